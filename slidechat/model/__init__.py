"""Slide encoder, projector and the LLM wrapper (plain PyTorch + transformers)."""
