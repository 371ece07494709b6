"""Prototype banks: cosine K-means sub-class prototypes from single-label tiles, and their contact sheet."""
