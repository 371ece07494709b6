"""``RUN_DIR/report.html``: one page a pathologist opens in a browser to judge a run.

Everything comes from what the stages left in the run directory (``run.json``, the manifests, QC
pictures, metrics files), so the report can be rebuilt at any time (``pbip-engine report RUN_DIR``) and
never needs the spec file or Ray. Pictures are downscaled previews in ``RUN_DIR/report_files/``, each
linking to its full-size original; nothing is fetched from the network. jinja2 renders the page
(``templates/report.html.j2``, autoescaped), matplotlib draws the training curves.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from pbip_engine.engine.io.atomic import atomic_write_bytes
from pbip_engine.engine.outputs.plots import preview, training_curves_png
from pbip_engine.jobs.manifest import MANIFEST, read_json

REPORT = "report.html"
ASSETS = "report_files"
TEMPLATES = Path(__file__).parent / "templates"

STATUS_CLASS = {
    "done": "ok",
    "skipped": "ok",
    "partial": "warn",
    "failed": "bad",
    "not needed": "na",
    "not run": "na",
}
METRIC_KEYS = [("miou", "mIoU"), ("mdice", "mDice"), ("mbiou", "boundary IoU"), ("fwiou", "FwIoU"), ("pixel_acc", "pixel accuracy")]  # fmt: skip


class ReportError(ValueError):
    """The folder is not a run directory (the message names it)."""


def _stage_names(run_stages: Iterable[str]) -> list[str]:
    from pbip_engine.jobs.stages import all_stages

    names = [s.name for s in all_stages()]
    return names + sorted(set(run_stages) - set(names))


def _manifest(run_dir: Path, stage: str) -> dict[str, Any]:
    """The stage's last manifest (a failed one included), else its finished folder's."""
    return read_json(run_dir / "manifests" / f"{stage}.json") or read_json(run_dir / stage / MANIFEST) or {}


def _fmt_counts(counts: dict[str, Any] | None) -> str:
    def fmt(v: Any) -> str:
        return f"{v:,.3g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)

    return ", ".join(f"{k} {fmt(v)}" for k, v in (counts or {}).items())


def _stage_row(name: str, entry: dict[str, Any] | None, manifest: dict[str, Any]) -> dict[str, Any]:
    entry = entry or {}
    status = entry.get("status") or ("not run" if not manifest else manifest.get("status", "not run"))
    note = ""
    seconds = entry.get("seconds", manifest.get("seconds"))
    counts = entry.get("counts") or manifest.get("counts")
    if entry.get("skipped"):
        status, note = "skipped", "up to date: the finished folder of an earlier run is reused"
    elif status == "failed":
        note = entry.get("error") or manifest.get("error") or "failed (no reason recorded)"
    elif status == "partial":
        failed = entry.get("failed_units") or {}
        note = f"{len(failed)} slide(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
    elif status == "not needed":
        note = entry.get("reason") or "not needed by this method"
    elif status == "not run":
        note = "not part of this run (disabled by the spec or not selected with --stages)"
    return {
        "name": name,
        "status": status,
        "css": STATUS_CLASS.get(status, "na"),
        "seconds": seconds if isinstance(seconds, int | float) else None,
        "counts": _fmt_counts(counts if status != "not needed" else None),
        "note": note,
    }


class _Assets:
    """Previews written under ``report_files/`` and the relative URLs the page uses."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.dir = run_dir / ASSETS
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.n = 0

    def url(self, path: Path) -> str:
        return quote(path.relative_to(self.run_dir).as_posix())

    def picture(self, src: Path, max_px: int, fmt: str = ".jpg") -> dict[str, str] | None:
        """{src: the preview, href: the original}, or None when ``src`` is absent or unreadable."""
        if not src.is_file():
            return None
        self.n += 1
        out = preview(src, self.dir / f"{self.n:04d}_{src.stem[:60]}{fmt}", max_px)
        return {"src": self.url(out), "href": self.url(src)} if out else None

    def png(self, name: str, data: bytes) -> str:
        self.n += 1
        path = self.dir / f"{self.n:04d}_{name}.png"
        atomic_write_bytes(path, data)
        return self.url(path)


