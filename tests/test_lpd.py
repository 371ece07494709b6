"""LPD (methods/lpd): the diversity regulariser is the paper's (one softmax, class c on the pixels of class c),
the InfoNCE, the warm-up, training end to end with a CAM model from the checkpoint, the atlas, and the spec checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_classnet import D, TinyBackbone, TinyEncoder, toy_batch

from pbip_engine.engine.training.loop import LoopConfig, fit_local
from pbip_engine.methods import PseudoOptions, Stage1Inputs, get_method
from pbip_engine.methods.lpd.cams import LpdCamModel
from pbip_engine.methods.lpd.losses import class_regions, diversity_loss, infonce_losses
from pbip_engine.methods.lpd.method import lpdnet_config
from pbip_engine.methods.lpd.model import LpdNetConfig, build_lpdnet, initial_prototypes
from pbip_engine.methods.lpd.task import LpdTask
from pbip_engine.schemas.spec import SpecError, parse_spec

SPEC = {
    "run": {"name": "t", "output": "out"},
    "data": {"synthetic": {"slides": 1, "size": 768}},
    "classes": [{"name": "red", "color": [200, 0, 0]}, {"name": "blue", "color": [0, 0, 200]}],
}


# -- the diversity regulariser ---------------------------------------------------------------------------


def _two_region_features(c: int = 4, h: int = 4, w: int = 8) -> torch.Tensor:
    """[1, c, h, w]: the left half of the map has feature e0, the right half e1."""
    f = torch.zeros(1, c, h, w)
    f[0, 0, :, : w // 2] = 1
    f[0, 1, :, w // 2 :] = 1
    return f


def test_diversity_is_one_for_identical_prototypes_and_lower_for_disjoint_ones():
    f = _two_region_features()
    regions = torch.zeros(1, 1, 4, 8, dtype=torch.bool)
    regions[0, 0] = True  # one class, whole map
    identical = torch.tensor([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0]])
    disjoint = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])  # one per half
    same, n = diversity_loss(f, identical, regions, k=2, tau=0.1)
    apart, _ = diversity_loss(f, disjoint, regions, k=2, tau=0.1)
    assert n == 1
    assert same.item() == pytest.approx(1.0, abs=1e-6)  # J = 0 -> exp(0)
    assert apart.item() < 0.05  # distributions on opposite halves: large Jeffreys divergence


def test_diversity_is_not_constant_and_has_a_gradient():
    """The public code's double softmax made exp(-J) ~ 1 whatever the prototypes; one softmax must not."""
    torch.manual_seed(0)
    f = torch.randn(2, 8, 6, 6)
    regions = torch.ones(2, 2, 6, 6, dtype=torch.bool)
    p = torch.randn(2 * 3, 8, requires_grad=True)
    loss, n = diversity_loss(f, p, regions, k=3)
    loss.backward()
    assert n == 4 and 0.0 < loss.item() < 0.99
    assert p.grad is not None and p.grad.abs().sum() > 1e-3
    other, _ = diversity_loss(f, torch.randn(6, 8), regions, k=3)
    assert abs(other.item() - loss.item()) > 1e-3
    # a gradient step on the term lowers it (the prototypes spread out)
    q = p.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([q], lr=5.0)
    for _ in range(20):
        opt.zero_grad()
        diversity_loss(f, q, regions, k=3)[0].backward()
        opt.step()
    assert diversity_loss(f, q, regions, k=3)[0].item() < loss.item() - 0.01


