"""Methods as plugins: a toy method registered from inside the test trains and makes pseudo masks.

Nothing under ``jobs/`` knows the toy method: it goes through the registry, the spec's method union, the
one training loop and the CamModel protocol that the pseudo stage uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from pbip_engine.cli import main
from pbip_engine.engine.training.checkpoint import read_checkpoint, restore_training_state
from pbip_engine.engine.training.inputs import to_model_input
from pbip_engine.engine.training.loop import LoopConfig, fit_local
from pbip_engine.engine.training.task import TrainTask
from pbip_engine.jobs.driver import select_stages
from pbip_engine.methods import (
    METHODS,
    Method,
    MethodConfig,
    PseudoOptions,
    Stage1Inputs,
    get_method,
    register_method,
    unregister_method,
)
from pbip_engine.schemas.spec import SpecError, json_schema, parse_spec

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class ToyConfig(MethodConfig):
    name: Literal["toy"] = "toy"
    width: int = 8


class ToyNet(nn.Module):
    """A 2-conv backbone whose 1x1 head gives one CAM per class; image logits = mean-pooled CAMs."""

    def __init__(self, n_classes: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ToyTask(TrainTask):
    kind = "stage1:toy"

    def __init__(self, n_classes: int, width: int) -> None:
        super().__init__()
        self.model = ToyNet(n_classes, width)
        self.width = width

    def prepare(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        return to_model_input(dict(batch), MEAN, STD, device)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        cams = self.model(batch["image"])
        loss = F.binary_cross_entropy_with_logits(cams.mean((2, 3)), batch["labels"])
        return {"loss": loss, "bce": float(loss.detach())}

    def model_config(self) -> dict[str, Any]:
        return {"n_classes": self.model.head.out_channels, "width": self.width}


class ToyCams:
    def __init__(self, checkpoint: Path) -> None:
        state = read_checkpoint(checkpoint, ToyTask.kind)
        self.net = ToyNet(**state["model_config"]).eval()
        restore_training_state(checkpoint, state, self.net)

    @torch.no_grad()
    def predict_masks(self, batch: dict[str, Any], options: PseudoOptions) -> np.ndarray:
        x = to_model_input(batch, MEAN, STD, "cpu")
        cams = self.net(x["image"]) - 1e4 * (1 - x["labels"])[:, :, None, None]  # restricted to the labels
        return (cams.argmax(1) + 1).to(torch.uint8).numpy()


class ToyMethod(Method):
    name = "toy"
    config_model = ToyConfig
    stages = frozenset({"classnet", "pseudo"})
    summary = "a test method: BCE on mean-pooled CAMs"

    def stage1_task(self, cfg: ToyConfig, inputs: Stage1Inputs) -> ToyTask:
        return ToyTask(inputs.n_classes, cfg.width)

    def load_cam_model(self, cfg: ToyConfig, checkpoint: Path, inputs: Stage1Inputs, device: Any) -> ToyCams:
        return ToyCams(checkpoint)


@pytest.fixture
def toy_method():
    register_method(ToyMethod)
    yield get_method("toy")
    unregister_method("toy")


def _batch(n: int, seed: int) -> dict[str, np.ndarray]:
    """Left half red (class 1) and right half blue (class 2), or one colour only, with matching labels."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, 16, 16, 3), np.uint8)
    labels = np.zeros((n, 2), np.float32)
    mask = np.zeros((n, 16, 16), np.uint8)
    for i in range(n):
        kind = int(rng.integers(3))
        if kind in (0, 2):
            img[i, :, :8, 0] = 220
            mask[i, :, :8] = 1
            labels[i, 0] = 1
        if kind in (1, 2):
            img[i, :, 8:, 2] = 220
            mask[i, :, 8:] = 2
            labels[i, 1] = 1
        if kind == 0:
            img[i, :, 8:, 0], mask[i, :, 8:] = 220, 1
        if kind == 1:
            img[i, :, :8, 2], mask[i, :, :8] = 220, 2
    return {"image": img, "labels": labels, "mask": mask}


SPEC = {
    "run": {"name": "t", "output": "out"},
    "data": {"synthetic": {"slides": 1, "size": 768}},
    "classes": [{"name": "red", "color": [200, 0, 0]}, {"name": "blue", "color": [0, 0, 200]}],
}