def _class_names(run_dir: Path, spec: dict[str, Any]) -> list[str]:
    card = read_json(run_dir / "segmenter" / "model.json") or {}
    return list(card.get("class_names") or [c["name"] for c in spec.get("classes", [])])


def _metrics_table(m: dict[str, Any], names: list[str]) -> dict[str, Any]:
    overall = [(label, m[k]) for k, label in METRIC_KEYS if isinstance(m.get(k), int | float)]
    per_class = []
    for i, k in enumerate(m.get("classes") or []):
        name = names[k - 1] if 0 < k <= len(names) else f"class {k}"
        row = {"name": name}
        for key in ("iou", "dice", "biou"):
            vals = m.get(key) or []
            row[key] = vals[i] if i < len(vals) and isinstance(vals[i], int | float) else None
        per_class.append(row)
    return {"overall": overall, "per_class": per_class, "n_images": m.get("n_images")}


def _metrics(run_dir: Path, names: list[str]) -> list[dict[str, Any]]:
    out = []
    for stage, title in (("pseudo", "Pseudo masks vs truth"), ("segment", "Whole-slide masks vs truth")):
        m = read_json(run_dir / stage / "metrics.json")
        if not m or "miou" not in m:
            continue
        out.append({"title": title, "source": f"{stage}/metrics.json", **_metrics_table(m, names)})
        if isinstance(m.get("multi_label"), dict):
            sub = m["multi_label"]
            out.append({"title": f"{title}: multi-label tiles only", "source": f"{stage}/metrics.json", **_metrics_table(sub, names)})  # fmt: skip
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted write
    return rows


def _training(run_dir: Path, stages: list[str], assets: _Assets) -> list[dict[str, Any]]:
    out = []
    for stage in stages:
        path = run_dir / stage / "metrics.jsonl"
        rows = _read_jsonl(path) if path.is_file() else []
        if not rows:
            continue
        scored = [r for r in rows if isinstance(r.get("val_score"), int | float)]
        best = max(scored, key=lambda r: r["val_score"]) if scored else None
        out.append(
            {
                "stage": stage,
                "plot": assets.png(f"{stage}_curves", training_curves_png(rows, stage)),
                "epochs": len(rows),
                "best_epoch": best.get("epoch") if best else None,
                "best_score": best["val_score"] if best else None,
            }
        )
    return out


def _slide_ids(
    run_dir: Path, manifests: dict[str, dict[str, Any]], failed: dict[str, list[str]]
) -> list[str]:
    ids = set(failed)
    for stage in ("tile", "segment"):
        ids |= set((manifests.get(stage) or {}).get("units") or {})
    ids |= {p.name[: -len(".tissue.png")] for p in (run_dir / "tile" / "qc").glob("*.tissue.png")}
    ids |= {p.name[: -len(".overlay.png")] for p in (run_dir / "segment" / "masks").glob("*.overlay.png")}
    return sorted(ids)


def _areas_csv(run_dir: Path) -> dict[str, dict[str, float]]:
    path = run_dir / "segment" / "cohort_areas.csv"
    if not path.is_file():
        return {}
    out = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            out[row["slide"]] = {
                k[: -len("_um2")]: float(v) for k, v in row.items() if k.endswith("_um2") and v
            }
    return out