def test_diversity_compares_class_c_prototypes_with_class_c_pixels():
    """Class 1's prototypes are scored on class 1's region only (the public code used class c - 1's)."""
    f = _two_region_features()
    diverse, same = [[1.0, 0, 0, 0], [0, 1.0, 0, 0]], [[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0]]
    only_class1 = torch.zeros(1, 2, 4, 8, dtype=torch.bool)
    only_class1[0, 1] = True  # class 0 has no pixels
    # class 1 identical -> exactly 1 regardless of class 0's prototypes
    loss, _ = diversity_loss(f, torch.tensor(diverse + same), only_class1, k=2, tau=0.1)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    # class 1 diverse -> low, even though class 0's prototypes are identical
    loss, _ = diversity_loss(f, torch.tensor(same + diverse), only_class1, k=2, tau=0.1)
    assert loss.item() < 0.05


def test_k1_and_empty_regions_give_zero():
    f = torch.randn(1, 4, 3, 3)
    assert diversity_loss(f, torch.randn(2, 4), torch.ones(1, 2, 3, 3, dtype=torch.bool), k=1)[1] == 0
    zero, n = diversity_loss(f, torch.randn(4, 4), torch.zeros(1, 2, 3, 3, dtype=torch.bool), k=2)
    assert n == 0 and zero.item() == 0.0


def test_class_regions_follow_the_labels_and_the_class_index():
    fused = torch.zeros(1, 2, 2, 2)
    fused[0, 0] = torch.tensor([[1.0, 0.9], [0.1, 0.0]])
    fused[0, 1] = torch.tensor([[0.2, 0.3], [0.8, 0.9]])
    both = class_regions(fused, torch.tensor([[1.0, 1.0]]), delta=0.5)
    assert both[0, 0].tolist() == [[True, True], [False, False]]
    assert both[0, 1].tolist() == [[False, False], [True, True]]
    only0 = class_regions(fused, torch.tensor([[1.0, 0.0]]), delta=0.5)
    assert not only0[0, 1].any() and only0[0, 0].tolist() == [[True, True], [False, False]]


# -- InfoNCE ------------------------------------------------------------------------------------------


def test_infonce_prefers_crops_near_their_own_class():
    protos = torch.eye(4)  # classes 0, 1 with k = 2: prototypes e0, e1 | e2, e3
    pc = torch.tensor([0, 0, 1, 1])
    cls = torch.tensor([0])
    good_fg, good_bg = infonce_losses(
        torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 0, 1.0, 0]]), cls, protos, pc
    )
    bad_fg, bad_bg = infonce_losses(
        torch.tensor([[0, 0, 1.0, 0]]), torch.tensor([[1.0, 0, 0, 0]]), cls, protos, pc
    )
    assert good_fg < 0.01 < bad_fg and good_bg < 0.01 < bad_bg
    # hard negatives: only the most similar other-class prototype counts
    z = torch.tensor([[1.0, 0, 0.5, 0]])
    all_neg, _ = infonce_losses(z, z, cls, protos, pc)
    hard, _ = infonce_losses(z, z, cls, protos, pc, hard_negatives=1)
    assert hard < all_neg


# -- the model and its training step ------------------------------------------------------------------


def tiny_lpd(k: int = 3, **kw) -> tuple[LpdTask, LpdNetConfig]:
    torch.manual_seed(0)
    base = {
        "pretrained": False,
        "levels": (1, 2, 3),
        "hidden": 16,
        "amp": False,
        "k": k,
        "proto_dim": 8,
        "enc_dim": D,
    }
    cfg = LpdNetConfig(**{**base, **kw})
    net = build_lpdnet(cfg, 2, initial_prototypes(2, k, 8), backbone=TinyBackbone())
    return LpdTask(net, cfg, TinyEncoder()), cfg


def test_prototypes_are_learnable_and_the_warm_up_is_classification_only():
    task, _ = tiny_lpd(warmup_iters=2)
    assert isinstance(task.model.prototypes, torch.nn.Parameter)
    batch = task.prepare(toy_batch(6), torch.device("cpu"))
    first = task(batch)
    assert first["warm"] == 0 and first["l_div"] == 0 and first["l_fg"] == 0
    first["loss"].backward()
    assert task.model.prototypes.grad.abs().sum() > 0  # the CAMs alone train the prototypes
    task(batch)
    third = task(batch)
    assert third["warm"] == 1 and third["l_div"] > 0 and third["l_fg"] > 0 and int(task.model.iters) == 3
    task.model.zero_grad()
    third["loss"].backward()
    assert task.model.psi.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in task.bank_encoder.parameters())  # the crop encoder stays frozen


