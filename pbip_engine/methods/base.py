"""What a method is to the engine: its spec keys, its stage-1 training task, its CAM model, its stage-2 choice.

Every weakly supervised method in this engine shares the pipeline shape (tiles with image-level
labels -> a stage-1 network whose class activation maps become pseudo masks -> a fully supervised
stage-2 segmenter). A method differs in what stage 1 trains and how its CAMs are read, so that is all a
``Method`` says; the jobs, the training loop, checkpointing and the stage-2 loop are shared.

Importing a method package must stay cheap (the spec imports the registry): configs are pydantic
models, and torch-heavy code is imported inside the methods' functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from pbip_engine.engine.pseudo import MIN_WHITE_OBJECT_PX, WHITE_THRESHOLD

if TYPE_CHECKING:
    import numpy as np
    import torch

    from pbip_engine.engine.pseudo.crf import CrfKernels
    from pbip_engine.engine.training.task import TrainTask


class MethodConfig(BaseModel):
    """The ``method:`` section of a spec; each method subclasses it with ``name: Literal["<name>"]``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str

    def check_spec(self, spec: Any) -> None:
        """Raise ``ValueError`` (one line naming both keys) if this config cannot work with the rest of ``spec``
        (e.g. pooling sizes larger than the feature map at ``tiling.tile_px``); the spec calls it on parse."""


@dataclass
class Stage1Inputs:
    """What the pipeline hands a method for stage 1: classes, the bank (if built) and the tile encoder."""

    class_names: list[str]
    bank_dir: Path | None = None
    encoder: str = "efficientnet_lite0"
    encoder_checkpoint: str | None = None
    seed: int = 0  # stage1.seed: lets a method initialise its fresh parameters reproducibly

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_spec(cls, spec: Any, bank_dir: str | Path | None) -> Stage1Inputs:
        """From a parsed job spec (``schemas.spec.JobSpec``) and the bank stage's folder, if it ran."""
        return cls(
            class_names=list(spec.class_names),
            bank_dir=Path(bank_dir) if bank_dir else None,
            encoder=spec.encoder.name,
            encoder_checkpoint=spec.encoder.checkpoint,
            seed=int(spec.stage1.seed),
        )


@dataclass
class PseudoOptions:
    """How CAMs become masks (spec ``pseudo:``): background rule and its parameters.

    ``flip`` averages each tile's CAMs with those of its horizontal mirror (flipped back): OEEM's test-time
    flip, which evens out a CNN's left/right bias at tile borders for one extra forward pass.
    """

    background: str = "white"
    white_threshold: int = WHITE_THRESHOLD
    min_object: int = MIN_WHITE_OBJECT_PX  # px of the tile at tiling.mpp
    gamma: float = 10.0
    flip: bool = False
    crf: bool = False  # dense CRF post-processing (engine.pseudo.crf)
    crf_kernels: CrfKernels | None = None  # in px at tiling.mpp; None = their defaults


class CamModel(Protocol):
    """A trained stage-1 model as the pseudo stage uses it.

    ``predict_cams`` is what lets the pseudo stage stitch overlapping tiles into one CAM per slide before the
    argmax (``pseudo.stitch``); a model without it gets per-tile masks from ``predict_masks``. A model whose
    method sets ``region_cams`` also has ``predict_region(image, tile_px, options, features)``: the CAMs (and
    the features ``pseudo.image_prototypes`` reads) of one whole stitched image (``pseudo.cam_context``), and
    ``max_region_px(tile_px)``: the largest edge of such an image it reads in one call (None: any), which
    the pseudo stage's windows then fit.
    """

    def predict_masks(self, batch: dict[str, Any], options: PseudoOptions) -> np.ndarray:
        """uint8 ``B,H,W`` masks (0 = background, k = class k) for uint8 ``B,H,W,3`` images + multi-hot labels."""

    def predict_cams(self, batch: dict[str, Any], options: PseudoOptions) -> np.ndarray:
        """float ``B,N,H,W`` class maps in [0, 1] at the images' size, before label restriction and background."""


class MasksFromCams:
    """Mixin for a CAM model with ``predict_cams`` and ``cfg.mean/std``: masks = its CAMs through
    ``cams_to_mask`` with the spec's background rule (the same path the pseudo stage's stitching takes),
    and no cap on the pictures ``predict_region`` reads."""

    def max_region_px(self, tile_px: int) -> int | None:
        """The largest picture edge one ``predict_region`` call may take (None: any; the pseudo stage's
        ``region_px`` windows bound it)."""
        return None

    def predict_masks(self, batch: dict[str, Any], options: PseudoOptions) -> np.ndarray:
        from pbip_engine.engine.pseudo.cams import cams_to_mask
        from pbip_engine.engine.training.inputs import rgb_uint8

        cfg = self.cfg  # type: ignore[attr-defined]
        need_rgb = "white" in options.background or options.crf  # the CRF's pairwise term reads the RGB
        rgb = rgb_uint8(batch, cfg.mean, cfg.std) if need_rgb else None
        return cams_to_mask(
            self.predict_cams(batch, options), batch["labels"], options.background, rgb=rgb,  # type: ignore[attr-defined]
            white_threshold=options.white_threshold, min_size=options.min_object, power=options.gamma,
            crf=options.crf, crf_kernels=options.crf_kernels,
        )  # fmt: skip


