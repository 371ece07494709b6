"""The job spec (``train.yaml``): one pydantic model per section, unknown keys rejected.

Relative paths resolve against the spec file's folder, so a spec means the same thing wherever it is
run from. Every error names the key path and the bad value (``SpecError``), and is raised before any
output is written.
"""

from __future__ import annotations

import glob
import json
import re
import reprlib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from pbip_engine.engine.inference import SEGMENT_OVERLAP
from pbip_engine.engine.wsi.slide_ids import SlideIdError, check_unique_ids
from pbip_engine.methods.base import MIN_WHITE_OBJECT_PX, WHITE_THRESHOLD, MethodConfig

URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class SpecError(ValueError):
    """A spec problem, already phrased for the user (file, key path, bad value)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Colour = tuple[int, int, int]


class ClassDef(_Section):
    name: str = Field(min_length=1)
    color: Colour

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: Colour) -> Colour:
        if any(c < 0 or c > 255 for c in v):
            raise ValueError(f"colour components must be 0..255, got {list(v)}")
        return v


class RunSection(_Section):
    name: str = "run"
    output: str = Field(
        description="output directory; on a cluster a shared filesystem mounted at the same path on every "
        "node (a URI such as s3:// is refused: mount the bucket instead)"
    )
    seed: int = 0

    @property
    def is_uri(self) -> bool:
        return bool(URI_RE.match(self.output))


class SynthSection(_Section):
    slides: int = Field(4, ge=1)
    size: int = Field(4096, ge=512)
    seed: int = 0
    mpp: float = Field(0.5, gt=0)


class DataSection(_Section):
    slides: list[str] = Field(default_factory=list, description="slide paths or globs")
    synthetic: SynthSection | None = None
    annotations: str | None = Field(None, description="folder of QuPath GeoJSON, <slide stem>.geojson")
    labels_csv: str | None = Field(None, description="slide-level labels: slide,<class>... (0/1)")
    mpp_overrides: str | None = Field(None, description="CSV slide,mpp for slides without mpp metadata")
    patches: str | None = Field(None, description="a patch dataset root instead of slides")
    patch_format: Literal["bcss_wsss", "luad_histoseg", "glas", "folder_csv"] | None = None
    patch_mpp: float | None = Field(
        None,
        gt=0,
        description="µm/px of the patch images (GlaS 20x: ~0.62); default tiling.mpp. Whole-image datasets "
        "(GlaS) are then cut on the tiling grid: tile_px·tiling.mpp/patch_mpp native px every "
        "(1 - tiling.overlap) of that, each resized to tiling.tile_px, so a coarser tiling.mpp trains on "
        "more context per pixel of compute",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        sources = [bool(self.slides), self.synthetic is not None, self.patches is not None]
        if sum(sources) == 0:
            raise ValueError("give one of data.slides, data.synthetic or data.patches")
        if self.slides and self.synthetic is not None:
            raise ValueError(
                "data.slides and data.synthetic are exclusive (the synthetic cohort makes its slides)"
            )
        if self.patches is not None and self.patch_format is None:
            raise ValueError("data.patches needs data.patch_format")
        return self


class TissueSection(_Section):
    target_mpp: float = Field(8.0, gt=0)
    blur: int = Field(7, ge=1)
    sat_threshold: float | None = Field(None, ge=0, le=1)
    min_saturation: float = Field(0.05, ge=0, le=1)
    close_radius: int = Field(2, ge=0)
    min_area_um2: float = Field(20000.0, ge=0)
    min_hole_um2: float = Field(10000.0, ge=0)
    exclude_dark: bool = True


class TilingSection(_Section):
    mpp: float = Field(0.5, gt=0, description="target µm/px of the tiles")
    tile_px: int = Field(224, ge=32)
    overlap: float = Field(0.0, ge=0, lt=1)
    min_tissue: float = Field(0.5, ge=0, le=1)
    label_min_fraction: float = Field(0.1, gt=0, le=1)
    jpeg_quality: int = Field(90, ge=50, le=100)
    backends: list[Literal["cucim", "tiffslide"]] = Field(default_factory=lambda: ["cucim", "tiffslide"])
    tissue: TissueSection = Field(default_factory=TissueSection)


class EncoderSection(_Section):
    name: str = "efficientnet_lite0"
    checkpoint: str | None = None
    batch_size: int = Field(64, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    tiles: Literal["all", "bank"] = Field(
        "all",
        description="all: embed every tile (the embeddings are a product of their own); bank: only the "
        "labelled single-label tiles, the only ones the bank builds from (GlaS: 19.5 % of the tiles)",
    )


class BankSection(_Section):
    k: int = Field(3, ge=1)
    k_per_class: dict[str, int] = Field(default_factory=dict)
    n_k: int = Field(100, ge=1)
    max_white: float = Field(0.5, ge=0, le=1)
    prototype: Literal["mean_topk", "centroid"] = "mean_topk"
    seed: int = 0
    allow_majority_fallback: bool = False
    holdout_fraction: float = Field(0.2, ge=0, lt=1)


class Stage1Section(_Section):
    """The stage-1 training loop, whatever the method (the method's own keys live under ``method:``)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(10, ge=1)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.003, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    schedule: Literal["constant", "poly"] = Field("constant", description="poly: lr * (1 - step/total)^0.9")
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="labelled tiles held out (by a hash of the tile id) to pick best.pt; 0 = the last epoch",
    )
    amp: bool = True
    seed: int = 0