def test_lambda_div_zero_removes_the_term():
    task, cfg = tiny_lpd(warmup_iters=0)
    cfg.lambda_div = 0.0
    out = task(task.prepare(toy_batch(6), torch.device("cpu")))
    assert out["l_div"] == 0 and out["l_fg"] > 0


def test_bank_initialisation_cycles_centres_with_jitter():
    protos = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0]])
    p = initial_prototypes(2, 3, 2, (protos, [2, 1]), seed=0)
    assert torch.equal(p[0], protos[0]) and torch.equal(p[1], protos[1]) and torch.equal(p[3], protos[2])
    assert torch.allclose(p[2], protos[0], atol=0.2) and not torch.equal(p[2], protos[0])


@pytest.mark.slow
def test_trains_end_to_end_and_the_checkpoint_makes_pseudo_masks(tmp_path):
    task, _ = tiny_lpd(k=2, warmup_iters=6, lr=1e-2)
    loop = LoopConfig(epochs=3, lr=1e-2, amp=False)
    res = fit_local(task, lambda e: [toy_batch(8, seed=e * 10 + i) for i in range(4)], loop, tmp_path / "s1",
                    val_data=[toy_batch(8, seed=99)], log_fn=None)  # fmt: skip
    hist = res["history"]
    assert hist[-1]["l_cls"] < hist[0]["l_cls"] and hist[-1]["warm"] == 1
    cams = LpdCamModel(tmp_path / "s1" / "last.pt", "cpu", backbone=TinyBackbone())
    assert int(cams.model.iters) == 12  # the warm-up counter travels with the checkpoint
    test = toy_batch(12, seed=5)
    masks = cams.predict_masks(test, PseudoOptions(background="none"))
    assert masks.shape == (12, 32, 32) and (masks == test["mask"]).mean() > 0.8
    power = cams.predict_masks(test, PseudoOptions(background="power", gamma=10))
    assert power.shape == masks.shape


def test_input_size_and_cam_readout_keys_are_pbips(tmp_path, monkeypatch):
    """LPD takes PBIP's CAM keys, so both run the same protocol (e.g. GlaS: 56-px tiles at 112 px, raw read-out):
    input_px resizes what the network sees, and the read-out keys re-read a checkpoint without retraining."""
    from pbip_engine.jobs.train_stage1 import ClassNetStage
    from pbip_engine.methods.lpd import cams as lpd_cams

    def spec(**method):
        return parse_spec({**SPEC, "method": {"name": "lpd", "levels": [2, 3], **method}}, tmp_path)

    trained, reread = spec(input_px=64), spec(input_px=64, cam_readout="raw", eval_fuse_weights=[1, 0])
    assert ClassNetStage().spec_json(trained) == ClassNetStage().spec_json(reread)
    assert ClassNetStage().spec_json(trained) != ClassNetStage().spec_json(spec(input_px=96))
    assert lpdnet_config(trained.method).input_px == 64
    with pytest.raises(SpecError, match="eval_fuse_weights"):
        spec(eval_fuse_weights=[1, 0, 0])

    task, _ = tiny_lpd(k=2, input_px=64)
    assert task.prepare(toy_batch(2), torch.device("cpu"))["image"].shape[-1] == 64
    fit_local(task, lambda e: [toy_batch(8, seed=e)], LoopConfig(epochs=1, lr=1e-2, amp=False), tmp_path / "s1",
              log_fn=None)  # fmt: skip
    ckpt = tmp_path / "s1" / "last.pt"
    readout = {"cam_readout": "raw", "eval_fuse_weights": [1, 0, 0]}
    raw = LpdCamModel(ckpt, "cpu", backbone=TinyBackbone(), readout=readout)
    as_trained = LpdCamModel(ckpt, "cpu", backbone=TinyBackbone())
    assert raw.cfg.input_px == 64 and raw.cfg.cam_readout == "raw" and raw.cfg.eval_fuse_weights == (1, 0, 0)
    assert as_trained.cfg.cam_readout == "minmax"
    batch, opts = toy_batch(3, seed=5), PseudoOptions(background="none")
    got = raw.predict_cams(batch, opts)
    assert got.shape == (3, 2, 32, 32)  # CAMs come back at the tile's size
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)  # the raw read-out: a softmax over the classes
    assert not np.allclose(got, as_trained.predict_cams(batch, opts), atol=1e-3)

    seen = {}
    monkeypatch.setattr(lpd_cams, "LpdCamModel", lambda ckpt, device, readout: seen.update(readout))
    get_method("lpd").load_cam_model(reread.method, ckpt, Stage1Inputs(["red", "blue"]), "cpu")
    assert seen == {"cam_readout": "raw", "eval_fuse_weights": [1.0, 0.0]}