def network_config(
    cfg: MethodConfig, config_cls: Any, renamed: dict[str, tuple[str, ...]] | None = None, **overrides: Any
) -> Any:
    """A method's ``method:`` keys as its network's dataclass config (``config_cls.from_dict``).

    Keys the network does not know (loop or pseudo-mask options) are left out, ``renamed`` maps a spec key to
    the field(s) it sets, and the backbone checkpoint path becomes ``pretrained`` (True = the packaged
    ImageNet weights): the one mapping every CAM method's network shares.
    """
    from dataclasses import fields

    known = {f.name for f in fields(config_cls)}
    d: dict[str, Any] = {}
    for key, value in cfg.model_dump().items():
        for target in (renamed or {}).get(key, (key,)):
            if target in known:
                d[target] = value
    d["pretrained"] = getattr(cfg, "backbone_checkpoint", None) or True
    return config_cls.from_dict({**d, **overrides})


@dataclass(frozen=True)
class Stage2Defaults:
    """The method's stage-2 recipe where the spec's ``segmenter:`` leaves it open.

    DeepLab-v3+ unless a method says otherwise: none of PBIP, LPD and gland publishes a stage 2 we can run as is
    (gland's paper trains a PSPNet-ResNeSt200), DeepLab-v3+ is their peers' template (MLPS, METHODS.md), and on the
    demo cohort it beat DeepLab-v2 on the same pseudo masks for each of the three (0.87-0.88 -> 0.92-0.93 whole-slide
    mIoU, BENCHMARKS.md sessions 41-42), training faster too.
    """

    arch: str = "deeplabv3plus"
    loss: str = "ce"


@dataclass
class OwnLabels:
    """A method that trains stage 2 on its own labels (exact masks of some images) instead of pseudo masks.

    ``attach`` is a picklable callable the segmenter stage maps over tile rows (Ray Data numpy batches with
    ``tile_id, slide_id, x, y, size0, tile_px, image``); it adds ``mask`` (PNG bytes, 255 = ignore) and
    ``labelled`` (bool). ``labelled`` names the images with masks; ``unlabelled`` keeps the other images'
    tiles in the training set (semi-supervised); each labelled tile is seen ``repeat`` times an epoch
    (None: about as often as the unlabelled tiles). ``record`` goes to the stage's manifest (the split).
    """

    labelled: list[str]
    attach: Any
    unlabelled: bool = True
    repeat: int | None = None
    record: dict[str, Any] | None = None


METHOD_STAGES: dict[str, str] = {
    "bank": "a prototype bank",
    "classnet": "a CAM network (stage 1)",
    "pseudo": "pseudo masks from CAMs",
}  # stage name -> what it makes: the pipeline stages a method may do without


