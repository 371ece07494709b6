"""The gland method (AAAI 2025) as a registered method: CCA + MPFP classifier CAMs, PLF in stage 2."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pbip_engine.methods.base import Method, Stage1Inputs, Stage2Defaults, network_config
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
    summary = (
        "gland (AAAI 2025): CAMs with Consistency Correlation Attention + MPFP pooling; PLF stage-2 loss"
    )

    def stage1_task(self, cfg: GlandConfig, inputs: Stage1Inputs) -> GlandTask:
        from pbip_engine.methods.gland.model import GlandNet
        from pbip_engine.methods.gland.task import GlandTask

        return GlandTask(GlandNet(net_config(cfg, inputs.n_classes)), cfg.new_parts_lr_mult)

    def load_cam_model(
        self, cfg: GlandConfig, checkpoint: Path, inputs: Stage1Inputs, device: torch.device | str
    ) -> GlandCamModel:
        from pbip_engine.methods.gland.cams import GlandCamModel

        return GlandCamModel(checkpoint, device)

    def stage2_defaults(self, cfg: GlandConfig) -> Stage2Defaults:
        return Stage2Defaults(loss="plf")