class CrfOptions(_Section):
    """The dense CRF's kernels (``pseudo.crf``), in µm so that they mean the same at any ``tiling.mpp``.

    Defaults: measured on whole GlaS images at 1.24 µm/px, where an appearance kernel of 6-12 µm (about a
    cell) with a light smoothness term lifts the pseudo masks by 0.012-0.018 mIoU and LPD's reference
    kernels (smoothness 15 px / weight 30, appearance 10 px / colour 20 / weight 50 at 0.62 µm/px) lose 0.016.
    """

    smoothness_um: float = Field(3.7, gt=0, description="Gaussian (position-only) kernel width")
    smoothness_weight: float = Field(3.0, ge=0)
    appearance_um: float = Field(10.0, gt=0, description="bilateral kernel's spatial width")
    appearance_rgb: float = Field(13.0, gt=0, description="bilateral kernel's colour width (0-255 units)")
    appearance_weight: float = Field(10.0, ge=0)
    iterations: int = Field(5, ge=1, le=50, description="mean-field iterations")

    def kernels(self, mpp: float) -> Any:
        """The kernels in px at ``mpp`` µm/px (``engine.pseudo.crf.CrfKernels``)."""
        from pbip_engine.engine.pseudo.crf import CrfKernels

        return CrfKernels(self.smoothness_um / mpp, self.smoothness_weight, self.appearance_um / mpp,
                          self.appearance_rgb, self.appearance_weight, self.iterations)  # fmt: skip


