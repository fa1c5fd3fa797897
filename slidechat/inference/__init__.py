"""Plain-PyTorch generation shared by the framework glue and the applications: the one batch step and
the resumable loop that drives it (``loop``), the model families it runs, the result writers."""
