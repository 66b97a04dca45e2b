"""The fastbyol version: one string, imported by whoever records it (checkpoints, summaries, the start line)."""

__version__ = "0.1.0"
