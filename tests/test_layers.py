"""The package's layers hold: engine/ and methods/ run without Ray (a notebook or a plain process can use
them), and the jobs/ stage programs never import each other (what they share lives in jobs.rundir).

Each rule is checked by reading the source with ``ast`` (function-local imports included), and the
whole set once more by import-linter's contracts in pyproject.toml.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pbip_engine"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, anywhere in it; relative imports made absolute.

    ``from a import b`` yields both ``a`` and ``a.b``, since ``b`` may be a submodule.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package.pop()
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
    return out


def ray_imports(root: Path, packages: tuple[str, ...]) -> list[str]:
    """Every import of ray (or a ray submodule) in the given packages below ``root``."""
    bad = []
    for pkg in packages:
        for path in sorted((root / pkg.replace(".", "/")).rglob("*.py")):
            for line, mod in _imported(path, root):
                if mod == "ray" or mod.startswith("ray."):
                    bad.append(f"{path.relative_to(root)}:{line} imports {mod}")
    return bad


def _registers_a_stage(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ClassDef):
            names = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in node.decorator_list}
            if "register_stage" in names:
                return True
    return False


def stage_modules(root: Path, jobs: str) -> dict[str, Path]:
    """Module name -> file of every jobs module that registers a stage."""
    folder = root / jobs.replace(".", "/")
    return {_module_name(p, root): p for p in sorted(folder.glob("*.py")) if _registers_a_stage(p)}


def stage_cross_imports(root: Path, jobs: str) -> list[str]:
    """Every import of one stage module by another."""
    stages = stage_modules(root, jobs)
    bad = []
    for name, path in stages.items():
        for line, mod in _imported(path, root):
            if mod in stages and mod != name:
                bad.append(f"{path.relative_to(root)}:{line} imports stage module {mod}")
    return bad


def test_engine_and_methods_never_import_ray() -> None:
    assert ray_imports(ROOT, ("pbip_engine.engine", "pbip_engine.methods")) == []


def test_stage_modules_never_import_each_other() -> None:
    stages = stage_modules(ROOT, "pbip_engine.jobs")
    assert {"pbip_engine.jobs.tile", "pbip_engine.jobs.infer", "pbip_engine.jobs.pseudo"} <= set(stages)
    assert "pbip_engine.jobs.stage" not in stages and "pbip_engine.jobs.rundir" not in stages
    assert stage_cross_imports(ROOT, "pbip_engine.jobs") == []


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_the_checks_catch_bad_imports(tmp_path: Path) -> None:
    """The two checks above on a toy tree with each kind of violation (so a green run means something)."""
    _write(tmp_path, "pkg/engine/__init__.py", "")
    _write(tmp_path, "pkg/engine/ok.py", "import numpy\nfrom raytracer import x\n")
    _write(tmp_path, "pkg/engine/local.py", "def f():\n    import ray.data\n")
    _write(tmp_path, "pkg/engine/sub/deep.py", "from ray import train\n")
    assert ray_imports(tmp_path, ("pkg.engine",)) == [
        "pkg/engine/local.py:2 imports ray.data",
        "pkg/engine/sub/deep.py:1 imports ray",
        "pkg/engine/sub/deep.py:1 imports ray.train",
    ]
    stage = "from pkg.jobs.stage import Stage, register_stage\n\n@register_stage\nclass S(Stage):\n    pass\n"
    _write(tmp_path, "pkg/jobs/__init__.py", "")
    _write(tmp_path, "pkg/jobs/stage.py", "class Stage: ...\n")
    _write(tmp_path, "pkg/jobs/rundir.py", "")
    _write(tmp_path, "pkg/jobs/a.py", "from pkg.jobs.rundir import x\n" + stage)
    _write(tmp_path, "pkg/jobs/b.py", stage + "def f():\n    from pkg.jobs.a import g\n")
    _write(tmp_path, "pkg/jobs/c.py", "from . import b\nfrom pkg.jobs import rundir\n" + stage)
    assert set(stage_modules(tmp_path, "pkg.jobs")) == {"pkg.jobs.a", "pkg.jobs.b", "pkg.jobs.c"}
    assert stage_cross_imports(tmp_path, "pkg.jobs") == [
        "pkg/jobs/b.py:7 imports stage module pkg.jobs.a",
        "pkg/jobs/c.py:1 imports stage module pkg.jobs.b",
    ]


def test_import_linter_contracts_hold() -> None:
    """pyproject's [tool.importlinter] contracts, on this checkout's code (not an installed copy)."""
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(
        [str(exe), "--no-cache"],  # reads the contracts from pyproject.toml in cwd
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout
