"""Encoder registry: ImageNet EfficientNet-Lite0 mapping, checkpoint paths of every family, error messages."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch

import pbip_engine  # noqa: F401  (cuCIM before torch)
from pbip_engine.engine.embed.encoders import (
    Encoder,
    EncoderError,
    EncoderInfo,
    create_encoder,
    efficientnet_lite0_imagenet_state_dict,
    encoder_id,
    list_encoders,
    load_state_dict_checked,
    register_encoder,
)
from pbip_engine.engine.embed.encoders.efficientnet import imagenet_weights_file
from pbip_engine.engine.embed.encoders.medclip import hf_swin_to_timm, timm_swin_to_hf

IMNET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMNET_COFFEE = {504, 967, 968}  # coffee mug, espresso, cup


def _rgb224(img: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------------------- efficientnet


@pytest.fixture(scope="module")
def imagenet_sd() -> dict[str, torch.Tensor]:
    return efficientnet_lite0_imagenet_state_dict()


def test_efficientnet_mapping_gives_sensible_imagenet_predictions(imagenet_sd):
    skdata = pytest.importorskip("skimage.data")
    assert imagenet_sd["classifier.weight"].shape == (1000, 1280)
    assert len(imagenet_sd) == 296
    m = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    m.load_state_dict(imagenet_sd, strict=True)
    enc = create_encoder("efficientnet_lite0")  # the encoder's own preprocessing (ImageNet mean/std)
    batch = np.stack([_rgb224(skdata.chelsea()), _rgb224(skdata.coffee())])
    with torch.no_grad():
        probs = m(enc.preprocess(batch)).softmax(-1)
    top = probs.argmax(-1).tolist()
    assert top[0] in IMNET_CATS and top[1] in IMNET_COFFEE
    assert probs.max(-1).values.min() > 0.4  # confident, not a lucky argmax over noise
    # the encoder is the same network without its classifier: pooled features feed the classifier
    with torch.no_grad():
        feats = enc(enc.preprocess(batch))
        assert feats.shape == (2, 1280)
        torch.testing.assert_close(m.classifier(feats), m(enc.preprocess(batch)), rtol=1e-4, atol=1e-4)


def test_efficientnet_state_dict_loads_features_only(imagenet_sd):
    f = timm.create_model("efficientnet_lite0", features_only=True, pretrained=False)
    res = f.load_state_dict(imagenet_sd, strict=False)
    assert res.missing_keys == []
    assert sorted({k.split(".")[0] for k in res.unexpected_keys}) == ["bn2", "classifier", "conv_head"]
    assert torch.equal(f.state_dict()["conv_stem.weight"], imagenet_sd["conv_stem.weight"])
    # a fresh copy every call: mutating one must not leak into the next
    imagenet_sd["conv_stem.weight"].zero_()
    assert efficientnet_lite0_imagenet_state_dict()["conv_stem.weight"].abs().sum() > 0


def test_efficientnet_accepts_both_key_layouts(tmp_path):
    raw = torch.load(imagenet_weights_file(), map_location="cpu", weights_only=True)
    assert next(iter(raw)).startswith("_conv_stem")  # EfficientNet-PyTorch names in the package file
    path = tmp_path / "effnet_pytorch_names.pth"
    torch.save(raw, path)
    a = create_encoder("efficientnet_lite0")
    b = create_encoder("efficientnet_lite0", checkpoint=path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


# ------------------------------------------------------------------------------------ errors & registry


def test_unknown_name_lists_known_encoders():
    with pytest.raises(EncoderError) as ei:
        create_encoder("resnet_from_mars")
    msg = str(ei.value)
    for name in list_encoders():
        assert name in msg
    assert "open_clip:<arch>" in msg and "timm:<name>" in msg
    with pytest.raises(EncoderError, match="unknown encoder"):
        create_encoder("nosuchfamily:foo")


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("medclip_vit", "pytorch_model.bin"),
        ("timm:resnet18", "checkpoint="),
        ("open_clip:ViT-S-32", "checkpoint="),
    ],
)
def test_hub_names_without_a_path_say_how_to_supply_a_file(name, hint):
    with pytest.raises(EncoderError) as ei:
        create_encoder(name)
    assert hint in str(ei.value)


def test_shape_mismatch_names_first_tensor_and_file(tmp_path):
    src = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    with pytest.raises(EncoderError) as ei:
        create_encoder("timm:resnet50", checkpoint=path)
    msg = str(ei.value)
    # resnet18's 3x3 basic-block conv vs resnet50's 1x1 bottleneck conv: the first tensor that disagrees
    assert "'layer1.0.conv1.weight'" in msg and "(64, 64, 1, 1)" in msg and "(64, 64, 3, 3)" in msg
    assert str(path) in msg


def test_load_state_dict_checked_reports_first_mismatch_in_module_order_and_warns(caplog):
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    sd = {"0.weight": torch.zeros(5, 4), "1.weight": torch.zeros(9, 9)}
    with pytest.raises(EncoderError, match=r"'0\.weight'.*\(3, 4\).*\(5, 4\).*2 mismatched"):
        load_state_dict_checked(m, sd, source="x.pth")
    good = {"0.weight": torch.ones(3, 4), "extra.bias": torch.zeros(1)}
    with caplog.at_level(logging.WARNING):
        load_state_dict_checked(m, good, source="y.pth")
    assert torch.equal(m[0].weight, torch.ones(3, 4))
    text = caplog.text
    assert "3 model tensors missing" in text and "1 unexpected" in text and "extra.bias" in text
    with pytest.raises(EncoderError, match="shares no tensor names"):
        load_state_dict_checked(m, {"foo": torch.zeros(1)}, source="z.pth")


def test_register_custom_encoder_and_preprocess():
    class MeanRGB(Encoder):
        def forward(self, x):
            return x.mean((2, 3))

    @register_encoder("_test_mean_rgb")
    def build(checkpoint=None, **kw):
        return MeanRGB(EncoderInfo("_test_mean_rgb", 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 3))

    assert "_test_mean_rgb" in list_encoders()
    enc = create_encoder("_test_mean_rgb")
    assert not enc.training
    img = np.zeros((1, 50, 70, 3), np.uint8)
    img[..., 0] = 255
    x = enc.preprocess(img)
    assert x.shape == (1, 3, 32, 32)
    torch.testing.assert_close(enc(x)[0], torch.tensor([2.0, -2.0, -2.0]))  # (1-.5)/.25, (0-.5)/.25
    with pytest.raises(EncoderError, match="uint8"):
        enc.preprocess(np.zeros((1, 8, 8, 3), np.float32))


def test_encoder_id_is_stable_and_content_addressed(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"w": torch.zeros(3)}, a)
    torch.save({"w": torch.ones(3)}, b)
    assert encoder_id("timm:resnet18", a) == encoder_id("timm:resnet18", str(a))
    assert encoder_id("timm:resnet18", a) != encoder_id("timm:resnet18", b)
    assert encoder_id("efficientnet_lite0", None) == "efficientnet_lite0@imagenet"
    assert encoder_id("medclip_vit", a, random_projection_seed=1) != encoder_id(
        "medclip_vit", a, random_projection_seed=2
    )
    with pytest.raises(EncoderError, match="not found"):
        encoder_id("timm:resnet18", tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------- timm


def test_timm_checkpoint_path_reproduces_the_source_model(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32).eval()
    path = tmp_path / "vit_tiny.safetensors"
    from safetensors.torch import save_file

    save_file({f"module.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(path))
    enc = create_encoder("timm:vit_tiny_patch16_224", checkpoint=path, img_size=32)
    assert enc.info.dim == 192 and enc.info.input_size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), src.forward_head(src.forward_features(x), pre_logits=True))


# ----------------------------------------------------------------------------------------- open_clip

TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
}


@pytest.mark.parametrize("layout", ["whole_model", "visual_only"])
def test_open_clip_checkpoint_whole_or_visual(tmp_path, layout):
    import open_clip

    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-S-32", pretrained=None, **TINY_CLIP).eval()
    sd = ref.state_dict() if layout == "whole_model" else ref.visual.state_dict()
    path = tmp_path / f"{layout}.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    enc = create_encoder("open_clip:ViT-S-32", checkpoint=path, **TINY_CLIP)
    assert enc.info.dim == 24 and enc.info.input_size == 32
    assert enc.info.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref.encode_image(x))


# -------------------------------------------------------------------------------------------- medclip


@pytest.fixture(scope="module")
def swin_src() -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0).eval()
    with torch.no_grad():  # perturb norms/biases so a wrong mapping cannot hide behind init constants
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def test_hf_swin_mapping_round_trips(swin_src):
    sd = swin_src.state_dict()
    hf = timm_swin_to_hf(sd)
    assert "encoder.layers.0.downsample.reduction.weight" in hf  # HF merges at the end of stage 0
    assert "encoder.layers.0.blocks.0.attention.self.query.weight" in hf
    back = hf_swin_to_timm(hf)
    want = {k for k in sd if not k.endswith("relative_position_index")}
    assert set(back) == want
    assert all(torch.equal(back[k], sd[k]) for k in want)


@pytest.mark.slow
def test_medclip_checkpoint_with_hf_names(tmp_path, swin_src):
    proj = torch.randn(512, 768) * 0.03
    ckpt = {f"vision_model.model.{k}": v for k, v in timm_swin_to_hf(swin_src.state_dict()).items()}
    ckpt["vision_model.projection_head.weight"] = proj
    ckpt["text_model.model.embeddings.word_embeddings.weight"] = torch.zeros(10, 4)  # ignored text tower
    ckpt["logit_scale"] = torch.tensor(3.0)
    path = tmp_path / "pytorch_model.bin"
    torch.save(ckpt, path)
    enc = create_encoder("medclip_vit", checkpoint=path)
    assert enc.info.dim == 512
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), swin_src(x) @ proj.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(EncoderError, match="already has a projection_head"):
        create_encoder("medclip_vit", checkpoint=path, random_projection_seed=0)


@pytest.mark.slow
def test_medclip_code_faithful_random_projection(tmp_path, swin_src):
    path = tmp_path / "swin_tiny_imagenet.pth"
    torch.save(swin_src.state_dict(), path)  # timm-keyed Swin, no projection
    with pytest.raises(EncoderError, match="random_projection_seed"):
        create_encoder("medclip_vit", checkpoint=path)
    a = create_encoder("medclip_vit", checkpoint=path, random_projection_seed=42, normalize="pbip_code")
    b = create_encoder("medclip_vit", checkpoint=path, random_projection_seed=42)
    assert torch.equal(a.projection.weight, b.projection.weight)  # seeded: reproducible across builds
    assert torch.equal(a.backbone.patch_embed.proj.weight, swin_src.patch_embed.proj.weight)
    w = a.projection.weight
    assert w.abs().max() <= 768**-0.5 and w.std() > 0.5 * 768**-0.5 / 3**0.5  # nn.Linear's init range
    # pbip_code preprocessing: BGR + per-tile global min-max to [0, 1]
    rgb = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    x = a.preprocess(rgb)
    assert float(x.min()) == pytest.approx(0.0) and float(x.max()) == pytest.approx(1.0)
    assert a.channel_order == "bgr" and b.channel_order == "rgb"
