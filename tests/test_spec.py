"""Job spec validation: a good spec, and each class of error with the key path and the value named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pbip_engine.cli import DEMO_SPEC, main
from pbip_engine.schemas.spec import SpecError, check_inputs, json_schema, load_spec, parse_spec

GOOD = {
    "run": {"name": "t", "output": "out"},
    "data": {"synthetic": {"slides": 1, "size": 512}},
    "classes": [{"name": "tumour", "color": [255, 0, 0]}, {"name": "stroma", "color": [0, 255, 0]}],
}


def _write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _err(raw: dict, tmp_path: Path) -> str:
    with pytest.raises(SpecError) as ei:
        check_inputs(load_spec(_write(tmp_path, raw)))
    return str(ei.value)


def test_good_spec_resolves_paths_against_spec_file(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, GOOD))
    assert spec.run.output == str((tmp_path / "out").resolve())
    assert spec.class_names == ["tumour", "stroma"]
    assert spec.bank.k == 3 and spec.method.name == "pbip" and spec.method.delta == 0.15  # paper defaults
    assert spec.stage1.lr == 1e-5 and spec.stage1.weight_decay == 0.003


def test_bundled_demo_spec_is_valid() -> None:
    spec = load_spec(DEMO_SPEC)
    assert spec.data.synthetic is not None and len(spec.classes) == 4


def test_unknown_key_is_named(tmp_path: Path) -> None:
    raw = {**GOOD, "tiling": {"tile_pxx": 224}}
    msg = _err(raw, tmp_path)
    assert "tiling.tile_pxx" in msg and "unknown key" in msg and "spec.yaml" in msg


def test_bad_value_names_key_and_value(tmp_path: Path) -> None:
    raw = {**GOOD, "tiling": {"mpp": -2}}
    msg = _err(raw, tmp_path)
    assert "tiling.mpp" in msg and "-2" in msg


def test_bad_colour_and_duplicate_class(tmp_path: Path) -> None:
    raw = {**GOOD, "classes": [{"name": "a", "color": [300, 0, 0]}]}
    assert "classes.0.color" in _err(raw, tmp_path)
    raw = {**GOOD, "classes": [{"name": "a", "color": [1, 2, 3]}, {"name": "a", "color": [1, 2, 3]}]}
    msg = _err(raw, tmp_path)
    assert "repeated" in msg
    # a section's own check names the problem: neither pydantic's prefix nor an echo of the whole spec
    assert "Value error" not in msg and "(got {" not in msg, msg


def test_missing_section_and_type_error(tmp_path: Path) -> None:
    raw = {k: v for k, v in GOOD.items() if k != "classes"}
    assert "classes" in _err(raw, tmp_path)
    raw = {**GOOD, "bank": {"k": "three"}}
    msg = _err(raw, tmp_path)
    assert "bank.k" in msg and "three" in msg


def test_missing_slide_and_empty_list(tmp_path: Path) -> None:
    raw = {**GOOD, "data": {"slides": ["nowhere/*.svs"]}}
    msg = _err(raw, tmp_path)
    assert "data.slides" in msg and "matches no file" in msg
    raw = {**GOOD, "data": {"slides": []}}
    assert "data.slides" in _err(raw, tmp_path)


def test_output_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    msg = _err(GOOD, tmp_path)
    assert "run.output" in msg and "is a file" in msg


def test_missing_referenced_path(tmp_path: Path) -> None:
    raw = {**GOOD, "data": {**GOOD["data"], "annotations": "no_such_dir"}}
    assert "data.annotations" in _err(raw, tmp_path)


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="mapping"):
        parse_spec([1, 2], source="x.yaml")  # type: ignore[arg-type]
    p = tmp_path / "bad.yaml"
    p.write_text("run: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)


def test_bad_yaml_is_one_line_with_the_line_and_column(tmp_path: Path) -> None:
    # str(e) of a YAML error spans four lines; shortened, it lost the line number and showed literal "\n"s.
    p = tmp_path / "bad.yaml"
    p.write_text("run: {name: a, output: b}\nclasses: [\n  : : :\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert "\n" not in msg and "\\n" not in msg, msg
    assert msg.startswith(f"{p}: not valid YAML: line 3, column 3: expected the node content"), msg


def test_json_schema_covers_every_section() -> None:
    schema = json_schema()
    for section in (
        "run",
        "data",
        "classes",
        "tiling",
        "encoder",
        "bank",
        "method",
        "stage1",
        "pseudo",
        "segmenter",
        "segment",
        "resources",
    ):
        assert section in schema["properties"]
    assert schema["additionalProperties"] is False


def test_cli_validate_and_schema(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", str(_write(tmp_path, GOOD))])
    assert ok.exit_code == 0 and "OK" in ok.output
    bad = runner.invoke(main, ["validate", str(_write(tmp_path, {**GOOD, "bogus": 1}))])
    assert bad.exit_code != 0 and "bogus" in bad.output
    assert not (tmp_path / "out").exists()  # nothing written before validation passes
    sch = runner.invoke(main, ["schema"])
    assert sch.exit_code == 0 and json.loads(sch.output)["title"] == "pbip-engine job spec"


def test_embedding_only_bank_tiles_excludes_the_majority_fallback(tmp_path: Path) -> None:
    raw = {**GOOD, "encoder": {"tiles": "bank"}, "bank": {"allow_majority_fallback": True}}
    msg = _err(raw, tmp_path)
    assert "encoder.tiles" in msg and "bank.allow_majority_fallback" in msg and "spec.yaml" in msg
    assert load_spec(_write(tmp_path, {**GOOD, "encoder": {"tiles": "bank"}})).encoder.tiles == "bank"
    assert "'all' or 'bank'" in _err({**GOOD, "encoder": {"tiles": "some"}}, tmp_path)


EXAMPLES = Path(__file__).parents[1] / "examples"


def _example(name: str):
    """The shipped spec, parsed without its data paths having to exist (CI clones need not hold GlaS)."""
    return parse_spec(yaml.safe_load((EXAMPLES / name).read_text()), EXAMPLES)


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_shipped_example_spec_validates(name: str) -> None:
    """A user's first command is one of these files: a key renamed in the schema must not break them silently."""
    assert _example(name).run.name == yaml.safe_load((EXAMPLES / name).read_text())["run"]["name"]


def test_glas_paper_carries_the_cpu_protocols_mask_recipe() -> None:
    """glas-paper.yaml changes the schedule (resolution, input, epochs, L_SIM), not how CAMs become masks:
    the CPU protocol's read-out and pseudo-mask levers were measured on GlaS, the paper's min-max was worse."""
    cpu, gpu = _example("glas.yaml"), _example("glas-paper.yaml")
    for key in ("cam_readout", "eval_fuse_weights", "levels"):
        assert getattr(gpu.method, key) == getattr(cpu.method, key), key
    # max_hole_px is an area in pixels: the same 2,000 px at 1.24 µm/px is 16x as many at 0.31 µm/px
    scale = (cpu.tiling.mpp / gpu.tiling.mpp) ** 2
    assert gpu.pseudo.max_hole_px == cpu.pseudo.max_hole_px * scale
    same = {k: v for k, v in cpu.pseudo.model_dump().items() if k != "max_hole_px"}
    assert same == {k: v for k, v in gpu.pseudo.model_dump().items() if k != "max_hole_px"}
    assert gpu.segmenter.class_weights == cpu.segmenter.class_weights and gpu.segmenter.val_fraction == 0
    assert gpu.segmenter.loss == cpu.segmenter.loss == "ce_dice"