class PseudoSection(_Section):
    background: Literal["none", "white", "power"] = "white"
    white_threshold: int = Field(
        WHITE_THRESHOLD,
        ge=0,
        le=255,
        description="white prior: grey above this is glass (225 keeps pale stroma)",
    )
    min_object: int = Field(
        MIN_WHITE_OBJECT_PX,
        ge=0,
        description="white prior: smallest glass region, in px of the tile at tiling.mpp (scale by 1/mpp² "
        "to keep an area in µm²)",
    )
    gamma: float = Field(10.0, gt=0)
    stitch: bool = Field(
        True,
        description="average the CAMs of overlapping tiles per slide before the argmax (OEEM): one label "
        "per pixel; false = each tile's own argmax",
    )
    overlap_labels: Literal["intersect", "own"] = Field(
        "intersect",
        description="with stitch: a pixel takes only the classes that every tile over it lists (a patch "
        "label holds for all its pixels, so a single-label neighbour settles the overlap); own = each "
        "tile's own labels",
    )
    fill_holes: list[str] = Field(
        default_factory=list,
        description="with stitch: classes that take every region they fully enclose on a slide's stitched "
        "mask (up to max_hole_px), e.g. gland, whose textureless lumens the CAMs leave to the stroma class",
    )
    max_hole_px: int | None = Field(
        None,
        ge=1,
        description="fill_holes: largest hole filled, in px at tiling.mpp (scale by 1/mpp² to keep an area "
        "in µm²); null = any enclosed region",
    )
    ignore_uncertain: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="with segmenter.crop_px: this fraction of each slide's pixels that the CAMs decide (the "
        "smallest margins between the two best allowed classes) is left unlabelled in the stitched regions "
        "stage 2 trains on; the tile masks and their scores keep every label",
    )
    image_prototypes: float | None = Field(
        None,
        ge=0,
        le=1,
        description="with stitch: re-read each slide's CAMs against class prototypes taken from that slide's own "
        "features (SIPE): the seeds are the pixels its labels settle plus this fraction of the CAM-decided "
        "pixels with the largest margins; 0 = off; null = the method's default (pbip, gland 0.5; others 0). Needs a "
        "method whose CAM model gives its features (pbip, lpd, gland)",
    )
    image_prototype_weight: float = Field(
        0.75,
        gt=0,
        le=1,
        description="image_prototypes: weight of the slide-specific CAMs against the cohort's (1 = theirs alone)",
    )
    image_prototype_k: int = Field(
        1,
        ge=1,
        le=16,
        description="image_prototypes: prototypes per class and slide (cosine K-means of the class's seeds; a "
        "pixel is scored by the nearest). 1 = their mean, SIPE's; GlaS masks gain ~0.01 with 2",
    )
    cam_context: Literal["tiles", "regions"] | None = Field(
        None,
        description="with stitch: tiles = each tile's CAMs read on the tile alone, then averaged where tiles "
        "overlap; regions = read on the picture a slide's labelled tiles make together (in windows of "
        "region_px with a tile of context, smaller where the CAM model caps one read: gland), so every tile's "
        "CAM sees its neighbours; null = the method's default (pbip, lpd: regions; others tiles). regions "
        "needs a method that reads whole images (pbip, lpd, gland; gland's attention made it ~11x slower than "
        "tiles on the demo)",
    )
    region_px: int = Field(
        512,
        ge=16,
        description="with stitch: each slide's pseudo-labelled tiles are also pasted into regions of at most "
        "this many px a side (at tiling.mpp), which stage 2 crops from (segmenter.crop_px)",
    )
    block_px: int = Field(
        4096,
        ge=256,
        description="with stitch: a slide whose labelled tiles span more than this many px a side (at "
        "tiling.mpp) is read and stitched in blocks of this size, each with two tiles of context around it, "
        "so memory stays bounded on whole slides labelled throughout (slide-level labels): ~2.3 GB a block "
        "at 4096 px, 0.9 GB at 2048 (four classes, half-overlapping tiles); a slide that fits is one block "
        "(every patch image)",
    )
    flip: bool = Field(False, description="test-time flip: average each tile's CAMs with its mirror's")
    crf: bool = Field(
        False,
        description="dense CRF on the class scores and pixels (LPD's post-processing; needs the optional "
        "package pydensecrf2): with stitch, once over each slide's stitched canvas in windows of region_px, "
        "else per tile",
    )
    crf_options: CrfOptions = Field(default_factory=CrfOptions)
    heatmaps: bool = True


class PlfOptions(_Section):
    """Purified Labels Filtration (``segmenter.loss: plf``); defaults = the gland paper, Eq. 11."""

    normalize: Literal["mean", "range"] = Field(
        "mean",
        description="divide the spatial softmax of -CE by its mean (paper) or max-min (wsss_gland code)",
    )
    confidence: Literal["max_minus_min", "max", "none"] = Field(
        "max_minus_min",
        description="pixel confidence: max-min of the class softmax (paper) or its max (code); none = the "
        "loss weight alone (OEEM's loss, which PLF extends; GlaS testA 0.761 -> 0.737 against CE, BENCHMARKS.md "
        "session 37)",
    )


class SegmenterSection(_Section):
    arch: Literal["deeplabv2", "deeplabv3plus"] | None = Field(
        None, description="default: the method's choice"
    )
    loss: Literal["ce", "ce_dice", "plf"] | None = Field(
        None,
        description="pixel loss: cross-entropy, cross-entropy + soft Dice, or PLF (gland paper); default: the "
        "method's choice",
    )
    plf: PlfOptions = Field(default_factory=PlfOptions)
    dice_weight: float = Field(
        1.0, gt=0, description="loss: ce_dice: the weight of the Dice term beside the CE"
    )
    class_weights: Literal["balanced"] | list[float] | None = Field(
        None,
        description="per-class weights of the pixel loss: 'balanced' = inverse pixel frequency in the pseudo "
        "masks (stage 2 otherwise amplifies their class imbalance), or one weight per class, background "
        "first; None = unweighted",
    )
    separable: bool = Field(
        True,
        description="deeplabv3plus: depthwise-separable atrous and decoder convolutions, as in its paper "
        "(2x faster training steps on CPU); false = dense 3x3 convolutions",
    )
    backbone: str = "efficientnet_lite0"
    backbone_checkpoint: str | None = None
    backbone_init: Literal["imagenet", "stage1"] = Field(
        "imagenet",
        description="where stage 2's backbone starts: 'imagenet' = the packaged ImageNet weights (or "
        "backbone_checkpoint); 'stage1' = the stage-1 model's backbone, already fine-tuned on the cohort's "
        "tissue (method.backbone must be segmenter.backbone); the head starts fresh either way",
    )
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="pseudo-labelled tiles held out to pick best.pt by mIoU; 0 = the last epoch",
    )
    crop_px: int | None = Field(
        None,
        ge=32,
        description="train on random crops of this edge (at tiling.mpp) of the stitched pseudo-mask regions "
        "(pseudo.region_px), with zoom and colour jitter, and segment with the same context; "
        "None = on the pseudo-labelled tiles themselves",
    )
    zoom: tuple[float, float] = Field(
        (0.75, 2.0), description="crop_px: random magnification range of a crop (> 1 zooms in)"
    )
    jitter: float = Field(
        0.2, ge=0, lt=1, description="crop_px: brightness/contrast/saturation jitter, ± this"
    )
    crops_per_epoch: float = Field(
        2.0,
        gt=0,
        description="crop_px: crops per epoch, as a multiple of the regions' area over a crop's area",
    )
    ema_epochs: float = Field(
        0.0,
        ge=0,
        description="ship (and validate) an exponential moving average of the weights with this time constant "
        "in epochs instead of the last step's weights; 0 = off",
    )
    amp: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _zoom(self) -> SegmenterSection:
        if not 0 < self.zoom[0] <= self.zoom[1]:
            raise ValueError(f"segmenter.zoom must be 0 < min <= max, got {list(self.zoom)}")
        return self


