"""File-system primitives every stage shares: atomic writes, JSON-safe values, checked image decoding."""
