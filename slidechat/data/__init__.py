"""Words and files to tensors: the task vocabulary, the prompt-format registry, answer parsing, datasets and
collation, SlideBench and LLaMA-Factory files, image preparation, the synthetic dataset generators."""