class SegmentSection(_Section):
    slides: list[str] = Field(
        default_factory=list, description="slides to segment; empty = the training slides"
    )
    overlap: float = Field(
        SEGMENT_OVERLAP,
        ge=0,
        lt=1,
        description="inference tiles overlap by this fraction and are Gaussian-blended; 0.5 beat 0.25 on every "
        "demo training measured (+0.010 mIoU mean) for 2.25x the tiles",
    )
    tile_px: int | None = Field(
        None,
        ge=16,
        description="inference tile edge at the model's µm/px; default: the crop stage 2 trained on",
    )
    tta: bool = Field(True, description="average each tile's logits with its two mirrors (3 passes per tile)")
    tta_scales: list[float] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="with tta: the mirrors at each of these scales of the tile, resized back (3 passes per "
        "scale); e.g. [0.75, 1.0, 1.25] for evaluation",
    )

    @field_validator("tta_scales")
    @classmethod
    def _positive_scales(cls, v: list[float]) -> list[float]:
        if any(x <= 0 for x in v):
            raise ValueError(f"segment.tta_scales must all be > 0, got {v}")
        return v

    @property
    def tta_option(self) -> bool | tuple[float, ...]:
        """What the predictor takes: False, True (mirrors at scale 1) or the scales."""
        if not self.tta:
            return False
        return True if list(self.tta_scales) == [1.0] else tuple(self.tta_scales)

    blend: Literal["gaussian", "average"] = "gaussian"
    output_mpp: float | None = Field(None, gt=0, description="mask µm/px; default = the model's tile µm/px")
    batch_size: int = Field(16, ge=1)
    input_mpp: float | None = Field(
        None,
        gt=0,
        description="µm/px of the inputs, overriding their files (needed by plain PNG/JPEG images such as GlaS)",
    )
    whole_image: bool = Field(False, description="segment every pixel (no tissue detection): patch images")
    truth: str | None = Field(
        None, description="folder of truth masks named like the inputs (<stem>.png|.tif): score each output"
    )
    truth_lut: list[int] | None = Field(
        None,
        description="remap raw truth values to ours first, e.g. GlaS [2, 1] (0 non-gland -> 2, 1 gland -> 1)",
    )


class AutoscaleSection(_Section):
    min: int = Field(1, ge=0)
    max: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _order(self) -> AutoscaleSection:
        if self.min > self.max:
            raise ValueError(f"autoscale.min ({self.min}) > autoscale.max ({self.max})")
        return self


class ResourcesSection(_Section):
    workers: int = Field(1, ge=1, description="Ray Train workers (stage 1 and stage 2)")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    autoscale: AutoscaleSection = Field(default_factory=AutoscaleSection)
    max_failures: int = Field(2, ge=0)
    local_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local Ray (default: all)")
    train_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of each Ray Train worker (stage 1, stage 2); default: cpus_per_worker. "
        "A worker whose shard fits train_cache_mb reads it before the first step, so the CPUs kept for "
        "actor pools (e.g. cpus_per_worker: 1 for two segment actors on 2 cores) sit idle while it trains",
    )
    train_cache_mb: float = Field(
        1024,
        ge=0,
        description="a Train worker reads each of its shards (the training rows, and the validation rows, "
        "encoded) into memory before the first step when that shard fits in this many MiB, and draws every "
        "epoch from there instead of streaming it through Ray Data (so at most twice this per worker); larger "
        "shards stream every epoch; 0 = always stream",
    )
    max_slide_pixels_per_byte: float = Field(
        10_000,
        ge=0,
        description="refuse a slide declaring more level-0 pixels per byte of its file (a corrupt header or "
        "a decompression bomb would size arrays from them); real scans stay under ~1000; 0 = no check",
    )


