"""Ray Train machinery shared by the ClassNet and segmenter stages.

``fit_on_ray`` runs an engine-side epoch function under ``TorchTrainer`` (gloo on CPU, NCCL on GPU):
checkpoint every epoch into the run's storage, resume from the latest checkpoint when the run is
restarted with the same storage (a re-run after a crash, or FailureConfig restarting a dead worker),
keep the best by validation mIoU when there is one, and hand back the epoch history.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pbip_engine.jobs.resources import compute_threads, failure_config, scaling_config
from pbip_engine.schemas.spec import ResourcesSection

CKPT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"


def augment(batch: dict[str, Any], seed: int) -> dict[str, Any]:
    """Random flips and 90° rotations, per batch (histology has no canonical orientation)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    img = batch["image"]
    if rng.random() < 0.5:
        img = img[:, :, ::-1]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = np.rot90(img, k=int(rng.integers(4)), axes=(1, 2))
    out = dict(batch)
    out["image"] = np.ascontiguousarray(img)
    return out


def worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build, resume, train epochs, report + checkpoint each epoch."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    import pbip_engine  # noqa: F401  (first import in the worker: cuCIM before torch)

    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))  # Ray sets OMP_NUM_THREADS to the reserved CPUs
    setup: Callable[[dict[str, Any], torch.device], dict[str, Any]] = config["setup"]
    device = ray.train.torch.get_device()
    state = setup(config, device)  # model (prepared for DDP), optimizer, epoch_fn, save_fn, load_fn
    start_epoch, history = 0, []
    ckpt = ray.train.get_checkpoint()
    ctx = ray.train.get_context()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta = state["load_fn"](Path(d) / CKPT_FILE)
            start_epoch = int(meta["epoch"]) + 1
            history = json.loads((Path(d) / HISTORY_FILE).read_text())
        if ctx.get_world_rank() == 0:
            print(f"resumed from the checkpoint of epoch {start_epoch - 1}: training epochs {start_epoch}+")
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, config["epochs"]):
        metrics = state["epoch_fn"](shard, epoch)
        metrics["epoch"] = epoch
        metrics["world_size"] = ctx.get_world_size()
        # The first epoch of the attempt that ran this one: 0 on a fresh start, k + 1 after resuming
        # from epoch k's checkpoint (a restarted worker group, or a re-run after a crash).
        metrics["start_epoch"] = start_epoch
        history.append(metrics)
        if ctx.get_world_rank() == 0:
            with tempfile.TemporaryDirectory() as d:
                state["save_fn"](Path(d) / CKPT_FILE, epoch, metrics)
                (Path(d) / HISTORY_FILE).write_text(json.dumps(history))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def fit_on_ray(
    name: str,
    setup: Callable[[dict[str, Any], Any], dict[str, Any]],
    config: dict[str, Any],
    datasets: dict[str, Any],
    resources: ResourcesSection,
    storage: Path,
    out_dir: Path,
    score: str | None = None,
) -> list[dict[str, Any]]:
    """Train, then copy the final (and best, when ``score`` is given) checkpoint into ``out_dir``."""
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    run_config = RunConfig(
        name=name,
        storage_path=str(storage),
        failure_config=failure_config(resources),
        checkpoint_config=CheckpointConfig(
            num_to_keep=2 if score is None else 3,
            checkpoint_score_attribute=score,
            checkpoint_score_order="max",
        ),
    )
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={**config, "setup": setup, "threads": compute_threads(resources)},
        scaling_config=scaling_config(resources),
        run_config=run_config,
        datasets=datasets,
    )
    from ray.data import DataContext

    data_ctx = DataContext.get_current()
    bars = data_ctx.enable_progress_bars
    data_ctx.enable_progress_bars = False  # per-worker ingest bars drown the epoch logs
    try:
        result = trainer.fit()
    finally:
        data_ctx.enable_progress_bars = bars
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training produced no checkpoint ({result.error})")
    out_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        shutil.copy2(Path(d) / CKPT_FILE, out_dir / "last.pt")
        history = json.loads((Path(d) / HISTORY_FILE).read_text())
    best = result.checkpoint
    if score is not None and result.best_checkpoints:
        best = max(result.best_checkpoints, key=lambda cm: cm[1].get(score, float("-inf")))[0]
    with best.as_directory() as d:
        shutil.copy2(Path(d) / CKPT_FILE, out_dir / "best.pt")
    with (out_dir / "metrics.jsonl").open("w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    return history
