"""Property test (issue 20): ``validate`` on mutated specs says OK or prints one bounded spec error.

Hypothesis mutates a valid spec: values of other types, deeper nesting, unicode and control characters,
huge and non-finite numbers, unknown and deleted keys, and YAML alias expansions. Whatever it builds,
``pbip-engine validate`` must exit 0 or 1 with a short ``Error:`` message (no traceback), within a time
bound per example, and the process must not grow by more than a bound over the whole run.
"""

from __future__ import annotations

import resource
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pbip_engine.cli import main

GOOD: dict[str, Any] = {
    "run": {"name": "t", "output": "out"},
    "data": {"synthetic": {"slides": 1, "size": 512}},
    "classes": [{"name": "tumour", "color": [255, 0, 0]}, {"name": "stroma", "color": [0, 255, 0]}],
    "tiling": {"mpp": 0.5, "tile_px": 224, "tissue": {"target_mpp": 8.0}},
    "segment": {"overlap": 0.25, "truth_lut": [0, 1, 2]},
    "resources": {"autoscale": {"min": 1, "max": 2}},
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),  # unicode, control characters, NUL included
    st.text(alphabet="/.~*?[]\\", max_size=12),  # path-like punctuation
    st.just("x" * 5000),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(d: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, (*prefix, i))
    return out


ALL_PATHS = _paths(GOOD)[1:]


@st.composite
def mutated_specs(draw: st.DrawFn) -> str:
    import copy

    spec = copy.deepcopy(GOOD)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ALL_PATHS))
        parent: Any = spec
        try:
            for k in path[:-1]:
                parent = parent[k]
            op = draw(st.sampled_from(["replace", "delete", "add_key"]))
            if op == "replace":
                parent[path[-1]] = draw(values)
            elif op == "delete" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, dict):
                parent[draw(st.text(min_size=1, max_size=20))] = draw(values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation changed the structure under this path
    alias = draw(st.booleans())
    if alias:  # a chain of anchors, each repeating the previous one, used in place of a value
        width, depth = draw(st.integers(1, 12)), draw(st.integers(1, 9))
        target = draw(st.sampled_from([("tiling", "mpp"), ("run", "name"), ("segment", "truth_lut")]))
        if isinstance(spec.get(target[0]), dict):
            spec[target[0]][target[1]] = "ALIAS-HERE"
    text = yaml.safe_dump(spec, allow_unicode=draw(st.booleans()))
    if alias:
        lines = ['a0: &a0 ["v"]']
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
        text = "\n".join(lines) + "\n" + text.replace("ALIAS-HERE", f"*a{depth - 1}")
    return text


@pytest.mark.slow
@settings(max_examples=80, deadline=3000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@example(
    "a0: &a0 [v, v, v, v, v, v, v, v, v]\n"
    + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 8))
    + "tiling: {mpp: *a7}\n"
)
@given(mutated_specs())
def test_validate_never_raises_more_than_one_bounded_spec_error(text: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "spec.yaml"
        p.write_text(text, encoding="utf-8", errors="surrogateescape")
        r = CliRunner().invoke(main, ["validate", str(p)])
    assert r.exit_code in (0, 1), (r.exit_code, r.output[:500], text[:500])
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output[:2000]
    if r.exit_code == 1:
        assert r.output.startswith("Error: ") and len(r.output) < 12_000, r.output[:500]
    else:
        assert ": OK (" in r.output
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 300, f"validate grew the process by {grown_mb:.0f} MB"
