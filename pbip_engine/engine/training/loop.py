"""The one training loop: stage 1 and stage 2 of every method, in one process or in a Ray Train worker.

Epochs over ``task`` with per-sample dihedral augmentation, AMP (see ``amp``), gradient clipping, a
constant or poly learning rate, an optional moving average of the weights (``ema_epochs``, see ``ema``), a
checkpoint after every epoch, resume from the latest one, the best epoch by validation score, and a
JSON-lines history. Where checkpoints live is the only thing that differs between a laptop and a cluster,
so it is a small ``CheckpointStore``: :class:`LocalStore` here, the Ray Train store in
``jobs/ray_train.py``. ``fit_local`` is the laptop entry point; the Ray worker builds a :class:`Trainer`
the same way and hands it its store.

Epochs are numbered from 1. Each history row holds the epoch, the global step, the epoch this attempt
started at (``start_epoch``: 1 on a fresh run, k + 1 after resuming from epoch k), the world size, the
mean of every value the task logged, throughput, and ``val`` + ``val_score`` when there is validation.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pbip_engine.engine.io.atomic import atomic_path, atomic_write_text, jsonable
from pbip_engine.engine.training.amp import autocast, backward_step, make_grad_scaler
from pbip_engine.engine.training.augment import augment_batch
from pbip_engine.engine.training.checkpoint import (
    latest_checkpoint,
    read_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from pbip_engine.engine.training.ema import WeightAverage
from pbip_engine.engine.training.inputs import unwrap
from pbip_engine.engine.training.task import TrainTask

Batches = Iterable[Mapping[str, Any]] | Callable[[int], Iterable[Mapping[str, Any]]]


@dataclass
class LoopConfig:
    """Optimisation settings shared by every stage; ``lr`` is the base rate each group's ``lr_mult`` scales."""

    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum)
    momentum: float = 0.9
    schedule: str = "constant"  # "constant" or "poly" (per iteration, power ``poly_power``)
    poly_power: float = 0.9
    grad_clip: float | None = None
    amp: bool = True  # takes effect on CUDA only
    augment: bool = True  # per-sample flips/rot90 of image (and mask)
    seed: int = 0
    log_every: int = 0  # steps between log lines; 0 = one line per epoch
    ema_epochs: float = 0.0  # > 0: validate and ship a moving average of the weights with this time constant

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingError(ValueError):
    """A loop that cannot go on: non-finite loss, unknown optimiser or schedule."""


def make_optimizer(task: TrainTask, cfg: LoopConfig) -> torch.optim.Optimizer:
    """The task's parameter groups at ``cfg.lr * lr_mult``; each group keeps its base rate in ``initial_lr``."""
    groups = []
    for g in task.param_groups():
        g = dict(g)
        g["lr"] = cfg.lr * float(g.pop("lr_mult", 1.0))
        g["initial_lr"] = g["lr"]
        g.setdefault("weight_decay", cfg.weight_decay)
        if g["params"]:
            groups.append(g)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise TrainingError(f"unknown optimizer {cfg.optimizer!r}; choose 'adamw' or 'sgd'")


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int | None, power: float) -> float:
    """lr = initial_lr * (1 - step/total)^power in every group; ``total_steps=None`` keeps the base rate.

    Stateless (a function of the global step), so a resumed run needs no scheduler state.
    """
    factor = 1.0 if not total_steps else max(0.0, 1.0 - min(step, total_steps) / total_steps) ** power
    for g in optimizer.param_groups:
        g["lr"] = g.get("initial_lr", g["lr"]) * factor
    return float(optimizer.param_groups[0]["lr"])


class CheckpointStore(Protocol):
    """Where a loop's checkpoints and history go (a local folder, or Ray Train's storage)."""

    def latest(self) -> tuple[Path, list[dict[str, Any]]] | None:
        """The newest checkpoint file and the history saved with it, or None on a fresh start."""

    def save(self, write: Callable[[Path], None], record: dict[str, Any], history: list[dict[str, Any]],
             is_best: bool) -> None:  # fmt: skip
        """Persist one epoch: ``write(path)`` writes the checkpoint file; ``history`` includes ``record``."""


