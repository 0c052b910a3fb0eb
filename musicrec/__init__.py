"""musicrec: offline pipeline and helpers for personal music recommendations."""

__version__ = "0.1.0"
