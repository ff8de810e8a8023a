"""Data loading (filled below)."""