class LocalStore:
    """``out/checkpoints/epoch_NNNN.pt`` (the last ``keep_last``), ``out/last.pt``, ``out/best.pt``, ``metrics.jsonl``."""

    def __init__(self, out_dir: str | Path, keep_last: int = 2, resume: bool = True) -> None:
        self.out = Path(out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.resume = resume

    def latest(self) -> tuple[Path, list[dict[str, Any]]] | None:
        path = latest_checkpoint(self.ckpt_dir) if self.resume else None
        if path is None:
            return None
        hist_file = self.out / "metrics.jsonl"
        rows = (
            [json.loads(s) for s in hist_file.read_text().splitlines() if s.strip()]
            if hist_file.is_file()
            else []
        )
        return path, rows

    def save(self, write: Callable[[Path], None], record: dict[str, Any], history: list[dict[str, Any]],
             is_best: bool) -> None:  # fmt: skip
        import shutil

        path = self.ckpt_dir / f"epoch_{record['epoch']:04d}.pt"
        write(path)
        for name, wanted in (("last.pt", True), ("best.pt", is_best)):
            if wanted:
                with atomic_path(self.out / name) as tmp:
                    shutil.copyfile(path, tmp)
        if self.keep_last > 0:
            for old in sorted(self.ckpt_dir.glob("epoch_*.pt"))[: -self.keep_last]:
                old.unlink(missing_ok=True)
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def _epoch_batches(data: Batches, epoch: int) -> Iterable[Mapping[str, Any]]:
    return data(epoch) if callable(data) else data


class Trainer:
    """Builds the optimiser and scaler for ``task`` and runs :meth:`fit` against a checkpoint store."""

    def __init__(
        self,
        task: TrainTask,
        cfg: LoopConfig,
        store: CheckpointStore,
        *,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        log_fn: Callable[[str], None] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.task, self.cfg, self.store = task, cfg, store
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.log_fn = log_fn
        self.run_config = dict(run_config or {})
        task.to(self.device)
        # Built before DDP wraps the model: the average follows the bare network, rank by rank alike.
        self.ema = WeightAverage(task.model, cfg.ema_epochs) if cfg.ema_epochs > 0 else None
        if wrap is not None:
            task.wrap(wrap)
        self.optimizer = make_optimizer(task, cfg)
        self.scaler = make_grad_scaler(self.device, cfg.amp)

    # -- one epoch ------------------------------------------------------------------------------------

    def train_epoch(self, batches: Iterable[Mapping[str, Any]], epoch: int, step: int,
                    total_steps: int | None) -> dict[str, Any]:  # fmt: skip
        """One pass; returns the mean of every logged value, steps, images, seconds, images/s and the last lr."""
        task, cfg = self.task, self.cfg
        task.train()
        rng = np.random.default_rng([cfg.seed, epoch, self.rank])
        sums: dict[str, float] = {}
        steps = images = 0
        t0 = time.perf_counter()
        lr = float(self.optimizer.param_groups[0]["lr"])
        for raw in batches:
            if cfg.augment:
                raw = augment_batch(raw, rng)
            if cfg.schedule == "poly":
                lr = set_poly_lr(self.optimizer, step + steps, total_steps, cfg.poly_power)
            batch = task.prepare(raw, self.device)
            with autocast(self.device, cfg.amp):
                out = task(batch)
            loss = out["loss"]
            if not torch.isfinite(loss):
                logged = {k: v for k, v in out.items() if k != "loss"}
                raise TrainingError(
                    f"non-finite loss at epoch {epoch} step {step + steps} (lr {lr:.3g}): {logged}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            backward_step(loss, task.model, self.optimizer, self.scaler, cfg.grad_clip)
            if self.ema is not None:
                self.ema.update(unwrap(task.model))
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in out.items():
                if k != "loss":
                    sums[k] = sums.get(k, 0.0) + float(v)
            steps += 1
            images += len(raw["image"])
            if self.log_fn is not None and cfg.log_every and steps % cfg.log_every == 0:
                self.log_fn(f"epoch {epoch} step {step + steps}: loss {float(loss):.4f} lr {lr:.3g}")
        seconds = time.perf_counter() - t0
        stats: dict[str, Any] = {k: v / max(steps, 1) for k, v in sums.items()}
        if not steps:
            stats["loss"] = math.nan
        stats.update(steps=steps, images=images, seconds=seconds,
                     images_per_s=images / seconds if seconds > 0 else 0.0, lr=lr)  # fmt: skip
        return stats

    # -- the loop -------------------------------------------------------------------------------------

    def resume(self) -> tuple[int, int, float, list[dict[str, Any]]]:
        """(first epoch to run, global step, best score so far, history) from the store's latest checkpoint."""
        found = self.store.latest()
        if found is None:
            return 1, 0, -math.inf, []
        path, history = found
        state = read_checkpoint(path, self.task.kind, map_location=self.device)
        averaged = None
        if state.get("training_model") is not None:  # "model" is the average; the optimiser moves these
            averaged = state["model"]
            state = {**state, "model": state["training_model"]}
        restore_training_state(path, state, self.task.model, self.optimizer, self.scaler)
        if self.ema is not None:
            if averaged is not None:
                self.ema.load(averaged, int(state.get("average_steps") or 1))
            else:  # the average starts now, from the restored weights
                self.ema = WeightAverage(unwrap(self.task.model), self.cfg.ema_epochs)
        done = int(state["epoch"])
        best = (state.get("metrics") or {}).get("best_score")
        if self.log_fn is not None:
            self.log_fn(f"resumed from {path.name} (epoch {done}): training epochs {done + 1}+")
        history = [h for h in history if h.get("epoch", 0) <= done]
        return done + 1, int(state.get("step") or 0), -math.inf if best is None else float(best), history

    def fit(self, train_data: Batches, val_data: Batches | None = None, *,
            steps_per_epoch: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """Train the remaining epochs; returns the whole history (earlier attempts' rows included)."""
        cfg = self.cfg
        start, step, best, history = self.resume()
        self.epochs_run = 0
        if steps_per_epoch is None and start > 1:
            steps_per_epoch = step // (start - 1) or None
        for epoch in range(start, cfg.epochs + 1):
            total = cfg.epochs * steps_per_epoch if steps_per_epoch else None
            if self.ema is not None:
                self.ema.steps_per_epoch = steps_per_epoch
            stats = self.train_epoch(_epoch_batches(train_data, epoch), epoch, step, total)
            self._check_finite(epoch)
            step += int(stats["steps"])
            steps_per_epoch = steps_per_epoch or int(stats["steps"]) or None
            record: dict[str, Any] = {"epoch": epoch, "step": step, "start_epoch": start,
                                      "world_size": self.world_size, **stats}  # fmt: skip
            is_best = val_data is None
            if val_data is not None:
                val = self._evaluate(_epoch_batches(val_data, epoch))
                record["val"] = val
                record["val_score"] = score = float(val.get("score", math.nan))
                if not math.isnan(score) and score > best:
                    best, is_best = score, True
            record["best_score"] = best if math.isfinite(best) else None
            record = jsonable(record)
            history.append(record)
            self.store.save(self._writer(epoch, step, record), record, history, is_best)
            self.epochs_run += 1
            if self.log_fn is not None:
                msg = (
                    f"epoch {epoch}/{cfg.epochs}: loss {stats['loss']:.4f}, {stats['images_per_s']:.1f} img/s"
                )
                if "val_score" in record:
                    msg += f", val score {record['val_score']:.4f} (best {best:.4f})"
                self.log_fn(msg)
        return history

    def _check_finite(self, epoch: int) -> None:
        """Refuse to checkpoint weights an epoch's last step made NaN/inf.

        The loss check sees a step's input weights, not its output, so a final step that diverges would
        otherwise be saved as ``last.pt``/``best.pt`` and only fail when a resumed run or a reader uses it.
        """
        nets = [("weights", unwrap(self.task.model))]
        if self.ema is not None:
            nets.append(("averaged weights", self.ema.module))
        for what, net in nets:
            for name, t in [*net.named_parameters(), *net.named_buffers()]:
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise TrainingError(
                        f"non-finite {what} after epoch {epoch} (first: {name}); not checkpointed. "
                        "Lower the learning rate or set grad_clip"
                    )

    def _evaluate(self, batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """The task's validation, of the weight average when there is one (the model the checkpoint ships)."""
        if self.ema is None:
            return self.task.evaluate(batches, self.device)
        trained = self.task.model
        self.task.model = self.ema.module
        try:
            return self.task.evaluate(batches, self.device)
        finally:
            self.task.model = trained

    def _writer(self, epoch: int, step: int, record: dict[str, Any]) -> Callable[[Path], None]:
        ema = self.ema

        def write(path: Path) -> None:
            save_checkpoint(
                path,
                unwrap(self.task.model) if ema is None else ema.module,
                kind=self.task.kind,
                epoch=epoch,
                step=step,
                metrics=record,
                optimizer=self.optimizer,
                scaler=self.scaler,
                model_config=self.task.model_config(),
                config={"loop": self.cfg.to_dict(), **self.run_config},
                training_model=None if ema is None else unwrap(self.task.model),
                average_steps=None if ema is None else ema.steps,
            )

        return write


def fit_local(
    task: TrainTask,
    train_data: Batches,
    cfg: LoopConfig,
    out_dir: str | Path,
    *,
    val_data: Batches | None = None,
    device: torch.device | str = "cpu",
    steps_per_epoch: int | None = None,
    resume: bool = True,
    keep_last: int = 2,
    log_fn: Callable[[str], None] | None = print,
    run_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Single-process training into ``out_dir`` (see :class:`LocalStore` for the files)."""
    torch.manual_seed(cfg.seed)
    store = LocalStore(out_dir, keep_last=keep_last, resume=resume)
    trainer = Trainer(task, cfg, store, device=device, log_fn=log_fn, run_config=run_config)
    history = trainer.fit(train_data, val_data, steps_per_epoch=steps_per_epoch)
    scores = [h["val_score"] for h in history if h.get("val_score") is not None]
    return {
        "history": history,
        "epochs_run": trainer.epochs_run,
        "best_score": max(scores) if scores else None,
        "out_dir": str(out_dir),
    }
