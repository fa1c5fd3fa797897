"""Plain-PyTorch generation shared by the framework glue and the applications: the batched, resumable
inference loop and its model families, prompt limits, result writers."""
