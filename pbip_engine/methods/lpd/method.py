"""LPD as a registered method: learnable prototypes (no bank unless ``init: bank``) + InfoNCE + diversity."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pbip_engine.methods.base import Method, Stage1Inputs, network_config
from pbip_engine.methods.lpd.config import LpdConfig
from pbip_engine.methods.pbip.config import CAM_READOUT_KEYS
from pbip_engine.methods.registry import register_method

if TYPE_CHECKING:
    import torch

    from pbip_engine.methods.lpd.cams import LpdCamModel
    from pbip_engine.methods.lpd.model import LpdNetConfig
    from pbip_engine.methods.lpd.task import LpdTask

# spec key -> LpdNetConfig field, where the names differ
_RENAMED = {"merge": ("merge_train", "merge_eval")}


def lpdnet_config(cfg: LpdConfig, **overrides: Any) -> LpdNetConfig:
    """The spec's ``method:`` keys as LpdNet's config (the checkpoint path becomes ``pretrained``)."""
    from pbip_engine.methods.lpd.model import LpdNetConfig

    return network_config(cfg, LpdNetConfig, _RENAMED, **overrides)


@register_method
class LpdMethod(Method):
    name = "lpd"
    config_model = LpdConfig
    stages = frozenset({"classnet", "pseudo"})  # + the bank with init: bank (uses_stages)
    summary = (
        "LPD (2025): k learnable prototypes per class trained end to end (no bank), FG/BG InfoNCE and a "
        "prototype diversity regulariser"
    )
    demo_keys = {"warmup_iters": 10, "sim_size": 96}
    readout_keys = CAM_READOUT_KEYS
    prototype_features = True
    region_cams = True
    cam_context_default = "regions"

    def uses_stages(self, cfg: LpdConfig) -> frozenset[str]:
        """The bank only to initialise the prototypes from it (``init: bank``)."""
        return self.stages | {"bank"} if cfg.init == "bank" else self.stages

    def stage1_task(self, cfg: LpdConfig, inputs: Stage1Inputs) -> LpdTask:
        import torch

        from pbip_engine.engine.embed.encoders import create_encoder
        from pbip_engine.methods.lpd.model import build_lpdnet, initial_prototypes
        from pbip_engine.methods.lpd.task import LpdTask
        from pbip_engine.methods.pbip.classnet import load_prototypes_from_bank

        encoder = create_encoder(inputs.encoder, inputs.encoder_checkpoint) if cfg.use_sim else None
        enc_dim = int(encoder.info.dim) if encoder is not None else cfg.proto_dim
        bank = None
        proto_dim = cfg.proto_dim
        if cfg.init == "bank":
            if inputs.bank_dir is None:
                raise ValueError(
                    "method.init: 'bank' needs the bank stage's prototypes, and no bank was built"
                )
            protos, k_list, _ = load_prototypes_from_bank(inputs.bank_dir)
            bank, proto_dim = (protos, k_list), int(protos.shape[1])
        ncfg = lpdnet_config(cfg, enc_dim=enc_dim, proto_dim=proto_dim)
        torch.manual_seed(inputs.seed)  # the fresh heads, psi and prototypes start the same for one seed
        p0 = initial_prototypes(inputs.n_classes, cfg.k, proto_dim, bank, seed=inputs.seed)
        return LpdTask(build_lpdnet(ncfg, inputs.n_classes, p0), ncfg, encoder)

    def load_cam_model(
        self, cfg: LpdConfig, checkpoint: Path, inputs: Stage1Inputs, device: torch.device | str
    ) -> LpdCamModel:
        from pbip_engine.methods.lpd.cams import LpdCamModel

        return LpdCamModel(checkpoint, device, readout=self.readout(cfg))

    def check_labels(self, cfg: LpdConfig, labelled_tiles: dict[str, int]) -> str | None:
        few = {c: n for c, n in labelled_tiles.items() if n < cfg.k}
        if few:
            return (
                f"method.k: {cfg.k} prototypes per class but class(es) {few} have fewer labelled tiles "
                "(lower method.k)"
            )
        return None

    def after_stage1(
        self, cfg: LpdConfig, checkpoint: Path, inputs: Stage1Inputs, out_dir: Path, tile_parquets: list[Path]
    ) -> dict[str, Any]:
        """The prototype atlas (``atlas.png``): the learned counterpart of the bank's gallery."""
        if not cfg.atlas_tiles:
            return {}
        from pbip_engine.methods.lpd.atlas import write_lpd_atlas
        from pbip_engine.methods.lpd.cams import load_lpdnet

        model, ncfg = load_lpdnet(checkpoint, "cpu")
        return write_lpd_atlas(
            out_dir / "atlas.png", model, ncfg, inputs.class_names, tile_parquets, cfg.atlas_tiles
        )
