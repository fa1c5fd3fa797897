"""Small helpers shared by every stage (atomic files, errors, logging)."""
