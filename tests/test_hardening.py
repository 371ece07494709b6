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
from click.testing import CliRunner, Result
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


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("nonexistent_net", "unknown encoder 'nonexistent_net'; known: "),
        ("timm:resnet5000", "unknown timm model 'resnet5000'"),
        ("open_clip:ViT-Q-99", "unknown OpenCLIP architecture 'ViT-Q-99'"),
        ("nofamily:x", "unknown encoder 'nofamily:x'"),
    ],
)
def test_validate_names_an_unknown_encoder(tmp_path: Path, name: str, says: str) -> None:
    # It passed validation and the embed stage then died inside Ray with ActorDiedError fragments.
    r = CliRunner().invoke(main, ["validate", str(_spec(tmp_path, {**GOOD, "encoder": {"name": name}}))])
    assert r.exit_code == 1 and r.output.startswith("Error: encoder.name: ") and says in r.output, r.output
    assert r.output.count("\n") == 1


def test_validate_accepts_registered_and_family_encoder_names(tmp_path: Path) -> None:
    for good in ("efficientnet_lite0", "timm:resnet18", "open_clip:ViT-B-16"):
        r = CliRunner().invoke(main, ["validate", str(_spec(tmp_path, {**GOOD, "encoder": {"name": good}}))])
        assert r.exit_code == 0, (good, r.output)


@pytest.mark.parametrize(
    ("method", "says"),
    [
        (
            {"name": "pbip", "levels": [2, 3, 9]},
            "method.levels [2, 3, 9]: not feature levels of backbone 'efficientnet_lite0'",
        ),
        ({"name": "lpd", "levels": [3, 3]}, "method.levels [3, 3]: distinct feature levels"),
        ({"name": "pbip", "backbone": "mit_b1", "levels": [0, 1]}, "mit_b1 has feature levels 1..4"),
        ({"name": "lpd", "backbone": "resnet5000"}, "method.backbone: unknown backbone 'resnet5000'"),
    ],
)
def test_validate_names_levels_the_backbone_does_not_have(tmp_path: Path, method: dict, says: str) -> None:
    # They passed validation; stage 1 then failed inside each of Ray Train's attempts with an IndexError traceback.
    r = CliRunner().invoke(main, ["validate", str(_spec(tmp_path, {**GOOD, "method": method}))])
    assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize(
    "method",
    [{"name": "pbip"}, {"name": "pbip", "levels": [-3, -2, -1]}, {"name": "lpd", "levels": [1, 4]}, {"name": "pbip", "backbone": "mit_b1", "levels": [1, 2, 3, 4]},
     {"name": "gland"}],
)  # fmt: skip
def test_validate_accepts_levels_the_backbone_has(tmp_path: Path, method: dict) -> None:
    r = CliRunner().invoke(main, ["validate", str(_spec(tmp_path, {**GOOD, "method": method}))])
    assert r.exit_code == 0, r.output


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


# -- 4: declared sizes are not trusted -------------------------------------------------------------------


def test_tiny_file_declaring_huge_dimensions_is_refused_before_any_allocation(tmp_path: Path) -> None:
    import time

    from wsi_synth import sparse_tiff

    from pbip_engine.engine.inference.plan import plan
    from pbip_engine.engine.wsi.slides import SlideError

    bomb = sparse_tiff(tmp_path / "bomb.tif", 30000, 30000, mpp=8.0)
    assert bomb.stat().st_size < 2048
    t0 = time.perf_counter()
    with pytest.raises(SlideError, match="max_slide_pixels_per_byte") as ei:
        plan(bomb, 2.0, 64, 0.25)  # reached tissue detection with a 30000² array before
    assert ei.value.reason == "implausible_size" and time.perf_counter() - t0 < 5


def test_tissue_detection_renders_within_a_pixel_budget() -> None:
    from pbip_engine.engine.wsi.slides import Slide
    from pbip_engine.engine.wsi.tissue import MAX_DETECTION_PIXELS, detection_downsample

    def slide(w: int, h: int, mpp: float) -> Slide:
        return Slide(Path("s.tif"), "x", [(w, h)], [1.0], mpp, "test")

    assert detection_downsample(slide(100_000, 80_000, 0.25), 8.0) == 32.0  # a real 40x scan: unchanged
    ds = detection_downsample(slide(30_000, 30_000, 8.0), 8.0)  # 1 before: a 30000² rendering
    assert (30_000 / ds) ** 2 <= MAX_DETECTION_PIXELS * 1.0001


