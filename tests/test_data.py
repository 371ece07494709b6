"""Dataset adapters: fake BCSS/LUAD trees, CSV folders, tile Parquet, and the real GlaS data when present."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pbip_engine.engine.ingest.datasets import (
    BCSSWSSSDataset,
    DataError,
    FolderCSVDataset,
    GlaSImages,
    GlaSPatches,
    LUADHistoSegDataset,
    TileParquetDataset,
    iterate_batches,
    parse_filename_labels,
    random_flip_rot,
)
from pbip_engine.engine.ingest.datasets.common import decode_rgb
from pbip_engine.schemas.datasets import TILES


def _png(path, value=(200, 100, 150), size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((size, size, 3), value[::-1], np.uint8))


def _pmask(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.astype(np.uint8).tobytes())
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 153, 0, 255, 255, 255, 255] + [0] * 753)
    im.save(path)


def test_parse_filename_labels_both_formats():
    assert parse_filename_labels("TCGA-A1_xmin45749_ymin25055_MPP-0.2500+101[1100].png", 4).tolist() == [
        1,
        1,
        0,
        0,
    ]
    assert parse_filename_labels("/data/[odd]/img/a-[1 0 0 1].png", 4).tolist() == [1, 0, 0, 1]
    with pytest.raises(DataError, match=r"no '\[\.\.\.\]'"):
        parse_filename_labels("/data/[1100]/plain.png", 4)  # brackets only in the directory are ignored
    with pytest.raises(DataError, match="4 binary digits"):
        parse_filename_labels("x[110].png", 4)


@pytest.mark.parametrize("with_img_dir", [False, True])
def test_bcss_tree(tmp_path, with_img_dir):
    root = tmp_path / "BCSS-WSSS"
    train = root / "train" / ("img" if with_img_dir else "")
    _png(train / "s1_xmin1+101[1100].png")
    _png(train / "s2_xmin2+101[0001].png")
    raw = np.array([[0, 1, 4, 4]] * 4, np.uint8)
    _png(root / "valid" / "img" / "v1.png", size=4)
    _pmask(root / "valid" / "mask" / "v1.png", raw)
    ds = BCSSWSSSDataset(tmp_path, "train")  # parent folder accepted
    assert len(ds) == 2 and ds.class_names == ["TUM", "STR", "LYM", "NEC"]
    s = ds[0]
    assert (
        s["image"].shape == (8, 8, 3)
        and s["image"].dtype == np.uint8
        and s["image"][0, 0].tolist() == [200, 100, 150]
    )
    assert s["labels"].tolist() == [1, 1, 0, 0] and "mask" not in s
    val = BCSSWSSSDataset(root, "val")  # 'val' resolves to 'valid'
    v = val[0]
    assert v["mask"][0].tolist() == [1, 2, 0, 0]  # raw 0->1, 1->2, 4 (BACK)->0
    assert v["labels"].tolist() == [1, 1, 0, 0]  # oracle labels from the mask
    with pytest.raises(DataError, match="split 'test' not found"):
        BCSSWSSSDataset(root, "test")


def test_luad_tree_val_named_val(tmp_path):
    root = tmp_path / "LUAD-HistoSeg"
    _png(root / "train" / "1031280-2300-27920-[1 0 0 1].png")
    _png(root / "val" / "img" / "a.png", size=4)
    _pmask(root / "val" / "mask" / "a.png", np.array([[3, 3, 2, 4]] * 4))
    ds = LUADHistoSegDataset(root, "train")
    assert ds[0]["labels"].tolist() == [1, 0, 0, 1] and ds.class_names == ["TE", "NEC", "LYM", "TAS"]
    v = LUADHistoSegDataset(root, "valid")[0]
    assert v["mask"][0].tolist() == [4, 4, 3, 0] and v["labels"].tolist() == [0, 0, 1, 1]
    _pmask(root / "val" / "mask" / "a.png", np.array([[7, 0, 0, 0]] * 4))
    with pytest.raises(DataError, match="mask value 7"):
        LUADHistoSegDataset(root, "val")[0]
    _png(root / "val" / "img" / "b.png", size=4)
    with pytest.raises(DataError, match="no mask for 1 images"):
        LUADHistoSegDataset(root, "val")


def test_folder_csv(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    _pmask(tmp_path / "b_mask.png", np.full((8, 8), 2))
    (tmp_path / "l.csv").write_text("image,labels,mask\na.png,tumor;stroma,\nb.png,stroma,b_mask.png\n")
    ds = FolderCSVDataset(tmp_path, "l.csv")
    assert (
        ds.class_names == ["stroma", "tumor"] and ds[0]["labels"].tolist() == [1, 1] and "mask" not in ds[0]
    )
    assert ds[1]["labels"].tolist() == [1, 0] and ds[1]["mask"].max() == 2
    (tmp_path / "bad.csv").write_text("image,labels\na.png,fat\n")
    with pytest.raises(DataError, match=r"bad.csv:2: unknown class \['fat'\]"):
        FolderCSVDataset(tmp_path, "bad.csv", ["stroma", "tumor"])


def _broken_jpegs(folder):
    """A JPEG cut at 60 % (libjpeg: "Premature end") and one with junk in its entropy-coded data."""
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur((rng.random((64, 64, 3)) * 255).astype(np.uint8), (5, 5), 0)
    data = cv2.imencode(".jpg", img)[1].tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cut.jpg").write_bytes(data[: len(data) * 3 // 5])
    junk = bytearray(data)
    junk[len(data) // 2 : len(data) // 2 + 40] = b"\xff\x00" * 20
    return bytes(junk)


def test_truncated_or_corrupt_jpeg_is_an_error_naming_the_file_not_a_grey_image(tmp_path):
    junk = _broken_jpegs(tmp_path)
    _png(tmp_path / "good.png")
    (tmp_path / "l.csv").write_text("image,labels\ngood.png,tumor\ncut.jpg,tumor\n")
    ds = FolderCSVDataset(tmp_path, "l.csv", ["stroma", "tumor"])
    assert ds[0]["image"].shape == (8, 8, 3)  # the good image still reads
    with pytest.raises(DataError, match=r"cut\.jpg: truncated or corrupt .*Premature end of JPEG"):
        ds[1]
    with pytest.raises(DataError, match=r"s:7:0: truncated or corrupt .*Corrupt JPEG"):
        decode_rgb(junk, "s:7:0")


def _tiles_table(labels, labelled):
    n = len(labels)
    jpeg = cv2.imencode(".jpg", np.full((16, 16, 3), (30, 60, 200), np.uint8))[1].tobytes()
    return pa.table(
        {
            "tile_id": [f"s:{i}:0" for i in range(n)],
            "slide_id": ["s"] * n,
            "x": [i * 16 for i in range(n)],
            "y": [0] * n,
            "size0": [16] * n,
            "tile_px": [16] * n,
            "mpp": [0.5] * n,
            "level": [0] * n,
            "tissue_fraction": [1.0] * n,
            "white_fraction": [0.0] * n,
            "labelled": labelled,
            "labels": labels,
            "image": [jpeg] * n,
        },
        schema=TILES,
    )


def test_tile_parquet(tmp_path):
    (tmp_path / "tiles").mkdir()
    pq.write_table(
        _tiles_table([[1, 0], [0, 1], [0, 0]], [True, True, False]), tmp_path / "tiles" / "p0.parquet"
    )
    pq.write_table(_tiles_table([[1, 1]], [True]), tmp_path / "tiles" / "p1.parquet")
    ds = TileParquetDataset(tmp_path / "tiles", ["a", "b"])
    assert len(ds) == 3 and ds.labels.tolist() == [[1, 0], [0, 1], [1, 1]]
    s = ds[0]
    assert (
        s["image"].shape == (16, 16, 3) and abs(int(s["image"][0, 0, 0]) - 200) < 6
    )  # RGB order (BGR written)
    assert len(TileParquetDataset(tmp_path / "tiles", ["a", "b"], labelled_only=False)) == 4
    with pytest.raises(DataError, match="has 2 labels but 3 classes"):
        TileParquetDataset(tmp_path / "tiles", ["a", "b", "c"])


def test_iterate_batches_and_augment():
    class DS:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            img = np.zeros((4, 4, 3), np.uint8)
            img[0, 0] = 255
            mask = np.zeros((4, 4), np.uint8)
            mask[0, 0] = 1
            return {"image": img, "labels": np.array([i], np.float32), "mask": mask, "name": str(i)}

    batches = list(iterate_batches(DS(), 2, shuffle=True, seed=1, augment=True))
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1] and batches[0]["image"].shape == (2, 4, 4, 3)
    again = list(iterate_batches(DS(), 2, shuffle=True, seed=1, augment=True))
    assert all((a["image"] == b["image"]).all() for a, b in zip(batches, again, strict=True))
    for b in batches:  # the bright pixel and the mask pixel move together
        assert ((b["image"][..., 0] == 255) == (b["mask"] == 1)).all()
    assert sorted(float(x) for b in batches for x in b["labels"][:, 0]) == [0, 1, 2, 3, 4]
    assert len(list(iterate_batches(DS(), 2, drop_last=True))) == 2
    shard = [b["name"] for b in iterate_batches(DS(), 10, rank=1, world_size=2)]
    assert shard == [["1", "3"]]
    rng = np.random.default_rng(0)
    s = random_flip_rot(DS()[0], rng)
    assert s["image"].flags.c_contiguous


def test_glas_patches_real(glas_dir):
    ds = GlaSPatches(glas_dir, "train", patch=112, stride=56)
    assert ds.class_names == ["gland", "non_gland"]
    # 775 x 522 image: x positions 0..616 step 56 (12) + 663 = 13; y 0..392 (8) + 410 = 9 -> 117 patches
    per_image = {}
    for name, _, _ in ds.index:
        per_image[name] = per_image.get(name, 0) + 1
    assert per_image["train_1"] == 13 * 9
    rng = np.random.default_rng(0)
    for i in rng.choice(len(ds), 20, replace=False):
        s = ds[int(i)]
        name, y, x = ds.index[int(i)]
        m = ds._masks[name][y : y + 112, x : x + 112]
        assert s["image"].shape == (112, 112, 3) and "mask" not in s
        assert s["labels"].tolist() == [float((m == 1).any()), float((m == 2).any())]
    assert ds.labels.sum(0).min() > 0  # both classes occur
    big = GlaSPatches(glas_dir, "train", out_size=224, with_mask=True)
    s = big[0]
    assert s["image"].shape == (224, 224, 3) and set(np.unique(s["mask"])) <= {1, 2}


def test_glas_images_real(glas_dir):
    ds = GlaSImages(glas_dir, "testA")
    assert len(ds) == 60
    s = ds[0]
    assert s["image"].shape[:2] == s["mask"].shape and set(np.unique(s["mask"])) <= {1, 2}
    assert s["labels"].tolist() == [float((s["mask"] == 1).any()), float((s["mask"] == 2).any())]
    with pytest.raises(DataError, match="no images in split 'testB'"):
        GlaSImages(glas_dir, "testB")
