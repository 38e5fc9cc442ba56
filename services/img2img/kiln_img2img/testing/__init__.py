"""Test helpers that build real-shaped models offline (no hub access)."""
