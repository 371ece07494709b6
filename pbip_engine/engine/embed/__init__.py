"""Tile embedding: the encoder registry and the batch embedder Ray Data maps over tiles."""
