"""Segmenting whole slides and images: tile plan, batched prediction, the stitching canvas, outputs."""

# Inference tiles overlap by half a tile: every interior pixel is predicted in four tile positions and
# Gaussian-blended. On the demo cohort (96-px tiles at the training crop) this lifted stage 2's whole-slide
# mIoU on all five stage-2 trainings measured, by +0.007 to +0.015 (mean +0.010) over 0.25, for 2.25x the
# tiles (BENCHMARKS.md, session 27); GlaS's protocol has used 0.5 since session 13.
SEGMENT_OVERLAP = 0.5
