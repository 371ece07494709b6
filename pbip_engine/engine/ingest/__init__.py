"""Turning inputs into the tiles dataset: whole slides (tile_slide), patch sets (patch_tiles) and dataset adapters."""
