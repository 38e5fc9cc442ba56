"""Test support for the mesh service: generated tiny model checkpoints (no downloads)."""
