"""mpp-first grid: level choice, extents, overlap, edge drop, exact tissue fractions, batched reads."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from wsi_synth import he_like, write_pyramid

import pbip_engine  # noqa: F401  (before anything that imports torch)
from pbip_engine.engine.wsi.slides import Slide, open_slide
from pbip_engine.engine.wsi.tiling import (
    TileGridParams,
    TileSpec,
    iter_tile_blocks,
    iter_tile_runs,
    iter_tiles,
    plan_tiles,
    read_tile,
    tissue_fractions,
)
from pbip_engine.engine.wsi.tissue import TissueParams, TissueResult, detect_tissue


def fake_slide(w: int, h: int, mpp: float, downsamples: tuple[float, ...] = (1, 2, 4, 8)) -> Slide:
    """Geometry only (planning never reads pixels)."""
    dims = [(round(w / d), round(h / d)) for d in downsamples]
    return Slide(Path("fake.svs"), "none", dims, list(downsamples), mpp, "test")


def full_tissue(slide: Slide, ds: float = 16.0, value: bool = True) -> TissueResult:
    w, h = slide.dimensions
    mask = np.full((int(np.ceil(h / ds)), int(np.ceil(w / ds))), value, bool)
    return TissueResult(mask, ds, None, np.zeros((*mask.shape, 3), np.uint8), 0.0)


def test_tissue_fractions_exact_for_fractional_edges() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((20, 30)) > 0.5
    ds, size0 = 3.7, 17
    xs, ys = np.array([0, 5, 33, 90]), np.array([1, 20, 50])
    got = tissue_fractions(mask, ds, xs, ys, size0)
    # Brute force: supersample each level-0 pixel 4x4.
    sub = 4
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            yy = (y + (np.arange(size0 * sub) + 0.5) / sub) / ds
            xx = (x + (np.arange(size0 * sub) + 0.5) / sub) / ds
            ref = mask[np.minimum(yy.astype(int), 19)][:, np.minimum(xx.astype(int), 29)].mean()
            assert got[j, i] == pytest.approx(ref, abs=0.02)


def test_level_and_extent_from_mpp() -> None:
    s = fake_slide(4000, 3000, mpp=0.25)
    tiles = plan_tiles(s, full_tissue(s), TileGridParams(mpp=0.5, tile_px=224, min_tissue=0.5))
    t = tiles[0]
    assert (t.size0, t.level, t.read_size) == (448, 1, 224)  # 2x level, no resize
    tiles = plan_tiles(s, full_tissue(s), TileGridParams(mpp=1.5, tile_px=100))
    t = tiles[0]
    assert (t.size0, t.level, t.read_size) == (600, 2, 150)  # level 4x (not 8x: never upsample), then resize
    # Grid: positions along x are multiples of the extent; all tiles inside the slide.
    xs = sorted({t.x for t in tiles})
    assert xs == [600 * i for i in range(4000 // 600)]
    assert all(t.x + t.size0 <= 4000 and t.y + t.size0 <= 3000 for t in tiles)


def test_overlap_stride_and_edge_drop() -> None:
    s = fake_slide(1000, 500, mpp=0.5)
    tiles = plan_tiles(s, full_tissue(s), TileGridParams(mpp=0.5, tile_px=200, overlap=0.25))
    xs = sorted({t.x for t in tiles})
    assert xs == [0, 150, 300, 450, 600, 750]  # 900 would leave the slide: dropped
    ys = sorted({t.y for t in tiles})
    assert ys == [0, 150, 300]
    assert len(tiles) == 18
    assert tiles == sorted(tiles, key=lambda t: (t.y, t.x))  # row-major


def test_min_tissue_filter() -> None:
    s = fake_slide(800, 800, mpp=0.5)
    tis = full_tissue(s, ds=8.0, value=False)
    tis.mask[:, :25] = True  # left 200 level-0 px are tissue
    half = plan_tiles(s, tis, TileGridParams(mpp=0.5, tile_px=100, min_tissue=0.5))
    assert {t.x for t in half} == {0, 100}
    assert all(t.tissue_fraction == pytest.approx(1.0) for t in half)
    tis.mask[:, 25:32] = True  # now up to x=256: tile at 200 has 56 % tissue
    t = plan_tiles(s, tis, TileGridParams(mpp=0.5, tile_px=100, min_tissue=0.5))
    assert {x.x for x in t} == {0, 100, 200}
    assert next(x.tissue_fraction for x in t if x.x == 200) == pytest.approx(0.56)
    anyt = plan_tiles(s, tis, TileGridParams(mpp=0.5, tile_px=100, min_tissue=0.0))
    assert {x.x for x in anyt} == {0, 100, 200}  # 0 means "any tissue", never pure glass


def test_upsampling_warns(caplog: pytest.LogCaptureFixture) -> None:
    s = fake_slide(1000, 1000, mpp=0.5)
    with caplog.at_level(logging.WARNING):
        tiles = plan_tiles(s, full_tissue(s), TileGridParams(mpp=0.25, tile_px=224))
    assert "upsampling" in caplog.text
    assert (tiles[0].size0, tiles[0].level, tiles[0].read_size) == (112, 0, 112)


def test_params_validated() -> None:
    for bad in ({"overlap": 1.0}, {"mpp": 0}, {"tile_px": 0}, {"min_tissue": 1.5}):
        with pytest.raises(ValueError):
            TileGridParams(**bad)


def test_runs_group_adjacent_tiles_only() -> None:
    row = [TileSpec(x, 0, 100, 0, 100, 1.0) for x in (0, 100, 200, 400, 500)]
    row += [TileSpec(0, 100, 100, 0, 100, 1.0)]
    runs = [[t.x for t in r] for r in iter_tile_runs(row, 1.0, max_run_px=1000)]
    assert runs == [[0, 100, 200], [400, 500], [0]]
    runs = [[t.x for t in r] for r in iter_tile_runs(row, 1.0, max_run_px=250)]
    assert runs == [[0, 100], [200], [400, 500], [0]]


def test_blocks_group_adjacent_rows_and_fall_back_to_runs_when_sparse() -> None:
    def grid(cells: list[tuple[int, int]]) -> list[TileSpec]:
        return [TileSpec(100 * c, 100 * r, 100, 0, 100, 1.0) for r, c in sorted(cells)]

    full = grid([(r, c) for r in range(5) for c in range(3)])
    blocks = [[(t.y // 100, t.x // 100) for t in b] for b in iter_tile_blocks(full, 1.0, 1000, max_rows=4)]
    assert blocks == [[(r, c) for r in range(4) for c in range(3)], [(4, 0), (4, 1), (4, 2)]]
    # Two column groups apart, then the width cap: separate rectangles, left to right.
    two = grid([(r, c) for r in range(2) for c in (0, 1, 2, 5, 6)])
    xs = [sorted({t.x for t in b}) for b in iter_tile_blocks(two, 1.0, 250, max_rows=4)]
    assert xs == [[0, 100], [200], [500, 600]]
    # A row gap starts a new band; a diagonal (1 of 4 cells filled) is read as single-tile runs.
    gap = grid([(0, 0), (0, 1), (2, 0), (2, 1)])
    assert [len(b) for b in iter_tile_blocks(gap, 1.0, 1000)] == [2, 2]
    diag = grid([(0, 0), (1, 1), (2, 2), (3, 3)])
    assert [len(b) for b in iter_tile_blocks(diag, 1.0, 1000)] == [1, 1, 1, 1]
    # max_rows=1 is the row runs, in plan order.
    assert list(iter_tile_blocks(full, 1.0, 1000, max_rows=1)) == list(iter_tile_runs(full, 1.0, 1000))
    assert sorted((t.y, t.x) for b in iter_tile_blocks(full, 1.0, 1000) for t in b) == [
        (t.y, t.x) for t in full
    ]


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize(("mpp", "overlap"), [(0.5, 0.0), (1.0, 0.0), (1.3, 0.5)])
def test_batched_reads_match_single_reads(tmp_path: Path, mpp: float, overlap: float, rows: int) -> None:
    img = he_like(1024, 1536, [(700, 500, 420)])
    p = write_pyramid(tmp_path / "s.tif", img, mpp=0.5, n_levels=3, tile=64)
    with open_slide(p) as s:
        tis = detect_tissue(s, TissueParams(target_mpp=4.0))
        tiles = plan_tiles(s, tis, TileGridParams(mpp=mpp, tile_px=64, overlap=overlap))
        assert len(tiles) > 10
        batched = list(iter_tiles(s, tiles, 64, max_run_px=512, max_rows=rows))
        if rows == 1:
            assert [t for t, _ in batched] == tiles  # row runs keep the plan's order
        else:
            assert sorted((t.y, t.x) for t, _ in batched) == [(t.y, t.x) for t in tiles]
        for t, im in batched:
            single = read_tile(s, t, 64)
            assert im.shape == single.shape == (64, 64, 3)
            # Cut columns use the same floor(x / downsample) as the backends: identical pixels.
            assert np.array_equal(im, single)


def test_real_slide_grid(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region.pyramid.tif") as s:
        tis = detect_tissue(s, TissueParams())
        tiles = plan_tiles(s, tis, TileGridParams(mpp=1.0, tile_px=128, overlap=0.25))
        assert tiles and all(t.level == 1 for t in tiles)  # 0.998 µm/px level
        assert all(t.tissue_fraction >= 0.5 for t in tiles)
        im = read_tile(s, tiles[len(tiles) // 2], 128)
        assert im.shape == (128, 128, 3) and im.std() > 5
        # Level downsample 2.0003, not 2: batched cuts still agree with single reads to ≤ 1 px shift.
        for t, im in iter_tiles(s, tiles, 128):
            assert np.abs(im.astype(np.int16) - read_tile(s, t, 128)).mean() < 3.0


def test_read_scaled_in_strips_matches_one_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pbip_engine.engine.wsi import slides

    p = write_pyramid(tmp_path / "s.tif", he_like(1024, 1536, [(700, 500, 420)]), mpp=0.5, n_levels=3)
    with open_slide(p) as s:
        whole = s.read_scaled(5.3)
        monkeypatch.setattr(slides, "_STRIP_BYTES", 20_000)  # ~26 level rows per strip
        strips = s.read_scaled(5.3)
    assert whole.shape == strips.shape == (round(1024 / 5.3), round(1536 / 5.3), 3)
    assert np.abs(whole.astype(np.int16) - strips).mean() < 1.0
