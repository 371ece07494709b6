"""MPAMatch as a registered method: no bank, no CAM stage, no pseudo masks; stage 2 trains on exact masks
of some images plus the unlabelled rest (``OwnLabels``) with the MPAMatch task on a TransUNet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pbip_engine.methods.base import Method, OwnLabels, Stage2Defaults
from pbip_engine.methods.mpamatch.config import MpaMatchConfig
from pbip_engine.methods.registry import register_method


def labelled_split(
    cfg: MpaMatchConfig, spec: Any, truth_dir: Path | None
) -> tuple[list[str], dict[str, Path]]:
    """(all image ids, labelled id -> mask file), from the spec (+ the synthetic cohort's truth folder)."""
    from pbip_engine.methods.mpamatch.labels import (
        LabelError,
        MaskSource,
        choose_labelled,
        find_masks,
        image_ids,
    )

    ids = image_ids(spec)
    folder = cfg.masks or (str(truth_dir) if truth_dir is not None else None)
    if folder is None:
        raise LabelError("method.masks: give the folder of exact masks (named like the images)")
    masks = find_masks(folder, ids)
    lut = cfg.mask_lut if cfg.masks is not None else None

    def classes_of(image_id: str) -> set[int]:
        return MaskSource(masks[image_id], spec.class_names, lut).classes()

    chosen = choose_labelled(ids, masks, cfg, spec.run.seed, classes_of)
    return ids, {i: masks[i] for i in chosen}


def _image_hw(spec: Any, image_id: str) -> tuple[int, int] | None:
    """Level-0 (height, width) of one image, for checking its mask; None where unknown before the run."""
    d = spec.data
    if d.patches is not None:
        from pbip_engine.engine.ingest.datasets.glas import GlaSImages

        return tuple(GlaSImages(d.patches, "train").image(image_id).shape[:2])  # type: ignore[return-value]
    if d.slides:
        from pbip_engine.engine.wsi.slides import open_slide
        from pbip_engine.schemas.spec import expand_slides

        path = next(p for p in expand_slides(d.slides) if p.stem == image_id)
        with open_slide(path, mpp_override=1.0) as s:  # only its size is read
            w, h = s.dimensions
        return h, w
    return None


@register_method
class MpaMatchMethod(Method):
    name = "mpamatch"
    config_model = MpaMatchConfig
    stages = frozenset()
    summary = "MPAMatch (arXiv 2508.19574): semi-supervised TransUNet, UniMatch consistency + image/text prototype contrast"

    def stage2_defaults(self, cfg: MpaMatchConfig) -> Stage2Defaults:
        return Stage2Defaults(arch="transunet")

    def check_inputs(self, cfg: MpaMatchConfig, spec: Any) -> None:
        from pbip_engine.methods.mpamatch.labels import MaskSource
        from pbip_engine.methods.mpamatch.text import check_text_encoder

        if cfg.text_prototypes:
            check_text_encoder(cfg.text_encoder)
        if spec.data.synthetic is not None and cfg.masks is None:
            return  # the truth is written by the synth stage; the split is drawn the same way then
        _, labelled = labelled_split(cfg, spec, None)
        for image_id, path in labelled.items():
            MaskSource(path, spec.class_names, cfg.mask_lut).check(_image_hw(spec, image_id))

    def stage2_labels(self, cfg: MpaMatchConfig, spec: Any, truth_dir: Path | None) -> OwnLabels:
        from pbip_engine.methods.mpamatch.labels import AttachMasks

        ids, labelled = labelled_split(cfg, spec, truth_dir)
        lut = cfg.mask_lut if cfg.masks is not None else None
        attach = AttachMasks({k: str(v) for k, v in labelled.items()}, spec.class_names, lut)
        record = {
            "labelled": sorted(labelled),
            "unlabelled": sorted(set(ids) - set(labelled)),
            "seed": spec.run.seed,
        }
        return OwnLabels(labelled=sorted(labelled), attach=attach, unlabelled=cfg.semi,
                         repeat=cfg.labelled_repeat, record=record)  # fmt: skip

    def stage2_task(self, cfg: MpaMatchConfig, spec: Any, config: dict[str, Any]):
        return build_task(cfg, spec.class_names, backbone_pretrained=cfg.backbone_checkpoint or True,
                          amp=bool(config["loop"]["amp"]))  # fmt: skip


def build_task(
    cfg: MpaMatchConfig, class_names: list[str], *, backbone_pretrained: Any = True, amp: bool = True
):
    """The TransUNet (+ text tower when text prototypes are on) and the MPAMatch task around them."""
    from pbip_engine.engine.nn.transunet import build_transunet
    from pbip_engine.methods.mpamatch.task import MpaMatchTask
    from pbip_engine.methods.mpamatch.text import create_text_tower

    tower = create_text_tower(cfg.text_encoder) if cfg.text_prototypes else None
    tdim = int(tower.dim) if tower is not None else 0
    n_ctx = cfg.n_ctx if tower is not None and tower.takes_context else 0
    proj = cfg.proj_dim if cfg.image_prototypes or cfg.text_prototypes else 0  # no unused head (DDP)
    model = build_transunet(len(class_names) + 1, cfg.backbone, backbone_pretrained, proj_dim=proj,
                            text_dim=tdim, text_ctx=n_ctx, backbone_kwargs=cfg.backbone_kwargs)  # fmt: skip
    return MpaMatchTask(model, cfg, class_names, tower, amp=amp)
