"""``segmenter.loss: ce_dice``: CE + macro soft Dice, hand-computed, with ignored pixels and the spec hook."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pbip_engine.engine.metrics import IGNORE_INDEX
from pbip_engine.engine.training.losses import stage2_loss
from pbip_engine.engine.training.losses.dice import ce_dice_loss
from pbip_engine.schemas.spec import SpecError, parse_spec

LOGITS = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # B=1, N=2, H=1, W=2
MASK = torch.tensor([[[0, 1]]])


def _hand_dice(logits: torch.Tensor, mask: torch.Tensor) -> float:
    p = logits.softmax(1)[0, :, 0]  # N, W
    losses = []
    for c in range(p.shape[0]):
        t = (mask[0, 0] == c).float()
        if t.sum() == 0:
            continue
        losses.append(1 - 2 * (p[c] * t).sum() / (p[c].sum() + t.sum()))
    return float(sum(losses) / len(losses))


def test_ce_dice_is_the_cross_entropy_plus_the_weighted_macro_dice():
    ce = F.cross_entropy(LOGITS, MASK).item()
    dice = _hand_dice(LOGITS, MASK)
    # by hand: p(class 0) = (0.881, 0.5): 1 - 1.762 / 2.381 = 0.260; p(class 1) = (0.119, 0.5): 1 - 1 / 1.619 = 0.382
    assert dice == pytest.approx(0.3212, abs=1e-3)
    assert ce_dice_loss(LOGITS, MASK).item() == pytest.approx(ce + dice, rel=1e-5)
    assert ce_dice_loss(LOGITS, MASK, dice_weight=0.5).item() == pytest.approx(ce + 0.5 * dice, rel=1e-5)
    w = torch.tensor([1.0, 3.0])  # class weights weigh the CE term only
    weighted = F.cross_entropy(LOGITS, MASK, weight=w).item() + dice
    assert stage2_loss("ce_dice", class_weights=[1, 3])(LOGITS, MASK).item() == pytest.approx(
        weighted, rel=1e-5
    )


def test_a_missed_small_class_costs_the_dice_term_what_it_costs_a_large_one():
    # 99 pixels of class 0 and one of class 1, all predicted class 0: CE barely notices, Dice loses half
    mask = torch.zeros(1, 1, 100, dtype=torch.long)
    mask[..., -1] = 1
    logits = torch.zeros(1, 2, 1, 100)
    logits[:, 0] = 6.0
    ce = F.cross_entropy(logits, mask).item()
    assert ce < 0.07
    assert ce_dice_loss(logits, mask).item() - ce > 0.45


def test_ignored_pixels_count_nowhere_and_an_all_ignored_batch_is_zero():
    logits = torch.cat([LOGITS, torch.tensor([[[[-9.0]], [[9.0]]]])], -1)
    mask = torch.cat([MASK, torch.tensor([[[IGNORE_INDEX]]])], -1)
    assert ce_dice_loss(logits, mask).item() == pytest.approx(ce_dice_loss(LOGITS, MASK).item(), rel=1e-5)
    x = LOGITS.clone().requires_grad_(True)
    out = ce_dice_loss(x, torch.full_like(MASK, IGNORE_INDEX))
    out.backward()
    assert out.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_the_spec_selects_ce_dice_with_its_weight_and_a_segmenter_trains_on_it(tmp_path):
    from pbip_engine.engine.nn.deeplab import build_segmenter
    from pbip_engine.engine.training.segmentation import SegmentationTask
    from pbip_engine.jobs.train_stage2 import segmenter_loss

    base = {"run": {"output": "o"}, "data": {"synthetic": {}}, "classes": [{"name": "a", "color": [1, 2, 3]}]}
    spec = parse_spec({**base, "segmenter": {"loss": "ce_dice", "dice_weight": 0.5}}, tmp_path)
    assert segmenter_loss(spec) == {"name": "ce_dice", "options": {"dice_weight": 0.5}}
    assert segmenter_loss(parse_spec(base, tmp_path)) == {"name": "ce", "options": {}}
    with pytest.raises(SpecError, match=r"segmenter\.dice_weight"):
        parse_spec({**base, "segmenter": {"loss": "ce_dice", "dice_weight": 0}}, tmp_path)
    torch.manual_seed(0)
    model = build_segmenter("deeplabv3plus", n_classes=2, backbone="efficientnet_lite0", pretrained=False,
                            crop_px=32)  # fmt: skip
    task = SegmentationTask(model, amp=False, loss=stage2_loss("ce_dice", segmenter_loss(spec)["options"]))
    model.eval()  # the same forward twice (dropout and batch statistics off)
    x = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 2, (2, 32, 32))}
    out = task(x)
    assert out["loss"].item() == pytest.approx(ce_dice_loss(model(x["image"]), x["mask"], dice_weight=0.5).item(),
                                               rel=1e-4)  # fmt: skip
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
