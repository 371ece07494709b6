"""The HTML run report, built from a small hand-made run directory and opened in headless Chromium.

The run directory has every kind of stage row (done, skipped, partial with a failed slide, failed with a
reason, not needed by the method) and a non-ASCII slide id, so a broken image link, an unescaped reason
or a missing stage shows up in the browser.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from browser import open_page
from click.testing import CliRunner

from pbip_engine.cli import main
from pbip_engine.engine.outputs.plots import curve_series
from pbip_engine.jobs.report import ASSETS, REPORT, ReportError, build_report

CLASSES = [{"name": "tumour", "color": [200, 40, 40]}, {"name": "nécrose", "color": [150, 120, 40]}]
SLIDES = ["slide_a", "ünïcødé_切片", "broken"]


def _png(path: Path, h: int, w: int, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), color, np.uint8)
    cv2.rectangle(img, (w // 4, h // 4), (3 * w // 4, 3 * h // 4), (0, 0, 0), 2)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    path.write_bytes(buf.tobytes())


def _json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _manifest(stage: str, spec: dict, **extra: object) -> dict:
    return {"stage": stage, "inputs": {"spec": json.dumps(spec)}, "versions": {"torch": "9.9", "ray": "2.60.0"}, **extra}  # fmt: skip


def make_run(d: Path) -> Path:
    """A run whose segmenter failed (so segment never ran) after a partial tile stage."""
    reason = "tile: cannot read <slide> header & footer"  # markup in a reason must show as text
    stages = {
        "synth": {"status": "done", "skipped": True, "input_hash": "a"},
        "tile": {"status": "partial", "seconds": 4.2, "counts": {"slides": 3, "tiles": 120},
                 "failed_units": {"broken": reason}},
        "embed": {"status": "done", "seconds": 12.5, "counts": {"tiles": 120}},
        "bank": {"status": "not needed", "reason": "this method learns its prototypes (no K-means bank)"},
        "classnet": {"status": "done", "seconds": 30.0, "counts": {"epochs": 3}},
        "pseudo": {"status": "done", "seconds": 8.0, "counts": {"masks": 100}},
        "segmenter": {"status": "failed", "error": "RuntimeError: CUDA out of memory"},
    }  # fmt: skip
    _json(d / "run.json", {"name": "tiny", "output": str(d), "updated": "2026-12-01T04:00:00+0000", "stages": stages, "exit_code": 1})  # fmt: skip
    spec = {"classes": CLASSES, "tiling": {"mpp": 1.0, "tile_px": 96}}
    for s in ("synth", "tile", "embed", "classnet", "pseudo"):
        _json(d / s / "manifest.json", _manifest(s, spec, status="done", seconds=1.0))
    units = {sid: {"status": "done"} for sid in SLIDES[:2]}
    units["broken"] = {"status": "failed", "reason": reason}
    _json(d / "tile" / "manifest.json", _manifest("tile", spec, status="partial", units=units))
    _json(d / "manifests" / "segmenter.json", _manifest("segmenter", {**spec, "segmenter": {"epochs": 2}}, status="failed", error="RuntimeError: CUDA out of memory"))  # fmt: skip
    for i, sid in enumerate(SLIDES[:2]):
        _png(d / "tile" / "qc" / f"{sid}.tissue.png", 300, 400, (230, 200, 230))
        _png(d / "segment" / "masks" / f"{sid}.overlay.png", 1200, 1600, (200, 40 * i, 40))
    (d / "segment" / "cohort_areas.csv").write_text(
        "slide,tissue_mpix,tumour_um2,nécrose_um2\nslide_a,1.0,1500000.0,500000.0\n", encoding="utf-8"
    )
    _png(d / "bank" / "gallery.png", 200, 800, (240, 130, 190))
    _png(d / "pseudo" / "heatmaps" / "slide_a.png", 100, 120, (255, 255, 255))
    rows = [
        {"epoch": e, "loss": 2.0 / e, "val": {"loss": 2.2 / e, "score": -2.2 / e}, "val_score": -2.2 / e}
        for e in (1, 2, 3)
    ]
    (d / "classnet" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _json(d / "pseudo" / "metrics.json", {"miou": 0.61, "mdice": 0.7, "classes": [1, 2], "iou": [0.5, 0.72], "dice": [0.66, 0.83]})  # fmt: skip
    return d


def test_curve_series_draws_the_selection_score_once():
    rows = [{"epoch": 1, "loss": 1.0, "val": {"loss": 2.0, "score": -2.0, "n_images": 4}},
            {"epoch": 2, "loss": 0.5, "val": {"loss": 1.0, "score": -1.0, "n_images": 4}}]  # fmt: skip
    epochs, losses, scores = curve_series(rows)
    assert epochs == [1, 2] and losses == {"train loss": [1.0, 0.5], "validation loss": [2.0, 1.0]}
    assert scores == {}  # score = -validation loss, n_images is not a score
    rows = [{"epoch": 1, "loss": 3.0, "val": {"miou": 0.4, "score": 0.4}}, {"epoch": 2, "loss": 2.0}]
    _, losses, scores = curve_series(rows)
    assert scores["miou"][0] == 0.4 and np.isnan(scores["miou"][1]) and "score" not in scores


@pytest.mark.slow
def test_report_in_a_browser(tmp_path):
    run = make_run(tmp_path / "run")
    path = build_report(run)
    assert path == run / REPORT
    html = path.read_text(encoding="utf-8")
    assert "<slide> header" not in html and "&lt;slide&gt; header" in html  # autoescaped
    assert "http://" not in html and "https://" not in html  # nothing to fetch
    page = open_page(path, screenshot=tmp_path / "shot.png")
    # 2 slides x (QC + overlay) + gallery + classnet curves + 1 mosaic
    assert len(page.images) == 7, page.images
    assert all(i["complete"] and i["naturalWidth"] > 0 for i in page.images), page.images
    assert page.console_errors == [] and page.failed_requests == [] and page.non_file_requests == []
    assert page.stage_rows == {
        "synth": "skipped", "tile": "partial", "embed": "done", "bank": "not needed", "classnet": "done",
        "pseudo": "done", "segmenter": "failed", "segment": "not run",
    }  # fmt: skip
    for text in (
        "this method learns its prototypes",  # the not-needed reason
        "RuntimeError: CUDA out of memory",  # the failed stage's reason
        "failed: tile: tile: cannot read <slide> header & footer",  # the failed slide's reason
        "ünïcødé_切片",
        "1.5000",  # tumour area of slide_a in mm²
        "nécrose",
        "0.720",  # per-class IoU of the pseudo masks
        "tile_px: 96",  # the spec
        "torch",
    ):
        assert text in page.text, text
    assert (tmp_path / "shot.png").stat().st_size > 10_000
    # Previews are small; the originals stay linked.
    assert max(p.stat().st_size for p in (run / ASSETS).iterdir()) < 200_000


def test_report_command(tmp_path):
    run = make_run(tmp_path / "run")
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert (run / REPORT).is_file() and str(run / REPORT) in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["report", str(tmp_path / "empty")])
    assert res.exit_code == 1 and "no run.json" in res.output and "Traceback" not in res.output
    with pytest.raises(ReportError, match="empty"):
        build_report(tmp_path / "empty")
    # A truncated run.json was reported as missing, and a list in it ended in an internal error.
    for text in ('{"stages": {"tile": ', "[1, 2]", '{"stages": [1]}'):
        (tmp_path / "empty" / "run.json").write_text(text)
        res = CliRunner().invoke(main, ["report", str(tmp_path / "empty")])
        assert res.exit_code == 1 and "run.json: unreadable or not a run summary" in res.output, res.output
        assert "internal error" not in res.output and "Traceback" not in res.output