class JobSpec(_Section):
    run: RunSection
    data: DataSection
    classes: list[ClassDef] = Field(min_length=1)
    tiling: TilingSection = Field(default_factory=TilingSection)
    encoder: EncoderSection = Field(default_factory=EncoderSection)
    bank: BankSection = Field(default_factory=BankSection)
    method: SerializeAsAny[MethodConfig] = Field(default_factory=lambda: _default_method())
    stage1: Stage1Section = Field(default_factory=Stage1Section)
    pseudo: PseudoSection = Field(default_factory=PseudoSection)
    segmenter: SegmenterSection = Field(default_factory=SegmenterSection)
    segment: SegmentSection = Field(default_factory=SegmentSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)

    @model_validator(mode="after")
    def _classes(self) -> JobSpec:
        names = [c.name for c in self.classes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"class names must be unique, repeated: {dup}")
        if any(n.lower() in ("background", "bg") for n in names):
            raise ValueError("'background' is implicit (mask value 0); do not list it in classes")
        unknown = sorted(set(self.bank.k_per_class) - set(names))
        if unknown:
            raise ValueError(f"bank.k_per_class names unknown classes {unknown}; classes are {names}")
        unknown = sorted(set(self.pseudo.fill_holes) - set(names))
        if unknown:
            raise ValueError(f"pseudo.fill_holes names unknown classes {unknown}; classes are {names}")
        return self

    @model_validator(mode="after")
    def _stitching_needed(self) -> JobSpec:
        if self.segmenter.crop_px is not None and not self.pseudo.stitch:
            raise ValueError(
                f"segmenter.crop_px ({self.segmenter.crop_px}) crops the stitched regions: it needs "
                "pseudo.stitch: true (or leave segmenter.crop_px unset to train on the tiles)"
            )
        if self.pseudo.ignore_uncertain and self.segmenter.crop_px is None:
            raise ValueError(
                f"pseudo.ignore_uncertain ({self.pseudo.ignore_uncertain}) unlabels pixels of the stitched "
                "regions, which only segmenter.crop_px trains on: set segmenter.crop_px, or leave it at 0"
            )
        if self.pseudo.image_prototypes is None:  # the method's default where stitching allows it
            from pbip_engine.methods import get_method

            default = get_method(self.method.name).image_prototypes_default if self.pseudo.stitch else 0.0
            self.pseudo.image_prototypes = default
        if self.pseudo.cam_context is None:  # the method's default where stitching allows it
            from pbip_engine.methods import get_method

            region = self.pseudo.stitch and get_method(self.method.name).cam_context_default == "regions"
            self.pseudo.cam_context = "regions" if region else "tiles"
        if self.pseudo.cam_context == "regions" and not self.pseudo.stitch:
            raise ValueError(
                "pseudo.cam_context: regions reads each slide's stitched tiles as one picture: it needs "
                "pseudo.stitch: true"
            )
        if self.pseudo.image_prototypes and not self.pseudo.stitch:
            raise ValueError(
                f"pseudo.image_prototypes ({self.pseudo.image_prototypes}) takes prototypes from each slide's "
                "stitched masks: it needs pseudo.stitch: true"
            )
        if self.pseudo.fill_holes and not self.pseudo.stitch:
            raise ValueError(
                f"pseudo.fill_holes ({self.pseudo.fill_holes}) fills holes on the stitched masks: it needs "
                "pseudo.stitch: true"
            )
        return self

    @model_validator(mode="after")
    def _bank_tiles_embedded(self) -> JobSpec:
        if self.encoder.tiles == "bank" and self.bank.allow_majority_fallback:
            raise ValueError(
                "encoder.tiles: bank embeds only single-label tiles, but bank.allow_majority_fallback: true "
                "builds from multi-label tiles too: set encoder.tiles: all, or the fallback to false"
            )
        return self

    @model_validator(mode="after")
    def _class_weights_fit(self) -> JobSpec:
        w = self.segmenter.class_weights
        if isinstance(w, list) and (len(w) != len(self.classes) + 1 or min(w) < 0):
            raise ValueError(
                f"segmenter.class_weights: {len(w)} weight(s) {w}; it needs {len(self.classes) + 1} "
                f"non-negative weights, background first, then one per entry of classes {self.class_names}"
            )
        return self

    @model_validator(mode="after")
    def _segmenter_init(self) -> JobSpec:
        s = self.segmenter
        if s.backbone_init != "stage1":
            return self
        if s.backbone_checkpoint:
            raise ValueError(
                "segmenter.backbone_init: stage1 starts from the stage-1 model's backbone, and "
                f"segmenter.backbone_checkpoint ({s.backbone_checkpoint}) names another start: set one of them"
            )
        from pbip_engine.methods import get_method

        if "classnet" not in get_method(self.method.name).uses_stages(self.method):
            raise ValueError(
                f"segmenter.backbone_init: stage1, but method {self.method.name!r} trains no stage-1 model: "
                "use imagenet"
            )
        stage1 = getattr(self.method, "backbone", None)
        if stage1 != s.backbone:
            raise ValueError(
                f"segmenter.backbone_init: stage1 needs the stage-1 backbone, method.backbone {stage1!r}, to be "
                f"segmenter.backbone ({s.backbone!r})"
            )
        return self

    @model_validator(mode="after")
    def _method_fits(self) -> JobSpec:
        self.method.check_spec(self)  # settings of the method that other sections can rule out
        return self

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def class_colors(self) -> list[Colour]:
        return [tuple(c.color) for c in self.classes]

    def __reduce__(self):
        # The parsed class is built from the method registry at run time (see spec_model), so pickle
        # rebuilds a spec from its (already resolved) values instead of looking the class up by name.
        return (_rebuild_spec, (self.model_dump(mode="json"),))

    def section_json(self, *names: str, drop: dict[str, Iterable[str]] | None = None) -> str:
        """Canonical JSON of some sections: what a stage's manifest hash is computed from.

        ``drop`` leaves keys out of a section (section -> keys), for a stage whose output they do not change.
        """
        d = self.model_dump(mode="json")
        out = {n: d[n] for n in names}
        for section, keys in (drop or {}).items():
            if isinstance(out.get(section), dict):
                gone = set(keys)
                out[section] = {k: v for k, v in out[section].items() if k not in gone}
        return json.dumps(out, sort_keys=True)


