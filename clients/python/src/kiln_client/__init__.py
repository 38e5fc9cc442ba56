"""Kiln's Python client. The generated contracts live in the `kiln` package beside it."""

__version__ = "0.1.0"
