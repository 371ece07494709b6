"""DeepLab-v2 / v3+ heads, backbone checkpoints, and the Ray-free segmenter training core."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from pbip_engine.engine.nn.deeplab import SegmenterError, build_segmenter, segmenter_from_config
from pbip_engine.engine.training.augment import augment_batch
from pbip_engine.engine.training.checkpoint import read_checkpoint
from pbip_engine.engine.training.ema import WeightAverage
from pbip_engine.engine.training.loop import (
    LocalStore,
    LoopConfig,
    Trainer,
    fit_local,
    make_optimizer,
    set_poly_lr,
)
from pbip_engine.engine.training.segmentation import (
    SegmentationTask,
    SegTrainError,
    batch_to_tensors,
    evaluate,
    iter_minibatches,
    load_segmenter,
    segmentation_loss,
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


def _atrous_weights(m) -> list[torch.Tensor]:
    if m.head_type == "deeplabv2":
        return [b.weight for b in m.aspp.branches]
    return [b[0].weight for b in m.aspp.branches[1:-1]]  # skip the 1x1 and image-pooling branches


@pytest.mark.parametrize("arch", ["deeplabv2", "deeplabv3plus"])
@pytest.mark.parametrize("crop", [96, 112])
def test_every_aspp_tap_learns_at_the_training_crop(arch, crop):
    # Audit cause 2: at 96/112 px and OS 8 the 12/18/24 taps of the paper's rates only see zero padding.
    torch.manual_seed(0)
    m = build_segmenter(arch, 3, pretrained=False, crop_px=crop).train()
    target = torch.randint(0, 3, (2, crop, crop))
    nn.functional.cross_entropy(m(torch.randn(2, 3, crop, crop)), target).backward()
    for w in _atrous_weights(m):
        g = w.grad.abs().sum(dim=(0, 1))  # [3, 3] per kernel tap
        off_centre = torch.cat([g.flatten()[:4], g.flatten()[5:]])
        assert (off_centre > 0).all(), (arch, crop, m.config["aspp_rates"], g)
    rates = m.config["aspp_rates"]
    assert len(set(rates)) == len(rates) and min(rates) >= 1


def test_rates_fit_crop_and_rebuild_from_config():
    m = build_segmenter("deeplabv2", 3, pretrained=False, crop_px=96)  # 12-px map: rates capped at 6
    assert m.config["aspp_rates"] == [2, 3, 5, 6]
    assert [b.dilation[0] for b in m.aspp.branches] == [2, 3, 5, 6]
    clone = segmenter_from_config(json.loads(json.dumps(m.config)))
    assert [b.dilation[0] for b in clone.aspp.branches] == [2, 3, 5, 6] and clone.config == m.config
    big = build_segmenter("deeplabv2", 3, pretrained=False, crop_px=512)  # the papers' rates already fit
    assert big.config["aspp_rates"] == [6, 12, 18, 24]
    old = {k: v for k, v in m.config.items() if k != "aspp_rates"}  # checkpoints from before the key
    assert [b.dilation[0] for b in segmenter_from_config(old).aspp.branches] == [6, 12, 18, 24]


def test_stage2_builds_its_segmenter_for_the_training_tile():
    from pbip_engine.jobs.train_stage2 import stage2_setup

    config = {"arch": "deeplabv2", "n_classes": 3, "backbone": "efficientnet_lite0", "pretrained": False,
              "crop_px": 96, "loop": {"amp": False}}  # fmt: skip
    task, _ = stage2_setup(config)
    assert task.model.config["aspp_rates"] == [2, 3, 5, 6]


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


def test_batches_are_normalised_checked_and_augmented_together():
    img = np.zeros((8, 6, 6, 3), np.uint8)
    img[..., 0] = np.arange(6, dtype=np.uint8)[None, None, :] * 40  # red encodes the column
    img[..., 1] = np.arange(6, dtype=np.uint8)[None, :, None] * 40  # green encodes the row
    mask = (np.arange(6, dtype=np.uint8)[None, :, None] * 6 + np.arange(6, dtype=np.uint8)[None, None, :]) % 3
    mask = np.broadcast_to(mask, (8, 6, 6)).copy()
    x, m = batch_to_tensors({"image": img, "mask": mask}, "cpu", mean=(0, 0, 0), std=(1, 1, 1))
    assert x.shape == (8, 3, 6, 6) and m.dtype == torch.long
    torch.testing.assert_close(x[0, 0, 0], torch.arange(6) * 40 / 255.0)
    aug = augment_batch({"image": img, "mask": mask}, np.random.default_rng(3))
    row, col = aug["image"][..., 1].astype(int) // 40, aug["image"][..., 0].astype(int) // 40
    assert np.array_equal((row * 6 + col) % 3, aug["mask"])  # image and mask moved together, per pixel
    assert len({aug["image"][i].tobytes() for i in range(8)}) > 1  # samples drew different transforms
    with pytest.raises(SegTrainError, match=r"\[5, 6, 7\]"):
        batch_to_tensors({"image": img, "mask": mask + 5}, "cpu", mean=(0, 0, 0), std=(1, 1, 1), n_classes=3)
    with pytest.raises(SegTrainError, match="mask shape"):
        batch_to_tensors({"image": img, "mask": mask[:, :3]}, "cpu", mean=(0, 0, 0), std=(1, 1, 1))


def test_poly_lr_and_head_multiplier():
    m = build_segmenter("deeplabv2", 3, pretrained=False)
    opt = make_optimizer(SegmentationTask(m, head_lr_mult=10), LoopConfig(lr=0.01, optimizer="sgd"))
    assert [g["name"] for g in opt.param_groups] == ["backbone", "head"]
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1)
    assert set(map(id, opt.param_groups[1]["params"])) == set(map(id, m.aspp.parameters()))
    assert set_poly_lr(opt, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * 0.5**0.9)
    assert set_poly_lr(opt, 100, 100, 0.9) == 0.0 and set_poly_lr(opt, 3, None, 0.9) == pytest.approx(0.01)


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


def test_step_learns_and_evaluate_scores(tmp_path):
    torch.manual_seed(0)
    imgs, masks = _toy_batches(n=8)
    cfg = LoopConfig(optimizer="adamw", lr=0.05, weight_decay=0.0, amp=False, augment=False)
    trainer = Trainer(SegmentationTask(Tiny()), cfg, LocalStore(tmp_path))
    first = trainer.train_epoch([{"image": imgs, "mask": masks}], 1, 0, None)["loss"]
    last = trainer.train_epoch([{"image": imgs, "mask": masks}] * 40, 2, 1, None)
    assert last["loss"] < 0.3 * first and last["steps"] == 40
    metrics = evaluate(trainer.task.model, iter_minibatches(imgs, masks, 8, shuffle=False))
    assert metrics["miou"] > 0.9 and metrics["n_ignored_pixels"] == int((masks == 255).sum())


@pytest.mark.slow
def test_deeplab_fit_local_checkpoints_resume_and_reload(tmp_path):
    """Stage 2 through the one loop: 2 epochs, a restart that continues at epoch 3, reload from best.pt."""
    torch.manual_seed(0)
    imgs, masks = _toy_batches(n=4, size=16)
    model = build_segmenter("deeplabv2", 3, pretrained=False, output_stride=16)
    cfg = LoopConfig(
        epochs=2, lr=2.5e-4, optimizer="sgd", weight_decay=5e-4, schedule="poly", amp=False, grad_clip=1.0
    )
    train = lambda e: iter_minibatches(imgs, masks, 2, seed=e)  # noqa: E731
    val = lambda e: iter_minibatches(imgs, masks, 4, shuffle=False)  # noqa: E731
    res = fit_local(SegmentationTask(model), train, cfg, tmp_path, val_data=val, log_fn=None)
    assert res["epochs_run"] == 2 and len(res["history"]) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert res["history"][-1]["step"] == 4
    assert res["history"][-1]["lr"] < 2.5e-4  # poly schedule decayed over the known epoch length
    assert res["history"][-1]["val_score"] == res["history"][-1]["val"]["miou"]
    assert (tmp_path / "best.pt").is_file() and len(
        (tmp_path / "metrics.jsonl").read_text().splitlines()
    ) == 2
    # A restart with 3 epochs resumes after epoch 2 instead of starting over.
    model2 = build_segmenter("deeplabv2", 3, pretrained=False, output_stride=16)
    cfg3 = LoopConfig(**{**cfg.to_dict(), "epochs": 3})
    res3 = fit_local(SegmentationTask(model2), train, cfg3, tmp_path, val_data=val, log_fn=None)
    assert res3["epochs_run"] == 1 and [h["epoch"] for h in res3["history"]] == [1, 2, 3]
    assert res3["history"][-1]["start_epoch"] == 3 and res3["history"][-1]["step"] == 6
    # The last checkpoint alone rebuilds an identical model.
    reloaded = load_segmenter(tmp_path / "last.pt")
    model2.eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model2(x))
    with pytest.raises(SegTrainError, match="not a pbip-engine checkpoint"):
        torch.save({"model": {}}, tmp_path / "junk.pt")
        load_segmenter(tmp_path / "junk.pt")


def _depthwise(block: nn.Module) -> bool:
    conv = block[0]
    return conv.groups == conv.in_channels > 1 and conv.kernel_size == (3, 3)


def test_v3plus_head_is_separable_and_older_checkpoints_rebuild_dense():
    # DeepLab-v3+ paper §3.2: atrous separable ASPP and decoder. Checkpoints written before the option
    # carry no "separable" key and hold dense 3x3 weights: they must rebuild dense, key for key.
    sep = build_segmenter("deeplabv3plus", 3, pretrained=False, crop_px=192)
    assert sep.config["separable"] is True
    assert all(_depthwise(b) for b in sep.aspp.branches[1:-1]) and all(_depthwise(b) for b in sep.decoder[:2])
    dense = build_segmenter("deeplabv3plus", 3, pretrained=False, crop_px=192, separable=False)
    assert not any(_depthwise(b) for b in [*dense.aspp.branches[1:-1], *dense.decoder[:2]])
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(sep) < 0.7 * n_params(dense)
    old = {k: v for k, v in dense.config.items() if k != "separable"}
    rebuilt = segmenter_from_config(json.loads(json.dumps(old)))
    assert rebuilt.config["separable"] is False
    rebuilt.load_state_dict(dense.state_dict())  # strict: same keys and shapes
    again = segmenter_from_config(json.loads(json.dumps(sep.config)))
    again.load_state_dict(sep.state_dict())
    assert build_segmenter("deeplabv2", 3, pretrained=False).config["separable"] is False  # v2: no 3x3 head


def test_segmentation_task_trains_channels_last_with_the_same_numbers():
    torch.manual_seed(0)
    model = build_segmenter("deeplabv3plus", 3, pretrained=False, crop_px=64)
    reference = build_segmenter("deeplabv3plus", 3, pretrained=False, crop_px=64)
    reference.load_state_dict(model.state_dict())
    task = SegmentationTask(model, amp=False)
    convs = [m.weight for m in task.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    rng = np.random.default_rng(0)
    raw = {"image": rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8),
           "mask": rng.integers(0, 3, (2, 64, 64), dtype=np.uint8)}  # fmt: skip
    batch = task.prepare(raw, torch.device("cpu"))
    task.eval()
    reference.eval()
    with torch.no_grad():
        ours = task(batch)["loss"]
        plain = nn.functional.cross_entropy(reference(batch["image"].contiguous()), batch["mask"])
    assert torch.allclose(ours, plain, atol=1e-4), (float(ours), float(plain))


# ------------------------------------------------------------------------ the weight average (EMA)


def test_average_is_the_running_mean_then_an_exponential_with_the_time_constant_in_steps():
    net = nn.BatchNorm1d(1)
    avg = WeightAverage(net, epochs=1.0, steps_per_epoch=4)  # tau = 4 steps
    values = [3.0, 7.0, -1.0, 5.0, 2.0, 8.0, 0.0, 4.0]
    expected, d = [], math.exp(-1 / 4)
    for n, v in enumerate(values):
        with torch.no_grad():
            net.weight.fill_(v)
            net.running_mean.fill_(10 * v)
            net.num_batches_tracked.fill_(n + 1)
        avg.update(net)
        prev = expected[-1] if expected else v
        share = min(n / (n + 1), d)
        expected.append(share * prev + (1 - share) * v)
        assert float(avg.module.weight.detach()) == pytest.approx(expected[-1], rel=1e-6)
        assert float(avg.module.running_mean) == pytest.approx(10 * expected[-1], rel=1e-6)  # buffers too
        assert int(avg.module.num_batches_tracked) == n + 1  # counters copied, not averaged
    assert expected[2] == pytest.approx(np.mean(values[:3]))  # warm-up: the plain mean
    assert avg.steps == len(values)
    assert float(net.weight.detach()) == values[-1]  # the trained model is untouched
    with pytest.raises(ValueError, match="time constant"):
        WeightAverage(net, epochs=0)


def _fit_averaged(out, epochs: int, ema: float, seed: int = 0):
    torch.manual_seed(seed)
    imgs, masks = _toy_batches(n=8)
    cfg = LoopConfig(epochs=epochs, lr=0.02, optimizer="adamw", amp=False, augment=False,
                     ema_epochs=ema)  # fmt: skip
    torch.manual_seed(1)
    task = SegmentationTask(Tiny())
    return fit_local(
        task,
        lambda e: iter_minibatches(imgs, masks, 2, seed=e),
        cfg,
        out,
        val_data=lambda e: iter_minibatches(imgs, masks, 8, shuffle=False),
        log_fn=None,
        steps_per_epoch=4,
    ), task


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_ships_the_average_validates_it_and_resumes_both(tmp_path):
    res, task = _fit_averaged(tmp_path / "straight", 3, ema=1.0)
    last = read_checkpoint(tmp_path / "straight" / "last.pt", "segmenter")
    trained = {k: v.cpu() for k, v in task.model.state_dict().items()}
    assert _same(last["training_model"], trained)  # the optimiser's weights, for a resume
    assert not _same(last["model"], trained)  # what readers load is the average, not the last step
    assert last["average_steps"] == 12
    # The validation score is the shipped model's.
    imgs, masks = _toy_batches(n=8)
    model = Tiny()
    model.load_state_dict(last["model"])
    shipped = evaluate(model, iter_minibatches(imgs, masks, 8, shuffle=False))
    assert res["history"][-1]["val_score"] == pytest.approx(shipped["miou"])
    # Stopped after epoch 2 and resumed: the same weights and the same average as the run straight through.
    _fit_averaged(tmp_path / "resumed", 2, ema=1.0)
    _fit_averaged(tmp_path / "resumed", 3, ema=1.0)
    again = read_checkpoint(tmp_path / "resumed" / "last.pt", "segmenter")
    assert again["epoch"] == 3 and again["average_steps"] == 12
    for key in ("training_model", "model"):
        for name, t in last[key].items():
            torch.testing.assert_close(again[key][name], t, msg=f"{key}.{name}")
    # Off (the default): no second copy of the weights, and "model" is the last step's.
    _, plain_task = _fit_averaged(tmp_path / "plain", 1, ema=0.0)
    plain = read_checkpoint(tmp_path / "plain" / "last.pt", "segmenter")
    assert "training_model" not in plain and _same(plain["model"], plain_task.model.state_dict())