# -- loading ------------------------------------------------------------------------------------

_PATH_KEYS = [
    ("data", "annotations"),
    ("data", "labels_csv"),
    ("data", "mpp_overrides"),
    ("data", "patches"),
    ("encoder", "checkpoint"),
    ("method", "backbone_checkpoint"),
    ("method", "masks"),
    ("segmenter", "backbone_checkpoint"),
    ("segment", "truth"),
]


def _rebuild_spec(values: dict[str, Any]) -> JobSpec:
    return spec_model().model_validate(values)


def _default_method() -> MethodConfig:
    from pbip_engine.methods import get_method

    return get_method("pbip").config_model()


_SPEC_MODEL: dict[int, type[JobSpec]] = {}


def spec_model() -> type[JobSpec]:
    """JobSpec with ``method:`` as a union of every registered method's keys, discriminated by ``name``.

    Built from the method registry when a spec is parsed (and rebuilt when a method is registered), so a
    method added at run time (a plugin, a test's toy method) is validated like the built-in ones.
    """
    from pbip_engine.methods.registry import METHODS, registry_version

    version = registry_version()
    if version not in _SPEC_MODEL:
        models = tuple(m.config_model for m in METHODS.values())
        union = models[0] if len(models) == 1 else Annotated[Union[models], Field(discriminator="name")]  # noqa: UP007
        _SPEC_MODEL.clear()
        _SPEC_MODEL[version] = create_model(
            "JobSpecWithMethods", __base__=JobSpec, method=(union, Field(default_factory=_default_method))
        )
    return _SPEC_MODEL[version]


# Where the keys of the pre-plugin ``classnet:`` section went (PBIP's own keys moved under ``method:``).
_LOOP_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "val_fraction", "amp")


def _legacy_classnet(raw: dict[str, Any], source: str) -> None:
    old = raw.get("classnet")
    if old is None:
        return
    keys = list(old) if isinstance(old, dict) else []
    moves = [f"classnet.{k} -> {'stage1' if k in _LOOP_KEYS else 'method'}.{k}" for k in keys]
    raise SpecError(
        f"{source}: the 'classnet' section was split: method keys go under 'method:' (with name: pbip) and "
        f"training-loop keys under 'stage1:'" + (f"; move {', '.join(moves)}" if moves else "")
    )


