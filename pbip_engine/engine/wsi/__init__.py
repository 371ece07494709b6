"""Slide reading: one reader interface over cuCIM/tiffslide, tissue detection, and the mpp-first tile grid."""
