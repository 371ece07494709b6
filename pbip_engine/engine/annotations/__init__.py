"""QuPath annotations in and out: GeoJSON reading/writing and image-level tile labels from outlines."""