def _resolve(value: str, base: Path) -> str:
    if URI_RE.match(value):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 3, 4, 4, 60, 60
ECHO_MAX_CHARS = 120  # what an error message may quote of the user's value
MAX_ERRORS_SHOWN = 20
MAX_SPEC_BYTES = 1_000_000  # a job spec is a few KB; anything this large is not one
MAX_SPEC_NODES = 100_000  # YAML nodes after expanding aliases (a 560-byte alias bomb expands to millions)


def short_repr(value: Any, limit: int = ECHO_MAX_CHARS) -> str:
    """A bounded repr: nested and long values are elided, so an error never echoes a huge input."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_errors(err: ValidationError, source: str, raw: dict[str, Any]) -> str:
    lines = [f"{source}: {err.error_count()} problem(s) in the job spec"]
    for e in err.errors()[:MAX_ERRORS_SHOWN]:
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = f"unknown key {short_repr(loc)} (not part of the spec; check the spelling)"
        else:
            msg = f"{loc}: {e['msg'].removeprefix('Value error, ')}"
            # A section's own check names what is wrong; echoing the whole section (a dict) is only noise.
            if "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict):
                msg += f" (got {short_repr(e['input'])})"
        lines.append(f"  - {msg if len(msg) <= 400 else msg[:397] + '...'}")
    if err.error_count() > MAX_ERRORS_SHOWN:
        lines.append(f"  - ... and {err.error_count() - MAX_ERRORS_SHOWN} more")
    return "\n".join(lines)


def _path_problem(value: str) -> str | None:
    """Why ``value`` cannot be a file path on this OS (checked before any file-system call sees it)."""
    if "\x00" in value:
        return "contains a NUL character"
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not encodable as UTF-8 (a lone surrogate?)"
    if len(encoded) > 4096:
        return f"is {len(encoded)} bytes long (paths are at most 4096)"
    if any(len(part.encode("utf-8")) > 255 for part in value.split("/")):
        return "has a component longer than 255 bytes"
    return None


def _check_path_strings(spec: JobSpec, source: str) -> None:
    values = [("run.output", spec.run.output)]
    values += [(f"{sec}.{key}", getattr(getattr(spec, sec), key, None)) for sec, key in _PATH_KEYS]
    values += [(f"data.slides[{i}]", v) for i, v in enumerate(spec.data.slides)]
    values += [(f"segment.slides[{i}]", v) for i, v in enumerate(spec.segment.slides)]
    for key, val in values:
        why = _path_problem(val) if isinstance(val, str) else None
        if why:
            raise SpecError(f"{source}: {key}: the path {short_repr(val)} {why}")


def parse_spec(raw: dict[str, Any], base_dir: Path | str = ".", source: str = "<spec>") -> JobSpec:
    """Validate a spec dict; relative paths resolve against ``base_dir``."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping, got {type(raw).__name__}")
    base = Path(base_dir).resolve()
    _legacy_classnet(raw, source)
    try:
        spec = spec_model().model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_errors(err, source, raw)) from None
    _check_path_strings(spec, source)
    # Resolve paths after validation so errors show what the user wrote.
    if not spec.run.is_uri:
        spec.run.output = _resolve(spec.run.output, base)
    for section, key in _PATH_KEYS:
        sec = getattr(spec, section)
        val = getattr(sec, key, None)
        if val is not None:
            setattr(sec, key, _resolve(val, base))
    spec.data.slides = [_resolve(s, base) for s in spec.data.slides]
    spec.segment.slides = [_resolve(s, base) for s in spec.segment.slides]
    return spec


def _expanded_size(node: yaml.Node, source: str) -> int:
    """Number of nodes the document has once its aliases are expanded (what validation will walk)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise SpecError(f"{source}: a YAML alias refers to the node that contains it (a loop)")
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        active.discard(key)
        sizes[key] = min(total, MAX_SPEC_NODES + 1)  # saturate: only "too big" matters
        return sizes[key]

    return size(node)


def safe_load_bounded(text: str, source: str) -> Any:
    """``yaml.safe_load`` that refuses alias bombs: a few hundred bytes whose aliases expand to millions
    of values (validating or printing those took gigabytes). Aliases themselves stay allowed."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_size(node, source)
        if n > MAX_SPEC_NODES:
            raise SpecError(
                f"{source}: the YAML expands to more than {MAX_SPEC_NODES} values (aliases, '*name', "
                "repeating large anchors); a job spec needs a few hundred - refusing it"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"{path}: is a directory, not a spec file")
    if not path.exists():
        raise SpecError(f"{path}: spec file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec: {e.strerror or e}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: {len(data)} bytes is not a job spec (limit {MAX_SPEC_BYTES})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save the spec as UTF-8"
        ) from None
    try:
        raw = safe_load_bounded(text, str(path))
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {yaml_error_line(e)}") from None
    except RecursionError:
        raise SpecError(f"{path}: the YAML is nested too deeply to be a job spec") from None
    return parse_spec(raw, path.parent, source=str(path))


