"""A slide's labelled tiles read and stitched in blocks of bounded size (``pseudo.block_px``).

The blocks must not change the masks: each block reads its tiles with a ring of context tiles, so a tile at a
block's edge sees the same neighbours and is stitched with the same overlapping tiles as on the whole slide.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pbip_engine.engine.pseudo.blocks import BlockGrid
from pbip_engine.methods.base import MasksFromCams


def _squares(xs, ys, s):
    return [(float(x), float(y), float(s)) for x, y in zip(xs, ys, strict=True)]


def _overlaps(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[2] and b[1] < a[1] + a[2]


def test_a_slide_that_fits_is_one_block_keeping_every_tile():
    xs, ys = [0, 100, 200, 300], [0, 0, 100, 300]
    (block,) = BlockGrid.of(xs, ys, [200] * 4, tile_px=100, block_px=256).blocks(
        xs, ys, [200] * 4
    )  # 500 level-0 px = 250 canvas px
    assert block.members.tolist() == [0, 1, 2, 3] and block.keep.all()
    assert BlockGrid.of([], [], [], 100, 256).blocks([], [], []) == []


@settings(max_examples=60, deadline=None)
@given(
    cols=st.integers(1, 30),
    rows=st.integers(1, 30),
    stride=st.sampled_from([16, 24, 32]),
    block_px=st.sampled_from([64, 100, 256]),
    holes=st.lists(st.integers(0, 899), max_size=200),
)
def test_every_tile_is_kept_once_with_every_tile_it_overlaps_beside_it(cols, rows, stride, block_px, holes):
    """Tiles of 32 level-0 px (16-px images) on a grid with gaps: each is kept by one block, and its block also
    reads every tile that overlaps it or lies within half a tile of it."""
    grid = [(c * stride, r * stride) for r in range(rows) for c in range(cols)]
    tiles = [t for i, t in enumerate(grid) if i not in set(holes)] or grid[:1]
    xs, ys = [t[0] for t in tiles], [t[1] for t in tiles]
    sizes = [32] * len(tiles)
    blocks = BlockGrid.of(xs, ys, sizes, tile_px=16, block_px=block_px).blocks(xs, ys, sizes)
    kept = np.concatenate([b.members[b.keep] for b in blocks])
    assert sorted(kept.tolist()) == list(range(len(tiles)))  # exactly once
    squares = _squares(xs, ys, 32)
    grown = [(x - 16, y - 16, 64.0) for x, y, _ in squares]  # half a tile around each square
    for b in blocks:
        members = set(b.members.tolist())
        for t in b.members[b.keep]:
            near = {u for u in range(len(tiles)) if _overlaps(grown[t], squares[u])}
            assert near <= members
        span = max(squares[u][0] + 32 for u in members) - min(squares[u][0] for u in members)
        # bounded: the block (level-0 px = 2 canvas px), two tiles of margin a side, a tile straddling each edge
        assert span <= block_px * 2 + 2 * 2 * 32 + 2 * 32


def _slide(n: int = 22, stride: int = 16, side: int = 32, seed: int = 0) -> tuple[dict, np.ndarray]:
    """``n`` x ``n`` tiles of ``side`` px every ``stride`` px cut from one random picture (PNG: exact crops, so
    the canvas a block pastes is the slide's own), level 0 = tile px; two classes listed everywhere."""
    rng = np.random.default_rng(seed)
    extent = (n - 1) * stride + side
    picture = cv2.GaussianBlur(rng.integers(0, 255, (extent, extent, 3), dtype=np.uint8), (0, 0), 3)
    rows = []
    for r in range(n):
        for c in range(n):
            x, y = c * stride, r * stride
            ok, png = cv2.imencode(
                ".png", cv2.cvtColor(picture[y : y + side, x : x + side], cv2.COLOR_RGB2BGR)
            )
            assert ok
            rows.append((f"s:{x}_{y}", x, y, png.tobytes()))
    batch = {
        "tile_id": np.array([r[0] for r in rows], dtype=object),
        "slide_id": np.array(["s"] * len(rows), dtype=object),
        "x": np.array([r[1] for r in rows]), "y": np.array([r[2] for r in rows]),
        "size0": np.array([side] * len(rows)),
        "labels": np.array([[1, 1]] * len(rows), np.uint8),
        "image": np.array([r[3] for r in rows], dtype=object),
    }  # fmt: skip
    return batch, picture


def _box_cams(image: np.ndarray) -> np.ndarray:
    """Two-class CAMs of a uint8 ``h,w,3`` picture: 5x5 box means of its red and blue (a 2-px reach)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
    return F.avg_pool2d(F.pad(x[:, [0, 2]], (2, 2, 2, 2), mode="replicate"), 5, stride=1)[0].numpy()


def _masks(rows: dict, folder) -> dict[str, np.ndarray]:
    from PIL import Image

    return {
        str(t): np.asarray(Image.open(folder / p))
        for t, p in zip(rows["tile_id"], rows["mask_path"], strict=True)
    }


SPEC = {
    "run": {"name": "t", "output": "out"},
    "data": {"synthetic": {"slides": 1, "size": 768}},
    "classes": [{"name": "a", "color": [200, 0, 0]}, {"name": "b", "color": [0, 0, 200]}],
    "tiling": {"tile_px": 32},
}


def test_regions_read_in_blocks_give_the_whole_slides_masks(tmp_path, monkeypatch):
    """``RegionPseudo`` on a 368-px slide of 484 half-overlapping tiles: with ``block_px: 256`` it reads four
    blocks, and every tile's mask equals the one-block read (a 2-px CAM reach: a block without context tiles
    would differ at its edges); each block writes its own stitched regions."""
    import pyarrow.parquet as pq

    import pbip_engine.jobs.pseudo as job
    from pbip_engine.jobs.rundir import REGIONS
    from pbip_engine.schemas.spec import parse_spec

    reads: list[tuple[int, int]] = []
    cap: dict[int, int | None] = {4096: None, 256: 96}  # per run, the largest picture the model reads

    class Model(MasksFromCams):
        def predict_region(self, image, tile_px, options, features):
            reads.append(image.shape[:2])
            return _box_cams(image), [], []

        def max_region_px(self, tile_px):
            return cap[block_px]

    monkeypatch.setattr(job, "_cam_model", lambda *a: Model())
    batch, _ = _slide()
    out = {}
    for block_px in (4096, 256):
        spec = parse_spec({**SPEC, "pseudo": {"background": "none", "image_prototypes": 0, "block_px": block_px,
                                              "region_px": 128}}, tmp_path)  # fmt: skip
        assert spec.pseudo.cam_context == "regions"
        folder = tmp_path / str(block_px)
        reads.clear()
        rows = job.RegionPseudo(spec, "model.pt", None, str(folder)).slide(batch)
        assert sorted(rows["tile_id"]) == sorted(batch["tile_id"])  # every tile once
        out[block_px] = _masks(rows, folder), sorted(p.name for p in (folder / REGIONS).glob("*.parquet"))
        # windows of region_px + a tile of context, or within the model's cap (a margin of a quarter of it)
        assert max(max(r) for r in reads) <= (cap[block_px] or 128 + 2 * 32)
    whole, blocked = out[4096][0], out[256][0]
    assert out[4096][1] == ["s.parquet"]
    assert out[256][1] == ["s.b0.parquet", "s.b1.parquet", "s.b2.parquet", "s.b3.parquet"]
    for tid, mask in whole.items():
        np.testing.assert_array_equal(blocked[tid], mask, err_msg=tid)
    assert len({m.tobytes() for m in whole.values()}) > 1  # the masks differ from tile to tile
    regions = [
        r for name in out[256][1] for r in pq.read_table(tmp_path / "256" / REGIONS / name).to_pylist()
    ]
    area = sum(r["width"] * r["height"] for r in regions)
    assert area >= 368 * 368 * 0.9  # the blocks' regions cover the slide (each tile in one block)


def test_stitched_tile_cams_in_blocks_give_the_whole_slides_masks(tmp_path):
    """The tile-CAM path (``stitch_slide``) in blocks: each tile's own CAMs, averaged where tiles overlap,
    give every tile the mask the whole slide gives it."""
    from pbip_engine.engine.pseudo.stitch import encode_cam
    from pbip_engine.jobs.pseudo import stitch_slide
    from pbip_engine.schemas.spec import parse_spec

    batch, picture = _slide(seed=1)
    cams = []
    for x, y in zip(batch["x"], batch["y"], strict=True):
        cams.append(encode_cam(_box_cams(picture[y : y + 32, x : x + 32])))  # each tile read alone
    batch["cam"] = np.array(cams, dtype=object)
    masks = {}
    for block_px in (4096, 256):
        spec = parse_spec({**SPEC, "pseudo": {"background": "none", "image_prototypes": 0, "block_px": block_px,
                                              "cam_context": "tiles"}}, tmp_path)  # fmt: skip
        folder = tmp_path / str(block_px)
        masks[block_px] = _masks(stitch_slide(batch, spec, str(folder)), folder)
    assert masks[4096].keys() == masks[256].keys()
    for tid, mask in masks[4096].items():
        np.testing.assert_array_equal(masks[256][tid], mask, err_msg=tid)


def test_stitched_tile_cams_grouped_by_block_give_the_whole_slides_masks(tmp_path):
    """The Ray path: each tile tagged with every block that reads it (``tag_blocks``), the rows grouped by
    block in any order, each group stitched alone (``stitch_block``): every tile is kept by one group, no group
    spans more than a block and its ring, and every mask equals the whole slide's."""
    from pbip_engine.engine.pseudo.blocks import BlockGrid
    from pbip_engine.engine.pseudo.stitch import encode_cam
    from pbip_engine.jobs.pseudo import stitch_block, stitch_slide, tag_blocks
    from pbip_engine.schemas.spec import parse_spec

    batch, picture = _slide(seed=2)
    batch["cam"] = np.array(
        [
            encode_cam(_box_cams(picture[y : y + 32, x : x + 32]))
            for x, y in zip(batch["x"], batch["y"], strict=True)
        ],
        dtype=object,
    )
    pseudo = {"background": "none", "image_prototypes": 0, "cam_context": "tiles"}
    whole_spec = parse_spec({**SPEC, "pseudo": pseudo}, tmp_path)
    whole = _masks(stitch_slide(batch, whole_spec, str(tmp_path / "whole")), tmp_path / "whole")
    spec = parse_spec({**SPEC, "pseudo": {**pseudo, "block_px": 256}}, tmp_path)
    grids = {"s": BlockGrid.of(batch["x"], batch["y"], batch["size0"], 32, 256)}
    assert len(grids["s"]) == 4
    tagged = tag_blocks(batch, grids)
    assert tagged["keep"].sum() == len(batch["tile_id"]) < len(tagged["keep"])  # context tiles come twice
    rng = np.random.default_rng(0)
    rows = []
    for key in rng.permutation(sorted(set(tagged["block"]))):
        at = rng.permutation(np.flatnonzero(tagged["block"] == key))  # Ray's groups come in any order
        group = {c: v[at] for c, v in tagged.items()}
        xs = group["x"]
        assert xs.max() + 32 - xs.min() <= 256 + 2 * 2 * 32 + 2 * 32  # a block, its ring, a straddling tile
        rows.append(stitch_block(group, spec, str(tmp_path / "blocks"), grids))
    blocked = {k: v for r in rows for k, v in _masks(r, tmp_path / "blocks").items()}
    assert sorted(blocked) == sorted(whole)
    for tid, mask in whole.items():
        np.testing.assert_array_equal(blocked[tid], mask, err_msg=tid)
    names = sorted(p.name for p in (tmp_path / "blocks" / "regions").glob("*.parquet"))
    assert names == ["s.b0.parquet", "s.b1.parquet", "s.b2.parquet", "s.b3.parquet"]


