"""PBIP as a registered method: ClassNet on bank prototypes (+ FG/BG matching through the bank encoder)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pbip_engine.methods.base import Method, Stage1Inputs, network_config
from pbip_engine.methods.pbip.config import CAM_READOUT_KEYS, PbipConfig
from pbip_engine.methods.registry import register_method

if TYPE_CHECKING:
    import torch

    from pbip_engine.methods.pbip.cams import PbipCamModel
    from pbip_engine.methods.pbip.classnet import ClassNetConfig
    from pbip_engine.methods.pbip.task import PbipTask


def classnet_config(cfg: PbipConfig, **overrides: Any) -> ClassNetConfig:
    """The spec's ``method:`` keys as ClassNet's config (the same names; the checkpoint path becomes ``pretrained``)."""
    from pbip_engine.methods.pbip.classnet import ClassNetConfig

    return network_config(cfg, ClassNetConfig, **overrides)


@register_method
class PbipMethod(Method):
    name = "pbip"
    config_model = PbipConfig
    summary = "PBIP (CVPR 2025): prototype-cosine CAMs on a bank of sub-class prototypes + FG/BG matching"
    readout_keys = CAM_READOUT_KEYS
    prototype_features = True
    region_cams = True
    cam_context_default = "regions"
    image_prototypes_default = 0.5

    def stage1_task(self, cfg: PbipConfig, inputs: Stage1Inputs) -> PbipTask:
        from pbip_engine.engine.embed.encoders import create_encoder
        from pbip_engine.methods.pbip.classnet import build_classnet, load_prototypes_from_bank
        from pbip_engine.methods.pbip.task import PbipTask

        if inputs.bank_dir is None:
            raise ValueError("pbip needs the bank stage's prototypes (bank_dir)")
        ccfg = classnet_config(cfg)
        protos, k_list, names = load_prototypes_from_bank(inputs.bank_dir)
        model = build_classnet(ccfg, protos, k_list, n_classes=len(names))
        encoder = create_encoder(inputs.encoder, inputs.encoder_checkpoint) if ccfg.use_sim else None
        return PbipTask(model, ccfg, encoder)

    def load_cam_model(
        self, cfg: PbipConfig, checkpoint: Path, inputs: Stage1Inputs, device: torch.device | str
    ) -> PbipCamModel:
        from pbip_engine.methods.pbip.cams import PbipCamModel

        return PbipCamModel(checkpoint, inputs.bank_dir, device, readout=self.readout(cfg))
