"""Pseudo masks: from CAMs to per-pixel labels, and scoring them against truth where it exists."""
