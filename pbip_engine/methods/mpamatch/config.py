"""MPAMatch's ``method:`` keys: where the labelled masks are, which images are labelled, the network, the losses.

The weak-to-strong settings follow UniMatch (threshold 0.95, loss = (sup + 0.25 s1 + 0.25 s2 + 0.5 fp) / 2);
the paper (arXiv 2508.19574) gives no loss weights for its two contrasts, so ``w_image`` / ``w_text`` are
ours (0.1 each, with temperature 0.1). ``consistency``, ``image_prototypes`` and ``text_prototypes`` switch
the parts off one by one, for the ablation ladder (all off = supervised only on the labelled images).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pbip_engine.methods.base import MethodConfig


class MpaMatchConfig(MethodConfig):
    name: Literal["mpamatch"] = "mpamatch"
    masks: str | None = Field(
        None,
        description="folder of exact masks named like the slides/images (<stem>.png|.tif|.tiff|.geojson); "
        "default for the synthetic cohort: its truth. Values are class indices (0 = background) unless mask_lut",
    )
    mask_lut: list[int] | None = Field(
        None, description="raw mask value v -> our class mask_lut[v] (GlaS: [2, 1]); 255 stays ignore"
    )
    labelled: list[str] = Field(
        default_factory=list,
        description="names (slide ids / image stems) of the labelled images; else labelled_fraction",
    )
    labelled_fraction: float = Field(
        0.125,
        gt=0,
        le=1,
        description="share of the images with a mask that are labelled, drawn with run.seed",
    )
    cover_classes: bool = Field(
        True,
        description="labelled_fraction: of 32 seeded draws keep the first whose masks show the most classes",
    )
    backbone: str = Field(
        "efficientnet_lite0", description="features_only CNN or a timm ViT (vit_large_patch16_224 = UNI)"
    )
    backbone_checkpoint: str | None = None
    backbone_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="timm kwargs, UNI: {init_values: 1e-5}"
    )
    threshold: float = Field(0.95, ge=0, le=1, description="confidence of a pseudo label on the weak view")
    consistency: bool = True
    image_prototypes: bool = True
    text_prototypes: bool = True
    text_encoder: str = Field(
        "minilm",
        description="'minilm' (packaged all-MiniLM-L6-v2, offline), 'hf:<folder>' (a local Hugging Face text "
        "model: BERT-like gets CoOp context; CLIP text towers fixed prompts), or 'open_clip:<arch>:<checkpoint>'",
    )
    prompt: str = "a histopathology image of {}"
    n_ctx: int = Field(4, ge=0, description="learnable prompt-context vectors (CoOp); 0 = fixed prompts")
    proj_dim: int = Field(64, ge=8)
    temperature: float = Field(0.1, gt=0)
    proto_momentum: float = Field(0.99, ge=0, lt=1)
    w_image: float = Field(0.1, ge=0)
    w_text: float = Field(0.1, ge=0)
    dice: bool = False
    labelled_repeat: int | None = Field(
        None,
        ge=1,
        description="times each labelled tile is seen per epoch; default: as many as unlabelled tiles",
    )
    max_pixels: int = Field(4096, ge=64, description="pixels per batch sampled for the contrasts")

    @model_validator(mode="after")
    def _prompt(self) -> MpaMatchConfig:
        if "{}" not in self.prompt:
            raise ValueError(f"method.prompt must contain '{{}}' for the class name, got {self.prompt!r}")
        return self

    def check_spec(self, spec: Any) -> None:
        if spec.segmenter.class_weights is not None:
            raise ValueError(
                "segmenter.class_weights weights the loss of the pseudo-mask stage 2; method.name: mpamatch "
                "trains its own segmenter with its own losses, so leave segmenter.class_weights unset"
            )

    @property
    def semi(self) -> bool:
        """Whether unlabelled images are used at all (any part beyond the supervised loss)."""
        return self.consistency or self.image_prototypes or self.text_prototypes
