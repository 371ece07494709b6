"""Canvas: exact reconstruction from overlapping one-hot tiles, blending maths, bounded open maps."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pbip_engine.engine.inference.stitch import Canvas, StitchError, blend_window, drop_stale_canvases


def _label_image(h: int, w: int, n_classes: int, seed: int = 0) -> np.ndarray:
    """Blocky random labels 0..n_classes-1 (blocks of odd size so tile edges cut through them)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, n_classes, size=(h // 7 + 1, w // 7 + 1))
    return np.kron(coarse, np.ones((7, 7), np.int64))[:h, :w].astype(np.uint8)


def _tiles(h: int, w: int, tile: int, stride: int) -> list[tuple[int, int]]:
    ys = list(range(0, max(h - tile, 0) + 1, stride))
    xs = list(range(0, max(w - tile, 0) + 1, stride))
    if ys[-1] + tile < h:
        ys.append(h - tile)  # edge tile aligned to the border
    if xs[-1] + tile < w:
        xs.append(w - tile)
    return [(y, x) for y in ys for x in xs]


@pytest.mark.parametrize("blend", ["gaussian", "average"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_hot_tiles_stitch_back_exactly(tmp_path, blend, dtype):
    h, w, n, tile = 203, 157, 4, 48  # odd sizes; chunk smaller than the canvas, not a divisor
    labels = _label_image(h, w, n)
    onehot = np.eye(n, dtype=np.float32)[labels].transpose(2, 0, 1)  # [C, H, W]
    with Canvas(tmp_path, (h, w), n, chunk=64, blend=blend, dtype=dtype, max_open_mb=0.05) as cv:
        for y, x in _tiles(h, w, tile, 36):
            cv.add(y, x, onehot[:, y : y + tile, x : x + tile])
        out = cv.argmax_tile(0, 0, h, w)
        bands = np.concatenate([b for _, b in cv.iter_bands(rows=50)], axis=0)
        assert cv.chunks_on_disk == 4 * 3
    np.testing.assert_array_equal(out, labels)
    np.testing.assert_array_equal(bands, labels)


def test_tiles_hanging_over_the_border_are_clipped(tmp_path):
    h, w, n = 50, 70, 3
    labels = _label_image(h, w, n, seed=1)
    onehot = np.eye(n, dtype=np.float32)[labels].transpose(2, 0, 1)
    padded = np.zeros((n, h + 40, w + 40), np.float32)
    padded[:, 20 : 20 + h, 20 : 20 + w] = onehot
    with Canvas(tmp_path, (h, w), n, chunk=32) as cv:
        for y in range(-20, h, 30):
            for x in range(-20, w, 30):
                cv.add(y, x, padded[:, y + 20 : y + 60, x + 20 : x + 60])
        np.testing.assert_array_equal(cv.argmax_tile(0, 0, h, w), labels)


def test_uncovered_pixels_are_background_and_blend_is_weighted(tmp_path):
    with Canvas(tmp_path, (40, 40), 3, chunk=16, blend="average") as cv:
        a = np.zeros((3, 20, 20), np.float32)
        a[2] = 1.0
        b = np.zeros((3, 20, 20), np.float32)
        b[1] = 3.0  # stronger vote in the overlap
        cv.add(0, 0, a)
        cv.add(10, 10, b)
        out = cv.argmax_tile(0, 0, 40, 40)
        mean, wsum = cv.mean_tile(0, 0, 40, 40)
    assert (out[30:, :] == 0).all() and (out[:, 30:] == 0).all()  # nothing landed there
    assert (out[:10, :10] == 2).all()
    assert (out[10:20, 10:20] == 1).all()  # 3.0/2 beats 1.0/2
    np.testing.assert_allclose(mean[1, 15, 15], 1.5)
    np.testing.assert_allclose(mean[2, 15, 15], 0.5)
    assert wsum[15, 15] == 2 and wsum[5, 5] == 1 and wsum[35, 35] == 0


def test_gaussian_window_prefers_the_tile_centre(tmp_path):
    # Two tiles disagree on their overlap; the Gaussian gives each pixel to the tile whose centre is nearer.
    with Canvas(tmp_path, (1, 30), 2, chunk=16, blend="gaussian") as cv:
        left = np.zeros((2, 1, 20), np.float32)
        left[0] = 1.0
        right = np.zeros((2, 1, 20), np.float32)
        right[1] = 1.0
        cv.add(0, 0, left)
        cv.add(0, 10, right)
        out = cv.argmax_tile(0, 0, 1, 30)[0]
    assert (out[:15] == 0).all() and (out[15:] == 1).all()
    win = blend_window(9, 9)
    assert win[4, 4] == 1.0 and win[0, 0] > 0 and win[0, 0] < win[2, 2] < win[4, 4]


def test_open_maps_stay_under_budget_and_close_removes_files(tmp_path):
    cv = Canvas(tmp_path, (256, 256), 2, chunk=32, max_open_mb=0.02)  # one 32x32x3 f32 chunk is 12 KB
    tile = np.ones((2, 64, 64), np.float32)
    for y in range(0, 256, 64):
        for x in range(0, 256, 64):
            cv.add(y, x, tile)
            assert cv._open_bytes <= 2 * 12288
    assert cv.chunks_on_disk == 64
    assert len(list(cv.dir.glob("*.bin"))) == 64  # and the owner lock beside them
    d = cv.dir
    cv.close()
    assert not d.exists()
    cv.close()  # idempotent


def test_bad_inputs_raise_clear_errors(tmp_path):
    with Canvas(tmp_path, (10, 10), 3) as cv:
        with pytest.raises(StitchError, match=r"\[3, h, w\]"):
            cv.add(0, 0, np.zeros((2, 4, 4), np.float32))
        with pytest.raises(StitchError, match="leaves the canvas"):
            cv.argmax_tile(5, 5, 10, 10)
    with pytest.raises(StitchError, match="blend"):
        Canvas(tmp_path, (10, 10), 3, blend="max")


def test_only_canvases_of_ended_processes_on_this_host_are_dropped(tmp_path):
    """Canvases without an owner lock (older versions) are judged by the pid in their name, on this host."""
    import socket

    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # names no process, now or later
    host = socket.gethostname()
    dead = tmp_path / f"canvas.{dead_pid}@{host}.k1ll3d"
    elsewhere = tmp_path / f"canvas.{dead_pid}@not-{host}.x1y2z3"
    plain = tmp_path / "canvas.notes"  # not named by Canvas: a user's folder
    for d in (dead, elsewhere, plain):
        d.mkdir()
        (d / "c0_0.bin").write_bytes(b"\0" * 64)
    with Canvas(tmp_path, (32, 32), 2, chunk=16) as live:
        live.add(0, 0, np.ones((2, 32, 32), np.float32))
        assert drop_stale_canvases(tmp_path) == [dead]
        assert live.dir.is_dir() and elsewhere.is_dir() and plain.is_dir() and not dead.exists()
        assert live.dir.name.startswith(f"canvas.{os.getpid()}@{host}.")


def test_a_canvas_is_live_while_its_owner_holds_its_lock_whatever_its_name_says(tmp_path):
    """Containers sharing a host name see each other's pids as dead (separate pid namespaces): the owner
    lock, not the name, decides. The lock goes with its process, however that process ends."""
    import subprocess
    import sys

    code = (
        "import sys, time; from pbip_engine.engine.inference.stitch import Canvas; "
        f"c = Canvas({str(tmp_path)!r}, (32, 32), 2, chunk=16); print(c.dir, flush=True); time.sleep(60)"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        theirs = Path(owner.stdout.readline().strip())
        pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
        renamed = theirs.with_name(f"canvas.{pid}@{theirs.name.split('@', 1)[1]}")  # its pid looks dead here
        theirs.rename(renamed)
        assert drop_stale_canvases(tmp_path) == [] and renamed.is_dir()  # the owner still holds the lock
    finally:
        owner.kill()
        owner.wait()
    assert drop_stale_canvases(tmp_path) == [renamed] and not renamed.exists()