# -- atlas ---------------------------------------------------------------------------------------------


def _png(rgb: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def test_atlas_from_a_tiles_parquet(tmp_path):
    from pbip_engine.methods.lpd.atlas import write_lpd_atlas

    task, cfg = tiny_lpd(k=2)
    b = toy_batch(10, seed=3)
    rows = [{"tile_id": f"s:{i}:0", "image": _png(img), "labels": lab.tolist(), "labelled": True}
            for i, (img, lab) in enumerate(zip(b["image"], b["labels"], strict=True))]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    out = write_lpd_atlas(
        tmp_path / "atlas.png", task.model, cfg, ["red", "blue"], [tmp_path / "s.parquet"], 8
    )
    import cv2

    img = cv2.imread(str(tmp_path / "atlas.png"))
    assert out == {"atlas": "atlas.png", "atlas_tiles": 8}
    assert img.shape == (4 * 96, 7 * 96, 3)  # 2 classes x k=2 rows; caption + 6 tiles
    assert img[96 * 0 + 48, 96 + 48].std() > 0  # a tile cell is drawn, not the empty grey


# -- spec --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "needle"),
    [
        ({"k": 0}, "method.lpd.k"),
        ({"lambda_div": -0.1}, "method.lpd.lambda_div"),
        ({"init": "kmeans"}, "init"),
    ],
)
def test_bad_method_keys_are_one_line_spec_errors(tmp_path, keys, needle):
    with pytest.raises(SpecError, match=needle):
        parse_spec({**SPEC, "method": {"name": "lpd", **keys}}, tmp_path)


def test_bank_only_with_init_bank_and_k_vs_labelled_tiles(tmp_path):
    from pbip_engine.jobs.driver import check_upstream, select_stages

    m = get_method("lpd")
    rand = parse_spec({**SPEC, "method": {"name": "lpd"}}, tmp_path)
    bank = parse_spec(
        {**SPEC, "method": {"name": "lpd", "init": "bank"}, "run": {"output": str(tmp_path / "r")}}, tmp_path
    )
    assert "bank" not in m.uses_stages(rand.method) and "bank" in m.uses_stages(bank.method)
    with pytest.raises(SpecError, match="does not use a prototype bank"):
        select_stages(rand, ["bank"])
    from pbip_engine.jobs.manifest import MANIFEST

    (tmp_path / "r" / "tile").mkdir(parents=True)
    (tmp_path / "r" / "tile" / MANIFEST).write_text("{}")
    with pytest.raises(SpecError, match=r"'classnet' needs \['bank'\].*method 'lpd'.*uses the bank"):
        check_upstream(bank, select_stages(bank, ["classnet"]), tmp_path / "r")
    msg = m.check_labels(rand.method, {"red": 40, "blue": 7})
    assert msg.startswith("method.k: 10") and "'blue': 7" in msg
    assert m.check_labels(rand.method, {"red": 40, "blue": 10}) is None
    ncfg = lpdnet_config(rand.method)
    assert ncfg.merge_train == ncfg.merge_eval == "softmax_max" and ncfg.tau == 0.07 and ncfg.k == 10
    assert math.isclose(ncfg.lambda_div, 0.5)
    inputs = Stage1Inputs.from_spec(bank, None)
    with pytest.raises(ValueError, match=r"method\.init: 'bank'"):
        m.stage1_task(bank.method.model_copy(update={"use_sim": False}), inputs)


