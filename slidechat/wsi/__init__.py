"""Open slides, segment tissue, and lay patch grids."""
