"""Writers of what users open: pyramidal (OME-)TIFF masks and QC overlays."""