def test_demo_keys_are_valid_lpd_keys(tmp_path):
    spec = parse_spec({**SPEC, "method": {"name": "lpd", **get_method("lpd").demo_keys}}, tmp_path)
    assert spec.method.warmup_iters < 3000
    assert json.loads(spec.section_json("method"))["method"]["name"] == "lpd"


# -- dense CRF (pseudo.crf) ---------------------------------------------------------------------------


def test_crf_snaps_a_blurred_cam_to_the_image_edge():
    pytest.importorskip("pydensecrf", reason="pydensecrf2 (the dev extra) is not installed")
    from pbip_engine.engine.pseudo.cams import cams_to_mask

    rgb = np.zeros((1, 32, 32, 3), np.uint8)
    rgb[0, :, :16] = (220, 30, 30)  # a sharp red | blue edge at x = 16
    rgb[0, :, 16:] = (30, 30, 220)
    ramp = np.clip((np.arange(32) - 13) / 12, 0, 1).astype(np.float32)  # blurred and off: edge at x ~ 19
    cams = np.stack([1 - ramp, ramp])[None, :, None, :].repeat(32, axis=2)  # [1, 2, 32, 32]
    labels = np.ones((1, 2), np.float32)
    truth = np.where(np.arange(32) < 16, 1, 2)[None, None, :].repeat(32, axis=1)
    plain = cams_to_mask(cams, labels, "none")
    crf = cams_to_mask(cams, labels, "none", rgb=rgb, crf=True)
    assert set(np.unique(crf)) <= {1, 2}
    assert (plain == truth).mean() < 0.95 and (crf == truth).mean() > (plain == truth).mean()
    only1 = cams_to_mask(cams, np.array([[1.0, 0.0]]), "power", rgb=rgb, crf=True)
    assert set(np.unique(only1)) <= {0, 1}  # an absent class never comes back through the CRF
    # nor does a class ruled out per pixel (overlapping tiles' shared labels): class 1 only left of x = 24
    allowed = np.ones((1, 2, 32, 32), bool)
    allowed[0, 1, :, :24] = False
    narrowed = cams_to_mask(cams, labels, "none", rgb=rgb, crf=True, allowed=allowed)
    assert (crf[0, :, 16:24] == 2).all()  # without the rule the CRF puts class 2 there ...
    assert (narrowed[0, :, :24] == 1).all()  # ... not with it
    assert (narrowed[0, :, 24:] == 2).mean() > 0.9  # right of it the CAMs and the CRF still decide


def test_labels_only_validation_scores_the_classification_loss():
    """The total jumps when L_sim/L_div switch on; the validation score must not follow it."""
    task, _ = tiny_lpd(warmup_iters=0)
    batches = [{k: v for k, v in toy_batch(6, seed=s).items() if k != "mask"} for s in (1, 2)]
    out = task.evaluate(batches, torch.device("cpu"))
    assert task.training  # evaluate restores the mode
    task.eval()
    cls = [float(task(task.prepare(b, torch.device("cpu")))["l_cls"]) for b in batches]
    assert out["score"] == pytest.approx(-sum(cls) / 2, rel=1e-4)
