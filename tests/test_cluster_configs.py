"""The configs under cluster/: they parse, Ray's own schema accepts the launcher config, the KubeRay
manifests autoscale a GPU group from zero, and every Ray container gets the token from one Secret."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pbip_engine.jobs.local_cluster import fake_autoscaler_config
from pbip_engine.schemas.spec import parse_spec

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
KUBERAY = CLUSTER / "kuberay"
SECRET_NAME = "pbip-ray-auth"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d["kind"] == kind]


def _cluster_specs() -> list[dict[str, Any]]:
    """The RayCluster spec of ray-cluster.yaml and the one embedded in ray-job.yaml."""
    return [c["spec"] for c in _by_kind("RayCluster")] + [
        j["spec"]["rayClusterSpec"] for j in _by_kind("RayJob")
    ]


def _token_env_ok(env: list[dict[str, Any]]) -> bool:
    by_name = {e["name"]: e for e in env}
    mode = by_name.get("RAY_AUTH_MODE", {}).get("value")
    ref = by_name.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    return mode == "token" and ref.get("name") == SECRET_NAME and ref.get("key") == "auth_token"


# -- the cluster launcher (AWS) ---------------------------------------------------------------------------


def test_launcher_config_passes_rays_schema() -> None:
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(raw)  # raises on a schema violation
    prepared = prepare_config(raw)
    validate_config(prepared)  # also after Ray fills in its AWS defaults
    assert prepared["available_node_types"].keys() == raw["available_node_types"].keys()
    # and a broken config is really rejected, so the check above can fail
    broken = {**raw, "max_workers": "many"}
    with pytest.raises(Exception):  # noqa: B017 - Ray raises jsonschema's ValidationError
        validate_config(broken)


def test_launcher_node_groups_and_commands() -> None:
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert cfg["provider"]["type"] == "aws" and cfg["idle_timeout_minutes"] > 0
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # drivers only
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance family
    assert types["cpu_worker"]["min_workers"] == 0
    assert any("pip install" in c and "pbip-engine" in c for c in cfg["setup_commands"])
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    head_start = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start  # reachable through an SSH tunnel only
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def test_fake_autoscaler_config_passes_rays_schema() -> None:
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import validate_config

    cfg = fake_autoscaler_config(
        {"CPU": 0}, {"cpu1": {"resources": {"CPU": 1}, "max_workers": 2}}, gcs_address="127.0.0.1:1234"
    )
    validate_config(cfg)
    assert cfg["provider"]["gcs_address"] == "127.0.0.1:1234" and cfg["max_workers"] == 2
    with pytest.raises(ValueError, match="whole numbers"):
        fake_autoscaler_config({"CPU": 0.5}, {}, gcs_address="127.0.0.1:1")


# -- KubeRay ---------------------------------------------------------------------------------------------


def test_kuberay_manifests_parse_and_have_known_kinds() -> None:
    kinds = sorted(d["kind"] for p in KUBERAY.glob("*.yaml") for d in _docs(p))
    assert kinds == ["ConfigMap", "PersistentVolumeClaim", "RayCluster", "RayJob", "Secret"]
    for d in (d for p in KUBERAY.glob("*.yaml") for d in _docs(p)):
        assert d["apiVersion"] in ("v1", "ray.io/v1") and re.fullmatch(r"[a-z0-9-]+", d["metadata"]["name"])


@pytest.mark.parametrize("which", [0, 1], ids=["RayCluster", "RayJob"])
def test_kuberay_cluster_autoscales_a_gpu_group_from_zero(which: int) -> None:
    spec = _cluster_specs()[which]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"  # never a public LB
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1 and gpu["replicas"] == 0
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups.values())


@pytest.mark.parametrize("which", [0, 1], ids=["RayCluster", "RayJob"])
def test_every_ray_container_gets_the_token_from_the_secret(which: int) -> None:
    spec = _cluster_specs()[which]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    containers = [c for p in pods for c in p["spec"]["containers"]]
    assert containers and all(_token_env_ok(c.get("env", [])) for c in containers)
    assert _token_env_ok(spec["autoscalerOptions"]["env"])  # the autoscaler talks to the GCS too


def test_token_secret_and_job_submitter() -> None:
    (secret,) = _by_kind("Secret")
    assert secret["metadata"]["name"] == SECRET_NAME and "auth_token" in secret["stringData"]
    assert secret["stringData"]["auth_token"].startswith("REPLACE")  # a placeholder, never a real token
    (job,) = _by_kind("RayJob")
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert _token_env_ok(submitter["env"])
    assert job["spec"]["entrypoint"].startswith("pbip-engine run ")
    assert "--address auto" in job["spec"]["entrypoint"]


def test_rayjob_spec_is_a_valid_job_spec_on_shared_storage() -> None:
    (cm,) = _by_kind("ConfigMap")
    (job,) = _by_kind("RayJob")
    spec_file = job["spec"]["entrypoint"].split()[2]
    mount = next(
        m
        for m in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
            "volumeMounts"
        ]
        if spec_file.startswith(m["mountPath"])
    )
    assert Path(spec_file).name in cm["data"] and mount["name"] == "spec"
    spec = parse_spec(yaml.safe_load(cm["data"][Path(spec_file).name]), mount["mountPath"])
    claim = _by_kind("PersistentVolumeClaim")[0]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    assert spec.run.output.startswith("/shared/")  # the RWX claim's mount point


def test_no_secret_values_in_cluster_folder() -> None:
    hexlike = re.compile(r"\b[0-9a-f]{32,}\b")
    for p in CLUSTER.rglob("*"):
        if p.is_file():
            assert not hexlike.search(p.read_text()), f"{p} contains what looks like a token"


def test_readme_walks_from_configs_to_a_submitted_job() -> None:
    text = (CLUSTER / "README.md").read_text()
    for needle in (
        "ray up cluster/aws.yaml",
        "kubectl port-forward",
        "pbip-engine submit",
        "pbip-engine status",
        "ray get-auth-token",
        "kubectl create secret generic pbip-ray-auth",
        "LocalCluster",
        "public internet",
    ):
        assert needle in text, needle
