"""segmenter.class_weights: balanced weights from the pseudo masks, weighted CE / PLF, spec checks, job helper."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pbip_engine.engine.metrics import IGNORE_INDEX
from pbip_engine.engine.training.losses import (
    balanced_weights,
    mask_class_counts,
    plf_weights,
    stage2_loss,
)
from pbip_engine.engine.training.losses.plf import plf_loss
from pbip_engine.schemas.spec import SpecError, parse_spec

LOGITS = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # B=1, N=2, H=1, W=2
MASK = torch.tensor([[[0, 1]]])
CE1, CE2 = math.log(1 + math.exp(-2)), math.log(2)
BASE = {"run": {"output": "o"}, "data": {"synthetic": {}}, "classes": [{"name": "a", "color": [1, 2, 3]}]}


def test_balanced_weights_are_inverse_frequency_over_the_classes_present():
    w = balanced_weights([0, 30, 70])
    assert w == pytest.approx([1.0, 100 / 60, 100 / 140])  # absent background keeps 1.0: never a target
    assert balanced_weights([0, 1, 10_000]) == pytest.approx([1.0, 10.0, 10_001 / 20_000])  # clipped at 10
    assert balanced_weights([50, 50]) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="no labelled pixels"):
        balanced_weights([0, 0])


def test_mask_class_counts_skip_ignored_pixels_and_reject_stray_values():
    a = np.array([[1, 1, IGNORE_INDEX], [2, 0, 1]], np.uint8)
    assert mask_class_counts([a, np.full((2, 2), 2, np.uint8)], 3).tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="mask value 3"):
        mask_class_counts([np.array([[3]], np.uint8)], 3)


def test_weighted_ce_is_the_weighted_mean_over_pixels():
    loss = stage2_loss("ce", class_weights=[2.0, 0.5])(LOGITS, MASK)
    assert loss.item() == pytest.approx((2.0 * CE1 + 0.5 * CE2) / 2.5, rel=1e-6)
    ignored = torch.tensor([[[0, IGNORE_INDEX]]])
    assert stage2_loss("ce", class_weights=[2.0, 0.5])(LOGITS, ignored).item() == pytest.approx(CE1, rel=1e-6)


def test_plf_applies_class_weights_after_choosing_its_weights_from_the_plain_ce():
    ce = F.cross_entropy(LOGITS, MASK, reduction="none")
    w = plf_weights(LOGITS, MASK, ce)[0, 0]  # PLF's own weights: unchanged by the class weights
    expected = (ce[0, 0, 0] * w[0] * 2.0 + ce[0, 0, 1] * w[1] * 0.5) / 2
    got = stage2_loss("plf", class_weights=[2.0, 0.5])(LOGITS, MASK)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stage2_loss("plf", class_weights=[1.0, 1.0])(LOGITS, MASK).item() == pytest.approx(
        plf_loss(LOGITS, MASK).item(), rel=1e-6
    )


def test_balanced_weights_undo_the_pull_towards_the_majority_class():
    """A bias-only model fitted to 30 % / 70 % labels predicts class 1 on 30 % odds; balanced, on even odds."""
    mask = torch.tensor([[[0] * 3 + [1] * 7]])
    weights = balanced_weights(mask_class_counts([mask.numpy().astype(np.uint8)], 2))
    for cw, p_expected in ((None, 0.3), (weights, 0.5)):
        bias = torch.zeros(2, requires_grad=True)
        opt = torch.optim.LBFGS([bias], max_iter=100)
        loss_fn = stage2_loss("ce", class_weights=cw)

        def closure(bias=bias, opt=opt, loss_fn=loss_fn):
            opt.zero_grad()
            loss = loss_fn(bias[None, :, None, None].expand(1, 2, 1, 10), mask)
            loss.backward()
            return loss

        opt.step(closure)
        assert torch.softmax(bias, 0)[0].item() == pytest.approx(p_expected, abs=1e-3)


def test_spec_accepts_balanced_or_one_weight_per_class_and_names_the_key_otherwise(tmp_path):
    balanced = parse_spec({**BASE, "segmenter": {"class_weights": "balanced"}}, tmp_path)
    assert balanced.segmenter.class_weights == "balanced"
    ok = parse_spec({**BASE, "segmenter": {"class_weights": [0.5, 2.0]}}, tmp_path)
    assert ok.segmenter.class_weights == [0.5, 2.0]
    with pytest.raises(SpecError, match=r"segmenter\.class_weights: 3 weight\(s\).*needs 2.*\['a'\]"):
        parse_spec({**BASE, "segmenter": {"class_weights": [1, 1, 1]}}, tmp_path)
    with pytest.raises(SpecError, match=r"segmenter\.class_weights"):
        parse_spec({**BASE, "segmenter": {"class_weights": "inverse"}}, tmp_path)
    semi = {**BASE, "method": {"name": "mpamatch"}, "segmenter": {"class_weights": "balanced"}}
    with pytest.raises(SpecError, match=r"segmenter\.class_weights.*mpamatch"):
        parse_spec(semi, tmp_path)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_the_job_counts_the_pseudo_masks_it_trains_on(tmp_path, monkeypatch):
    import pbip_engine.jobs.train_stage2 as job

    folder = tmp_path / "regions"
    folder.mkdir()
    masks = [np.full((4, 4), 1, np.uint8), np.full((4, 4), 2, np.uint8), np.full((4, 4), 2, np.uint8)]
    masks[0][0, 0] = IGNORE_INDEX
    for i, m in enumerate(masks):  # one file per slide, as the pseudo stage writes them
        pq.write_table(pa.table({"tile_id": [f"s{i}/r0_0"], "mask": [_png(m)]}), folder / f"s{i}.parquet")
    spec = parse_spec({**BASE, "classes": [*BASE["classes"], {"name": "b", "color": [4, 5, 6]}],
                       "segmenter": {"class_weights": "balanced"}}, tmp_path)  # fmt: skip
    weights, record = job.loss_class_weights(spec, folder)
    assert record["class_pixels"] == [0, 15, 32] and record["weight_masks"] == 3
    assert weights == pytest.approx(balanced_weights([0, 15, 32])) == record["class_weights"]
    monkeypatch.setattr(job, "WEIGHT_SAMPLE_MASKS", 2)  # a large cohort: every 2nd mask is read
    _, sampled = job.loss_class_weights(spec, folder)
    assert sampled["weight_masks"] == 2 and sampled["class_pixels"] == [0, 15, 16]
    fixed = parse_spec({**BASE, "segmenter": {"class_weights": [1.0, 3.0]}}, tmp_path)
    assert job.loss_class_weights(fixed, folder) == ([1.0, 3.0], {"class_weights": [1.0, 3.0]})
    assert job.loss_class_weights(parse_spec(BASE, tmp_path), folder) == (None, {})


def test_stage2_setup_builds_the_weighted_loss():
    from pbip_engine.jobs.train_stage2 import stage2_setup

    config = {"arch": "deeplabv2", "n_classes": 2, "backbone": "efficientnet_lite0", "pretrained": False,
              "crop_px": 32, "loop": {"amp": False},
              "loss": {"name": "ce", "options": {}, "class_weights": [2.0, 0.5]}}  # fmt: skip
    task, _ = stage2_setup(config)
    assert task.loss_fn(LOGITS, MASK).item() == pytest.approx((2.0 * CE1 + 0.5 * CE2) / 2.5, rel=1e-6)
