"""Embedder: TILES batch -> embeddings with the right schema, order, colours and encoder id."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import pytest
import timm
import torch

import pbip_engine  # noqa: F401  (cuCIM before torch)
from pbip_engine.engine.embed.embedder import Embedder, EmbedError, embed_table
from pbip_engine.engine.embed.encoders import Encoder, EncoderInfo, register_encoder
from pbip_engine.schemas.datasets import TILES, embeddings_schema, tile_key


class ChannelMean(Encoder):
    """dim-3 'encoder' whose embedding is the mean R, G, B in [0, 1]: makes colour handling checkable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


@register_encoder("_test_channel_mean")
def _build_channel_mean(checkpoint=None, **kw) -> Encoder:
    return ChannelMean(EncoderInfo("_test_channel_mean", int(kw.get("size", 32)), (0.0,) * 3, (1.0,) * 3, 3))


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def tiles_table(images: list[np.ndarray], n_classes: int = 3) -> pa.Table:
    n = len(images)
    rows = {
        "tile_id": [tile_key("s1", 100 * i, 0) for i in range(n)],
        "slide_id": ["s1"] * n,
        "x": [100 * i for i in range(n)],
        "y": [0] * n,
        "size0": [im.shape[0] for im in images],
        "tile_px": [im.shape[0] for im in images],
        "mpp": [0.5] * n,
        "level": [0] * n,
        "tissue_fraction": [1.0] * n,
        "white_fraction": [i / max(n, 1) for i in range(n)],
        "labelled": [i % 2 == 0 for i in range(n)],
        "labels": [[int(c == i % n_classes) for c in range(n_classes)] for i in range(n)],
        "image": [_jpeg(im) for im in images],
    }
    return pa.Table.from_pydict(rows, schema=TILES)


COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (200, 200, 40)]


def solid(colour, size) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (size, size, 3)).copy()


@pytest.mark.parametrize("tile_px", [40, 512])  # 512 with a 32-px encoder exercises 1/8 DCT-reduced decoding
def test_colours_arrive_as_rgb_in_order(tile_px):
    imgs = [solid(COLOURS[i % 4], tile_px) for i in range(6)]
    emb = Embedder("_test_channel_mean", None, device="cpu", dtype="float32", batch_size=4)
    assert emb._reduce_factor(tile_px) == (8 if tile_px == 512 else 1)
    out = embed_table(tiles_table(imgs), emb, batch_size=5)
    got = np.stack(out.column("embedding").to_numpy(zero_copy_only=False))
    want = np.array([COLOURS[i % 4] for i in range(6)], np.float32) / 255
    np.testing.assert_allclose(got, want, atol=0.03)


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit.pth"
    torch.save(m.state_dict(), path)
    return path, m


def test_embed_table_schema_passthrough_and_values(vit_ckpt):
    path, ref = vit_ckpt
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(7)]
    table = tiles_table(imgs)
    emb = Embedder(
        "timm:vit_tiny_patch16_224", str(path), device="cpu", batch_size=3, encoder_kwargs={"img_size": 32}
    )
    out = embed_table(table, emb, batch_size=4)
    assert out.schema.equals(embeddings_schema(192, "float16"), check_metadata=True)
    assert out.num_rows == 7
    for col in ("tile_id", "slide_id", "x", "y", "white_fraction", "labelled", "labels"):
        assert out.column(col).to_pylist() == table.column(col).to_pylist(), col
    assert set(out.column("encoder").to_pylist()) == {emb.encoder_id}
    assert emb.encoder_id.startswith("timm:vit_tiny_patch16_224@")
    # same numbers as the reference model on the decoded pixels
    decoded = np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), 1), cv2.COLOR_BGR2RGB)
                        for b in table.column("image").to_pylist()])  # fmt: skip
    with torch.no_grad():
        want = ref(emb.model.preprocess(decoded)).numpy()
    got = np.stack(out.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.999
    # chunking does not change the result: same rows in the same order. Not bit-equal: a different
    # micro-batch takes another BLAS path on CPU, and a float32 difference in the last bit can round
    # to the neighbouring float16 (seen with torch 2.14 in CI).
    out2 = embed_table(table, emb, batch_size=64)
    assert out2.column("tile_id").to_pylist() == out.column("tile_id").to_pylist()
    got2 = np.stack(out2.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(got2, got, rtol=1e-2, atol=1e-2)
    unit, unit2 = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (got, got2))
    sim = unit2 @ unit.T
    assert (sim.argmax(1) == np.arange(len(got))).all() and sim.diagonal().min() > 0.9999


def test_call_returns_numpy_columns_for_ray():
    imgs = [solid(COLOURS[0], 32) for _ in range(3)]
    t = tiles_table(imgs)
    batch = {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}
    emb = Embedder("_test_channel_mean", None, device="cpu", dtype="float16")
    out = emb(batch)
    assert set(out) == set(embeddings_schema(3).names)
    assert out["embedding"].shape == (3, 3) and out["embedding"].dtype == np.float16
    assert list(out["encoder"]) == ["_test_channel_mean@random"] * 3


def test_bad_input_errors_name_the_problem():
    t = tiles_table([solid(COLOURS[0], 32) for _ in range(2)])
    emb = Embedder("_test_channel_mean", None, device="cpu")
    batch = {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}
    batch["image"] = batch["image"].copy()
    batch["image"][1] = b"not a jpeg"
    with pytest.raises(EmbedError, match=r"s1:100:0.*decode"):
        emb(batch)
    with pytest.raises(EmbedError, match="image"):
        embed_table(t.drop_columns(["image"]), emb, 4)
    with pytest.raises(EmbedError, match="dtype"):
        Embedder("_test_channel_mean", None, dtype="int8")


def test_empty_table_gives_empty_embeddings():
    emb = Embedder("_test_channel_mean", None, device="cpu")
    out = embed_table(TILES.empty_table(), emb, 8)
    assert out.num_rows == 0 and out.schema.equals(embeddings_schema(3, "float16"))


def test_omp_num_threads_is_respected(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        Embedder("_test_channel_mean", None, device="cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
