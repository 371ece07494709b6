"""engine.wsi.grid.grid_positions: one grid, three edge modes, each equal to the tiler it replaced."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pbip_engine.engine.wsi.grid import EDGES, grid_positions

lengths = st.integers(min_value=1, max_value=5000)
sizes = st.integers(min_value=1, max_value=600)
strides = st.floats(min_value=1.0, max_value=700.0, allow_nan=False)


def _old_tile_stage(length: int, size0: int, stride0: float) -> np.ndarray:
    # tiling._positions before the shared grid (whole tiles only).
    n = math.floor((length - size0) / stride0) + 1 if length >= size0 else 0
    pos = np.round(np.arange(max(n, 0)) * stride0).astype(np.int64)
    return pos[pos + size0 <= length]


def _old_inference(length: int, size0: int, stride0: float) -> np.ndarray:
    # segment_slide.grid_positions before the shared grid (last tile flush, one overhanging tile if short).
    if length <= size0:
        return np.zeros(1, np.int64)
    pos = _old_tile_stage(length, size0, stride0)
    return pos if pos[-1] + size0 >= length else np.append(pos, length - size0)


def _old_glas(size: int, patch: int, stride: int) -> list[int]:
    # datasets/glas._positions before the shared grid (integer stride, no padding).
    if size < patch:
        return []
    pos = list(range(0, size - patch + 1, stride))
    if pos[-1] != size - patch:
        pos.append(size - patch)
    return pos


@given(lengths, sizes, strides, st.sampled_from(EDGES))
def test_sorted_in_bounds_and_step_at_most_stride(length, size, stride, edge):
    pos = grid_positions(length, size, stride, edge)
    assert pos.dtype == np.int64
    assert (np.diff(pos) > 0).all()
    assert (np.diff(pos) <= math.ceil(stride)).all()  # rounding k * stride moves a start by < 1 pixel
    if length >= size:
        assert pos[0] == 0 and (pos + size <= length).all()
    else:
        assert pos.tolist() == ([0] if edge == "overhang" else [])


@given(lengths, sizes, strides, st.sampled_from(["cover", "overhang"]))
def test_cover_modes_leave_no_pixel_out(length, size, stride, edge):
    assume(stride <= size)  # tiles that overlap or touch (every caller); a wider stride leaves gaps by design
    assume(length >= size or edge == "overhang")
    pos = grid_positions(length, size, stride, edge)
    covered = np.zeros(max(length, size), bool)
    for p in pos:
        covered[p : p + size] = True
    assert covered[:length].all()
    assert max(length - size, 0) == pos[-1]


@given(lengths, sizes, strides)
def test_skip_is_cover_without_the_flush_tile(length, size, stride):
    skip, cover = grid_positions(length, size, stride, "skip"), grid_positions(length, size, stride, "cover")
    assert cover[: len(skip)].tolist() == skip.tolist() and len(cover) - len(skip) in (0, 1)


@given(lengths, sizes, strides)
def test_equals_the_old_tile_stage_and_inference_grids(length, size, stride):
    assert np.array_equal(grid_positions(length, size, stride, "skip"), _old_tile_stage(length, size, stride))
    assert np.array_equal(
        grid_positions(length, size, stride, "overhang"), _old_inference(length, size, stride)
    )


@given(lengths, sizes, st.integers(min_value=1, max_value=700))
def test_equals_the_old_glas_patches(length, size, stride):
    assert grid_positions(length, size, stride, "cover").tolist() == _old_glas(length, size, stride)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1000, 128, 96.0, "skip"), [0, 96, 192, 288, 384, 480, 576, 672, 768, 864]),
        ((1000, 128, 96.0, "cover"), [0, 96, 192, 288, 384, 480, 576, 672, 768, 864, 872]),
        ((10, 4, 1.5, "skip"), [0, 2, 3, 4, 6]),
        ((50, 128, 96.0, "overhang"), [0]),
        ((50, 128, 96.0, "cover"), []),
        ((128, 128, 96.0, "overhang"), [0]),
        ((775, 448, 224, "cover"), [0, 224, 327]),
    ],
)
def test_examples(args, expected):
    assert grid_positions(*args).tolist() == expected


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="edge"):
        grid_positions(100, 10, 5, "pad")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stride"):
        grid_positions(100, 10, 0)