def test_a_method_registered_in_a_test_trains_and_makes_pseudo_masks(toy_method, tmp_path):
    spec = parse_spec({**SPEC, "method": {"name": "toy", "width": 6}}, tmp_path)
    assert isinstance(spec.method, ToyConfig) and spec.method.width == 6
    inputs = Stage1Inputs.from_spec(spec, None)
    task = toy_method.stage1_task(spec.method, inputs)
    torch.manual_seed(0)
    cfg = LoopConfig(epochs=3, lr=0.05, amp=False)
    res = fit_local(task, lambda e: [_batch(8, seed=e * 10 + i) for i in range(6)], cfg, tmp_path / "s1",
                    val_data=[_batch(8, seed=99)], log_fn=None)  # fmt: skip
    losses = [h["loss"] for h in res["history"]]
    assert res["epochs_run"] == 3 and losses[-1] < losses[0]
    cams = toy_method.load_cam_model(spec.method, tmp_path / "s1" / "best.pt", inputs, "cpu")
    test = _batch(16, seed=7)
    masks = cams.predict_masks(test, PseudoOptions(background="none"))
    assert masks.shape == (16, 16, 16) and set(np.unique(masks)) <= {1, 2}
    assert (masks == test["mask"]).mean() > 0.9  # the CAMs localise red vs blue


def test_spec_method_union_follows_the_registry(toy_method, tmp_path):
    with pytest.raises(SpecError, match="width"):
        parse_spec({**SPEC, "method": {"name": "toy", "width": "wide"}}, tmp_path)
    with pytest.raises(SpecError, match="levels"):  # a PBIP key is not a toy key
        parse_spec({**SPEC, "method": {"name": "toy", "levels": [1]}}, tmp_path)
    schema = json_schema()
    assert {"PbipConfig", "ToyConfig"} <= set(schema["$defs"])
    unregister_method("toy")
    with pytest.raises(SpecError, match="toy"):
        parse_spec({**SPEC, "method": {"name": "toy"}}, tmp_path)
    register_method(ToyMethod)


def test_a_method_without_a_bank_disables_the_bank_stage(toy_method, tmp_path):
    from pbip_engine.jobs.stages import get_stage

    toy = parse_spec({**SPEC, "method": {"name": "toy"}}, tmp_path)
    pbip = parse_spec(SPEC, tmp_path)
    assert not get_stage("bank").enabled(toy) and get_stage("bank").enabled(pbip)
    assert "bank" not in get_stage("classnet").dependencies(toy)
    assert "bank" in get_stage("pseudo").dependencies(pbip)
    assert "does not use a prototype bank" in get_stage("bank").not_needed(toy)
    assert get_stage("bank").not_needed(pbip) is None and get_stage("synth").not_needed(toy) is None
    with pytest.raises(SpecError, match="bank: method 'toy' does not use a prototype bank"):
        select_stages(toy, ["bank"])


def test_run_json_shows_unneeded_stages_as_not_needed(toy_method, tmp_path, monkeypatch):
    """The driver records a stage the method does without as "not needed" (not failed, not missing)."""
    from pbip_engine.jobs import driver

    toy = parse_spec({**SPEC, "method": {"name": "toy"}, "run": {"output": str(tmp_path / "run")}}, tmp_path)
    monkeypatch.setattr(driver, "check_inputs", lambda spec: None)
    monkeypatch.setattr(driver, "select_stages", lambda spec, only: [])  # run nothing, only plan
    summary = driver.run_pipeline(toy, log=lambda m: None)
    assert summary.stages["bank"]["status"] == "not needed"
    assert "bank" not in summary.selected
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["stages"]["bank"] == summary.stages["bank"]


def test_old_classnet_section_says_where_each_key_moved(tmp_path):
    with pytest.raises(SpecError) as e:
        parse_spec({**SPEC, "classnet": {"epochs": 2, "sim_size": 96}}, tmp_path)
    assert "classnet.epochs -> stage1.epochs" in str(
        e.value
    ) and "classnet.sim_size -> method.sim_size" in str(e.value)


def test_registry_rejects_clashes_and_unknown_names():
    class Other(ToyMethod):
        name = "pbip"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Other)
    with pytest.raises(KeyError, match="pbip"):
        get_method("nope")
    assert "pbip" in METHODS


def test_cli_lists_methods_and_demo_refuses_an_unknown_one(tmp_path):
    r = CliRunner().invoke(main, ["methods"])
    assert r.exit_code == 0 and "pbip:" in r.output and "sim_size" in r.output
    stage2 = [line for line in r.output.splitlines() if line.startswith("  stage 2: ")]
    assert len(stage2) == 4 and sum(": deeplabv3plus, ce loss by default" in line for line in stage2) == 3
    assert "  stage 2: transunet with its own losses (method keys)" in stage2
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--method", "nope"])
    assert r.exit_code != 0 and "unknown method 'nope'" in r.output and not (tmp_path / "d").exists()
