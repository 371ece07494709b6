"""DeepLab-v2 / v3+ heads, backbone checkpoints, and the Ray-free segmenter training core."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from pbip_engine.engine.nn.deeplab import SegmenterError, build_segmenter, segmenter_from_config
from pbip_engine.engine.training.stage2 import (
    SegTrainConfig,
    SegTrainError,
    batch_to_tensors,
    evaluate,
    fit_local,
    iter_minibatches,
    load_segmenter,
    make_optimizer,
    segmentation_loss,
    segmenter_step,
    set_poly_lr,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny tensors on a shared 2-core box: OpenMP spin-waiting makes 2 threads 10-100x slower than 1.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("arch", ["deeplabv2", "deeplabv3plus"])
def test_logits_have_input_size_and_class_count(arch):
    torch.manual_seed(0)
    m = build_segmenter(arch, 4, pretrained=False).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 3, 37, 53))
    assert y.shape == (2, 4, 37, 53) and torch.isfinite(y).all()
    assert m.config["arch"] == arch and m.config["n_classes"] == 4
    assert m.backbone.feature_info.reduction()[-1] == m.config["output_stride"]
    # Batch size 1 trains (the image-pooling branch has no BatchNorm).
    m.train()
    m(torch.randn(1, 3, 32, 32)).sum().backward()


def test_output_stride_and_aspp_rates():
    v2 = build_segmenter("deeplabv2", 3, pretrained=False)
    assert v2.config["output_stride"] == 8
    assert [b.dilation[0] for b in v2.aspp.branches] == [6, 12, 18, 24]
    v2_16 = build_segmenter("deeplabv2", 3, pretrained=False, output_stride=16)
    assert [b.dilation[0] for b in v2_16.aspp.branches] == [3, 6, 9, 12]
    v3 = build_segmenter("deeplabv3plus", 3, pretrained=False)
    assert v3.config["output_stride"] == 16
    assert [b[0].dilation[0] for b in v3.aspp.branches[1:4]] == [6, 12, 18]
    assert v3.backbone.feature_info.reduction()[0] == 4  # low-level skip at stride 4


def test_imagenet_backbone_loads_offline_and_config_rebuilds():
    m = build_segmenter("deeplabv3plus", 3, pretrained=True)
    assert m.backbone.load_report["missing"] == []
    clone = segmenter_from_config(json.loads(json.dumps(m.config)))
    assert clone.config == m.config
    assert set(clone.state_dict()) == set(m.state_dict())


def test_resnet_checkpoint_keys_reported_and_shape_mismatch_refused(tmp_path, caplog):
    torchvision = pytest.importorskip("torchvision")
    sd = torchvision.models.resnet18(weights=None).state_dict()  # torchvision key names, random values
    sd["extra.thing"] = torch.zeros(3)
    path = tmp_path / "resnet18_tv.pth"
    torch.save(sd, path)
    with caplog.at_level(logging.WARNING):
        m = build_segmenter("deeplabv3plus", 5, "resnet18", pretrained=path)
    torch.testing.assert_close(m.backbone.state_dict()["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])
    assert "extra.thing" in m.backbone.load_report["unexpected"]
    assert not any(k.startswith("fc.") for k in m.backbone.load_report["unexpected"])  # classifier dropped
    sd["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save(sd, path)
    with pytest.raises(SegmenterError, match=r"layer2\.0\.conv1\.weight"):
        build_segmenter("deeplabv2", 5, "resnet18", pretrained=path)


@pytest.mark.slow
def test_resnet101_paper_backbone_builds():
    m = build_segmenter("deeplabv2", 5, "resnet101", pretrained=False, output_stride=16).eval()
    assert m.backbone.feature_info.channels()[-1] == 2048
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5, 32, 32)


def test_bad_configurations_raise():
    with pytest.raises(SegmenterError, match="arch"):
        build_segmenter("unet", 3, pretrained=False)
    with pytest.raises(SegmenterError, match="background"):
        build_segmenter("deeplabv2", 1, pretrained=False)
    with pytest.raises(SegmenterError, match="pretrained"):
        build_segmenter("deeplabv2", 3, "resnet101", pretrained=True)  # no network weights


# ------------------------------------------------------------------------------------------- training


class Tiny(nn.Module):
    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, n_classes, 1))
        self.config = {"n_classes": n_classes, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_loss_ignores_255_and_survives_all_ignored():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    mask = torch.randint(0, 3, (2, 4, 4))
    mask[0, :2] = 255
    keep = mask != 255
    expected = nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[keep], mask[keep])
    torch.testing.assert_close(segmentation_loss(logits, mask), expected)
    zero = segmentation_loss(logits, torch.full((2, 4, 4), 255))
    zero.backward()
    assert zero.item() == 0.0 and logits.grad is not None and (logits.grad == 0).all()


def test_batches_are_normalised_checked_and_flipped_together():
    img = np.zeros((2, 4, 6, 3), np.uint8)
    img[..., 0] = np.arange(6, dtype=np.uint8)[None, None, :] * 40  # red encodes the column
    mask = np.broadcast_to(np.arange(6, dtype=np.uint8)[None, None, :] % 3, (2, 4, 6)).copy()
    x, m = batch_to_tensors({"image": img, "mask": mask}, "cpu", mean=(0, 0, 0), std=(1, 1, 1))
    assert x.shape == (2, 3, 4, 6) and m.dtype == torch.long
    torch.testing.assert_close(x[0, 0, 0], torch.arange(6) * 40 / 255.0)
    g = torch.Generator().manual_seed(3)
    xf, mf = batch_to_tensors((img, mask), "cpu", mean=(0, 0, 0), std=(1, 1, 1), hflip=True, generator=g)
    col = (xf[:, 0] * 255 / 40).round().long()  # recovered column index per pixel
    assert torch.equal(col % 3, mf)  # image and mask flipped together
    assert (mf[:, :, 0] == 2).any()  # at least one sample was flipped (column 5 -> 0)
    with pytest.raises(SegTrainError, match=r"\[5, 6, 7\]"):
        batch_to_tensors({"image": img, "mask": mask + 5}, "cpu", mean=(0, 0, 0), std=(1, 1, 1), n_classes=3)
    with pytest.raises(SegTrainError, match="mask shape"):
        batch_to_tensors({"image": img, "mask": mask[:, :3]}, "cpu", mean=(0, 0, 0), std=(1, 1, 1))


def test_poly_lr_and_head_multiplier():
    m = build_segmenter("deeplabv2", 3, pretrained=False)
    opt = make_optimizer(m, SegTrainConfig(lr=0.01, head_lr_mult=10))
    assert [g["name"] for g in opt.param_groups] == ["backbone", "head"]
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1)
    assert set(map(id, opt.param_groups[1]["params"])) == set(map(id, m.aspp.parameters()))
    assert set_poly_lr(opt, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * 0.5**0.9)
    assert set_poly_lr(opt, 100, 100) == 0.0 and set_poly_lr(opt, 3, None) == pytest.approx(0.01)
    assert make_optimizer(m, SegTrainConfig()).param_groups[0]["lr"] == pytest.approx(2.5e-4)  # v2 paper


def _toy_batches(n: int = 16, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Red squares (class 1) and blue squares (class 2) on white (class 0), 5 % of pixels uncertain."""
    rng = np.random.default_rng(seed)
    imgs = np.full((n, size, size, 3), 235, np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        for cls, color in ((1, (200, 40, 40)), (2, (40, 40, 200))):
            y, x = rng.integers(0, size - 6, 2)
            imgs[i, y : y + 6, x : x + 6] = color
            masks[i, y : y + 6, x : x + 6] = cls
    masks[rng.random(masks.shape) < 0.05] = 255
    return imgs, masks


def test_step_learns_and_evaluate_scores():
    torch.manual_seed(0)
    imgs, masks = _toy_batches(n=8)
    model = Tiny()
    cfg = SegTrainConfig(optimizer="adamw", lr=0.05, weight_decay=0.0, amp=False)
    opt = make_optimizer(model, cfg)
    first = segmenter_step(model, {"image": imgs, "mask": masks}, opt, cfg)["loss"]
    for _ in range(40):
        last = segmenter_step(model, {"image": imgs, "mask": masks}, opt, cfg)["loss"]
    assert last < 0.2 * first
    metrics = evaluate(model, iter_minibatches(imgs, masks, 8, shuffle=False))
    assert metrics["miou"] > 0.9 and metrics["n_ignored_pixels"] == int((masks == 255).sum())


@pytest.mark.slow
def test_deeplab_fit_local_checkpoints_resume_and_reload(tmp_path):
    torch.manual_seed(0)
    imgs, masks = _toy_batches(n=4, size=16)
    model = build_segmenter("deeplabv2", 3, pretrained=False, output_stride=16)
    cfg = SegTrainConfig(epochs=2, amp=False)  # lr: DeepLab-v2's published 2.5e-4
    train = lambda e: iter_minibatches(imgs, masks, 2, seed=e)  # noqa: E731
    val = lambda e: iter_minibatches(imgs, masks, 4, shuffle=False)  # noqa: E731
    res = fit_local(model, train, cfg, tmp_path, val_data=val, log_fn=None)
    assert res["epochs_run"] == 2 and len(res["history"]) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert res["history"][-1]["step"] == 4
    assert res["history"][-1]["train"]["lr"] < 2.5e-4  # poly schedule decayed over the known epoch length
    assert (tmp_path / "best.pt").is_file() and len(
        (tmp_path / "metrics.jsonl").read_text().splitlines()
    ) == 2
    # A third epoch resumes from epoch 2 instead of starting over.
    res3 = fit_local(model, train, cfg, tmp_path, val_data=val, epochs=3, log_fn=None)
    assert res3["epochs_run"] == 1 and [h["epoch"] for h in res3["history"]] == [1, 2, 3]
    # The best checkpoint alone rebuilds an identical model.
    best_epoch = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["epoch"]
    reloaded = load_segmenter(tmp_path / "checkpoints" / f"epoch_{best_epoch:04d}.pt")
    model.eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
    with pytest.raises(SegTrainError, match="not a pbip-segmenter"):
        torch.save({"model": {}}, tmp_path / "junk.pt")
        load_segmenter(tmp_path / "junk.pt")