def test_spec_override_matches_the_engine_default() -> None:
    from pbip_engine.engine.wsi.slides import MAX_PIXELS_PER_BYTE
    from pbip_engine.schemas.spec import ResourcesSection

    assert ResourcesSection().max_slide_pixels_per_byte == MAX_PIXELS_PER_BYTE


def _jpeg_bomb(path: Path) -> Path:
    """A 631-byte JPEG whose frame header declares 30000 x 30000 pixels."""
    import cv2

    _, buf = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
    b = bytearray(buf.tobytes())
    sof = b.find(b"\xff\xc0")
    b[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") * 2
    path.write_bytes(bytes(b))
    return path


@pytest.mark.slow
def test_segment_images_one_bomb_fails_alone_and_the_good_image_is_written(
    model_dir: Path, tmp_path: Path
) -> None:
    import cv2

    d = tmp_path / "imgs"
    d.mkdir()
    _jpeg_bomb(d / "bomb.jpg")
    img = np.full((96, 96, 3), 230, np.uint8)
    img[20:70, 20:70] = (150, 50, 120)
    cv2.imwrite(str(d / "good.png"), img)
    r = CliRunner().invoke(
        main, ["segment", "--model", str(model_dir), "--images", str(d / "*"), "--mpp", "2.0",
               "--out", str(tmp_path / "o"), "--no-tta"],
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    assert "segmented 1/2" in r.output and "FAILED bomb:" in r.output and "900000000 pixels" in r.output
    assert (tmp_path / "o" / "good.mask.ome.tif").is_file() and not list((tmp_path / "o").glob("bomb.*"))


def test_segment_rerun_keeps_what_is_done_with_the_same_settings(model_dir: Path, tmp_path: Path) -> None:
    """``pbip-engine segment`` into the same folder again resumed nothing: every slide was segmented anew."""
    import cv2

    d = tmp_path / "imgs"
    d.mkdir()
    img = np.full((96, 96, 3), 230, np.uint8)
    img[20:70, 20:70] = (150, 50, 120)
    for name in ("a", "b"):
        cv2.imwrite(str(d / f"{name}.png"), img)
    out = tmp_path / "o"

    def segment(*extra: str) -> str:
        r = CliRunner().invoke(main, ["segment", "--model", str(model_dir), "--images", str(d / "*.png"),
                                      "--mpp", "2.0", "--out", str(out), "--no-tta", *extra])  # fmt: skip
        assert r.exit_code == 0, r.output
        return r.output

    first = segment()
    assert "segmented 2/2" in first and "done by an earlier run" not in first, first
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mask.ome.tif")}
    assert "segmented 2/2" in (again := segment()) and "(2 done by an earlier run" in again, again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mask.ome.tif")} == stamps  # not rewritten
    (out / "b.mask.ome.tif").unlink()  # an interrupted slide: its record may say done, its mask is gone
    assert "(1 done by an earlier run" in segment()
    assert (out / "b.mask.ome.tif").is_file() and (out / "a.mask.ome.tif").stat().st_mtime_ns == stamps[
        "a.mask.ome.tif"
    ]
    assert "done by an earlier run" not in segment("--overlap", "0.25")  # other settings: all anew
    cv2.imwrite(str(d / "a.png"), 255 - img)  # another image under the same name (a re-export)
    assert "(1 done by an earlier run" in segment("--overlap", "0.25")  # only b is kept
    assert json.loads((out / "segment.json").read_text())["a"]["status"] == "done"


# -- 3: a tile cuCIM cannot decode is an error, not pixels ---------------------------------------------

_CUCIM_PROBE = """
import sys
import pbip_engine  # before torch: cuCIM loads
if not pbip_engine.CUCIM_AVAILABLE:
    print("NO-CUCIM"); sys.exit(0)
from pbip_engine.engine.inference.plan import plan
from pbip_engine.engine.wsi.slides import open_slide
with open_slide(sys.argv[1], backends=("cucim",)) as s:
    print("CLEAN", s.backend, float(s.read_region((0, 0), 0, (256, 256)).mean()))
try:
    with open_slide(sys.argv[2], backends=("cucim",)) as s:
        s.read_region((0, 0), 0, (256, 256))
    print("READ-SILENTLY")
except Exception as e:
    print("FAILED", getattr(e, "reason", "?"), e)
try:
    p = plan(sys.argv[2], 0.5, 64, 0.25)
    print("PLANNED", len(p.tiles))
except Exception as e:
    print("PLAN-FAILED", getattr(e, "reason", "?"), e)
"""


@pytest.mark.slow  # a fresh interpreter (cuCIM must load before torch): ~15 s
def test_corrupt_jpeg_tile_fails_with_a_reason_under_cucim(tmp_path: Path) -> None:
    import subprocess
    import sys

    import tifffile
    from wsi_synth import he_like

    clean = write_pyramid(tmp_path / "clean.tif", he_like(256, 256, [(128, 128, 80)]), mpp=0.5, n_levels=1,
                          tile=128, compression="jpeg")  # fmt: skip
    data = bytearray(clean.read_bytes())
    with tifffile.TiffFile(clean) as t:
        off = t.pages[0].dataoffsets[0]
    data[off : off + 2] = b"\x00\x00"  # tile 0 no longer starts with a JPEG SOI marker
    bad = tmp_path / "bad.tif"
    bad.write_bytes(bytes(data))
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's code
    r = subprocess.run([sys.executable, "-c", _CUCIM_PROBE, str(clean), str(bad)], capture_output=True,
                       text=True, timeout=120, env=env)  # fmt: skip
    if "NO-CUCIM" in r.stdout:
        pytest.skip("cuCIM is not importable here")
    assert "CLEAN cucim" in r.stdout and "READ-SILENTLY" not in r.stdout, r.stdout + r.stderr
    assert "FAILED" in r.stdout and "cuCIM reported a tile it could not decode" in r.stdout, r.stdout
    # Planning opens with both backends: cuCIM's probe of the coarsest level hits the broken tile, tiffslide
    # refuses it too, so the slide fails with the decoders' reasons instead of being segmented.
    assert "PLAN-FAILED" in r.stdout and "Not a JPEG file" in r.stdout, r.stdout


@pytest.mark.slow
def test_cohort_plans_hold_bounded_tissue_and_write_the_same_masks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning every slide before writing kept each slide's tissue rendering: O(cohort) memory. Past a
    budget a plan drops its mask and the writer detects tissue again, with the same result."""
    import tifffile
    from slide_fuzz_worker import CARD, TILE_PX, _colour_stream

    import pbip_engine.engine.inference.cohort as cohort
    import pbip_engine.engine.inference.write as write

    redetected = []
    real_detect = write.detect_tissue
    monkeypatch.setattr(write, "detect_tissue", lambda *a, **k: redetected.append(1) or real_detect(*a, **k))
    slides = [_tiny_slide(tmp_path / "in" / f"s{i}.tif", size=384, mpp=1.0) for i in range(2)]
    masks = {}
    for budget in (cohort.KEEP_TISSUE_PIXELS, 0):
        monkeypatch.setattr(cohort, "KEEP_TISSUE_PIXELS", budget)
        out = tmp_path / f"out{budget}"
        seen, redetected[:] = [], []
        for slide, res in cohort.segment_cohort(slides, CARD, out, _colour_stream, overlap=0.25, blend="average",
                                                tile_px=TILE_PX):  # fmt: skip
            assert not isinstance(res, Exception), res
            seen.append(slide)
        assert seen == slides and len(redetected) == (0 if budget else 2)
        masks[budget] = [tifffile.imread(out / f"{s.stem}.mask.ome.tif", level=0) for s in slides]
    for a, b in zip(*masks.values(), strict=True):
        assert np.array_equal(a, b) and (a > 0).any()


def test_evaluate_matches_segment_outputs_to_truths_by_slide_id(tmp_path: Path) -> None:
    """``segment`` writes ``<id>.mask.ome.tif``; evaluate took its stem for ``<id>.mask.ome`` and matched
    no truth, and a truth ``x.ome.tif`` was ``x.ome`` (the slide-id rule: both are ``x``)."""
    import tifffile

    from pbip_engine.engine.metrics import index_mask_dir

    (tmp_path / "p").mkdir()
    (tmp_path / "t").mkdir()
    m = np.zeros((8, 8), np.uint8)
    m[:4] = 1
    tifffile.imwrite(tmp_path / "p" / "x.mask.ome.tif", m)
    tifffile.imwrite(tmp_path / "t" / "x.ome.tif", m)
    assert list(index_mask_dir(tmp_path / "p")) == list(index_mask_dir(tmp_path / "t")) == ["x"]
    r = CliRunner().invoke(main, ["evaluate", "--pred", str(tmp_path / "p"), "--truth", str(tmp_path / "t"),
                                  "--classes", "1", "--ignore-background"])  # fmt: skip
    assert r.exit_code == 0 and "mIoU 1.0000" in r.output, r.output


def test_evaluate_scores_a_segment_output_folder_as_it_is(tmp_path: Path) -> None:
    """``segment --out`` also holds each slide's RGB overlays; evaluate took them for a second mask of the
    slide ("two masks share the stem") and the README's segment-then-evaluate workflow failed."""
    import cv2
    import tifffile

    from pbip_engine.engine.inference.write import OUTPUT_SUFFIXES
    from pbip_engine.engine.metrics import index_mask_dir

    (tmp_path / "p").mkdir()
    (tmp_path / "t").mkdir()
    m = np.zeros((8, 8), np.uint8)
    m[:4] = 1
    rgb = np.full((8, 8, 3), 200, np.uint8)
    tifffile.imwrite(tmp_path / "p" / f"x{OUTPUT_SUFFIXES['mask']}", m)
    tifffile.imwrite(tmp_path / "p" / f"x{OUTPUT_SUFFIXES['overlay_tiff']}", rgb)
    cv2.imwrite(str(tmp_path / "p" / f"x{OUTPUT_SUFFIXES['overlay']}"), rgb)
    (tmp_path / "p" / f"x{OUTPUT_SUFFIXES['geojson']}").write_text("{}")
    cv2.imwrite(str(tmp_path / "t" / "x.png"), m)
    assert index_mask_dir(tmp_path / "p") == {"x": tmp_path / "p" / f"x{OUTPUT_SUFFIXES['mask']}"}
    r = CliRunner().invoke(main, ["evaluate", "--pred", str(tmp_path / "p"), "--truth", str(tmp_path / "t"),
                                  "--classes", "1", "--ignore-background"])  # fmt: skip
    assert r.exit_code == 0 and "mIoU 1.0000" in r.output, r.output


def test_evaluate_scales_a_full_resolution_truth_and_refuses_another_frame(tmp_path: Path) -> None:
    """``segment`` writes masks at the model's µm/px (GlaS: half the JPEG's), so the README's GlaS workflow
    gave "shape != truth"; a truth of the same frame at another scale is now resized like the run's scorer does,
    and one of another aspect is still an error naming both files."""
    import cv2

    for d in ("p", "t", "t2"):
        (tmp_path / d).mkdir()
    pred = np.ones((26, 39), np.uint8)  # 775 x 522 at half resolution, rounded
    pred[:13] = 2
    cv2.imwrite(str(tmp_path / "p" / "x.png"), pred)
    cv2.imwrite(str(tmp_path / "t" / "x.png"), cv2.resize(pred, (77, 52), interpolation=cv2.INTER_NEAREST))
    cv2.imwrite(str(tmp_path / "t2" / "x.png"), np.ones((52, 52), np.uint8))

    def evaluate(truth: str) -> Result:
        return CliRunner().invoke(main, ["evaluate", "--pred", str(tmp_path / "p"), "--truth",
                                         str(tmp_path / truth), "--classes", "2"])  # fmt: skip

    ok = evaluate("t")
    assert ok.exit_code == 0 and "mIoU 1.0000" in ok.output, ok.output
    bad = evaluate("t2")
    assert bad.exit_code == 1 and "x.png" in bad.output and "does not frame the same image" in bad.output, (
        bad.output
    )
    assert "Traceback" not in bad.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mpp", "0"], "--mpp: µm/px must be a number > 0"),
        (["--mpp", "nan"], "--mpp: µm/px must be a number > 0"),
        (["--mpp", "0.5", "--tta-scales", "1,nan"], "--tta-scales: scales must be finite numbers > 0"),
        (["--mpp", "0.5", "--tta-scales", "inf"], "--tta-scales: scales must be finite numbers > 0"),
    ],
)
def test_segment_refuses_a_bad_mpp_or_tta_scale_before_reading_anything(
    tmp_path: Path, args: list[str], message: str
) -> None:
    # Before: "--mpp 0" failed every image with a message about a spec key, and a NaN scale with an int64 overflow.
    r = CliRunner().invoke(main, ["segment", "--model", str(tmp_path), "--images", str(tmp_path / "*.png"),
                                  "--out", str(tmp_path / "o"), *args])  # fmt: skip
    assert r.exit_code == 1 and message in r.output, r.output
    assert not (tmp_path / "o").exists()
