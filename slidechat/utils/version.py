"""The package version, in the bottom layer so that every output can record it (setup.py reads it here)."""

__version__ = "0.1.0"
