"""The gland method: CCA (against a naive reference), MPFP, the spec check, and a small training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pbip_engine.cli import main
from pbip_engine.engine.nn.attention import (
    ConsistencyCorrelationAttention,
    CrissCrossAttention,
    PositionAttention,
)
from pbip_engine.engine.nn.mpfp import PyramidFusionPooling, weighted_logits
from pbip_engine.engine.training.loop import LoopConfig, fit_local
from pbip_engine.methods import PseudoOptions, Stage1Inputs, get_method
from pbip_engine.methods.gland.config import GlandConfig
from pbip_engine.schemas.spec import SpecError, parse_spec

REPO = Path(__file__).resolve().parents[1]


def _naive_criss_cross(m: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """Pixel by pixel: softmax over the energies of its column then its row (its own column entry dropped if masked)."""
    q, k, v = m.query(x), m.key(x), m.value(x)
    b, _, h, w = x.shape
    out = torch.zeros_like(x)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                pos = [(g, j) for g in range(h) if not (m.mask_self and g == i)] + [(i, u) for u in range(w)]
                e = torch.stack([q[n, :, i, j] @ k[n, :, g, u] for g, u in pos])
                a = torch.softmax(e, 0)
                out[n, :, i, j] = sum(a[t] * v[n, :, g, u] for t, (g, u) in enumerate(pos))
    return m.gamma * out + x


@pytest.mark.parametrize("mask_self", [True, False])
def test_criss_cross_matches_a_naive_per_pixel_computation(mask_self):
    torch.manual_seed(0)
    m = CrissCrossAttention(8, reduction=4, mask_self=mask_self)
    with torch.no_grad():
        m.gamma.fill_(0.7)
    x = torch.randn(2, 8, 3, 5)
    torch.testing.assert_close(m(x), _naive_criss_cross(m, x), rtol=1e-4, atol=1e-5)
    a_col, a_row = m.attention(x)
    # each pixel's h + w (- 1 with the mask) weights sum to 1; masked: its own column entry is 0
    torch.testing.assert_close(a_col.sum(-1) + a_row.sum(-1), torch.ones(2, 3, 5))
    own = a_col[:, torch.arange(3), :, torch.arange(3)]
    assert bool((own == 0).all()) == mask_self


def test_position_attention_and_cca_start_as_identity_and_match_a_naive_reference():
    torch.manual_seed(1)
    x = torch.randn(1, 8, 3, 4)
    cca = ConsistencyCorrelationAttention(8, cc_reduction=4, pam_reduction=4)
    torch.testing.assert_close(cca(x), x)  # every gamma starts at 0
    pam = PositionAttention(8, reduction=4)
    with torch.no_grad():
        pam.gamma.fill_(0.5)
    q, k, v = (f(x).flatten(2)[0] for f in (pam.query, pam.key, pam.value))  # C',N / C,N
    ref = torch.stack([v @ torch.softmax(q[:, n] @ k, 0) for n in range(12)], 1)  # pixel n over all keys
    torch.testing.assert_close(pam(x), 0.5 * ref.view(1, 8, 3, 4) + x, rtol=1e-4, atol=1e-5)
    assert pam.query.out_channels == 2  # c' = c / 4


def test_mpfp_shapes_sign_preservation_and_gate_gradients():
    torch.manual_seed(0)
    m = PyramidFusionPooling(3, (2, 4, 8, 16))
    assert len(m.steps) == 3
    pos = torch.rand(2, 3, 16, 16) + 0.1
    fused = m(pos)
    assert fused.shape == (2, 3, 16, 16)
    assert bool((fused >= 0).all()) and bool(
        (m(-pos) <= 0).all()
    )  # positive stays positive, negative negative
    cam = torch.randn(2, 3, 16, 16, requires_grad=True)
    logits = m.logits(cam)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    for step in m.steps:
        for gate in (step.pos_gate, step.neg_gate):
            assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    # Eq. 9 on a hand case: W = F -> mean(relu(F)^2) - mean(-relu(-F)^2)... = mean(F^2)
    f = torch.tensor([[[[1.0, -2.0]]]])
    assert weighted_logits(f, f).item() == pytest.approx((1 - 4) / 2)


def test_mpfp_average_fusion_is_the_mean_of_the_pyramid():
    m = PyramidFusionPooling(2, (2, 4), fusion="average")
    assert len(m.steps) == 0 and not list(m.parameters())
    cam = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(m(cam), torch.stack(m.pyramid(cam)).mean(0))
    single = PyramidFusionPooling(2, (4,))
    torch.testing.assert_close(single(cam), single.pyramid(cam)[0])  # Table 4's single-P rows


BASE = {
    "run": {"output": "o"},
    "data": {"synthetic": {}},
    "classes": [{"name": "a", "color": [1, 2, 3]}, {"name": "b", "color": [3, 2, 1]}],
}


def test_validate_rejects_pooling_sizes_larger_than_the_cam(tmp_path):
    spec = {**BASE, "tiling": {"tile_px": 96}, "method": {"name": "gland", "input_px": None}}
    with pytest.raises(SpecError, match=r"method\.mpfp_sizes .* 12x12 CAM at tiling\.tile_px=96"):
        parse_spec(spec, tmp_path)
    ok = parse_spec(
        {**spec, "method": {"name": "gland", "input_px": None, "mpfp_sizes": [2, 4, 8]}}, tmp_path
    )
    assert ok.method.cam_px(96) == 12
    parse_spec({**spec, "method": {"name": "gland", "input_px": None, "mpfp": False}}, tmp_path)
    with pytest.raises(SpecError, match=r"method\.cca_levels \[4\] must lie in 1\.\.method\.level \(3\)"):
        parse_spec({**BASE, "method": {"name": "gland", "level": 3, "cca_levels": [3, 4]}}, tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "run: {output: o}\ndata: {synthetic: {}}\nclasses: [{name: a, color: [1, 2, 3]}]\n"
        "tiling: {tile_px: 64}\nmethod: {name: gland, input_px: 100, output_stride: 16}\n"
    )
    res = CliRunner().invoke(main, ["validate", str(bad)])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "method.mpfp_sizes" in res.output and "method.input_px=100" in res.output


def test_glas_and_demo_specs_accept_the_gland_method(tmp_path):
    import yaml

    raw = yaml.safe_load((REPO / "examples" / "glas.yaml").read_text())
    raw["method"] = {"name": "gland"}
    spec = parse_spec(raw, REPO / "examples")
    assert spec.method.cam_px(spec.tiling.tile_px) == 28  # 112-px patches at 224, stride 8
    demo = yaml.safe_load((REPO / "pbip_engine" / "examples" / "demo.yaml").read_text())
    demo["method"] = {"name": "gland"}
    assert parse_spec(demo, tmp_path).method.name == "gland"


def test_glas_gland_example_is_the_glas_protocol_with_only_the_budget_keys_changed():
    """glas-gland.yaml's figures stand beside glas.yaml's only while both specs share tiles, stage 2 and test."""
    import yaml

    pbip = yaml.safe_load((REPO / "examples" / "glas.yaml").read_text())
    gland = yaml.safe_load((REPO / "examples" / "glas-gland.yaml").read_text())
    spec = parse_spec(gland, REPO / "examples")
    assert spec.method.name == "gland" and spec.pseudo.flip is False and spec.stage1.epochs == 1
    assert max(spec.method.mpfp_sizes) <= spec.method.cam_px(spec.tiling.tile_px)
    for key in ("data", "classes", "tiling", "segment", "resources"):
        assert gland[key] == pbip[key], key
    # stage 2's epochs are a budget key: gland's figures were measured at 6 (glas.yaml: 10 since session 23);
    # backbone_init: stage1 was measured on PBIP's ClassNet only (session 40), gland's figures start from ImageNet;
    # loss: ce_dice was measured on PBIP's masks only (session 41), gland's figures are CE's
    seg_own = ("epochs", "backbone_init", "loss")
    assert {k: v for k, v in gland["segmenter"].items() if k not in seg_own} == {
        k: v for k, v in pbip["segmenter"].items() if k not in seg_own
    }
    assert {k: v for k, v in gland["stage1"].items() if k != "epochs"} == {
        k: v for k, v in pbip["stage1"].items() if k != "epochs"
    }
    # the flip is a budget key; ignore_uncertain was measured on PBIP only (session 21), gland's figures without
    # it; cam_context: regions stays off for gland (sessions 30-31: it adds nothing at ~11x the cost), and
    # image_prototypes takes each method's default (0.5 for both since session 32); two prototypes per class
    # (image_prototype_k) help PBIP (session 35) and lower gland's masks 0.649 -> 0.632 (session 36)
    own = (
        "flip",
        "ignore_uncertain",
        "image_prototypes",
        "image_prototype_weight",
        "image_prototype_k",
        "cam_context",
    )
    assert {k: v for k, v in gland["pseudo"].items() if k not in own} == {
        k: v for k, v in pbip["pseudo"].items() if k not in own
    }


def _batch(n: int, seed: int) -> dict[str, np.ndarray]:
    """Red left / blue right halves, or one colour only, with matching image labels and masks."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, 32, 32, 3), np.uint8)
    labels = np.zeros((n, 2), np.float32)
    mask = np.zeros((n, 32, 32), np.uint8)
    for i in range(n):
        kind = int(rng.integers(3))
        left, right = (1, 1) if kind == 0 else (2, 2) if kind == 1 else (1, 2)
        for sl, cls in ((np.s_[:, :16], left), (np.s_[:, 16:], right)):
            img[i][sl] = (220, 30, 30) if cls == 1 else (30, 30, 220)
            mask[i][sl] = cls
            labels[i, cls - 1] = 1
    return {"image": img, "labels": labels, "mask": mask}


