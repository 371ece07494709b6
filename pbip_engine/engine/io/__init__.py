"""File-system primitives every stage shares: atomic writes and JSON-safe values."""
