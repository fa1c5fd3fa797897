"""Answer extraction, accuracy tables and caption metrics."""
