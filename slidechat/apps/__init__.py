"""Applications: what the commands do (extract, screen, test, chat), on top of the glue, models, data
and evaluation."""
