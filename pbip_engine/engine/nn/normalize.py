"""Input normalisation constants shared by encoders, segmentation networks, datasets and the predictor.

Torch-free, so datasets and the inference planner can import them without loading a framework. A model
stores the mean/std it was trained with in its config; these are only the defaults.
"""

from __future__ import annotations

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
