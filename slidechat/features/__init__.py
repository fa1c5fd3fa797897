"""Patch encoders, the extraction pipeline, and feature-file I/O."""