def _slides(
    run_dir: Path,
    manifests: dict[str, dict[str, Any]],
    run_stages: dict[str, Any],
    names: list[str],
    assets: _Assets,
) -> list[dict[str, Any]]:
    from pbip_engine.jobs.stage import unit_reason

    failed: dict[str, list[str]] = {}
    for stage, entry in run_stages.items():
        for unit, reason in ((entry or {}).get("failed_units") or {}).items():
            failed.setdefault(unit, []).append(f"{stage}: {reason}")
    for stage, m in manifests.items():
        for unit, u in (m.get("units") or {}).items():
            if isinstance(u, dict) and u.get("status") == "failed":
                why = f"{stage}: {unit_reason(u) or 'failed'}"  # as run.json has it
                if why not in failed.get(unit, []):
                    failed.setdefault(unit, []).append(why)
    seg_units = (manifests.get("segment") or {}).get("units") or {}
    csv_areas = _areas_csv(run_dir)
    slides = []
    for sid in _slide_ids(run_dir, manifests, failed):
        unit = seg_units.get(sid) or {}
        areas_um2 = unit.get("class_areas_um2") or csv_areas.get(sid) or {}
        order = [n for n in names if n in areas_um2] + [n for n in areas_um2 if n not in names]
        metrics = unit.get("metrics") or {}
        slides.append(
            {
                "id": sid,
                "failed": failed.get(sid, []),
                "qc": assets.picture(run_dir / "tile" / "qc" / f"{sid}.tissue.png", 480),
                "overlay": assets.picture(run_dir / "segment" / "masks" / f"{sid}.overlay.png", 640),
                "areas_mm2": [(n, areas_um2[n] / 1e6) for n in order],
                "total_mm2": sum(areas_um2.values()) / 1e6 if areas_um2 else None,
                "metrics": [
                    (label, metrics[k]) for k, label in METRIC_KEYS if isinstance(metrics.get(k), int | float)
                ],
            }
        )
    return slides


def _spec_and_versions(
    run: dict[str, Any], manifests: dict[str, dict[str, Any]]
) -> tuple[str, dict[str, str]]:
    """The spec sections the stages were hashed from (together: the spec of the run), and the versions."""
    spec: dict[str, Any] = {}
    if run.get("name"):
        spec["run"] = {"name": run.get("name"), "output": run.get("output")}
    versions: dict[str, str] = {}
    for m in manifests.values():
        with contextlib.suppress(TypeError, json.JSONDecodeError):
            spec.update(json.loads((m.get("inputs") or {}).get("spec") or "{}"))
        versions.update(m.get("versions") or {})
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=110), dict(
        sorted(versions.items())
    )


def _pictures(run_dir: Path, patterns: list[str], assets: _Assets, max_px: int) -> list[dict[str, str]]:
    out = []
    for pattern in patterns:
        for p in sorted(run_dir.glob(pattern)):
            pic = assets.picture(p, max_px, ".png" if "heatmaps" in pattern else ".jpg")
            if pic:
                out.append({**pic, "caption": p.relative_to(run_dir).as_posix()})
    return out


def build_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` (and its previews in ``RUN_DIR/report_files/``); return its path."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise ReportError(f"{run_dir}: not a run directory (no run.json); run `pbip-engine run SPEC` first")
    run = read_json(run_dir / "run.json")
    if not isinstance(run, dict) or not isinstance(run.get("stages", {}), dict):
        raise ReportError(
            f"{run_dir / 'run.json'}: unreadable or not a run summary (a mapping with 'stages'); "
            "re-run `pbip-engine run SPEC` to rewrite it"
        )
    run_stages: dict[str, Any] = run.get("stages") or {}
    order = _stage_names(run_stages)
    manifests = {s: _manifest(run_dir, s) for s in order}
    stages = [_stage_row(s, run_stages.get(s), manifests[s]) for s in order]
    spec_yaml, versions = _spec_and_versions(run, manifests)
    names = _class_names(run_dir, yaml.safe_load(spec_yaml) or {})
    assets = _Assets(run_dir)
    total_s = sum(s["seconds"] or 0 for s in stages if s["status"] not in ("skipped", "not run"))
    context = {
        "name": run.get("name") or run_dir.name,
        "run_dir": str(run_dir.resolve()),
        "updated": run.get("updated", ""),
        "exit_code": run.get("exit_code"),
        "total_s": total_s,
        "stages": stages,
        "slides": _slides(run_dir, manifests, run_stages, names, assets),
        "class_names": names,
        "galleries": _pictures(run_dir, ["bank/gallery*.png", "*/atlas*.png"], assets, 1400),
        "training": _training(run_dir, order, assets),
        "mosaics": _pictures(run_dir, ["pseudo/heatmaps/*.png"], assets, 520),
        "metrics": _metrics(run_dir, names),
        "spec_yaml": spec_yaml,
        "versions": versions,
    }
    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined, trim_blocks=True
    )
    env.filters["num"] = lambda v, d=3: (
        "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"
    )
    html = env.get_template("report.html.j2").render(**context)
    path = run_dir / REPORT
    atomic_write_bytes(path, html.encode("utf-8"))
    return path
