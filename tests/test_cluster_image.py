"""The one container image of both cluster paths: cluster/docker/Dockerfile installs pbip-engine from its
own build context (the package is on no registry, and a name lookup would install a stranger's upload),
.dockerignore keeps .git, runs and virtualenvs out of that context, and cluster/aws.yaml runs the same
image instead of Ray's default AMI. Static checks: CI has no Docker daemon, so nothing is built here.

The Dockerfile is read with `dockerfile` (Docker's own Go parser) and the build context is computed with
the Docker SDK's `exclude_paths`, which applies .dockerignore the way the Docker CLI does."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml
from docker.utils.build import exclude_paths

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
DOCKERFILE_REL = str(DOCKERFILE.relative_to(REPO))
# `pip install pbip-engine` (or "pbip-engine==0.1.0", -U ...): a registry lookup by the project's name
PIP_BY_NAME = re.compile(r"pip\s+install\b[^\n&;|]*?(?<![\w./-])[\"']?pbip[-_]engine\b(?![\w./-]*/)")


def _commands(text: str) -> list[Any]:
    return list(dockerfile.parse_string(text))


def _context(root: Path) -> set[str]:
    """Paths (relative, '/'-separated) that `docker build -f cluster/docker/Dockerfile ROOT` sends."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return set(exclude_paths(str(root), patterns, dockerfile=DOCKERFILE_REL))


