"""ClassNet / ImgMatchNet / training loop on tiny models (CPU, 32-64 px, 2 classes, random prototypes)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pbip_engine  # noqa: F401  (loads cuCIM before torch)
from pbip_engine.engine.embed.encoders.base import EncoderInfo
from pbip_engine.engine.nn.backbones import BackboneError, create_backbone
from pbip_engine.engine.nn.mit import FeatureInfo
from pbip_engine.engine.training.checkpoint import CheckpointError, read_checkpoint, restore_training_state
from pbip_engine.engine.training.inputs import to_model_input
from pbip_engine.engine.training.loop import LocalStore, LoopConfig, Trainer, fit_local, make_optimizer
from pbip_engine.methods.pbip.cams import evaluate_cams
from pbip_engine.methods.pbip.classnet import (
    VARIANTS,
    ClassNetConfig,
    build_classnet,
    classnet_step,
    freeze_encoder,
)
from pbip_engine.methods.pbip.task import PbipTask

D = 16  # prototype / bank-encoder dim


class TinyBackbone(nn.Module):
    """Three conv stages at 1/2, 1/4, 1/8 with timm's features_only interface."""

    def __init__(self) -> None:
        super().__init__()
        chans = [8, 12, 16]
        layers, c_in = [], 3
        for c in chans:
            layers.append(nn.Sequential(nn.Conv2d(c_in, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU()))
            c_in = c
        self.stages = nn.ModuleList(layers)
        self.feature_info = FeatureInfo(chans, [2, 4, 8])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return out


class TinyEncoder(nn.Module):
    """A stand-in bank encoder: conv + BN + GAP + linear to D, with an ``info`` like engine.encoders."""

    def __init__(self) -> None:
        super().__init__()
        self.info = EncoderInfo("tiny", 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), D)
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, D)
        self.seen_sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_sizes.append(tuple(x.shape[-2:]))
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def tiny_cfg(**kw) -> ClassNetConfig:
    base = {"pretrained": False, "levels": (1, 2, 3), "hidden": 16, "amp": False, "lr": 1e-3}
    return ClassNetConfig(**{**base, **kw})


def tiny_model(cfg: ClassNetConfig | None = None, k=(2, 2), seed: int = 0):
    torch.manual_seed(seed)
    cfg = cfg or tiny_cfg()
    protos = F.normalize(torch.randn(sum(k), D), dim=1)
    return build_classnet(cfg, protos, list(k), len(k), backbone=TinyBackbone()), cfg


