"""Ray Train around the engine's one training loop (``engine/training/loop.py``).

``fit_on_ray`` runs ``worker_loop`` under ``TorchTrainer`` (gloo on CPU, NCCL on GPU). Each worker builds
its task with a stage's ``setup`` function, wraps the trainable part with ``prepare_model`` and runs the
same :class:`~pbip_engine.engine.training.loop.Trainer` as ``fit_local``; only the checkpoint store
differs (:class:`RayStore`: Ray Train's storage, so a restarted worker group or a re-run after a crash
resumes from the latest epoch). The best epoch by validation score is kept when there is validation.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pbip_engine.jobs.resources import failure_config, read_options, scaling_config, train_threads
from pbip_engine.schemas.spec import ResourcesSection

CKPT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"


class RayStore:
    """Checkpoints in Ray Train's storage: rank 0 reports each epoch with its checkpoint, the others without."""

    def __init__(self) -> None:
        import ray.train

        self.ctx = ray.train.get_context()

    def latest(self) -> tuple[Path, list[dict[str, Any]]] | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        # Copy out: the checkpoint directory may be a temporary download that is removed on exit.
        d = Path(tempfile.mkdtemp(prefix="resume-"))
        with ckpt.as_directory() as src:
            shutil.copy2(Path(src) / CKPT_FILE, d / CKPT_FILE)
            history = json.loads((Path(src) / HISTORY_FILE).read_text())
        return d / CKPT_FILE, history

    def save(self, write: Callable[[Path], None], record: dict[str, Any], history: list[dict[str, Any]],
             is_best: bool) -> None:  # fmt: skip
        import ray.train
        from ray.train import Checkpoint

        metrics = {k: v for k, v in record.items() if not isinstance(v, dict)}  # Ray wants flat metrics
        if self.ctx.get_world_rank() != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            write(Path(d) / CKPT_FILE)
            (Path(d) / HISTORY_FILE).write_text(json.dumps(history))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def holdout_split(ds: Any, ids: Iterable[str], fraction: float) -> tuple[dict[str, Any], int]:
    """``{"train", "val"}`` datasets split by the tile-id hash, and the number of training rows.

    ``ids`` are the dataset's tile ids read cheaply (one Parquet column), so the training length that the
    poly schedule needs is known without reading the images twice.
    """
    from pbip_engine.engine.training.split import is_validation

    datasets = {"train": ds.filter(lambda r: not is_validation(r["tile_id"], fraction), **read_options())}
    if fraction > 0:
        datasets["val"] = ds.filter(lambda r: is_validation(r["tile_id"], fraction), **read_options())
    return datasets, sum(1 for t in ids if not is_validation(t, fraction))


def shard_batches(shard: Any, batch_size: int, convert: Callable[[dict[str, Any]], dict[str, Any]], *,
                  shuffle: bool, cache_bytes: int = 0,
                  seed: tuple[int, ...] = (0,)) -> Callable[[int], Iterable[dict[str, Any]]]:  # fmt: skip
    """epoch -> this worker's batches of a Ray Data shard, converted to the engine's batch convention.

    With ``cache_bytes`` > 0 a shard whose encoded rows fit is read from Ray Data once, before the first
    step, and every epoch is drawn from memory (``EpochCache``); ``convert`` (decoding,
    random crops) still runs every epoch.
    """
    from pbip_engine.engine.training.epoch_cache import EpochCache

    def stream(epoch: int) -> Iterable[dict[str, Any]]:
        kw = {"local_shuffle_buffer_size": batch_size * 20, "local_shuffle_seed": epoch} if shuffle else {}
        yield from shard.iter_batches(batch_size=batch_size, batch_format="numpy", **kw)

    rows = EpochCache(stream, batch_size, cache_bytes, shuffle=shuffle, seed=seed)

    def batches(epoch: int) -> Iterable[dict[str, Any]]:
        for b in rows(epoch):
            yield convert(b)

    return batches


def worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build the task, then the engine's Trainer with a RayStore."""
    import ray.train
    import ray.train.torch
    import torch

    import pbip_engine  # noqa: F401  (first import in the worker: cuCIM before torch)
    from pbip_engine.engine.training.loop import LoopConfig, Trainer

    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))  # Ray sets OMP_NUM_THREADS to the reserved CPUs
    device = ray.train.torch.get_device()
    ctx = ray.train.get_context()
    task, convert = config["setup"](config)
    cfg = LoopConfig(**config["loop"])
    torch.manual_seed(cfg.seed)
    rank0 = ctx.get_world_rank() == 0
    trainer = Trainer(task, cfg, RayStore(), device=device, rank=ctx.get_world_rank(),
                      world_size=ctx.get_world_size(), wrap=ray.train.torch.prepare_model,
                      log_fn=print if rank0 else None, run_config=config.get("run_config"))  # fmt: skip
    bs = int(config["batch_size"])
    cache = int(config.get("cache_bytes") or 0)
    train = shard_batches(ray.train.get_dataset_shard("train"), bs, convert, shuffle=True, cache_bytes=cache,
                          seed=(cfg.seed, ctx.get_world_rank()))  # fmt: skip
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    val_convert = getattr(convert, "validation", convert)  # e.g. RegionCrops: centre crops, no jitter
    val = (
        shard_batches(val_shard, bs, val_convert, shuffle=False, cache_bytes=cache)
        if val_shard is not None
        else None
    )
    steps = -(-int(config["n_train"]) // (bs * ctx.get_world_size())) if config.get("n_train") else None
    trainer.fit(train, val, steps_per_epoch=steps)


def fit_on_ray(
    name: str,
    setup: Callable[[dict[str, Any]], tuple[Any, Callable[[dict[str, Any]], dict[str, Any]]]],
    config: dict[str, Any],
    datasets: dict[str, Any],
    resources: ResourcesSection,
    storage: Path,
    out_dir: Path,
) -> list[dict[str, Any]]:
    """Train; copy the last and the best checkpoint (by ``val_score`` when there is a ``val`` dataset) to ``out_dir``.

    ``setup(config) -> (task, convert)`` runs in each worker; ``convert`` turns a Ray Data numpy batch into
    the engine's batch convention. Writes ``out_dir/last.pt``, ``best.pt`` and ``metrics.jsonl``.
    """
    from ray.train import CheckpointConfig, DataConfig, RunConfig
    from ray.train.torch import TorchTrainer

    has_val = "val" in datasets
    score = "val_score" if has_val else None
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
    from ray.data import DataContext

    # Set before the trainer captures the DataContext: per-worker ingest bars (train and val, one per
    # split coordinator) drown the epoch logs.
    data_ctx = DataContext.get_current()
    bars = data_ctx.enable_progress_bars
    data_ctx.enable_progress_bars = False
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            **config,
            "setup": setup,
            "threads": train_threads(resources),
            "has_val": has_val,
            "cache_bytes": int(resources.train_cache_mb * 2**20),
        },
        scaling_config=scaling_config(resources),
        run_config=run_config,
        datasets=datasets,
        # Every worker validates on the whole held-out set, so each reports the same score.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
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
