"""Issue 20: the defects that hostile-input probes found, each with a test that failed on the old code.

Real files throughout: specs on disk, pyramidal TIFFs written by tifffile, a real (tiny, untrained)
segmenter checkpoint for ``pbip-engine segment``.
"""

from __future__ import annotations

import json
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


# -- 6, 7: spec files that are hostile rather than wrong ----------------------------------------------

ALIAS_BOMB = """run: {name: t, output: out}
data: {synthetic: {slides: 1}}
classes: [{name: a, color: [1, 2, 3]}]
x0: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
x1: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
x2: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
x3: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
x4: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
x5: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
x6: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
tiling: {mpp: *g}
"""


def test_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path: Path) -> None:
    import time

    p = _spec(tmp_path, ALIAS_BOMB)
    assert p.stat().st_size < 700
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["validate", str(p)])
    assert time.perf_counter() - t0 < 5
    assert r.exit_code == 1 and "expands to more than" in r.output and len(r.output) < 500, r.output[:500]


def test_errors_echo_a_bounded_part_of_the_bad_value(tmp_path: Path) -> None:
    nested = [[["x" * 1000] * 50] * 50] * 5  # 12 MB when printed whole
    raw = {**GOOD, "tiling": {"mpp": nested, "tile_pxx": "y" * 100_000}, "z" * 5000: 1}
    r = CliRunner().invoke(main, ["validate", str(_spec(tmp_path, raw))])
    assert r.exit_code == 1 and "tiling.mpp" in r.output
    assert len(r.output) < 2000, len(r.output)


def test_spec_that_is_not_utf8_or_is_a_folder_gets_one_line(tmp_path: Path) -> None:
    p = tmp_path / "latin1.yaml"
    p.write_bytes("run: {name: caf\xe9, output: out}\n".encode("latin-1"))
    r = CliRunner().invoke(main, ["validate", str(p)])
    assert r.exit_code == 1 and "not UTF-8" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["validate", str(tmp_path)])
    assert r.exit_code == 1 and "is a directory" in r.output and "not found" not in r.output


def test_paths_the_os_cannot_take_are_spec_errors(tmp_path: Path) -> None:
    for bad in ("a\x00b", "d/" + "n" * 300):
        raw = {**GOOD, "run": {"name": "t", "output": bad}}
        r = CliRunner().invoke(main, ["validate", str(_spec(tmp_path, raw))])
        assert r.exit_code == 1 and "run.output" in r.output and "Traceback" not in r.output, r.output


# -- 8: broken and looping links are failed inputs, not dropped ---------------------------------------


def test_broken_and_looping_links_are_kept_and_fail_with_a_reason(tmp_path: Path) -> None:
    from pbip_engine.engine.inference.plan import plan
    from pbip_engine.engine.wsi.slides import SlideError

    d = tmp_path / "slides"
    good = _tiny_slide(d / "good.tif")
    (d / "broken.tif").symlink_to(d / "gone.tif")
    (d / "loop.tif").symlink_to(d / "loop.tif")
    raw = {**GOOD, "data": {"slides": [str(d / "*.tif")]}}
    slides = check_inputs(load_spec(_spec(tmp_path, raw)))
    assert sorted(p.name for p in slides) == ["broken.tif", "good.tif", "loop.tif"]
    for name in ("broken.tif", "loop.tif"):
        with pytest.raises(SlideError, match="symbolic link") as ei:
            plan(d / name, 2.0, 64, 0.25)
        assert ei.value.reason == "missing" and name in str(ei.value)
    assert plan(good, 2.0, 64, 0.25).tiles


# -- 9, 10, 11: the command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run's segmenter folder: a real (untrained, tiny-input) DeepLab checkpoint and card."""
    import torch

    from pbip_engine.engine.nn.deeplab import build_segmenter
    from pbip_engine.engine.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("run")
    m = build_segmenter("deeplabv2", 3, pretrained=False, crop_px=64)
    save_checkpoint(d / "segmenter" / "best.pt", m, kind="segmenter", model_config=m.config)
    card = {"mpp": 2.0, "tile_px": 64, "class_names": ["a", "b"], "class_colors": [[255, 0, 0], [0, 0, 255]]}
    (d / "segmenter" / "model.json").write_text(json.dumps(card))
    return d


def _broken_copy(model_dir: Path, tmp_path: Path, name: str, cut: int) -> Path:
    import shutil

    d = tmp_path / "broken-run"
    shutil.copytree(model_dir, d)
    f = d / "segmenter" / name
    f.write_bytes(f.read_bytes()[:cut])
    return d


@pytest.mark.parametrize(
    ("name", "cut", "says"), [("model.json", 20, "model card"), ("best.pt", 5000, "best.pt")]
)
def test_unusable_model_is_one_command_error_not_n_slide_failures(
    model_dir: Path, tmp_path: Path, name: str, cut: int, says: str
) -> None:
    for n in ("s1", "s2", "s3"):
        _tiny_slide(tmp_path / "in" / f"{n}.tif")
    bad = _broken_copy(model_dir, tmp_path, name, cut)
    r = CliRunner().invoke(
        main,
        [
            "segment",
            "--model",
            str(bad),
            "--slides",
            str(tmp_path / "in" / "*.tif"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 1, r.output
    assert says in r.output and "FAILED" not in r.output and r.output.count("\n") == 1, r.output


def test_cli_expected_errors_are_one_line_naming_the_input(tmp_path: Path) -> None:
    runner = CliRunner()
    for d in ("p", "t"):
        (tmp_path / d).mkdir()
    r = runner.invoke(main, ["evaluate", "--pred", str(tmp_path / "p"), "--truth", str(tmp_path / "t"),
                             "--classes", "2", "--truth-lut", "a,b"])  # fmt: skip
    assert r.exit_code == 1 and "--truth-lut 'a,b'" in r.output and r.output.count("\n") == 1, r.output
    r = runner.invoke(main, ["schema", "--out", str(tmp_path / "missing" / "s.json")])
    assert r.exit_code == 1 and "missing/s.json" in r.output and r.output.count("\n") == 1, r.output
    r = runner.invoke(main, ["submit", str(_spec(tmp_path, GOOD)), "--address", "http://[::1"])
    assert r.exit_code == 1 and "http://[::1" in r.output and "not a valid URL" in r.output, r.output


def test_unexpected_errors_say_where_the_traceback_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pbip_engine.cli as cli

    def boom() -> dict:
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "json_schema", boom)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    r = CliRunner().invoke(main, ["schema"])
    assert r.exit_code == 1 and "internal error (KeyError" in r.output and "Traceback" not in r.output
    logs = list(tmp_path.glob("pbip-engine-error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in r.output and "Traceback" in logs[0].read_text()


def test_submitted_entrypoint_keeps_a_dash_named_spec_an_argument(tmp_path: Path) -> None:
    import shlex

    from pbip_engine.cli import run
    from pbip_engine.jobs.submit import build_submission

    raw = {**GOOD, "run": {"name": "t", "output": str(tmp_path / "out")}}
    spec_path = _spec(tmp_path, raw, name="-x.yaml")
    sub = build_submission(spec_path, load_spec(spec_path), stages=["synth"])
    try:
        argv = shlex.split(sub.entrypoint)
        assert argv[:2] == ["pbip-engine", "run"]
        ctx = run.make_context("run", argv[2:])
        assert ctx.params["spec"] == "-x.yaml" and ctx.params["address"] == "auto"
    finally:
        sub.cleanup()
