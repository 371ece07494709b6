"""Issue 20: the defects that hostile-input probes found, each with a test that failed on the old code.

Real files throughout: specs on disk, pyramidal TIFFs written by tifffile, a real (tiny, untrained)
segmenter checkpoint for ``pbip-engine segment``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from wsi_synth import write_pyramid

from pbip_engine.cli import main
from pbip_engine.engine.inference.plan import slide_stem
from pbip_engine.engine.wsi.slide_ids import id_collisions, slide_id
from pbip_engine.jobs.rundir import slide_id_of
from pbip_engine.schemas.spec import SpecError, check_inputs, load_spec

GOOD = {
    "run": {"name": "t", "output": "out"},
    "data": {"synthetic": {"slides": 1, "size": 512}},
    "classes": [{"name": "tumour", "color": [255, 0, 0]}, {"name": "stroma", "color": [0, 255, 0]}],
}


def _spec(tmp_path: Path, raw: dict | str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return p


def _tiny_slide(path: Path, size: int = 256, mpp: float = 2.0) -> Path:
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), 235, np.uint8)
    img[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (180, 60, 120)
    img = np.clip(img.astype(int) + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_pyramid(path, img, mpp=mpp, n_levels=2, tile=64, compression="zlib")


# -- 1, 2: one slide-id rule ------------------------------------------------------------------------


def test_slide_id_rule_is_shared_by_every_stage_and_writer() -> None:
    for name, want in [
        ("a.svs", "a"),
        ("x.ome.tif", "x"),
        ("y.OME.TIFF", "y"),
        (".tmp-scan.svs", "_tmp-scan"),
    ]:
        assert slide_id(name) == want
        assert slide_id_of(Path("d") / name) == slide_stem(Path("d") / name) == want  # was Path.stem: x.ome
    assert not slide_id(".hidden.tif").startswith(".")  # never hidden: globs skip dot-files
    clashes = id_collisions([Path("a/same.svs"), Path("b/same.svs"), Path("c/other.tif"), Path("a/same.svs")])
    assert clashes == {"same": [Path("a/same.svs"), Path("b/same.svs")]}


def test_validate_reports_two_slides_with_one_id_naming_both(tmp_path: Path) -> None:
    a, b = _tiny_slide(tmp_path / "a" / "same.svs"), _tiny_slide(tmp_path / "b" / "same.tif")
    raw = {**GOOD, "data": {"slides": [str(a), str(b)]}}
    r = CliRunner().invoke(main, ["validate", str(_spec(tmp_path, raw))])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert str(a) in r.output and str(b) in r.output and "'same'" in r.output
    raw = {**GOOD, "segment": {"slides": [str(tmp_path / "*" / "same.*")]}}
    with pytest.raises(SpecError, match=r"segment\.slides"):
        check_inputs(load_spec(_spec(tmp_path, raw)))


def test_segment_refuses_two_inputs_with_one_id_before_writing(tmp_path: Path) -> None:
    _tiny_slide(tmp_path / "a" / "same.tif")
    _tiny_slide(tmp_path / "b" / "same.tif")
    (tmp_path / "model").mkdir()
    r = CliRunner().invoke(
        main,
        [
            "segment",
            "--model",
            str(tmp_path / "model"),
            "--slides",
            str(tmp_path / "*" / "same.tif"),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert r.exit_code == 1, r.output
    assert "a/same.tif" in r.output and "b/same.tif" in r.output and "segmented" not in r.output
    assert not (tmp_path / "out").exists()
