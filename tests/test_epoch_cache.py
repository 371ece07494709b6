"""EpochCache: a training shard read once, then drawn from memory (engine/training/epoch_cache.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbip_engine.engine.training.epoch_cache import EpochCache, batch_nbytes


class Source:
    """A stand-in for a Ray Data shard: rows with encoded-image bytes and label lists, counting its passes."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size, self.passes = n, batch_size, 0

    def __call__(self, epoch: int):
        self.passes += 1
        for start in range(0, self.n, self.batch_size):
            ids = np.arange(start, min(start + self.batch_size, self.n))
            images = np.empty(len(ids), dtype=object)
            images[:] = [bytes([i % 256]) * 100 for i in ids]
            yield {"tile_id": np.array([f"t{i}" for i in ids]), "image": images,
                   "labels": np.stack([[i % 2, 1 - i % 2] for i in ids]).astype(np.float32)}  # fmt: skip


def _ids(batches) -> list[str]:
    return [t for b in batches for t in b["tile_id"]]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), bs=st.integers(1, 16), seed=st.integers(0, 5))
def test_cached_epochs_hold_every_row_once_in_the_same_steps(n: int, bs: int, seed: int) -> None:
    src = Source(n, bs)
    cache = EpochCache(src, bs, 1 << 20, shuffle=True, seed=(seed, 0))
    first = list(cache(1))
    assert cache.cached and src.passes == 1
    for epoch in (2, 3):
        batches = list(cache(epoch))
        assert src.passes == 1  # from memory
        assert len(batches) == len(first)  # DDP workers with equal shards keep taking equal steps
        assert sorted(_ids(batches)) == sorted(_ids(first))
        for b in batches:  # the columns stay aligned row by row
            i = np.array([int(t[1:]) for t in b["tile_id"]])
            assert [c[0] for c in b["image"]] == list(i % 256)
            np.testing.assert_array_equal(b["labels"][:, 0], i % 2)


def test_cached_order_is_reshuffled_per_epoch_and_reproducible() -> None:
    a = EpochCache(Source(50, 8), 8, 1 << 20, shuffle=True, seed=(0, 0))
    b = EpochCache(Source(50, 8), 8, 1 << 20, shuffle=True, seed=(0, 0))
    list(a(1)), list(b(1))
    e2, e3 = _ids(a(2)), _ids(a(3))
    assert e2 != e3  # each epoch its own order
    assert e2 == _ids(b(2))  # the same seed and epoch give the same order (a resumed run repeats it)
    other_rank = EpochCache(Source(50, 8), 8, 1 << 20, shuffle=True, seed=(0, 1))
    list(other_rank(1))
    assert _ids(other_rank(2)) != e2
    plain = EpochCache(Source(50, 8), 8, 1 << 20, shuffle=False)
    assert _ids(plain(1)) == _ids(plain(2))  # validation keeps its order


def test_a_shard_over_the_limit_streams_every_epoch() -> None:
    src = Source(40, 8)
    one_batch = batch_nbytes(next(iter(Source(40, 8)(0))))
    cache = EpochCache(src, 8, 3 * one_batch, shuffle=True)  # room for 3 of the 5 batches
    for epoch in (1, 2, 3):
        assert len(_ids(cache(epoch))) == 40
    assert not cache.cached and src.passes == 3
    off = EpochCache(Source(40, 8), 8, 0, shuffle=True)
    list(off(1))
    assert not off.cached  # 0 = always stream


def test_batch_nbytes_counts_encoded_payloads() -> None:
    images = np.empty(2, dtype=object)
    images[:] = [b"x" * 1000, b"y" * 3000]
    n = batch_nbytes({"image": images, "labels": np.zeros((2, 4), np.float32)})
    assert 4000 + 32 <= n < 4000 + 32 + 64
    with pytest.raises(ValueError, match="batch_size"):
        EpochCache(Source(1, 1), 0, 1, shuffle=False)


def test_a_column_whose_width_varies_by_batch_is_kept_row_by_row() -> None:
    def source(epoch: int):
        yield {"labels": np.zeros((2, 3), np.float32)}
        yield {"labels": np.ones((1, 4), np.float32)}  # a list column Ray stacked at a different width

    cache = EpochCache(source, 3, 1 << 20, shuffle=False)
    list(cache(1))
    (batch,) = list(cache(2))
    assert [len(r) for r in batch["labels"]] == [3, 3, 4]


class CountingSource(Source):
    """A Source that counts the batches read so far (how far the stream was pulled)."""

    def __init__(self, n: int, batch_size: int, fail_at: int | None = None) -> None:
        super().__init__(n, batch_size)
        self.read, self.fail_at = 0, fail_at

    def __call__(self, epoch: int):
        for b in super().__call__(epoch):
            if self.fail_at is not None and self.read == self.fail_at:
                raise OSError("a block could not be read")
            self.read += 1
            yield b


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 60), bs=st.integers(1, 16), seed=st.integers(0, 5))
def test_the_shard_is_read_before_the_first_step(n: int, bs: int, seed: int) -> None:
    src = CountingSource(n, bs)
    cache = EpochCache(src, bs, 1 << 20, shuffle=True, seed=(seed, 0))
    epoch1 = cache(1)
    first = next(epoch1)
    assert src.read == -(-n // bs) and cache.cached  # every batch read before the first one is handed out
    batches = [first, *epoch1]
    assert len(batches) == -(-n // bs) and sorted(_ids(batches)) == sorted(f"t{i}" for i in range(n))
    for b in batches:  # the columns stay aligned row by row
        i = np.array([int(t[1:]) for t in b["tile_id"]])
        np.testing.assert_array_equal(b["labels"][:, 0], i % 2)
    assert len(_ids(cache(2))) == n and src.passes == 1  # later epochs from memory as before


def test_an_epoch_cut_short_keeps_the_read_shard_and_a_failed_read_keeps_nothing() -> None:
    src = CountingSource(40, 8)
    cache = EpochCache(src, 8, 1 << 20, shuffle=True)
    for i, _ in enumerate(cache(1)):
        if i == 1:
            break  # the read had finished: the shard in memory is whole
    assert cache.cached and len(_ids(cache(2))) == 40 and src.passes == 1
    broken = CountingSource(40, 8, fail_at=3)
    cache = EpochCache(broken, 8, 1 << 20, shuffle=True)
    with pytest.raises(OSError):
        list(cache(1))
    assert not cache.cached
    broken.fail_at = None
    assert len(_ids(cache(1))) == 40 and cache.cached  # a retried epoch reads again


def test_a_shard_over_the_limit_hands_out_every_row_in_stream_order_then_streams() -> None:
    src = CountingSource(40, 8)
    one_batch = batch_nbytes(next(iter(Source(40, 8)(0))))
    cache = EpochCache(src, 8, 3 * one_batch, shuffle=True)  # room for 3 of the 5 batches
    epoch1 = cache(1)
    next(epoch1)
    assert src.read < 5  # read until the limit was passed, not the whole shard
    assert _ids([*epoch1]) == [f"t{i}" for i in range(8, 40)]
    assert len(_ids(cache(2))) == 40 and src.passes == 2 and not cache.cached
