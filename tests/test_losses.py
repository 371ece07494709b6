"""PBIP loss terms (Eq. 3-13) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pbip_engine  # noqa: F401
from pbip_engine.methods.pbip import losses as L


def test_classification_loss_is_weighted_sum_of_bce():
    y = torch.tensor([[1.0, 0.0]])
    z1, z2 = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, -2.0]])
    # level 1: BCE(0) = log 2 for both entries; level 2: log(1 + e^-2) for both
    expected = 0.5 * math.log(2) + 1.0 * math.log1p(math.exp(-2))
    assert L.classification_loss([z1, z2], y, [0.5, 1.0]).item() == pytest.approx(expected, rel=1e-6)
    assert L.classification_loss([z1, z2], y).item() == pytest.approx(
        math.log(2) + math.log1p(math.exp(-2)), rel=1e-6
    )
    with pytest.raises(ValueError, match="2 levels"):
        L.classification_loss([z1, z2], y, [1.0])


def test_fuse_for_matching_sums_upsampled_levels():
    a = torch.ones(1, 2, 2, 2)
    b = torch.full((1, 2, 4, 4), 2.0)
    fused = L.fuse_for_matching([a, b], (4, 4))
    assert fused.shape == (1, 2, 4, 4) and torch.allclose(fused, torch.full_like(fused, 3.0))
    assert torch.allclose(L.fuse_for_matching([a, b], (4, 4), [0.0, 0.5]), torch.ones(1, 2, 4, 4))


def test_threshold_per_class_vs_per_image():
    m = torch.zeros(1, 2, 1, 4)
    m[0, 0, 0] = torch.tensor([1.0, 0.5, 0.1, -1.0])  # strong class
    m[0, 1, 0] = torch.tensor([0.1, 0.05, 0.01, 0.0])  # weak class
    # per class, delta 0.3: class 0 tau 0.3 -> [1,1,0,0]; class 1 tau 0.03 -> [1,1,0,0]
    pc = L.foreground_masks(m, 0.3, "per_class")
    assert pc[0, 0, 0].tolist() == [1, 1, 0, 0] and pc[0, 1, 0].tolist() == [1, 1, 0, 0]
    # per image: one tau = 0.3 * 1.0 for both classes -> the weak class is empty
    pi = L.foreground_masks(m, 0.3, "per_image")
    assert pi[0, 0, 0].tolist() == [1, 1, 0, 0] and pi[0, 1, 0].tolist() == [0, 0, 0, 0]
    assert L.foreground_masks(torch.full((1, 1, 2, 2), -1.0), 0.15).sum() == 0  # no evidence -> no FG


def test_compose_fg_bg_eq5():
    x = torch.ones(1, 3, 1, 2)
    soft = torch.tensor([[[0.8, 0.3]]])
    b = torch.tensor([[[1.0, 0.0]]])
    fg, bg = L.compose_fg_bg(x, soft, b)
    assert fg[0, :, 0].tolist() == [[pytest.approx(0.8), 0.0]] * 3
    assert bg[0, :, 0].tolist() == [[0.0, pytest.approx(0.7)]] * 3


def test_minmax_per_channel():
    m = torch.tensor([[[[2.0, 4.0]], [[1.0, 1.0]]]])
    out = L.minmax_per_channel(m)
    assert out[0, 0, 0].tolist() == [0.0, 1.0] and out[0, 1, 0].tolist() == [0.0, 0.0]


def _orthonormal_setup():
    # 2 classes, K = 1, prototypes e0 (class 0) and e1 (class 1)
    protos = torch.eye(2, 4)
    proto_class = torch.tensor([0, 1])
    return protos, proto_class


def test_similarity_paper_values():
    protos, pc = _orthonormal_setup()
    f_fg = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # equals its class-0 prototype
    f_bg = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # equals the other prototype
    l_fgs, l_bgs = L.similarity_losses(f_fg, f_bg, torch.tensor([0]), protos, pc, tau=1.0)
    # s_FF = 1, s_FB = 0 -> -log(e / (e + 1)); s_BB = 1 (other), s_BF = 0 (target) -> same value
    assert l_fgs.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    assert l_bgs.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    # swapped features are worse: -log(1 / (1 + e))
    bad_fg, bad_bg = L.similarity_losses(f_bg, f_fg, torch.tensor([0]), protos, pc, tau=1.0)
    assert bad_fg.item() == pytest.approx(math.log1p(math.e), rel=1e-6) and bad_bg.item() > l_bgs.item()


def test_similarity_paper_sum_vs_mean():
    # class 0 has K=1, class 1 has K=2; f_fg at cosine 0.5 to all three prototypes
    protos = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    pc = torch.tensor([0, 1, 1])
    f = F.normalize(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), dim=1)  # cos = 0.5 to each
    l_sum, _ = L.similarity_losses(f, f, torch.tensor([0]), protos, pc, variant="paper")
    l_mean, _ = L.similarity_losses(f, f, torch.tensor([0]), protos, pc, variant="paper_mean")
    # paper: s_FF = 0.5, s_FB = 0.5 + 0.5 = 1.0 -> -log(e^.5 / (e^.5 + e^1)); paper_mean: equal scores -> log 2
    assert l_sum.item() == pytest.approx(-math.log(math.exp(0.5) / (math.exp(0.5) + math.e)), rel=1e-6)
    assert l_mean.item() == pytest.approx(math.log(2), rel=1e-6)


def test_similarity_infonce_batch_matches_explicit_sums():
    torch.manual_seed(0)
    protos = F.normalize(torch.randn(6, 8), dim=1)
    pc = torch.tensor([0, 0, 1, 1, 2, 2])
    f_fg, f_bg = torch.randn(3, 8), torch.randn(3, 8)
    cls = torch.tensor([0, 2, 1])
    tau = 0.07
    l_fg, l_bg = L.similarity_losses(f_fg, f_bg, cls, protos, pc, tau=tau, variant="infonce_batch")
    s_fg = F.normalize(f_fg, dim=1) @ protos.T / tau
    s_bg = F.normalize(f_bg, dim=1) @ protos.T / tau
    s_fg, s_bg = s_fg.double(), s_bg.double()
    num = den = 0.0
    bnum = bden = 0.0
    for i in range(3):
        for m in range(6):
            e = math.exp(s_fg[i, m])
            den += e
            if pc[m] == cls[i]:
                num += e
        pos = sum(math.exp(s_bg[i, m]) for m in range(6) if pc[m] != cls[i]) / 4
        tgt = sum(math.exp(s_bg[i, m]) for m in range(6) if pc[m] == cls[i])
        bnum += pos
        bden += pos + tgt
    assert l_fg.item() == pytest.approx(-math.log(num / den), rel=1e-4)
    assert l_bg.item() == pytest.approx(-math.log(bnum / bden), rel=1e-4)


def test_similarity_empty_and_bad_variant():
    protos, pc = _orthonormal_setup()
    e = torch.zeros(0, 4)
    l_fg, l_bg = L.similarity_losses(e, e, torch.zeros(0, dtype=torch.long), protos, pc)
    assert l_fg.item() == 0.0 and l_bg.item() == 0.0
    with pytest.raises(ValueError, match="variant"):
        L.similarity_losses(e, e, torch.zeros(0, dtype=torch.long), protos, pc, variant="x")
