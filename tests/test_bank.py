"""Prototype bank (PBIP §3.2): planted sub-clusters recovered, N_K selection, options, persistence, gallery."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pyarrow as pa
import pytest

from pbip_engine.engine.prototypes.bank import (
    Bank,
    BankError,
    BankParams,
    build_bank,
    cosine_kmeans,
    keep_bank_tiles,
    l2n,
    zero_shot_report,
)
from pbip_engine.engine.prototypes.gallery import gallery_shape, write_gallery
from pbip_engine.schemas.datasets import embeddings_schema

CLASSES = ["TUM", "STR", "LYM", "NEC"]
DIM = 32
ENC = "test_enc@abc"


def planted(
    n_per_sub: int = 60, k: int = 3, n_multi: int = 20, n_white: int = 10, seed: int = 0, spread: float = 0.15
) -> dict[str, np.ndarray]:
    """Per class k planted sub-clusters (well separated), plus multi-label and white single-label tiles.

    tile ids encode the truth: ``c{class}_s{sub}_{i}``, ``multi_{i}``, ``white_c{class}_{i}``.
    """
    rng = np.random.default_rng(seed)
    class_dirs = l2n(rng.normal(size=(len(CLASSES), DIM)))
    ids, xs, labels, white = [], [], [], []
    for c in range(len(CLASSES)):
        subs = l2n(class_dirs[c] + 0.6 * l2n(rng.normal(size=(k, DIM))))
        for s in range(k):
            for i in range(n_per_sub):
                ids.append(f"c{c}_s{s}_{i}")
                xs.append(subs[s] + spread * rng.normal(size=DIM) / np.sqrt(DIM))
                labels.append(np.eye(len(CLASSES), dtype=np.uint8)[c])
                white.append(rng.uniform(0, 0.4))
        for i in range(n_white):  # would be the most central tiles if not dropped
            ids.append(f"white_c{c}_{i}")
            xs.append(subs[0])
            labels.append(np.eye(len(CLASSES), dtype=np.uint8)[c])
            white.append(0.9)
    for i in range(n_multi):
        a, b = rng.choice(len(CLASSES), 2, replace=False)
        ids.append(f"multi_{i}")
        xs.append(class_dirs[a] + class_dirs[b])
        lab = np.zeros(len(CLASSES), np.uint8)
        lab[[a, b]] = 1
        labels.append(lab)
        white.append(0.1)
    n = len(ids)
    return {
        "tile_id": np.array(ids, dtype=object),
        "embedding": (np.stack(xs) * 3.0).astype(np.float32),  # unnormalised on purpose
        "labels": np.stack(labels),
        "labelled": np.ones(n, bool),
        "white_fraction": np.array(white, np.float32),
    }


def _quiet(_msg: str) -> None:
    pass


def test_recovers_planted_subclusters_and_respects_filters():
    data = planted()
    logs: list[str] = []
    bank, rep = build_bank(data, CLASSES, ENC, BankParams(k=3, n_k=20, seed=1), log=logs.append)
    assert bank.k == [3] * 4 and bank.prototypes.shape == (12, DIM)
    np.testing.assert_allclose(np.linalg.norm(bank.prototypes, axis=1), 1, atol=1e-5)
    seen_subs = {c: set() for c in range(4)}
    for (name, _j), mem in zip(bank.subclass_labels(), bank.members, strict=True):
        c = CLASSES.index(name)
        assert len(mem) == 20
        assert all(m.startswith(f"c{c}_") for m in mem), "only that class's single-label, non-white tiles"
        subs = [m.split("_")[1] for m in mem]
        purity = max(subs.count(s) for s in set(subs)) / len(subs)
        assert purity >= 0.95
        seen_subs[c].add(max(set(subs), key=subs.count))
    assert all(len(s) == 3 for s in seen_subs.values()), "each planted sub-cluster gets its own prototype"
    for name in CLASSES:
        cr = rep["classes"][name]
        assert cr["single_label"] == 190 and cr["dropped_white"] == 10
        assert cr["held_out"] == 36 and cr["used"] == 144 and sum(cr["cluster_sizes"]) == 144
    assert rep["zero_shot"]["macro_f1"] == pytest.approx(1.0)
    assert rep["holdout_size"] == 4 * 36
    assert rep["mean_intra_class_cosine"] > rep["mean_inter_class_cosine"]
    held = set()  # held-out tiles never enter the bank
    for mem in bank.members:
        held |= set(mem)
    assert len(held) == 12 * 20
    assert any("zero-shot" in m for m in logs)
    assert json.loads(json.dumps(rep))["zero_shot"]["n"] == 4 * 36  # the report is plain JSON


@pytest.mark.parametrize("fit_max", [20_000, 40])  # 40: scikit-learn sees a subsample, refinement sees all
def test_cosine_kmeans_labels_match_planted_clusters(fit_max):
    rng = np.random.default_rng(5)
    centres = l2n(rng.normal(size=(3, DIM)))
    truth = np.repeat(np.arange(3), 100)
    x = l2n(centres[truth] + 0.3 * rng.normal(size=(300, DIM)) / np.sqrt(DIM))
    c, lab = cosine_kmeans(x, 3, seed=0, fit_max=fit_max)
    assert lab.shape == (300,) and set(lab.tolist()) == {0, 1, 2}
    for t in range(3):
        assert len(set(lab[truth == t].tolist())) == 1  # each planted cluster is one label
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    assert np.argmax(x @ c.T, axis=1).tolist() == lab.tolist()  # a fixed point of cosine assignment


def test_nk_selection_mean_topk_and_centroid():
    data = planted(n_per_sub=30, k=1, n_multi=0, n_white=0, spread=0.8)
    base = BankParams(k=1, n_k=10, holdout_fraction=0.0)
    bank, _ = build_bank(data, CLASSES, ENC, base, log=_quiet)
    cent, _ = build_bank(
        data, CLASSES, ENC, BankParams(k=1, n_k=10, holdout_fraction=0, prototype="centroid"), _quiet
    )
    x = l2n(data["embedding"])
    ids = list(data["tile_id"])
    for c in range(4):
        rows = np.array([i for i, t in enumerate(ids) if t.startswith(f"c{c}_")])
        centre = l2n(x[rows].mean(0))
        nearest = rows[np.argsort(-(x[rows] @ centre))[:10]]
        assert bank.members[c] == [ids[i] for i in nearest]  # N_K nearest, nearest first
        np.testing.assert_allclose(bank.prototypes[c], l2n(x[nearest].mean(0)), atol=1e-5)
        np.testing.assert_allclose(cent.prototypes[c], centre, atol=1e-5)  # reference-code centroid
        assert not np.allclose(bank.prototypes[c], cent.prototypes[c], atol=1e-3)


def test_small_clusters_and_k_clamp_warn():
    data = planted(n_per_sub=4, k=1, n_multi=0, n_white=0)
    logs: list[str] = []
    params = BankParams(k=3, k_per_class={"LYM": 6}, n_k=50, holdout_fraction=0.0)
    bank, rep = build_bank(data, CLASSES, ENC, params, log=logs.append)
    assert bank.k == [3, 3, 4, 3]  # LYM asked for 6 > 4 tiles
    assert any("clamped to K=4" in w for w in rep["warnings"])
    assert any("< N_K=50" in w for w in rep["warnings"]) and any("< N_K=50" in m for m in logs)
    assert rep["classes"]["TUM"]["n_k_used"] == rep["classes"]["TUM"]["cluster_sizes"]
    t = bank.as_tensor()
    m = bank.mask()
    assert tuple(t.shape) == (4, 4, DIM)
    assert m.tolist()[0] == [True, True, True, False] and m.tolist()[2] == [True] * 4
    assert float(t[0, 3].abs().sum()) == 0.0
    np.testing.assert_allclose(t[2, 3].numpy(), bank.prototypes[bank.offsets[2] + 3])
    with pytest.raises(BankError, match="unknown class"):
        build_bank(data, CLASSES, ENC, BankParams(k_per_class={"FAT": 2}), log=_quiet)


def test_no_single_label_class_error_and_fallback():
    data = planted(n_per_sub=10, k=1, n_multi=30, n_white=0, seed=3)
    keep = np.array([not t.startswith("c3_") for t in data["tile_id"]])  # NEC only in multi-label tiles
    data = {k: v[keep] for k, v in data.items()}
    n_multi_nec = int(((data["labels"][:, 3] == 1) & (data["labels"].sum(1) > 1)).sum())
    assert n_multi_nec > 0
    with pytest.raises(BankError) as ei:
        build_bank(data, CLASSES, ENC, BankParams(k=2, n_k=5), log=_quiet)
    msg = str(ei.value)
    assert "'NEC'" in msg and f"{n_multi_nec} multi-label" in msg and "allow_majority_fallback" in msg
    # encoder.tiles: bank embedded no multi-label tile, so the message names that key, not a count of 0
    with pytest.raises(BankError) as ei:
        build_bank(_arrow(data), CLASSES, ENC, BankParams(k=2, n_k=5), log=_quiet, bank_tiles_only=True)
    msg = str(ei.value)
    assert "'NEC'" in msg and "encoder.tiles" in msg and "multi-label tiles contain it)" not in msg
    bank, rep = build_bank(
        data, CLASSES, ENC, BankParams(k=2, n_k=5, allow_majority_fallback=True), log=_quiet
    )
    assert rep["classes"]["NEC"]["source"] == "multi_label_fallback"
    assert all(m.startswith("multi_") for j in range(2) for m in bank.members[bank.offsets[3] + j])
    assert any("NEC" in w for w in rep["warnings"])


def _arrow(data: dict[str, np.ndarray]) -> pa.Table:
    n = len(data["tile_id"])
    schema = embeddings_schema(DIM, "float16")
    return pa.Table.from_arrays(
        [
            pa.array(data["tile_id"], pa.string()),
            pa.array(["s"] * n),
            pa.array(np.arange(n), pa.int64()),
            pa.array(np.zeros(n), pa.int64()),
            pa.array(data["white_fraction"], pa.float32()),
            pa.array(data["labelled"]),
            pa.array(list(data["labels"]), pa.list_(pa.uint8())),
            pa.FixedSizeListArray.from_arrays(pa.array(data["embedding"].astype(np.float16).ravel()), DIM),
            pa.array([ENC] * n),
        ],
        schema=schema,
    )


def test_arrow_input_save_load_and_zero_shot(tmp_path):
    table = _arrow(planted(n_per_sub=25))
    bank, rep = build_bank(table, CLASSES, ENC, BankParams(k=3, n_k=8), log=_quiet)
    assert rep["zero_shot"]["macro_f1"] > 0.99
    bank.save(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["bank.json", "bank.safetensors"]
    again = Bank.load(tmp_path / "b")
    np.testing.assert_array_equal(again.prototypes, bank.prototypes)
    assert (again.class_names, again.k, again.n_k, again.encoder) == (bank.class_names, bank.k, 8, ENC)
    assert again.members == bank.members and again.params["k"] == 3
    # an independent hold-out set scores ~1 on separable data
    other = planted(n_per_sub=5, n_multi=5, n_white=0, seed=0)
    zs = zero_shot_report(again, other)
    assert zs["macro_f1"] == pytest.approx(1.0) and zs["n"] == 4 * 15
    assert set(zs["per_class"]) == set(CLASSES) and zs["per_class"]["TUM"]["support"] == 15
    with pytest.raises(BankError, match="from encoder"):
        build_bank(table, CLASSES, "other@123", BankParams(k=2, n_k=4), log=_quiet)
    (tmp_path / "b" / "bank.safetensors").unlink()
    with pytest.raises(BankError, match=r"bank\.safetensors"):
        Bank.load(tmp_path / "b")


def test_gallery_png_grid(tmp_path):
    data = planted(n_per_sub=12, k=2, n_multi=0, n_white=0)
    bank, _ = build_bank(data, CLASSES, ENC, BankParams(k=2, n_k=5, holdout_fraction=0), log=_quiet)
    colours = {
        c: np.array(v, np.uint8) for c, v in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)])
    }
    fetched: list[str] = []

    def fetch(tid: str) -> np.ndarray:
        fetched.append(tid)
        return np.broadcast_to(colours[int(tid[1])], (40, 40, 3)).copy()

    out = write_gallery(tmp_path / "g" / "bank.png", bank, fetch, per_row=4, thumb=32)
    img = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    assert img.shape == (8 * 32, 5 * 32, 3) == (*gallery_shape(bank, 4, 32), 3)
    assert len(fetched) == 8 * 4  # per_row of the 5 members per sub-class
    for row in range(8):
        c = row // 2
        cell = img[row * 32 + 4 : row * 32 + 28, 32 + 4 : 64 - 4]
        np.testing.assert_allclose(cell.reshape(-1, 3).mean(0), colours[c], atol=3)
    assert not list((tmp_path / "g").glob(".*tmp"))


def test_embedding_only_the_bank_tiles_builds_the_same_bank():
    """encoder.tiles: bank drops multi-label and unlabelled rows before the encoder; the bank must not change."""
    data = planted(n_per_sub=25)
    data["labelled"][::7] = False  # unlabelled tiles of a WSI cohort: the bank never reads them
    table = _arrow(data)
    kept = keep_bank_tiles(table)
    ids = kept["tile_id"].to_pylist()
    want = [
        t
        for t, lab, n in zip(data["tile_id"], data["labelled"], data["labels"].sum(1), strict=True)
        if lab and n == 1
    ]
    assert ids == want and 0 < len(ids) < table.num_rows
    assert not any(t.startswith("multi_") for t in ids)
    assert any(t.startswith("white_") for t in ids)  # white tiles are the bank's own filter (max_white)
    assert keep_bank_tiles(table.slice(0, 0)).num_rows == 0
    params = BankParams(k=3, n_k=8)
    full, rep_full = build_bank(table, CLASSES, ENC, params, log=_quiet)
    part, rep_part = build_bank(kept, CLASSES, ENC, params, log=_quiet)
    np.testing.assert_array_equal(part.prototypes, full.prototypes)
    assert part.members == full.members
    assert rep_part["zero_shot"] == rep_full["zero_shot"]
    # the bank's report must not count the multi-label tiles it never saw as 0
    assert (
        any(c["multi_label"] > 0 for c in rep_full["classes"].values())
        and rep_full["embedded_tiles"] == "all"
    )
    _, rep_only = build_bank(kept, CLASSES, ENC, params, log=_quiet, bank_tiles_only=True)
    assert all(c["multi_label"] is None for c in rep_only["classes"].values())
    assert rep_only["embedded_tiles"] == "bank" and rep_only["zero_shot"] == rep_full["zero_shot"]
