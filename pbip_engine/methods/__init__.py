"""Segmentation methods as plugins: one folder per method and a registry (see registry)."""
