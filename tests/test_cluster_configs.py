"""The configs under cluster/: they parse, Ray's own schema accepts the launcher config, Kubernetes' own
schemas (kubernetes-validate, offline) accept the core objects and every pod template, and the KubeRay
manifests carry what the operator acts on: token auth through `authOptions` (its own dashboard calls
depend on it), one RWX claim at one path, a GPU group from zero, no /dev/shm mount of our own.

No package ships KubeRay's CRD schemas, so the RayCluster / RayJob fields the operator depends on are
asserted one by one here (checked by hand against the CRDs of KubeRay 1.6, 1.7 and HEAD)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pbip_engine.jobs.local_cluster import fake_autoscaler_config
from pbip_engine.schemas.spec import parse_spec

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
KUBERAY = CLUSTER / "kuberay"
SECRET_NAME = "pbip-ray-auth"
MIN_KUBERAY = "1.6"  # authOptions.secretName; the README and the manifests name it
# Kubernetes releases the core objects and pod templates are checked against (kubernetes-validate ships them)
K8S_VERSIONS = [f"1.{minor}" for minor in range(25, 38)]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d["kind"] == kind]


def _cluster_specs() -> list[dict[str, Any]]:
    """The RayCluster spec of ray-cluster.yaml and the one embedded in ray-job.yaml."""
    return [c["spec"] for c in _by_kind("RayCluster")] + [
        j["spec"]["rayClusterSpec"] for j in _by_kind("RayJob")
    ]


def _pod_templates(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name -> pod template, the head as "head"."""
    return {"head": spec["headGroupSpec"]["template"]} | {
        g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]
    }


def _group_params(spec: dict[str, Any], group: str) -> dict[str, str]:
    if group == "head":
        return spec["headGroupSpec"].get("rayStartParams", {})
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == group).get("rayStartParams", {})


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


def test_idle_timeouts_are_one_value_everywhere() -> None:
    """A worker idle this long goes, on both paths; one value, with its reason next to it in the files."""
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())["idle_timeout_minutes"] * 60
    kuberay = [s["autoscalerOptions"]["idleTimeoutSeconds"] for s in _cluster_specs()]
    assert kuberay == [aws, aws], (aws, kuberay)


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
def test_token_auth_goes_through_auth_options(which: int) -> None:
    """The operator adds the token to its own dashboard calls (job status, RayJob success) only when the
    cluster spec says `authOptions.mode: token`; env vars in the pods do not reach it. With `secretName`
    it reads our Secret (key auth_token) and also puts RAY_AUTH_MODE / RAY_AUTH_TOKEN into every Ray
    container, the autoscaler and the submitter."""
    spec = _cluster_specs()[which]
    assert spec.get("authOptions") == {"mode": "token", "secretName": SECRET_NAME}
    major, minor, *_ = (int(x) for x in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52)  # the operator refuses token mode on older Ray
    # any token a pod names explicitly comes from that same Secret (never a second source of truth)
    containers = [c for t in _pod_templates(spec).values() for c in t["spec"]["containers"]]
    envs = [e for c in containers for e in c.get("env", [])] + spec["autoscalerOptions"].get("env", [])
    for e in envs:
        if e["name"] == "RAY_AUTH_TOKEN":
            assert e["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": "auth_token"}
        if e["name"] == "RAY_AUTH_MODE":
            assert e["value"] == "token"


def test_kuberay_version_that_supports_auth_options_is_named() -> None:
    readme = (CLUSTER / "README.md").read_text()
    assert f"KubeRay ≥ {MIN_KUBERAY}" in readme and "every KubeRay version" not in readme
    for name in ("ray-cluster.yaml", "ray-job.yaml"):
        assert f"KubeRay >= {MIN_KUBERAY}" in (KUBERAY / name).read_text(), name


def test_token_secret_and_job_entrypoint() -> None:
    (secret,) = _by_kind("Secret")
    assert secret["metadata"]["name"] == SECRET_NAME and "auth_token" in secret["stringData"]
    assert secret["stringData"]["auth_token"].startswith("REPLACE")  # a placeholder, never a real token
    (job,) = _by_kind("RayJob")
    assert job["spec"]["entrypoint"].startswith("pbip-engine run ")
    assert "--address auto" in job["spec"]["entrypoint"]
    # a custom submitter pod would have to run the cluster's image; the default one does
    head_image = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    submitter = job["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", [])
    assert all(c["image"] == head_image for c in submitter)


