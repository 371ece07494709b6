"""The gland method (AAAI 2025) as a registered method: CCA + MPFP classifier CAMs; the paper's PLF stage-2 loss
is one key (``segmenter.loss: plf``), not the default (measured below)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pbip_engine.methods.base import Method, Stage1Inputs, network_config
from pbip_engine.methods.gland.config import GlandConfig
from pbip_engine.methods.registry import register_method

if TYPE_CHECKING:
    import torch

    from pbip_engine.methods.gland.cams import GlandCamModel
    from pbip_engine.methods.gland.model import GlandNetConfig
    from pbip_engine.methods.gland.task import GlandTask


def net_config(cfg: GlandConfig, n_classes: int) -> GlandNetConfig:
    """The spec's ``method:`` keys as the network's config (the checkpoint path becomes ``pretrained``)."""
    from pbip_engine.methods.gland.model import GlandNetConfig

    return network_config(cfg, GlandNetConfig, n_classes=n_classes)


@register_method
class GlandMethod(Method):
    name = "gland"
    config_model = GlandConfig
    stages = frozenset({"classnet", "pseudo"})
    prototype_features = True
    region_cams = True
    # Each slide's CAMs re-read against its own prototypes: pseudo masks 0.573 / 0.580 -> 0.649 / 0.650 on GlaS
    # (stage-1 seeds 0 / 1), 0.838 -> 0.870 on the demo cohort (BENCHMARKS.md, gland, sessions 30-32).
    image_prototypes_default = 0.5
    # No stage2_defaults: the base's DeepLab-v3+ and cross-entropy, not the paper's PLF. On the same pseudo masks
    # PLF was below CE on the demo (0.851 / 0.863 vs 0.884 / 0.880, two seeds; under its own masks' 0.874 where CE
    # is above) and level on GlaS testA (0.673 / 0.672 vs 0.683 / 0.671, inside the noise): BENCHMARKS.md, gland,
    # session 33.
    summary = "gland (AAAI 2025): CAMs with Consistency Correlation Attention + MPFP pooling (PLF: segmenter.loss: plf)"

    def stage1_task(self, cfg: GlandConfig, inputs: Stage1Inputs) -> GlandTask:
        from pbip_engine.methods.gland.model import GlandNet
        from pbip_engine.methods.gland.task import GlandTask

        return GlandTask(GlandNet(net_config(cfg, inputs.n_classes)), cfg.new_parts_lr_mult)

    def load_cam_model(
        self, cfg: GlandConfig, checkpoint: Path, inputs: Stage1Inputs, device: torch.device | str
    ) -> GlandCamModel:
        from pbip_engine.methods.gland.cams import GlandCamModel

        return GlandCamModel(checkpoint, device)