def test_a_slides_parquet_is_read_one_block_at_a_time(tmp_path, monkeypatch):
    """``RegionPseudo`` on a slide's tile Parquet reads one block's rows at a time (never the whole slide),
    skips unlabelled tiles, sizes blocks at the tiles' stored edge (32 px here, not the spec's 64), and gives
    the masks of the whole slide held in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import pbip_engine.jobs.pseudo as job
    from pbip_engine.schemas.spec import parse_spec

    class Model(MasksFromCams):
        def predict_region(self, image, tile_px, options, features):
            return _box_cams(image), [], []

    monkeypatch.setattr(job, "_cam_model", lambda *a: Model())
    batch, _ = _slide(seed=3)
    n = len(batch["tile_id"])
    table = pa.table({**{c: list(v) for c, v in batch.items()}, "tile_px": [32] * n,
                      "labelled": [True] * n})  # fmt: skip
    unlabelled = table.slice(0, 5).set_column(table.schema.get_field_index("labelled"), "labelled",
                                              pa.array([False] * 5))  # fmt: skip
    unlabelled = unlabelled.set_column(0, "tile_id", pa.array([f"u{i}" for i in range(5)]))
    path = tmp_path / "s.parquet"
    pq.write_table(pa.concat_tables([table, unlabelled]), path)
    reads: list[int] = []
    real_read = pq.read_table

    def counting_read(*args, **kwargs):
        t = real_read(*args, **kwargs)
        if "image" in t.column_names:
            reads.append(t.num_rows)
        return t

    monkeypatch.setattr(pq, "read_table", counting_read)
    raw = {**SPEC, "tiling": {"tile_px": 64}, "pseudo": {"background": "none", "image_prototypes": 0}}
    whole_spec = parse_spec(raw, tmp_path)
    whole = _masks(
        job.RegionPseudo(whole_spec, "m.pt", None, str(tmp_path / "w")).slide(batch), tmp_path / "w"
    )
    spec = parse_spec({**raw, "pseudo": {**raw["pseudo"], "block_px": 256}}, tmp_path)
    rows = job.RegionPseudo(spec, "m.pt", None, str(tmp_path / "b"))({"path": np.array([str(path)])})
    assert len(reads) == 4 and max(reads) < n  # four blocks, each read alone
    blocked = _masks(rows, tmp_path / "b")
    assert sorted(blocked) == sorted(whole)  # the unlabelled tiles left out
    for tid, mask in whole.items():
        np.testing.assert_array_equal(blocked[tid], mask, err_msg=tid)


def test_the_spec_bounds_the_block(tmp_path):
    from pbip_engine.schemas.spec import parse_spec

    assert parse_spec(SPEC, tmp_path).pseudo.block_px == 4096
    with pytest.raises(ValueError, match="block_px"):
        parse_spec({**SPEC, "pseudo": {"block_px": 100}}, tmp_path)


def test_a_list_column_keeps_its_bytes_whole():
    """Rows picked from a list column (not an array) keep an encoded image's trailing zero bytes."""
    from pbip_engine.jobs.pseudo import _column

    col = _column([b"\x89PNG\x00\x00", b"x", [1, 0]])
    assert col[[0]][0] == b"\x89PNG\x00\x00" and col[[2]][0] == [1, 0]
    assert np.asarray([b"\x89PNG\x00\x00", b"x"])[0] != b"\x89PNG\x00\x00"  # what numpy alone would do