@pytest.mark.parametrize("which", [0, 1], ids=["RayCluster", "RayJob"])
def test_no_dev_shm_mount_of_our_own(which: int) -> None:
    """KubeRay mounts a memory-backed /dev/shm sized to the memory limit only when the pod has none;
    Ray's object store lives there, and a smaller mount of ours pushes it to disk."""
    for group, template in _pod_templates(_cluster_specs()[which]).items():
        for c in template["spec"]["containers"]:
            mounts = [m["mountPath"].rstrip("/") for m in c.get("volumeMounts", [])]
            assert "/dev/shm" not in mounts, f"{group}/{c['name']} mounts /dev/shm"
        # and no plasma-directory override that would move the store elsewhere
        assert "plasma-directory" not in _group_params(_cluster_specs()[which], group)


@pytest.mark.parametrize("which", [0, 1], ids=["RayCluster", "RayJob"])
def test_one_rwx_claim_at_one_path_in_every_group(which: int) -> None:
    """run.output is read back by the next stage on other nodes: the same RWX claim, the same path."""
    (claim,) = _by_kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    spec = _cluster_specs()[which]
    paths = {}
    for group, template in _pod_templates(spec).items():
        volumes = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in template["spec"].get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        (container,) = template["spec"]["containers"]
        paths[group] = {
            m["mountPath"]
            for m in container["volumeMounts"]
            if volumes.get(m["name"]) == claim["metadata"]["name"]
        }
    assert len(paths) >= 3 and all(p == {"/shared"} for p in paths.values()), paths


@pytest.mark.parametrize("which", [0, 1], ids=["RayCluster", "RayJob"])
def test_head_start_params_are_only_what_we_change(which: int) -> None:
    """dashboard-host 0.0.0.0 is KubeRay's default on the head; the head runs no tasks."""
    params = _cluster_specs()[which]["headGroupSpec"]["rayStartParams"]
    assert params == {"num-cpus": "0"}


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


# -- Kubernetes' own schemas (kubernetes-validate ships them: no download) -----------------------------


def _core_objects() -> list[dict[str, Any]]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d["apiVersion"] == "v1"]


def _pod_template_objects() -> list[tuple[str, dict[str, Any]]]:
    """Every pod template of the RayCluster and RayJob as a core PodTemplate (the CRDs embed the core
    PodTemplateSpec, so Kubernetes' schema is the one the operator's pods are built from)."""
    out = []
    for kind, spec in zip(["RayCluster", "RayJob"], _cluster_specs(), strict=True):
        for group, template in _pod_templates(spec).items():
            obj = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": group},
                "template": template,
            }
            out.append((f"{kind}/{group}", obj))
    return out


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_core_objects_and_pod_templates_pass_kubernetes_schemas(k8s: str) -> None:
    objs = [(d["kind"], d) for d in _core_objects()] + _pod_template_objects()
    assert len(objs) >= 3 + 6
    for what, obj in objs:
        try:
            kubernetes_validate.validate(obj, k8s, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{what} on Kubernetes {k8s}: {e.message}")


def test_kubernetes_validation_rejects_a_misspelt_field() -> None:
    """The strict check above can fail: an unknown field in a pod template or a Secret is an error."""
    _, obj = _pod_template_objects()[0]
    container = obj["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    (secret,) = _by_kind("Secret")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**secret, "stringDate": {}}, K8S_VERSIONS[0], strict=True)


def test_no_secret_values_in_cluster_folder() -> None:
    hexlike = re.compile(r"\b[0-9a-f]{32,}\b")
    for p in CLUSTER.rglob("*"):
        if p.is_file():
            assert not hexlike.search(p.read_text()), f"{p} contains what looks like a token"


def test_docs_do_not_point_at_configs_that_fail() -> None:
    """run.output as an s3:// URI is refused by `run` and `submit`; a finished RayJob is not re-run by
    applying the file again (it has to be deleted first)."""
    from pbip_engine.schemas.spec import RunSection

    assert "refused" in (RunSection.model_fields["output"].description or "")
    for path in [*CLUSTER.rglob("*.yaml"), CLUSTER / "README.md"]:
        for block in re.split(r"\n\s*\n", path.read_text()):
            if "s3://" in block:
                assert "refuse" in block, f"{path.name} offers an s3:// run.output: {block[:200]}"
    for path in (CLUSTER / "README.md", KUBERAY / "ray-job.yaml"):
        text = path.read_text()
        assert "kubectl delete rayjob pbip-crc" in text and "DELETE_RAYJOB_CR_AFTER_JOB_FINISHES" in text
        assert "Re-applying after a failure resumes" not in text


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
