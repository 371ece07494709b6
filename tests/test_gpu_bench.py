"""bench/gpu_glas.py and bench/gpu_throughput.py run end to end on CPU (``--tiny``) and write complete JSON.

The real runs need a GPU and are never part of CI; this only proves the scripts work the first time one is
available. GlaS data are resolved relative to the repository (``../shared/data/glas``); without them the
GlaS test is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GLAS = REPO.parent / "shared" / "data" / "glas"

pytestmark = pytest.mark.slow


def _run(script: str, out: Path, *extra: str, timeout: int = 600) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / script),
            "--tiny",
            "--device",
            "cpu",
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _unit(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0


def test_gpu_glas_tiny(tmp_path: Path) -> None:
    if not (GLAS / "labels.csv").is_file():
        pytest.skip(f"GlaS data not found at {GLAS}")
    res = _run("gpu_glas.py", tmp_path / "glas.json", "--data", str(GLAS), "--fill-holes", "50")
    assert res["settings"]["fill_holes"] == 50  # the lumen filling runs in the pseudo step
    for key in ("pseudo_miou", "stage2_testA_miou", "control_testA_miou", "bank_macro_f1"):
        assert _unit(res[key]), (key, res[key])
    for key in ("data", "bank", "stage1", "pseudo", "stage2", "control"):
        assert res["timings_s"][key] > 0, key
    assert res["device"] == "cpu" and res["settings"]["tiny"] is True
    weights = res["stage2"][
        "class_weights"
    ]  # --class-weights balanced (default): one per class, background 1.0
    assert len(weights) == 3 and weights[0] == 1.0 and all(0.1 <= w <= 10 for w in weights)
    # stage 2 on the pseudo masks starts from the stage-1 backbone (--stage2-init), the control from ImageNet
    assert (res["stage2"]["backbone_init"], res["control"]["backbone_init"]) == ("stage1", "imagenet")
    # --stage2-loss (default ce_dice, as examples/glas.yaml) for both
    assert res["stage2"]["loss"] == res["control"]["loss"] == "ce_dice"


def test_gpu_glas_tiny_lpd(tmp_path: Path) -> None:
    """``--method lpd``: no bank step, LPD's stage 1 (k=3 in --tiny, warm-up 2 iterations) and the rest as PBIP;
    with ``--crf`` (the engine's whole-image CRF, where pydensecrf2 is installed)."""
    if not (GLAS / "labels.csv").is_file():
        pytest.skip(f"GlaS data not found at {GLAS}")
    crf = ["--crf"] if importlib.util.find_spec("pydensecrf") else []
    res = _run(
        "gpu_glas.py", tmp_path / "lpd.json", "--data", str(GLAS), "--method", "lpd", "--no-control", *crf
    )
    assert res["settings"]["crf"] is bool(crf)
    assert res["method"] == "lpd" and res["bank"] == "not needed" and res["bank_macro_f1"] is None
    for key in ("pseudo_miou", "stage2_testA_miou"):
        assert _unit(res[key]), (key, res[key])
    assert res["stage1"]["l_div"] is not None and res["settings"]["lpd_k"] == 3
    assert res["n_train_images"] > 0 and res["n_test_images"] > 0
    assert len(res["pseudo"]["iou"]) == 2 and len(res["stage2"]["iou"]) == 2


def test_gpu_glas_tiny_control_only(tmp_path: Path) -> None:
    """``--control-only``: stage 2 on the true masks alone (the recipe's ceiling), no bank or stage 1."""
    if not (GLAS / "labels.csv").is_file():
        pytest.skip(f"GlaS data not found at {GLAS}")
    res = _run(
        "gpu_glas.py",
        tmp_path / "control.json",
        "--data",
        str(GLAS),
        "--control-only",
        "--class-weights",
        "none",
    )
    assert _unit(res["control_testA_miou"]) and "pseudo_miou" not in res
    assert res["control"]["class_weights"] is None
    assert set(res["timings_s"]) == {"data", "control"} and res["total_s"] >= res["timings_s"]["control"]


def test_gpu_throughput_tiny(tmp_path: Path) -> None:
    res = _run("gpu_throughput.py", tmp_path / "tp.json")
    expected = {"embed_efficientnet_lite0", "embed_timm_vit_base_patch16_224", "stage1_pbip",
                "stage2_segmenter", "segment"}  # fmt: skip
    assert set(res["rows"]) == expected
    for name, r in res["rows"].items():
        for key in ("end_to_end", "bare", "ratio"):
            v = r[key]
            assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (name, key, v)


def test_gpu_glas_pseudo_masks_take_the_classes_every_patch_lists() -> None:
    """Two half-image classes, 4-px patches every 2 px: every pixel is settled, and correctly."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_glas
    finally:
        sys.path.remove(str(REPO / "bench"))
    import argparse

    import numpy as np

    mask = np.ones((8, 8), np.uint8)
    mask[:, 4:] = 2
    allowed = gpu_glas.patch_label_rule(mask, argparse.Namespace(patch=4, stride=2))
    assert allowed.shape == (2, 8, 8) and allowed.dtype == bool
    assert (allowed.sum(0) == 1).all()  # the x = 2 patch lists both, but its neighbours settle each column
    np.testing.assert_array_equal(allowed.argmax(0) + 1, mask)
    # one gland pixel inside every patch over it: those pixels allow both classes, the far corner only 2
    mask = np.full((8, 8), 2, np.uint8)
    mask[3, 3] = 1
    allowed = gpu_glas.patch_label_rule(mask, argparse.Namespace(patch=4, stride=2))
    assert allowed[:, 3, 3].all() and allowed[:, 2:4, 2:4].all()
    assert (allowed[:, 7, 7] == [False, True]).all()
