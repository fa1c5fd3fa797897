"""Training/test datasets, chat templates and collation."""