def yaml_error_line(e: yaml.YAMLError) -> str:
    """``e`` on one line with the 1-based line and column of the problem (str(e) spans several lines)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if problem is None:
        return " ".join(str(e).split())[:ECHO_MAX_CHARS]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(e, "context", None)
    return where + problem + (f" ({context})" if context else "")


def expand_slides(patterns: list[str], key: str = "data.slides") -> list[Path]:
    """Globs → files, sorted and de-duplicated; a pattern matching nothing is an error.

    A broken or looping symbolic link stays in the list (it is not dropped silently): the stage that
    opens it reports it as a failed input, naming the link.
    """
    out: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(ch in pat for ch in "*?[") else [pat]
        hits = [h for h in hits if Path(h).exists() or Path(h).is_symlink()]
        if not hits:
            raise SpecError(f"{key}: {short_repr(pat)} matches no file")
        out.extend(Path(h) for h in hits)
    seen: set[Path] = set()
    uniq = [p for p in out if not (p in seen or seen.add(p))]
    if not uniq:
        raise SpecError(f"{key}: the slide list is empty")
    return uniq


def check_output(spec: JobSpec) -> None:
    """Output must be a directory (or creatable), never an existing file."""
    if spec.run.is_uri:
        return
    out = Path(spec.run.output)
    if out.exists() and not out.is_dir():
        raise SpecError(f"run.output: {str(out)!r} is a file, not a directory")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise SpecError(f"run.output: {str(parent)!r} is a file, so {str(out)!r} cannot be created")


def json_schema() -> dict[str, Any]:
    """JSON Schema for editors (yaml-language-server)."""
    schema = spec_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pbip-engine job spec"
    return schema


def check_inputs(spec: JobSpec) -> list[Path]:
    """Everything the spec points at must exist before a run starts; returns the slide list."""
    check_output(spec)
    for section, key in _PATH_KEYS:
        val = getattr(getattr(spec, section), key, None)
        if val is not None and not URI_RE.match(val) and not Path(val).exists():
            raise SpecError(f"{section}.{key}: {short_repr(val)} does not exist")
    if spec.pseudo.crf:
        from pbip_engine.engine.pseudo.crf import crf_available

        if not crf_available():
            raise SpecError(
                "pseudo.crf: true needs the optional package pydensecrf2 (pip install pydensecrf2)"
            )
    from pbip_engine.engine.embed.encoders import EncoderError, check_encoder_name

    try:
        check_encoder_name(spec.encoder.name)
    except EncoderError as e:
        raise SpecError(f"encoder.name: {e}") from None
    slides = expand_slides(spec.data.slides) if spec.data.slides else []
    check_slide_ids(slides, "data.slides")
    if spec.segment.slides:
        check_slide_ids(expand_slides(spec.segment.slides, "segment.slides"), "segment.slides")
    from pbip_engine.methods import get_method

    if spec.pseudo.image_prototypes and not get_method(spec.method.name).prototype_features:
        raise SpecError(
            f"pseudo.image_prototypes needs a method whose CAMs compare features with prototypes (pbip, lpd, gland); "
            f"method {spec.method.name!r} has none"
        )
    if spec.pseudo.cam_context == "regions" and not get_method(spec.method.name).region_cams:
        raise SpecError(
            f"pseudo.cam_context: regions needs a method whose CAM model reads whole images (pbip, lpd, gland); "
            f"method {spec.method.name!r} reads tiles only (set pseudo.cam_context: tiles)"
        )
    try:
        get_method(spec.method.name).check_inputs(spec.method, spec)
    except ValueError as e:  # the method's own checks (masks, labelled split, checkpoints) name their key
        raise SpecError(str(e)) from None
    return slides


def check_slide_ids(slides: list[Path], key: str) -> None:
    """A SpecError naming both files when two slides would write (and overwrite) the same outputs."""
    try:
        check_unique_ids(slides, key)
    except SlideIdError as e:
        raise SpecError(str(e)) from None
