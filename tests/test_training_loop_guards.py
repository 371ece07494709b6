"""The loop never checkpoints weights its last step made non-finite."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from pbip_engine.engine.training.loop import LoopConfig, TrainingError, fit_local
from pbip_engine.engine.training.task import TrainTask


class _SumTask(TrainTask):
    """loss = 10 x one weight: finite before every step, so only the weights show a blow-up."""

    kind = "test:sum"

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Linear(1, 1, bias=False)
        nn.init.ones_(self.model.weight)

    def prepare(self, batch: Any, device: torch.device) -> dict[str, Any]:
        return {"x": torch.as_tensor(batch["image"], dtype=torch.float32, device=device)}

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"loss": 10 * self.model.weight.sum() + 0 * batch["x"].sum()}


def _batches(epoch: int) -> list[dict[str, Any]]:
    return [{"image": np.ones((2, 1), np.float32)}]


def _cfg(lr: float, epochs: int) -> LoopConfig:
    return LoopConfig(epochs=epochs, lr=lr, optimizer="sgd", momentum=0.0, augment=False, amp=False)


def test_an_epoch_ending_in_inf_weights_is_not_checkpointed(tmp_path):
    # one SGD step at lr 1e38 (gradient 10) takes the weight from 1 past float32's range to -inf, after a loss of 10
    with pytest.raises(TrainingError, match=r"non-finite weights after epoch 1 \(first: weight\)"):
        fit_local(_SumTask(), _batches, _cfg(1e38, 2), tmp_path, log_fn=None)
    assert not list((tmp_path / "checkpoints").glob("epoch_*.pt"))
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()


def test_finite_weights_are_checkpointed_every_epoch(tmp_path):
    res = fit_local(_SumTask(), _batches, _cfg(0.1, 2), tmp_path, log_fn=None)
    assert res["epochs_run"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch_*.pt")) == [
        "epoch_0001.pt",
        "epoch_0002.pt",
    ]
    assert (tmp_path / "last.pt").is_file()
