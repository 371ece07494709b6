"""Segmenting whole slides and images: tile plan, batched prediction, the stitching canvas, outputs."""