@pytest.fixture
def one_thread():
    """Small convolutions gain nothing from threads and lose a lot on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_gland_trains_and_its_checkpoint_makes_the_same_cams(tmp_path, one_thread):
    """Stage 1 through the shared loop, then the pseudo stage's view of the checkpoint.

    Localisation quality is measured on the demo and GlaS (BENCHMARKS.md); a 32-px toy is too small for a
    stride-8 CNN's CAM to separate halves reliably, so this checks the plumbing, not the accuracy.
    """
    from pbip_engine.methods.gland.cams import cam_maps
    from pbip_engine.methods.gland.task import model_input

    cfg = GlandConfig(input_px=32, mpfp_sizes=[2, 4], cca_levels=[3, 4])
    method = get_method("gland")
    inputs = Stage1Inputs(["red", "blue"])
    torch.manual_seed(0)
    task = method.stage1_task(cfg, inputs)
    res = fit_local(task, lambda e: [_batch(8, seed=e * 10 + i) for i in range(3)],
                    LoopConfig(epochs=2, lr=1e-3, amp=False), tmp_path / "s1", log_fn=None)  # fmt: skip
    losses = [h["loss"] for h in res["history"]]
    assert losses[-1] < losses[0]
    assert any(
        float(b.cc1.gamma.detach().abs()) > 0 for b in task.model.cca.values()
    )  # CCA left the identity
    cams = method.load_cam_model(cfg, tmp_path / "s1" / "last.pt", inputs, "cpu")
    test = _batch(6, seed=7)
    maps = cams.predict_cams(test, PseudoOptions(background="none"))
    assert maps.shape == (6, 2, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    task.model.eval()
    with torch.no_grad():
        mine = cam_maps(task.model, model_input(test, task.cfg, "cpu")["image"], (32, 32))
    np.testing.assert_allclose(maps, mine.numpy(), atol=1e-5)
    flipped = cams.predict_cams(test, PseudoOptions(background="none", flip=True))
    assert flipped.shape == maps.shape and not np.allclose(flipped, maps)
    masks = cams.predict_masks(test, PseudoOptions(background="none"))
    single = test["labels"].sum(1) == 1
    assert masks.shape == (6, 32, 32) and (masks[single] == test["mask"][single]).all()  # label restriction


def test_cca_hooks_sit_inside_the_backbone_and_follow_a_deep_copy(one_thread):
    import copy

    from pbip_engine.methods.gland.model import GlandNet, GlandNetConfig

    torch.manual_seed(0)
    net = GlandNet(
        GlandNetConfig(n_classes=2, pretrained=False, input_px=64, mpfp_sizes=[2, 4], cca_levels=[3])
    )
    net.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = net(x)["cam"]
        twin = copy.deepcopy(net)
        twin.cca["3"].cc1.gamma.fill_(1.0)  # only the copy's block changes
        torch.testing.assert_close(net(x)["cam"], before)
        assert not torch.allclose(twin(x)["cam"], before)  # level 3's CCA output feeds level 4


def test_gland_runs_neither_the_bank_nor_the_embed_stage(tmp_path):
    from pbip_engine.jobs.stages import get_stage

    gland = parse_spec({**BASE, "method": {"name": "gland"}}, tmp_path)
    pbip = parse_spec(BASE, tmp_path)
    for name in ("bank", "embed"):
        assert "does not use a prototype bank" in get_stage(name).not_needed(gland)
        assert get_stage(name).not_needed(pbip) is None
    assert get_stage("classnet").dependencies(gland) == ("tile",)


def _cam_model(input_px: int):
    """A GlandCamModel around an untrained net whose CCA blocks are switched on (gamma 0.5), no checkpoint."""
    from pbip_engine.methods.gland.cams import GlandCamModel
    from pbip_engine.methods.gland.model import GlandNet, GlandNetConfig

    torch.manual_seed(0)
    cfg = GlandNetConfig(
        n_classes=2, pretrained=False, input_px=input_px, mpfp_sizes=[2, 4], cca_levels=[3, 4]
    )
    net = GlandNet(cfg).eval()
    for block in net.cca.values():
        for part in (block.cc1, block.pam, block.cc2):
            part.gamma.data.fill_(0.5)
    model = GlandCamModel.__new__(GlandCamModel)
    model.model, model.cfg, model.device = net, cfg, "cpu"
    return model


def test_gland_reads_a_tile_alone_and_as_a_picture_alike_and_gives_its_features(one_thread):
    """``pseudo.cam_context: regions`` and ``pseudo.image_prototypes`` for gland: a picture that is one tile
    enters the network as the tile does (so its CAMs are the tile's), and the features are the head's input."""
    from pbip_engine.methods.gland.cams import PROTOTYPE_SCALE

    model = _cam_model(input_px=64)
    batch = _batch(3, seed=3)  # 32-px tiles, entering the network at 64 px
    opts = PseudoOptions(background="none", flip=True)
    cams = model.predict_cams(batch, opts)
    with_feats, feats, weights = model.predict_cams_and_features(batch, opts)
    np.testing.assert_allclose(with_feats, cams, atol=1e-6)
    assert weights == [PROTOTYPE_SCALE] and len(feats) == 1
    assert feats[0].shape == (3, model.model.head.in_channels, 8, 8)  # 64 px at output stride 8
    np.testing.assert_allclose(np.linalg.norm(feats[0].astype(np.float32), axis=1), 1.0, atol=2e-3)
    for i in range(3):
        region, rfeats, rweights = model.predict_region(batch["image"][i], 32, opts, True)
        np.testing.assert_allclose(region, cams[i], atol=1e-5)
        np.testing.assert_allclose(rfeats[0].astype(np.float32), feats[0][i].astype(np.float32), atol=2e-3)
        assert rweights == [PROTOTYPE_SCALE]


def test_gland_states_the_largest_picture_its_attention_can_hold(one_thread, monkeypatch):
    """CCA's position attention holds cells² energies: gland caps the picture one region read takes (in
    canvas px, at the tiles' scale), and the pseudo stage's windows fit the cap (``region_tile_cams``)."""
    import pbip_engine.methods.gland.cams as gc
    from pbip_engine.engine.pseudo.region_cams import region_tile_cams
    from pbip_engine.engine.pseudo.stitch import tile_layout

    monkeypatch.setattr(gc, "MAX_REGION_NET_PX", 128)
    model = _cam_model(input_px=64)  # 32-px tiles enter the network at 64 px: 128 network px = 64 canvas px
    assert model.max_region_px(32) == 64 and model.max_region_px(64) == 128
    seen: list[tuple[int, int]] = []
    model.model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(0, 160, 16), np.arange(0, 112, 16))
    n = xs.size
    layout = tile_layout(list(xs.ravel()), list(ys.ravel()), [32] * n, [32] * n)  # a 176 x 128 canvas
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    opts = PseudoOptions(background="none")

    def read(image):
        cams, feats, _ = model.predict_region(image, 32, opts, True)
        return cams, [f.astype(np.float32) for f in feats]

    cams, feats = region_tile_cams(layout, images, read, 512, 32, model.max_region_px(32))
    assert len(seen) > 4 and max(max(s) for s in seen) <= 128  # every read within the cap
    assert all(c.shape == (2, 32, 32) and c.min() >= 0 and c.max() <= 1 for c in cams)
    assert all((c.sum(0) > 0).all() for c in cams)  # every tile was read
    assert all(f[0].shape == (model.model.head.in_channels, 8, 8) for f in feats)  # 32 canvas px = 8 cells
