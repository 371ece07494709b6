"""PLF (gland paper Eq. 10-11) as a stage-2 loss: hand-computed cases, options, ignore index, spec hook."""

from __future__ import annotations

import inspect
import math
from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from pbip_engine.engine.metrics import IGNORE_INDEX
from pbip_engine.engine.training.losses import STAGE2_LOSSES, stage2_loss
from pbip_engine.engine.training.losses.plf import Confidence, Normalize, plf_loss
from pbip_engine.schemas.spec import PlfOptions, SegmenterSection, SpecError, parse_spec

# One image, two pixels side by side: pixel 1 is class 0 with logits (2, 0), pixel 2 class 1 with (0, 0).
LOGITS = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # B=1, N=2, H=1, W=2
MASK = torch.tensor([[[0, 1]]])
CE1, CE2 = math.log(1 + math.exp(-2)), math.log(2)  # 0.1269, 0.6931
S1, S2 = math.exp(-CE1), math.exp(-CE2)
W1, W2 = S1 / (S1 + S2), S2 / (S1 + S2)  # spatial softmax of -CE
P1 = 1 / (1 + math.exp(-2))  # pixel 1's top class probability; pixel 2 is 0.5 / 0.5


def test_plf_matches_the_hand_computed_paper_weights():
    # mean normalisation (mean of W over 2 pixels = 0.5) x confidence max - min (pixel 2: 0.5 - 0.5 = 0)
    expected = (CE1 * (W1 / 0.5) * (P1 - (1 - P1)) + CE2 * (W2 / 0.5) * 0.0) / 2
    got = plf_loss(LOGITS, MASK)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.06166, abs=1e-4)


def test_plf_reference_options_range_and_max_confidence():
    rng = W1 - W2
    expected = (CE1 * (W1 / rng) * P1 + CE2 * (W2 / rng) * 0.5) / 2
    got = plf_loss(LOGITS, MASK, normalize="range", confidence="max")
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_confidence_none_is_oeems_loss_weight_alone():
    # OEEM: the spatial softmax of -CE over its mean, no confidence factor; pixel 2 (50 / 50) still teaches
    expected = (CE1 * (W1 / 0.5) + CE2 * (W2 / 0.5)) / 2
    got = plf_loss(LOGITS, MASK, confidence="none")
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() > plf_loss(LOGITS, MASK).item()
    assert stage2_loss("plf", {"confidence": "none"})(LOGITS, MASK).item() == pytest.approx(got.item())


def test_a_one_class_image_keeps_the_plain_cross_entropy():
    mask = torch.tensor([[[1, 1]]])
    plain = F.cross_entropy(LOGITS, mask)
    assert plf_loss(LOGITS, mask).item() == pytest.approx(plain.item(), rel=1e-6)


def test_ignored_pixels_count_nowhere():
    # A third pixel, ignored, with a huge loss: the two labelled pixels' loss is unchanged, and an image whose
    # second class is only on ignored pixels counts as one class.
    logits = torch.cat([LOGITS, torch.tensor([[[[-9.0]], [[9.0]]]])], -1)
    mask = torch.tensor([[[0, 1, IGNORE_INDEX]]])
    assert plf_loss(logits, mask).item() == pytest.approx(plf_loss(LOGITS, MASK).item(), rel=1e-5)
    only = torch.tensor([[[1, IGNORE_INDEX, IGNORE_INDEX]]])
    assert plf_loss(logits, only).item() == pytest.approx(
        F.cross_entropy(logits, only, ignore_index=IGNORE_INDEX).item(), rel=1e-6
    )
    none = torch.full((1, 1, 3), IGNORE_INDEX)
    z = plf_loss(logits.requires_grad_(), none)
    assert z.item() == 0.0 and z.requires_grad