def _pip_install_args(run: str) -> list[str]:
    """The positional arguments of every `pip install` in one RUN line."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    args: list[str] = []
    words: list[str] = []
    for token in [*lexer, ";"]:
        if token.strip("&|;()") == "":  # a shell operator ends one command
            if "pip" in words and "install" in words[words.index("pip") :]:
                rest = words[words.index("install", words.index("pip")) + 1 :]
                args += [w for w in rest if not w.startswith("-")]
            words = []
        else:
            words.append(token)
    return args


def _copies(cmds: list[Any]) -> list[tuple[list[str], str, tuple[str, ...]]]:
    """(sources, destination, flags) of every COPY / ADD."""
    return [(list(c.value[:-1]), c.value[-1], c.flags) for c in cmds if c.cmd in ("COPY", "ADD")]


def _ray_version() -> str:
    manifest = yaml.safe_load((CLUSTER / "kuberay" / "ray-cluster.yaml").read_text())
    return manifest["spec"]["rayVersion"]


def test_dockerfile_installs_the_package_from_its_build_context() -> None:
    cmds = _commands(DOCKERFILE.read_text())
    (base,) = [c.value[0] for c in cmds if c.cmd == "FROM"]
    assert base == f"rayproject/ray:{_ray_version()}-py311-gpu"  # the Ray the manifests declare
    copies = _copies(cmds)
    runs = [c.value[0] for c in cmds if c.cmd == "RUN"]
    targets = [a for r in runs for a in _pip_install_args(r)]
    assert targets, "the Dockerfile installs nothing"
    destinations = {dest.rstrip("/") for _, dest, _ in copies}
    for target in targets:
        # a folder the Dockerfile copied in, never a name or URL pip would look up
        assert target.rstrip("/") in destinations, f"pip install {target!r} is not a copied folder"
    assert not any(PIP_BY_NAME.search(r) for r in runs)
    # what it copies is in the repository and in the build context .dockerignore lets through
    context = _context(REPO)
    sources = [s for srcs, _, _ in copies for s in srcs]
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert readme, "pyproject.toml names no readme"  # (tomllib is 3.11+, the project supports 3.10)
    for needed in ("pyproject.toml", readme.group(1), "pbip_engine"):
        assert needed in sources, f"{needed} is not copied, so `pip install` cannot build the package"
    for s in sources:
        assert (REPO / s).exists() and s in context, s
    # the base image runs as user ray: pip writes build files into the copied folder
    assert all(any(f.startswith("--chown=") for f in flags) for _, _, flags in copies)


def test_pip_by_name_pattern_catches_the_registry_installs() -> None:
    """The pattern above can fail: it flags what the old Dockerfile and aws.yaml ran, not a path."""
    for bad in (
        'python -m pip install --no-cache-dir "pbip-engine==0.1.0"',
        'python3 -m pip install -U "pbip-engine"',
        "pip install pbip_engine && true",
    ):
        assert PIP_BY_NAME.search(bad), bad
    for ok in ("python -m pip install --no-cache-dir /tmp/pbip-engine", "pip install ./pbip-engine/"):
        assert not PIP_BY_NAME.search(ok), ok
    assert _pip_install_args("pip install -U pip && python -m pip install --no-cache-dir /src") == [
        "pip",
        "/src",
    ]


def test_dockerignore_keeps_git_runs_and_venvs_out(tmp_path: Path) -> None:
    files = [
        ".git/HEAD",
        ".git/objects/ab/cdef",
        ".venv/bin/python",
        "venv/lib/site.py",
        "runs/crc/run.json",
        "demo-out/masks/a.tif",
        "build/lib/x.py",
        "bench/gpu_bundle.sh",
        "tests/test_x.py",
        ".pytest_cache/v/x",
        ".ruff_cache/x",
        "pbip_engine.egg-info/PKG-INFO",
        "pbip_engine/__pycache__/cli.cpython-311.pyc",
        "slides/a.svs",
        "pyproject.toml",
        "README.md",
        "pbip_engine/__init__.py",
        "pbip_engine/examples/demo.yaml",
        "cluster/docker/Dockerfile",
        ".dockerignore",
    ]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    sent = {p for p in _context(tmp_path) if (tmp_path / p).is_file()}
    assert sent == {
        "pyproject.toml",
        "README.md",
        "pbip_engine/__init__.py",
        "pbip_engine/examples/demo.yaml",
        "cluster/docker/Dockerfile",  # Docker always sends the Dockerfile and .dockerignore
        ".dockerignore",
    }


def test_build_context_of_this_checkout_has_the_whole_package() -> None:
    sent = _context(REPO)
    package = {
        str(p.relative_to(REPO))
        for p in (REPO / "pbip_engine").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert package and package <= sent
    allowed = {"pyproject.toml", "README.md", ".dockerignore", DOCKERFILE_REL}
    stray = {p for p in sent if (REPO / p).is_file() and p not in allowed and p not in package}
    assert not stray, sorted(stray)[:10]


def test_aws_runs_the_kuberay_image_not_the_default_ami() -> None:
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    kuberay_images = {
        c["image"]
        for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
        if d
        for c in _containers(d)
    }
    assert len(kuberay_images) == 1  # one image for every pod
    assert cfg["docker"]["image"] in kuberay_images
    assert not {"head_image", "worker_image"} & cfg["docker"].keys()
    for name, node_type in cfg["available_node_types"].items():
        assert "docker" not in node_type, f"{name} overrides the image"
        # Ray's launcher puts its default AMI (Ubuntu 18.04 Deep Learning AMI) where ImageId is empty or
        # "latest_dlami" (ray/autoscaler/_private/aws/config.py, _check_ami)
        ami = node_type["node_config"].get("ImageId", "")
        assert ami.lower() not in ("", "latest_dlami"), f"{name} boots Ray's default AMI"
    # nothing is installed on the nodes: the image is the environment
    commands = [c for k in cfg if k.endswith("_commands") for c in cfg[k]]
    assert not any("pip install" in c for c in commands), commands


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    spec = spec.get("rayClusterSpec", spec)
    if "headGroupSpec" not in spec:
        return []
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for t in templates for c in t["spec"]["containers"]]


@pytest.mark.parametrize(
    "path",
    [CLUSTER / "README.md", CLUSTER / "aws.yaml", DOCKERFILE, REPO / "README.md"],
    ids=lambda p: p.name,
)
def test_no_install_of_pbip_engine_by_name(path: Path) -> None:
    text = path.read_text()
    assert not PIP_BY_NAME.search(text), PIP_BY_NAME.search(text)


def test_readme_builds_the_image_from_the_repository_root() -> None:
    text = (CLUSTER / "README.md").read_text()
    assert f"docker build -t REGISTRY/pbip-engine:0.1.0 -f {DOCKERFILE_REL} ." in text
    assert "NVIDIA driver ≥ 580" in text
