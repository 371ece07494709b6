"""A training worker's shard held in memory after its first full pass, when it is small.

Streaming a shard through Ray Data every epoch costs CPU that the training step needs: on a 2-core node the
split coordinator alone took a quarter of a core while a ClassNet trained (BENCHMARKS.md). Most cohorts a
node trains on fit in memory as the encoded rows Ray Data hands out (GlaS: ~9k tile JPEGs, ~30 MB), so the
first epoch reads them before its first step and every epoch draws batches from memory, reshuffled over
the whole shard (a better shuffle than the streaming buffer's). A shard larger than the limit streams every
epoch; the cache gives up the moment it would pass the limit, so memory stays bounded.

The shard is read before the first step, not alongside it. Streamed beside the training
step, Ray Data's tasks take CPU from the step's threads, and on a 2-core node the step's two OpenMP threads
then wait on each other: a streamed first epoch ran at half the speed of the cached ones (GlaS stage 2:
1.27 vs 2.45 img/s), far more than the Ray Data work itself costs. Read first, the shard takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

Batch = Mapping[str, np.ndarray]


def batch_nbytes(batch: Batch) -> int:
    """Bytes a numpy batch holds: array buffers, plus the payload of object cells (encoded images, lists)."""
    total = 0
    for col in batch.values():
        arr = np.asarray(col)
        if arr.dtype != object:
            total += arr.nbytes
            continue
        total += arr.nbytes  # the pointers
        for cell in arr.ravel():
            if isinstance(cell, bytes | bytearray | memoryview):
                total += len(cell)
            elif isinstance(cell, np.ndarray):
                total += cell.nbytes
            else:
                total += 64  # small scalars and strings: a rough constant is enough for a limit
    return total


class EpochCache:
    """Epoch -> batches: the first call reads ``source(epoch)`` whole before it yields, while its rows fit in
    ``limit_bytes``, and serves that epoch and every later one from memory.

    ``seed`` (e.g. the run's seed and the worker's rank) and the epoch fix each cached epoch's order.
    ``limit_bytes <= 0`` never caches. A source that passes the limit while being read is handed out as read,
    then streamed to its end, and streams every epoch after. A read that fails keeps nothing, so a retried
    epoch reads again; once read, the shard stays, even if an epoch is cut short. Cached epochs keep the
    shard's row count and batch size, so workers of a DDP group that received equal shards still take the
    same number of steps.
    """

    def __init__(self, source: Callable[[int], Iterable[Batch]], batch_size: int, limit_bytes: int, *,
                 shuffle: bool, seed: Sequence[int] = (0,)) -> None:  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source, self.batch_size, self.limit = source, int(batch_size), int(limit_bytes)
        self.shuffle, self.seed = shuffle, [int(x) for x in seed]
        self.streams = self.limit <= 0  # set for good once a read passes the limit
        self.rows: dict[str, np.ndarray] | None = None  # the whole shard, column-wise, once cached

    @property
    def cached(self) -> bool:
        return self.rows is not None

    def __call__(self, epoch: int) -> Iterator[Batch]:
        if self.rows is None and self.streams:
            yield from self.source(epoch)
            return
        if self.rows is None:
            source = iter(self.source(epoch))
            kept: list[Batch] = []
            size = 0
            for batch in source:
                kept.append(batch)
                size += batch_nbytes(batch)
                if size > self.limit:  # too big for memory: what was read, then the rest as it streams
                    self.streams = True
                    yield from kept
                    del kept
                    yield from source
                    return
            if not kept:
                return
            self.rows = _concat(kept)
            del kept
        yield from self._from_memory(epoch)

    def _from_memory(self, epoch: int) -> Iterator[Batch]:
        rows = self.rows
        assert rows is not None
        n = len(next(iter(rows.values())))
        order = np.random.default_rng([*self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield {k: v[idx] for k, v in rows.items()}


def _concat(batches: list[Batch]) -> dict[str, np.ndarray]:
    keys = list(batches[0])
    for b in batches[1:]:
        if list(b) != keys:
            raise ValueError(f"shard batches disagree on their columns: {keys} vs {list(b)}")
    return {k: _concat_column([np.asarray(b[k]) for b in batches]) for k in keys}


def _concat_column(parts: list[np.ndarray]) -> np.ndarray:
    if len({p.shape[1:] for p in parts}) == 1:  # 1-D object columns (bytes, lists) concatenate as cells too
        return np.concatenate(parts)
    out = np.empty(sum(len(p) for p in parts), dtype=object)  # fixed-size lists whose size varies by batch
    out[:] = [row for p in parts for row in p]
    return out