def test_plf_batches_images_independently_and_weights_are_detached():
    a, b = plf_loss(LOGITS, MASK), plf_loss(LOGITS, torch.tensor([[[1, 1]]]))
    both = plf_loss(torch.cat([LOGITS, LOGITS]), torch.cat([MASK, torch.tensor([[[1, 1]]])]))
    assert both.item() == pytest.approx((a.item() + b.item()) / 2, rel=1e-5)  # same pixel count per image
    logits = LOGITS.clone().requires_grad_()
    plf_loss(logits, MASK).backward()
    # pixel 2's weight is 0 (no confidence), so only pixel 1's CE sends gradient: d/dz of w1 * CE1 / 2
    g = logits.grad[0, :, 0, 1]
    assert torch.allclose(g, torch.zeros(2))
    assert logits.grad[0, 0, 0, 0].item() == pytest.approx(
        -(1 - P1) * (W1 / 0.5) * (2 * P1 - 1) / 2, rel=1e-5
    )


def test_stage2_loss_factory_and_spec_keys(tmp_path):
    ce = stage2_loss("ce")
    assert ce(LOGITS, MASK).item() == pytest.approx(F.cross_entropy(LOGITS, MASK).item())
    plf = stage2_loss("plf", {"normalize": "range"})
    assert plf(LOGITS, MASK).item() == pytest.approx(plf_loss(LOGITS, MASK, normalize="range").item())
    with pytest.raises(ValueError, match="unknown stage-2 loss 'dice'"):
        stage2_loss("dice")
    base = {"run": {"output": "o"}, "data": {"synthetic": {}}, "classes": [{"name": "a", "color": [1, 2, 3]}]}
    spec = parse_spec({**base, "segmenter": {"loss": "plf", "plf": {"normalize": "range"}}}, tmp_path)
    assert spec.segmenter.loss == "plf" and spec.segmenter.plf.normalize == "range"
    with pytest.raises(SpecError, match=r"segmenter\.plf\.confidence"):
        parse_spec({**base, "segmenter": {"plf": {"confidence": "min"}}}, tmp_path)


def test_the_segmenter_stage_picks_the_spec_loss_or_the_methods_default(tmp_path):
    from pbip_engine.engine.nn.deeplab import build_segmenter
    from pbip_engine.engine.training.segmentation import SegmentationTask
    from pbip_engine.jobs.train_stage2 import segmenter_loss

    base = {"run": {"output": "o"}, "data": {"synthetic": {}}, "classes": [{"name": "a", "color": [1, 2, 3]}]}
    assert segmenter_loss(parse_spec(base, tmp_path)) == {"name": "ce", "options": {}}
    gland = parse_spec({**base, "method": {"name": "gland"}}, tmp_path)
    assert segmenter_loss(gland) == {"name": "ce", "options": {}}  # PLF lost to CE on the demo (session 33)
    gland_plf = parse_spec({**base, "method": {"name": "gland"}, "segmenter": {"loss": "plf"}}, tmp_path)
    assert segmenter_loss(gland_plf) == {
        "name": "plf",
        "options": {"normalize": "mean", "confidence": "max_minus_min"},
    }
    pbip_plf = parse_spec({**base, "segmenter": {"loss": "plf"}}, tmp_path)
    assert segmenter_loss(pbip_plf)["name"] == "plf"
    model = build_segmenter(
        "deeplabv2", n_classes=2, backbone="efficientnet_lite0", pretrained=False, crop_px=32
    )
    task = SegmentationTask(model, amp=False, loss=stage2_loss("plf"))
    x = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 2, (2, 32, 32))}
    out = task(x)
    expected = plf_loss(model(x["image"]), x["mask"])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_the_spec_offers_exactly_the_losses_and_plf_options_the_engine_takes():
    # The spec repeats the Literals rather than importing them: plf.py imports torch, the spec must not.
    losses = SegmenterSection.model_fields["loss"].annotation  # Literal[...] | None
    assert {a for t in get_args(losses) for a in get_args(t)} == set(STAGE2_LOSSES)
    fields = PlfOptions.model_fields
    assert set(get_args(fields["confidence"].annotation)) == set(get_args(Confidence))
    assert set(get_args(fields["normalize"].annotation)) == set(get_args(Normalize))
    for name in ("confidence", "normalize"):  # the spec's default is the loss's default
        assert fields[name].default == inspect.signature(plf_loss).parameters[name].default