class Method:
    """One weakly supervised method; subclasses are registered with ``methods.registry.register_method``."""

    name: ClassVar[str]
    config_model: ClassVar[type[MethodConfig]]
    # The method-specific stages this method runs, of METHOD_STAGES; the others show as "not needed" in run.json.
    # A method without a CAM stage (a semi-supervised one) drops "classnet" and "pseudo" and trains stage 2 on
    # its own labels.
    stages: ClassVar[frozenset[str]] = frozenset({"bank", "classnet", "pseudo"})
    summary: ClassVar[str] = ""
    # ``method:`` keys that ``pbip-engine demo --method NAME`` adds to this method's defaults (the demo is a
    # few hundred small tiles and two epochs: e.g. a warm-up counted in iterations must be shorter).
    demo_keys: ClassVar[dict[str, Any]] = {}
    # ``method:`` keys that only change how the trained stage-1 model's CAMs are read into pseudo masks, not
    # what stage 1 learns: changing one re-runs the pseudo stage and keeps the trained model (the classnet
    # stage's input hash leaves them out). ``load_cam_model`` must take them from the spec, not the checkpoint.
    readout_keys: ClassVar[frozenset[str]] = frozenset()
    # True when the CAM model offers ``predict_cams_and_features`` (CAMs as feature-prototype cosines), which
    # ``pseudo.image_prototypes`` needs.
    prototype_features: ClassVar[bool] = False
    # ``pseudo.image_prototypes`` where the spec leaves it unset (with stitching): on only where it was measured
    # to help (pbip and gland: GlaS and the demo cohort, BENCHMARKS.md sessions 22 and 30-32).
    image_prototypes_default: ClassVar[float] = 0.0
    # True when the CAM model offers ``predict_region`` (CAMs of a whole stitched image at the tiles' scale),
    # which ``pseudo.cam_context: regions`` needs; ``cam_context_default`` is that key where the spec leaves it
    # unset: regions only where it was measured to help (pbip: GlaS and the demo; lpd: the demo; BENCHMARKS.md session 24).
    region_cams: ClassVar[bool] = False
    cam_context_default: ClassVar[str] = "tiles"

    def readout(self, cfg: MethodConfig) -> dict[str, Any]:
        """The spec's values of ``readout_keys``, for ``load_cam_model`` to apply over the checkpoint's."""
        return {k: getattr(cfg, k) for k in self.readout_keys}

    def uses_stages(self, cfg: MethodConfig) -> frozenset[str]:
        """The method-specific stages this configuration runs (a method may need the bank only for some
        settings, e.g. prototypes initialised from it); ``stages`` unless a method overrides this."""
        return self.stages

    def stage1_task(self, cfg: MethodConfig, inputs: Stage1Inputs) -> TrainTask:
        """The stage-1 training task (trainable model + frozen helpers + loss)."""
        raise NotImplementedError

    def load_cam_model(
        self, cfg: MethodConfig, checkpoint: Path, inputs: Stage1Inputs, device: torch.device | str
    ) -> CamModel:
        """The trained stage-1 model from ``checkpoint`` (written by the loop), ready to make pseudo masks."""
        raise NotImplementedError

    def stage2_defaults(self, cfg: MethodConfig) -> Stage2Defaults:
        return Stage2Defaults()

    def check_labels(self, cfg: MethodConfig, labelled_tiles: dict[str, int]) -> str | None:
        """A one-line spec error (naming the key and value) if this configuration cannot train on a cohort
        with ``labelled_tiles`` (class name -> labelled tiles that carry it); None when it can. The stage-1
        stage asks before it trains."""
        return None

    def after_stage1(
        self,
        cfg: MethodConfig,
        checkpoint: Path,
        inputs: Stage1Inputs,
        out_dir: Path,
        tile_parquets: list[Path],
    ) -> dict[str, Any]:
        """Extra outputs of the trained stage-1 model written into its stage folder ``out_dir`` (e.g. a
        picture of what it learned); returns values for the stage's manifest. Default: nothing."""
        return {}

    def stage2_labels(self, cfg: MethodConfig, spec: Any, truth_dir: Path | None) -> OwnLabels | None:
        """Where stage 2's labels come from: None = the pseudo stage's masks (every CAM method)."""
        return None

    def stage2_task(self, cfg: MethodConfig, spec: Any, config: dict[str, Any]) -> TrainTask | None:
        """The stage-2 training task (runs in each Ray Train worker); None = ``SegmentationTask``."""
        return None

    def check_inputs(self, cfg: MethodConfig, spec: Any) -> None:
        """Checks of the method's inputs that ``pbip-engine validate`` runs before anything (raise ValueError).

        The default checks that ``method.levels`` are feature levels of ``method.backbone`` (for the methods
        that have both): a level the backbone lacks failed inside every Ray Train attempt of stage 1.
        """
        backbone, levels = getattr(cfg, "backbone", None), getattr(cfg, "levels", None)
        if isinstance(backbone, str) and levels:
            check_backbone_levels(backbone, levels)


def check_backbone_levels(backbone: str, levels: Sequence[int]) -> None:
    """ValueError naming ``method.levels`` (or ``method.backbone``) unless ``backbone`` returns a feature map at
    each of ``levels``.

    The backbone is built on the meta device (no weights, no memory; tens of milliseconds). A backbone that
    cannot be built there is not judged here: stage 1 builds it for real.
    """
    import torch

    from pbip_engine.engine.nn.backbones import BackboneError, create_backbone

    if len(set(levels)) != len(levels):  # negative levels count from the deepest, as in timm
        raise ValueError(f"method.levels {list(levels)}: distinct feature levels, e.g. [2, 3, 4]")
    try:
        with torch.device("meta"):
            create_backbone(backbone, pretrained=False, out_indices=tuple(levels))
    except (IndexError, AssertionError, BackboneError) as e:
        why = str(e) or type(e).__name__
        if "unknown backbone" in why:
            raise ValueError(f"method.backbone: {why}") from None
        raise ValueError(
            f"method.levels {list(levels)}: not feature levels of backbone {backbone!r} ({why})"
        ) from None
    except RuntimeError as e:
        if "Unknown model" in str(e):  # timm's words for a name it does not know
            raise ValueError(
                f"method.backbone: unknown backbone {backbone!r} (see timm.list_models())"
            ) from None