def toy_batch(n: int = 4, size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Solid red (class 1), solid blue (class 2) and half/half (both) images: trivially separable."""
    rng = np.random.default_rng(seed)
    imgs, labels, masks = [], [], []
    for _ in range(n):
        kind = int(rng.integers(3))
        img = np.zeros((size, size, 3), np.uint8)
        mask = np.zeros((size, size), np.uint8)
        if kind == 0:
            img[..., 0], mask[:] = 220, 1
        elif kind == 1:
            img[..., 2], mask[:] = 220, 2
        else:
            img[:, : size // 2, 0], mask[:, : size // 2] = 220, 1
            img[:, size // 2 :, 2], mask[:, size // 2 :] = 220, 2
        imgs.append(img)
        labels.append([float(kind != 1), float(kind != 0)])
        masks.append(mask)
    return {"image": np.stack(imgs), "labels": np.asarray(labels, np.float32), "mask": np.stack(masks)}


def test_forward_shapes_and_eq2():
    model, _ = tiny_model()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert [tuple(c.shape) for c in out["cams"]] == [(2, 2, 16, 16), (2, 2, 8, 8), (2, 2, 4, 4)]
    assert [tuple(z.shape) for z in out["logits"]] == [(2, 2)] * 3
    assert tuple(out["subclass_cams"][0].shape) == (2, 4, 16, 16)
    # Eq. 2 by hand on the last level: mean over K of the cosine to each projected prototype, times s_i
    f = model.backbone(x)[-1]
    p = F.normalize(model.projectors[-1](model.prototypes), dim=1)
    cos = torch.einsum("bchw,mc->bmhw", F.normalize(f, dim=1), p)
    expected = model.logit_scale[-1] * torch.stack([cos[:, :2].mean(1), cos[:, 2:].mean(1)], 1)
    torch.testing.assert_close(out["cams"][-1], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["logits"][-1], expected.mean((2, 3)), rtol=1e-4, atol=1e-5)


def test_merge_rules_differ_and_follow_mode():
    cfg = tiny_cfg(merge_train="mean", merge_eval="softmax_max")
    model, _ = tiny_model(cfg)
    z = torch.tensor([[0.0, 2.0, 1.0, 1.0]])
    mean = model.merge_subclasses(z, "mean")
    smax = model.merge_subclasses(z, "softmax_max")
    torch.testing.assert_close(mean, torch.tensor([[1.0, 1.0]]))
    w = torch.softmax(torch.tensor([0.0, 2.0]), 0)
    torch.testing.assert_close(smax, torch.tensor([[float((w * torch.tensor([0.0, 2.0])).sum()), 1.0]]))
    model.train()
    assert model.merge == "mean"
    model.eval()
    assert model.merge == "softmax_max"


def test_uneven_k_and_nk_layout():
    cfg = tiny_cfg()
    m3 = build_classnet(cfg, torch.randn(2, 3, D), None, 2, backbone=TinyBackbone())
    assert m3.k_list == [3, 3] and tuple(m3.prototypes.shape) == (6, D)
    m = build_classnet(cfg, torch.randn(5, D), [2, 3], 2, backbone=TinyBackbone())
    assert tuple(m(torch.randn(1, 3, 32, 32))["logits"][0].shape) == (1, 2)
    with pytest.raises(ValueError, match="k_list sums to 4"):
        build_classnet(cfg, torch.randn(5, D), [2, 2], 2, backbone=TinyBackbone())


def test_sim_gradient_reaches_backbone_not_encoder():
    model, cfg = tiny_model(tiny_cfg(alpha=0.0, beta=1.0))
    enc = TinyEncoder()
    enc.train()
    batch = to_model_input(toy_batch(4, seed=1), cfg.mean, cfg.std, "cpu")
    loss, stats = classnet_step(model, enc, batch, cfg)
    assert stats["n_sim"] == batch["labels"].sum().item() > 0
    assert stats["l_cls"] > 0 and loss.item() == pytest.approx(stats["l_sim"], rel=1e-5)
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum().item() for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    assert not enc.training  # put in eval mode: BN statistics of the frozen encoder do not move
    assert enc.seen_sizes[-1] == (32, 32)


def test_sim_size_and_dim_check():
    model, cfg = tiny_model(tiny_cfg(sim_size=16))
    enc = freeze_encoder(TinyEncoder())
    batch = to_model_input(toy_batch(2), cfg.mean, cfg.std, "cpu")
    classnet_step(model, enc, batch, cfg)
    assert enc.seen_sizes[-1] == (16, 16)
    enc.fc = nn.Linear(8, D + 1)
    with pytest.raises(ValueError, match="17-d but the prototypes are 16-d"):
        classnet_step(model, enc, batch, cfg)


def test_no_present_class_gives_zero_sim():
    model, cfg = tiny_model()
    batch = to_model_input(toy_batch(2), cfg.mean, cfg.std, "cpu")
    batch["labels"] = torch.zeros_like(batch["labels"])
    _, stats = classnet_step(model, freeze_encoder(TinyEncoder()), batch, cfg)
    assert stats["n_sim"] == 0 and stats["l_sim"] == 0.0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_run(variant):
    overrides = {"pretrained": False, "hidden": 16, "amp": False}
    cfg = ClassNetConfig.from_variant(variant, **overrides)
    if variant == "reference":
        assert cfg.threshold == "per_image" and cfg.sim_loss == "infonce_batch" and cfg.tau == 0.07
        cfg.levels, cfg.level_weights, cfg.fuse_weights = (1, 2, 3), (0.1, 1.0, 1.0), (0.0, 0.0, 1.0)
        cfg.eval_fuse_weights = (0.3, 0.3, 0.4)
    else:
        cfg.levels = (1, 2, 3)
    model, _ = tiny_model(cfg)
    batch = to_model_input(toy_batch(3), cfg.mean, cfg.std, "cpu")
    loss, stats = classnet_step(model, freeze_encoder(TinyEncoder()), batch, cfg)
    assert math.isfinite(loss.item()) and stats["l_fgs"] > 0


def loop_cfg(cfg, **kw):
    return LoopConfig(**{"epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "amp": False,
                         "augment": False, **kw})  # fmt: skip


def tiny_trainer(tmp_path, cfg_kw=None, **loop_kw):
    model, cfg = tiny_model(tiny_cfg(**(cfg_kw or {})))
    task = PbipTask(model, cfg, TinyEncoder())
    return Trainer(task, loop_cfg(cfg, **loop_kw), LocalStore(tmp_path)), model, cfg


@pytest.mark.slow
def test_loss_decreases_on_toy_task(tmp_path):
    trainer, model, cfg = tiny_trainer(tmp_path, {"lr": 3e-3})
    batches = [toy_batch(6, seed=s) for s in range(20)]
    first = trainer.train_epoch(batches[:3], 1, 0, None)
    trainer.train_epoch(batches[3:17], 2, 3, None)
    last = trainer.train_epoch(batches[17:], 3, 17, None)
    assert last["l_cls"] < 0.5 * first["l_cls"], (first, last)
    assert first["steps"] == 3 and first["images"] == 18 and first["images_per_s"] > 0
    val = evaluate_cams(model, [toy_batch(6, seed=99)], cfg, "cpu", 2, ignore_background=True)
    assert val["ignore_background"] is True and val["boundary_band_px"] == 1
    assert val["miou"] > 0.5  # solid colours become separable after a few steps


def test_optimizer_groups():
    """Backbone at the base rate, fresh projectors/logit scale at new_parts_lr_mult; no decay below 2-D."""
    model, cfg = tiny_model(tiny_cfg(new_parts_lr_mult=10.0))
    opt = make_optimizer(PbipTask(model, cfg, TinyEncoder()), loop_cfg(cfg))
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"backbone", "backbone_no_decay", "new", "new_no_decay"}
    assert groups["backbone"]["lr"] == cfg.lr and groups["new"]["lr"] == pytest.approx(10 * cfg.lr)
    assert groups["new_no_decay"]["weight_decay"] == 0.0 and groups["new"]["weight_decay"] == cfg.weight_decay
    no_decay = {id(p) for p in groups["new_no_decay"]["params"]}
    assert id(model.logit_scale) in no_decay and id(model.projectors[0].fc1.bias) in no_decay
    assert id(model.projectors[0].fc1.weight) in {id(p) for p in groups["new"]["params"]}
    assert {id(p) for p in model.backbone.parameters()} == {
        id(p) for g in ("backbone", "backbone_no_decay") for p in groups[g]["params"]
    }
    frozen = {id(p) for p in PbipTask(model, cfg, TinyEncoder()).bank_encoder.parameters()}
    assert not frozen & {id(p) for g in opt.param_groups for p in g["params"]}  # the encoder never trains


def test_to_model_input_normalises():
    b = {"image": np.full((1, 4, 4, 3), 255, np.uint8), "labels": np.ones((1, 2))}
    out = to_model_input(b, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "cpu")
    assert tuple(out["image"].shape) == (1, 3, 4, 4) and torch.allclose(out["image"], torch.ones(1))
    with pytest.raises(ValueError, match="B,H,W,3"):
        to_model_input({"image": np.zeros((1, 3, 4, 4), np.uint8)}, (0, 0, 0), (1, 1, 1), "cpu")


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    trainer, model, cfg = tiny_trainer(tmp_path)
    trainer.train_epoch([toy_batch(2)], 1, 0, None)
    path = tmp_path / "c.pt"
    trainer._writer(3, 7, {"miou": 0.5})(path)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name == ".pbip-tmp"]
    other, _ = tiny_model(seed=1)
    opt2 = make_optimizer(PbipTask(other, cfg), loop_cfg(cfg))
    state = read_checkpoint(path, "stage1:pbip")
    restore_training_state(path, state, other, opt2)
    assert state["epoch"] == 3 and state["step"] == 7 and state["metrics"]["miou"] == 0.5
    assert state["model_config"]["levels"] == [1, 2, 3]
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"]  # AdamW moments restored
    wrong, _ = tiny_model(k=(3, 2))
    with pytest.raises(CheckpointError, match="prototypes"):
        restore_training_state(path, state, wrong)
    with pytest.raises(CheckpointError, match="segmenter"):
        read_checkpoint(path, "segmenter")


def test_fit_local_resume_and_best(tmp_path):
    """Stage 1 through the one loop: stop after epoch 1, restart, the history continues at epoch 2."""
    model, cfg = tiny_model(tiny_cfg(epochs=2))
    train = lambda epoch: [toy_batch(4, seed=epoch)]  # noqa: E731
    val = [toy_batch(4, seed=123)]
    r1 = fit_local(PbipTask(model, cfg, TinyEncoder()), train, loop_cfg(cfg, epochs=1), tmp_path,
                   val_data=val, log_fn=None)  # fmt: skip
    assert r1["epochs_run"] == 1 and (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    model2, _ = tiny_model(cfg, seed=5)
    r2 = fit_local(
        PbipTask(model2, cfg, TinyEncoder()), train, loop_cfg(cfg), tmp_path, val_data=val, log_fn=None
    )
    assert r2["epochs_run"] == 1  # resumed at epoch 2 of 2
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and [r["start_epoch"] for r in lines] == [1, 2]
    assert {"miou", "fwiou", "mdice", "mbiou", "score"} <= set(lines[1]["val"])
    assert (
        lines[1]["val_score"] == lines[1]["val"]["miou"]
    )  # masks in the val batches: CAM mIoU picks best.pt
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    best = read_checkpoint(tmp_path / "best.pt", "stage1:pbip")
    assert best["metrics"]["val_score"] == max(r["val_score"] for r in lines)
    r3 = fit_local(
        PbipTask(model2, cfg, TinyEncoder()), train, loop_cfg(cfg), tmp_path, val_data=val, log_fn=None
    )
    assert r3["epochs_run"] == 0


def test_labels_only_validation_scores_the_negative_loss(tmp_path):
    model, cfg = tiny_model(tiny_cfg(epochs=1))
    val = [{k: v for k, v in toy_batch(4, seed=7).items() if k != "mask"}]
    res = fit_local(PbipTask(model, cfg, TinyEncoder()), [toy_batch(4)], loop_cfg(cfg), tmp_path, val_data=val,
                    log_fn=None)  # fmt: skip
    row = res["history"][0]
    assert row["val_score"] == pytest.approx(-row["val"]["loss"]) and row["val"]["loss"] > 0


def test_ddp_wrapped_step(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, cfg = tiny_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        batch = to_model_input(toy_batch(2), cfg.mean, cfg.std, "cpu")
        loss, _ = classnet_step(ddp, freeze_encoder(TinyEncoder()), batch, cfg)
        loss.backward()
        assert model.projectors[0].fc1.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_mit_checkpoint(tmp_path):
    mit = create_backbone("mit_b0", pretrained=False, out_indices=(1, 2, 3, 4))
    outs = mit(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs] == [
        (32, 16, 16),
        (64, 8, 8),
        (160, 4, 4),
        (256, 4, 4),
    ]  # strides 4,2,2,1
    assert mit.feature_info.reduction() == [4, 8, 16, 16]
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in mit.state_dict().items()}
    sd["head.weight"] = torch.randn(1000, 256)
    sd.pop("block1.0.mlp.fc2.bias")
    torch.save({"state_dict": sd}, tmp_path / "mit_b0.pth")
    loaded = create_backbone("mit_b0", pretrained=tmp_path / "mit_b0.pth", out_indices=(2, 3, 4))
    assert loaded.load_report == {"missing": ["block1.0.mlp.fc2.bias"], "unexpected": []}  # head.* popped
    assert torch.equal(loaded.state_dict()["block4.1.attn.q.weight"], sd["block4.1.attn.q.weight"])
    sd["patch_embed2.proj.weight"] = torch.randn(64, 32, 5, 5)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(BackboneError, match=r"patch_embed2\.proj\.weight.*\(64, 32, 5, 5\)"):
        create_backbone("mit_b0", pretrained=tmp_path / "bad.pth")
    with pytest.raises(BackboneError, match=r"mit_b1\.pth"):
        create_backbone("mit_b1", pretrained=True)


def test_efficientnet_backbone_imagenet_weights():
    from pbip_engine.engine.embed.encoders.efficientnet import efficientnet_lite0_imagenet_state_dict

    bb = create_backbone("efficientnet_lite0", pretrained=True, out_indices=(2, 3, 4))
    assert bb.feature_info.channels() == [40, 112, 320]
    assert bb.load_report == {"missing": [], "unexpected": []}
    ref = efficientnet_lite0_imagenet_state_dict()
    assert torch.equal(bb.state_dict()["blocks.5.0.conv_pw.weight"], ref["blocks.5.0.conv_pw.weight"])


def test_encoder_input_conversion():
    model, cfg = tiny_model()
    enc = TinyEncoder()  # info: input 32 px, mean 0.5, std 0.25
    img01 = torch.rand(2, 3, 64, 64)
    x = model.matcher.encoder_input(img01, enc)
    ref = F.interpolate(img01, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(x, (ref - 0.5) / 0.25)
    enc.channel_order = "bgr"  # PBIP's cv2 order: channels flipped, statistics used as given
    torch.testing.assert_close(model.matcher.encoder_input(img01, enc), (ref.flip(1) - 0.5) / 0.25)
    # the backbone-normalised batch is denormalised before masking: FG of an all-foreground map is the image
    u8 = toy_batch(1)
    batch = to_model_input(u8, cfg.mean, cfg.std, "cpu")
    back = (batch["image"] * model.matcher.std + model.matcher.mean) * 255
    assert torch.allclose(back.permute(0, 2, 3, 1), torch.as_tensor(u8["image"]).float(), atol=1e-3)


def test_competitive_pooling_makes_present_classes_split_the_tile():
    """GAP scores a class on its own CAM; competitive pooling scores its share of the pixels it wins."""
    from pbip_engine.methods.pbip.classnet import competitive_logits

    split = torch.zeros(1, 2, 8, 8)
    split[0, 0, :, :4], split[0, 1, :, 4:] = 5.0, 5.0  # each class wins half the tile
    everywhere = torch.stack([torch.full((8, 8), 5.0), torch.full((8, 8), 4.0)])[
        None
    ]  # both "high" everywhere
    s, e = competitive_logits(split, 0.1), competitive_logits(everywhere, 0.1)
    assert s[0, 0] > 3 and s[0, 1] > 3  # both present: each owns its pixels
    assert e[0, 0] > 0 > e[0, 1]  # class 1 wins no pixel: scored absent, although GAP would score it 4
    assert everywhere.mean((2, 3))[0, 1] == 4.0
    cams = split.clone().requires_grad_(True)
    torch.nn.functional.binary_cross_entropy_with_logits(
        competitive_logits(cams), torch.ones(1, 2)
    ).backward()
    assert cams.grad is not None and cams.grad.abs().sum() > 0


def test_competitive_pooling_is_a_classnet_option():
    from pbip_engine.methods.pbip.classnet import ClassNetConfig

    cfg = ClassNetConfig(pretrained=False, pooling="competitive", pool_top=0.2)
    net = build_classnet(cfg, torch.randn(4, D), [2, 2], 2, backbone=TinyBackbone())
    out = net(torch.randn(2, 3, 32, 32))
    assert all(lg.shape == (2, 2) for lg in out["logits"]) and net.pooling == "competitive"
    with pytest.raises(ValueError, match="pooling"):
        ClassNetConfig(pooling="max").validate()


def test_input_px_feeds_the_network_a_larger_tile_and_returns_tile_sized_cams():
    from pbip_engine.methods.pbip.cams import predict_cams

    cfg = tiny_cfg(input_px=64)
    model, _ = tiny_model(cfg)
    seen = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    batch = {"image": np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)}
    task = PbipTask(model, cfg, None)
    assert tuple(task.prepare(batch, torch.device("cpu"))["image"].shape[-2:]) == (64, 64)
    cams = predict_cams(model, batch, cfg, "cpu")
    assert seen[-1] == (64, 64) and tuple(cams.shape) == (2, 2, 32, 32)
    # the finest level now has 64/2 = 32 cells instead of 16: the CAM is finer, not only upsampled
    plain, _ = tiny_model(tiny_cfg())
    assert (
        plain(torch.zeros(1, 3, 32, 32))["cams"][0].shape[-1] * 2
        == model(torch.zeros(1, 3, 64, 64))["cams"][0].shape[-1]
    )


def test_raw_cam_readout_keeps_the_classes_relative_scale():
    """``cam_readout: raw``: a softmax over the classes of the raw fused CAMs, whose argmax is the raw
    argmax; min-max per map can flip a pixel to a class that is weak everywhere in the tile."""
    from pbip_engine.methods.pbip.cams import _fused, _readout, predict_cams

    cfg = tiny_cfg(cam_readout="raw")
    model, _ = tiny_model(cfg)
    batch = {"image": np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)}
    cams = predict_cams(model, batch, cfg, "cpu")
    assert cams.min() >= 0 and cams.max() <= 1
    torch.testing.assert_close(cams.sum(1), torch.ones(2, 32, 32))
    x = to_model_input(batch, cfg.mean, cfg.std, "cpu")["image"]
    _, raw, _ = _fused(model.eval(), x, cfg, "cpu")
    assert torch.equal(cams.argmax(1), raw.argmax(1))
    weak = torch.tensor([[[[0.9, 1.0]], [[-2.0, -1.9]]]])  # class 1 far below class 0 everywhere
    mm = torch.tensor([[[[0.0, 1.0]], [[0.0, 1.0]]]])  # ... yet both span [0, 1] after min-max
    assert _readout(mm, weak, cfg).argmax(1).eq(0).all()


def test_readout_keys_rerun_the_pseudo_stage_and_keep_the_trained_model(tmp_path):
    """``cam_readout`` / ``eval_fuse_weights`` only change how CAMs are read: the classnet stage's input hash
    leaves them out (no retraining), the pseudo stage's keeps them, and the CAM model takes them from the
    spec over the values saved in the checkpoint."""
    from pbip_engine.engine.prototypes.bank import Bank
    from pbip_engine.jobs.pseudo import PseudoStage
    from pbip_engine.jobs.train_stage1 import ClassNetStage
    from pbip_engine.methods import Stage1Inputs, get_method
    from pbip_engine.methods.base import PseudoOptions
    from pbip_engine.methods.pbip.cams import predict_cams
    from pbip_engine.schemas.spec import parse_spec

    base = {
        "run": {"name": "t", "output": "out"},
        "data": {"synthetic": {"slides": 1, "size": 768}},
        "classes": [{"name": "red", "color": [200, 0, 0]}, {"name": "blue", "color": [0, 0, 200]}],
    }

    def spec(**method):
        return parse_spec({**base, "method": {"name": "pbip", "use_sim": False, **method}}, tmp_path)

    trained = spec(levels=[2, 3], cam_readout="minmax")
    reread = spec(levels=[2, 3], cam_readout="raw", eval_fuse_weights=[1, 0])
    retrained = spec(levels=[2, 3], cam_readout="minmax", input_px=64)
    classnet, pseudo = ClassNetStage(), PseudoStage()
    assert classnet.spec_json(trained) == classnet.spec_json(reread)
    assert pseudo.spec_json(trained) != pseudo.spec_json(reread)
    assert classnet.spec_json(trained) != classnet.spec_json(retrained)

    torch.manual_seed(0)
    Bank(["red", "blue"], [2, 2], 5, "tiny", F.normalize(torch.randn(4, D), dim=1).numpy(),
         [["a"]] * 4).save(tmp_path / "bank")  # fmt: skip
    method = get_method("pbip")
    inputs = Stage1Inputs(["red", "blue"], bank_dir=tmp_path / "bank")
    cfg = trained.method.model_copy(update={"backbone_checkpoint": None})
    task = method.stage1_task(cfg.model_copy(update={"lr": 1e-3}), inputs)
    fit_local(task, lambda e: [toy_batch(4, seed=e)], LoopConfig(epochs=1, lr=1e-3, amp=False), tmp_path / "s1",
              log_fn=None)  # fmt: skip
    batch = toy_batch(3, seed=5)
    as_trained = method.load_cam_model(trained.method, tmp_path / "s1" / "last.pt", inputs, "cpu")
    as_reread = method.load_cam_model(reread.method, tmp_path / "s1" / "last.pt", inputs, "cpu")
    assert as_trained.cfg.cam_readout == "minmax" and as_trained.cfg.eval_fuse_weights is None
    assert as_reread.cfg.cam_readout == "raw" and as_reread.cfg.eval_fuse_weights == (1, 0)
    opts = PseudoOptions(background="none")
    got = as_reread.predict_cams(batch, opts)
    want = predict_cams(as_reread.model, batch, as_reread.cfg, "cpu").numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)  # the raw read-out is a softmax over classes
    assert not np.allclose(got, as_trained.predict_cams(batch, opts), atol=1e-3)


def test_matcher_pads_the_encoder_batch_to_fixed_sizes():
    """The (image, class) pair count changes every batch; the encoder must see a few padded batch sizes only
    (cuDNN autotuning re-tunes every new shape), and the padding must not change a feature or a mask."""
    from pbip_engine.methods.pbip import losses as L
    from pbip_engine.methods.pbip.classnet import SIM_BATCH_MULTIPLE

    model, cfg = tiny_model()
    model.eval()
    enc = freeze_encoder(TinyEncoder())
    sizes: list[int] = []
    enc.register_forward_pre_hook(lambda m, a: sizes.append(len(a[0])))
    x = to_model_input(toy_batch(5), cfg.mean, cfg.std, "cpu")["image"]
    y = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1], [1, 0]], dtype=torch.float32)  # S = 7 pairs
    with torch.no_grad():
        cams = [c / model(x)["scales"][i] for i, c in enumerate(model(x)["cams"])]
        model.matcher(cams, x, y, enc)
        model.matcher.pad_multiple = SIM_BATCH_MULTIPLE  # what CUDA gets by default
        m = model.matcher(cams, x, y, enc)
    assert sizes == [14, 2 * SIM_BATCH_MULTIPLE]  # CPU: 7 FG + 7 BG as they are; padded: 16 + 16
    assert m["f_fg"].shape[0] == m["f_bg"].shape[0] == m["binary"].shape[0] == 7
    # the unpadded reference: the same 7 pairs through the encoder on their own
    fused = L.fuse_for_matching(cams, x.shape[-2:], model.matcher.fuse_weights)
    b, c = torch.nonzero(y > 0.5, as_tuple=True)
    binary = L.foreground_masks(fused, model.matcher.delta, model.matcher.threshold)[b, c]
    soft = L.minmax_per_channel(fused)[b, c]
    img01 = (x * model.matcher.std + model.matcher.mean).clamp(0, 1)[b]
    fg, bg = L.compose_fg_bg(img01, soft, binary.float())
    with torch.no_grad():
        ref = enc(model.matcher.encoder_input(torch.cat([fg, bg]), enc))
    torch.testing.assert_close(m["f_fg"], ref[:7])
    torch.testing.assert_close(m["f_bg"], ref[7:])
    assert torch.equal(m["binary"], binary)
