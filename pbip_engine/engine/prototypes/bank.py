"""The PBIP image bank (CVPR 2025, §3.2): K sub-class prototypes per class from clustered single-label tiles.

Paper recipe, implemented as the default:
  1. per class, the tiles whose image label is that class only, minus tiles with too much white;
  2. cosine K-means within the class (K sub-classes);
  3. per sub-class, the N_K tiles nearest the centre; prototype = their mean feature (renormalised).
The public code instead used the renormalised centroid of *all* members (``prototype="centroid"``) and
never built the bank selection (QingchenTang/PBIP @ 6d40540). A stratified, seeded hold-out of single-label tiles is
kept out of the bank and used for a nearest-prototype zero-shot check of the bank's quality.

Layout: ``prototypes`` is ``[sum(k), dim]`` float32, L2-normalised rows, class-major (class 0's K_0 rows,
then class 1's ...), the same layout as the reference code's ``features`` + ``cumsum_k``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute

from pbip_engine.engine.io.atomic import atomic_save, atomic_write_text

if TYPE_CHECKING:  # torch only for as_tensor(): keep this module importable without it
    import torch

BANK_JSON = "bank.json"
BANK_TENSORS = "bank.safetensors"
BANK_FORMAT_VERSION = 1


class BankError(ValueError):
    """A bank cannot be built or loaded (no eligible tiles for a class, bad file, bad parameters)."""


@dataclass
class BankParams:
    """Bank construction settings. Paper defaults: K=3, N_K=100."""

    k: int = 3
    k_per_class: dict[str, int] = field(default_factory=dict)
    n_k: int = 100
    max_white: float = 0.5
    prototype: Literal["mean_topk", "centroid"] = "mean_topk"
    seed: int = 0
    allow_majority_fallback: bool = False
    holdout_fraction: float = 0.2  # single-label tiles held out for the zero-shot check, never in the bank
    n_init: int = 4
    max_iter: int = 100  # per scikit-learn restart; real features converge in far fewer
    fit_max: int = 20_000  # scikit-learn fits on a seeded subsample of at most this many tiles per class
    refine_iters: int = 20  # spherical (true cosine) k-means refinement after scikit-learn's k-means


@dataclass
class Bank:
    """Prototypes plus provenance. ``members[j]``: tile ids of sub-class j's N_K tiles, nearest first."""

    class_names: list[str]
    k: list[int]
    n_k: int
    encoder: str
    prototypes: np.ndarray
    members: list[list[str]]
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prototypes = np.asarray(self.prototypes, dtype=np.float32)
        if len(self.k) != len(self.class_names):
            raise BankError(f"bank has {len(self.class_names)} classes but {len(self.k)} K values")
        if self.prototypes.ndim != 2 or self.prototypes.shape[0] != sum(self.k):
            raise BankError(
                f"bank prototypes have shape {self.prototypes.shape}, expected [{sum(self.k)}, dim]"
            )
        if len(self.members) != sum(self.k):
            raise BankError(f"bank has {len(self.members)} member lists for {sum(self.k)} sub-classes")

    @property
    def dim(self) -> int:
        return int(self.prototypes.shape[1])

    @property
    def offsets(self) -> list[int]:
        """``cumsum_k``: class c's prototypes are rows ``offsets[c]:offsets[c+1]``."""
        return [0, *np.cumsum(self.k).tolist()]

    def subclass_labels(self) -> list[tuple[str, int]]:
        """(class name, 0-based sub-class index) for every prototype row."""
        return [(c, j) for c, kc in zip(self.class_names, self.k, strict=True) for j in range(kc)]

    def prototype_class(self) -> np.ndarray:
        """0-based class index of every prototype row."""
        return np.repeat(np.arange(len(self.k)), self.k)

    def as_tensor(self) -> torch.Tensor:
        """``[N_classes, K_max, dim]`` float32; classes with fewer than K_max prototypes are zero-padded.

        Use :meth:`mask` (``[N_classes, K_max]`` bool) to ignore the padding when K differs per class.
        """
        import torch

        out = torch.zeros(len(self.k), max(self.k), self.dim, dtype=torch.float32)
        for c, (a, b) in enumerate(zip(self.offsets[:-1], self.offsets[1:], strict=True)):
            out[c, : b - a] = torch.from_numpy(self.prototypes[a:b])
        return out

    def mask(self) -> torch.Tensor:
        """``[N_classes, K_max]`` bool, True where :meth:`as_tensor` holds a real prototype."""
        import torch

        return torch.arange(max(self.k))[None, :] < torch.tensor(self.k)[:, None]

    # ---------------------------------------------------------------------------------------- persistence

    def save(self, dir: str | Path) -> None:
        """``bank.safetensors`` (prototypes) + ``bank.json`` (the rest), each written atomically."""
        from safetensors.numpy import save_file

        d = Path(dir)
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": BANK_FORMAT_VERSION,
            "class_names": list(self.class_names),
            "k": [int(x) for x in self.k],
            "n_k": int(self.n_k),
            "encoder": self.encoder,
            "dim": self.dim,
            "members": self.members,
            "params": self.params,
        }
        atomic_save(
            d / BANK_TENSORS,
            lambda tmp: save_file(
                {"prototypes": np.ascontiguousarray(self.prototypes)},
                tmp,
                metadata={"encoder": self.encoder, "k": json.dumps(meta["k"])},
            ),
        )
        atomic_write_text(d / BANK_JSON, json.dumps(meta, indent=1))

    @classmethod
    def load(cls, dir: str | Path) -> Bank:
        d = Path(dir)
        jpath, tpath = d / BANK_JSON, d / BANK_TENSORS
        for p in (jpath, tpath):
            if not p.is_file():
                raise BankError(f"bank file missing: {p}")
        try:
            meta = json.loads(jpath.read_text())
        except json.JSONDecodeError as e:
            raise BankError(f"{jpath} is not valid JSON: {e}") from e
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(tpath))
        except Exception as e:
            raise BankError(f"could not read {tpath}: {e}") from e
        if "prototypes" not in tensors:
            raise BankError(f"{tpath} has no 'prototypes' tensor (has {sorted(tensors)})")
        missing = [k for k in ("class_names", "k", "n_k", "encoder", "members") if k not in meta]
        if missing:
            raise BankError(f"{jpath} lacks key(s) {missing}")
        try:
            return cls(
                class_names=list(meta["class_names"]),
                k=[int(x) for x in meta["k"]],
                n_k=int(meta["n_k"]),
                encoder=str(meta["encoder"]),
                prototypes=tensors["prototypes"],
                members=[list(m) for m in meta["members"]],
                params=dict(meta.get("params", {})),
            )
        except BankError as e:
            raise BankError(f"inconsistent bank in {d}: {e}") from e


# ------------------------------------------------------------------------------------------- inputs


@dataclass
class _Emb:
    tile_id: np.ndarray  # object[str]
    labels: np.ndarray  # uint8 [n, n_classes]
    labelled: np.ndarray  # bool [n]
    white: np.ndarray  # float32 [n]
    x: np.ndarray  # float32 [n, dim], L2-normalised


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _embedding_matrix(col: Any) -> np.ndarray:
    if isinstance(col, (pa.ChunkedArray, pa.Array)):
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if pa.types.is_fixed_size_list(arr.type):
            return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
        return (
            np.stack([np.asarray(v) for v in arr.to_numpy(zero_copy_only=False)])
            if len(arr)
            else np.zeros((0, 0))
        )
    a = np.asarray(col)
    if a.dtype == object:
        a = np.stack([np.asarray(v) for v in a])
    return a


def _read_embeddings(emb: pa.Table | Mapping[str, Any], n_classes: int) -> _Emb:
    """Accept an embeddings Arrow table (schemas.embeddings_schema) or a dict of arrays with the same keys."""
    cols = emb.column_names if isinstance(emb, pa.Table) else list(emb)
    need = ("tile_id", "labels", "embedding")
    missing = [c for c in need if c not in cols]
    if missing:
        raise BankError(f"embeddings lack column(s) {missing} (have {cols})")

    def get(name: str) -> Any:
        return emb.column(name) if isinstance(emb, pa.Table) else emb[name]

    def np_col(name: str) -> np.ndarray:
        c = get(name)
        return (
            c.to_numpy(zero_copy_only=False) if isinstance(c, (pa.ChunkedArray, pa.Array)) else np.asarray(c)
        )

    x = _embedding_matrix(get("embedding"))
    n = len(x)
    labels = _embedding_matrix(get("labels")).astype(np.uint8) if n else np.zeros((0, n_classes), np.uint8)
    if labels.shape != (n, n_classes):
        raise BankError(
            f"labels have shape {labels.shape}, expected ({n}, {n_classes}) for {n_classes} classes"
        )
    labelled = np_col("labelled").astype(bool) if "labelled" in cols else np.ones(n, bool)
    white = (
        np_col("white_fraction").astype(np.float32) if "white_fraction" in cols else np.zeros(n, np.float32)
    )
    tile_id = np_col("tile_id").astype(object)
    if not np.all(np.isfinite(x)):
        bad = int((~np.isfinite(x).all(1)).sum())
        raise BankError(f"{bad} embeddings contain NaN/inf (first tile {tile_id[~np.isfinite(x).all(1)][0]})")
    return _Emb(tile_id=tile_id, labels=labels, labelled=labelled, white=white, x=l2n(x))


def _check_encoder(emb: pa.Table | Mapping[str, Any], encoder_id: str) -> None:
    """Refuse to mix embeddings of different encoders (their spaces are unrelated)."""
    cols = emb.column_names if isinstance(emb, pa.Table) else list(emb)
    if "encoder" not in cols:
        return
    col = (
        emb.column("encoder")
        if isinstance(emb, pa.Table)
        else pa.array(np.asarray(emb["encoder"], dtype=object))
    )
    found = sorted({str(v) for v in pa.compute.unique(col).to_pylist()})
    if found != [encoder_id]:
        raise BankError(f"embeddings come from encoder(s) {found}, but the bank is for {encoder_id!r}")


# ----------------------------------------------------------------------------------------- clustering


def cosine_kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int,
    n_init: int = 4,
    max_iter: int = 100,
    refine_iters: int = 20,
    fit_max: int = 20_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine K-means on unit vectors -> (unit centres [k, dim], labels [n]).

    scikit-learn's Euclidean K-means on L2-normalised rows (k-means++, ``n_init`` restarts) gives the
    start; a few spherical K-means steps (assign by max cosine, mean, renormalise) then make the result
    a fixed point of the paper's cosine distance over *all* tiles. Empty clusters keep their previous
    centre. Above ``fit_max`` tiles, scikit-learn sees a seeded subsample (the refinement still uses all).
    """
    from sklearn.cluster import KMeans

    fit_x = x
    if len(x) > fit_max:
        fit_x = x[np.sort(np.random.default_rng(seed).choice(len(x), fit_max, replace=False))]
    km = KMeans(n_clusters=k, n_init=max(4, n_init), max_iter=max_iter, random_state=seed).fit(fit_x)
    centres = l2n(km.cluster_centers_)
    labels = np.full(len(x), -1, np.int64)  # forces at least one assignment pass over all tiles
    for _ in range(max(1, refine_iters)):
        new = np.argmax(x @ centres.T, axis=1)
        new_centres = centres.copy()
        for j in range(k):
            sel = new == j
            if sel.any():
                new_centres[j] = l2n(x[sel].mean(0))
        done = np.array_equal(new, labels)
        labels, centres = new, new_centres
        if done:
            break
    return centres, labels


# ------------------------------------------------------------------------------------------ building


def single_label(labelled: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The rows the bank builds from (unless it falls back to multi-label tiles): labelled, one class."""
    return np.asarray(labelled, bool) & (np.asarray(labels).sum(1) == 1)


def keep_bank_tiles(tiles: pa.Table) -> pa.Table:
    """The rows of a tiles (or embeddings) table the bank can use without its majority fallback.

    The bank is the only reader of tile embeddings, and on patch-labelled cohorts most tiles carry two or more
    classes (GlaS: 80 %), so embedding only these rows skips most of the encoder pass and builds the same bank.
    """
    if tiles.num_rows == 0:
        return tiles
    labels = _embedding_matrix(tiles.column("labels"))
    return tiles.filter(pa.array(single_label(tiles.column("labelled").to_numpy(), labels)))


def _select_class_tiles(
    e: _Emb, ci: int, name: str, params: BankParams, counts: dict, bank_tiles_only: bool = False
) -> np.ndarray:
    """Indices of the tiles eligible for class ``ci`` (before hold-out)."""
    has = e.labelled & (e.labels[:, ci] > 0)
    single = has & single_label(e.labelled, e.labels)
    n_single, n_multi = int(single.sum()), int((has & ~single).sum())
    white_ok = e.white <= params.max_white
    # Embeddings of the bank's tiles only (encoder.tiles: bank) hold no multi-label tile: their count is unknown
    counts.update(
        single_label=n_single,
        multi_label=None if bank_tiles_only else n_multi,
        dropped_white=int((single & ~white_ok).sum()),
    )
    idx = np.flatnonzero(single & white_ok)
    if idx.size:
        counts["source"] = "single_label"
        return idx
    if bank_tiles_only or not params.allow_majority_fallback:
        if n_single:
            why = f"has {n_single} single-label tiles but all exceed max_white={params.max_white}"
        elif bank_tiles_only:
            why = "has no single-label tiles among the embedded ones (encoder.tiles: bank embeds no others)"
        else:
            why = f"has no single-label tiles ({n_multi} multi-label tiles contain it)"
        fix = (
            "encoder.tiles: all and bank.allow_majority_fallback: true"
            if bank_tiles_only
            else "allow_majority_fallback=True"
        )
        raise BankError(
            f"class {name!r} {why}; set {fix} to build its prototypes from multi-label tiles containing it "
            "(a weaker, noisier bank)"
        )
    idx = np.flatnonzero(has & white_ok)
    if not idx.size:
        raise BankError(
            f"class {name!r} has no usable tiles at all (single-label {n_single}, multi-label {n_multi}, "
            f"max_white={params.max_white})"
        )
    counts["source"] = "multi_label_fallback"
    counts["dropped_white"] = int((has & ~white_ok).sum())
    return idx


def _holdout_split(idx: np.ndarray, frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if frac <= 0 or idx.size < 2:
        return idx, idx[:0]
    n_hold = min(round(idx.size * frac), idx.size - 1)
    perm = rng.permutation(idx.size)
    return np.sort(idx[perm[n_hold:]]), np.sort(idx[perm[:n_hold]])


def build_bank(
    embeddings: pa.Table | Mapping[str, Any],
    class_names: list[str],
    encoder_id: str,
    params: BankParams | None = None,
    log: Callable[[str], None] = print,
    bank_tiles_only: bool = False,
) -> tuple[Bank, dict]:
    """Build the bank from tile embeddings -> (bank, report). See the module docstring for the recipe.

    ``bank_tiles_only``: the embeddings hold only the rows ``keep_bank_tiles`` keeps (``encoder.tiles: bank``),
    so the report does not count multi-label tiles (it would say 0) and errors name that setting.
    """
    params = params or BankParams()
    if params.prototype not in ("mean_topk", "centroid"):
        raise BankError(f"BankParams.prototype must be 'mean_topk' or 'centroid', got {params.prototype!r}")
    if params.k < 1 or params.n_k < 1 or not 0 <= params.holdout_fraction < 1:
        raise BankError(f"bad BankParams: k={params.k}, n_k={params.n_k}, holdout={params.holdout_fraction}")
    unknown = sorted(set(params.k_per_class) - set(class_names))
    if unknown:
        raise BankError(f"k_per_class names unknown class(es) {unknown}; classes are {class_names}")
    e = _read_embeddings(embeddings, len(class_names))
    _check_encoder(embeddings, encoder_id)
    rng = np.random.default_rng(params.seed)
    protos: list[np.ndarray] = []
    members: list[list[str]] = []
    ks: list[int] = []
    holdout: list[np.ndarray] = []
    report: dict[str, Any] = {
        "classes": {},
        "warnings": [],
        "embedded_tiles": "bank" if bank_tiles_only else "all",
    }

    def warn(msg: str) -> None:
        report["warnings"].append(msg)
        log(f"bank: WARNING {msg}")

    for ci, name in enumerate(class_names):
        counts: dict[str, Any] = {}
        idx = _select_class_tiles(e, ci, name, params, counts, bank_tiles_only)
        if counts.get("source") == "multi_label_fallback":
            warn(
                f"class {name!r}: no usable single-label tiles; using {idx.size} multi-label tiles containing it"
            )
        use, hold = _holdout_split(idx, params.holdout_fraction, rng)
        if counts.get("source") == "single_label":
            holdout.append(hold)
        else:  # fallback tiles are not single-label: they cannot score the zero-shot check
            use = np.sort(np.concatenate([use, hold]))
            hold = hold[:0]
        k_req = int(params.k_per_class.get(name, params.k))
        k = min(k_req, use.size)
        if k < k_req:
            warn(f"class {name!r}: K={k_req} > {use.size} usable tiles; clamped to K={k}")
        x = e.x[use]
        if k == 1:
            centres, lab = l2n(x.mean(0, keepdims=True)), np.zeros(use.size, np.int64)
        else:
            centres, lab = cosine_kmeans(
                x,
                k,
                seed=params.seed,
                n_init=params.n_init,
                max_iter=params.max_iter,
                refine_iters=params.refine_iters,
                fit_max=params.fit_max,
            )
        sizes, picked = [], []
        for j in range(k):
            mem = np.flatnonzero(lab == j)
            sims = x[mem] @ centres[j]
            order = mem[np.argsort(-sims, kind="stable")]
            top = order[: params.n_k]
            if mem.size < params.n_k:
                warn(
                    f"class {name!r} sub-class {j}: only {mem.size} tiles < N_K={params.n_k}; using all of them"
                )
            if params.prototype == "mean_topk":
                p = l2n(x[top].mean(0))
            else:  # reference code: renormalised centroid of all members
                p = l2n(x[mem].mean(0)) if mem.size else centres[j]
            protos.append(p)
            members.append([str(t) for t in e.tile_id[use[top]]])
            sizes.append(int(mem.size))
            picked.append(int(top.size))
        ks.append(k)
        counts.update(held_out=int(hold.size), used=int(use.size), k=k, cluster_sizes=sizes, n_k_used=picked)
        report["classes"][name] = counts
        log(f"bank: {name}: {counts['source']} {use.size} used, {hold.size} held out, clusters {sizes}")

    bank = Bank(
        class_names=list(class_names),
        k=ks,
        n_k=params.n_k,
        encoder=encoder_id,
        prototypes=np.stack(protos).astype(np.float32),
        members=members,
        params=asdict(params),
    )
    report.update(prototype_similarity(bank))
    hold_idx = np.concatenate(holdout) if holdout else np.zeros(0, np.int64)
    report["holdout_size"] = int(hold_idx.size)
    if hold_idx.size:
        report["zero_shot"] = _zero_shot(bank, e.x[hold_idx], e.labels[hold_idx])
        log(
            f"bank: zero-shot macro F1 on {hold_idx.size} held-out tiles = {report['zero_shot']['macro_f1']:.3f}"
        )
    else:
        report["zero_shot"] = None
    return bank, report


def prototype_similarity(bank: Bank) -> dict[str, float | None]:
    """Mean cosine between prototypes of the same class (intra) and of different classes (inter)."""
    s = bank.prototypes @ bank.prototypes.T
    cls = bank.prototype_class()
    same = cls[:, None] == cls[None, :]
    off = ~np.eye(len(cls), dtype=bool)
    intra, inter = s[same & off], s[~same]
    return {
        "mean_intra_class_cosine": float(intra.mean()) if intra.size else None,
        "mean_inter_class_cosine": float(inter.mean()) if inter.size else None,
    }


def _zero_shot(bank: Bank, x: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    single = labels.sum(1) == 1
    x, y = l2n(x[single]), np.argmax(labels[single], axis=1)
    pred = bank.prototype_class()[np.argmax(x @ bank.prototypes.T, axis=1)] if len(x) else np.zeros(0, int)
    n = len(bank.class_names)
    conf = np.zeros((n, n), np.int64)
    np.add.at(conf, (y, pred), 1)
    per: dict[str, dict[str, float | int]] = {}
    f1s = []
    for c, name in enumerate(bank.class_names):
        tp = conf[c, c]
        p = tp / conf[:, c].sum() if conf[:, c].sum() else 0.0
        r = tp / conf[c].sum() if conf[c].sum() else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per[name] = {
            "precision": float(p),
            "recall": float(r),
            "f1": float(f1),
            "support": int(conf[c].sum()),
        }
        if conf[c].sum():
            f1s.append(f1)
    return {
        "per_class": per,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "accuracy": float(np.trace(conf) / conf.sum()) if conf.sum() else 0.0,
        "n": int(conf.sum()),
        "confusion": conf.tolist(),
    }


def zero_shot_report(bank: Bank, embeddings_holdout: pa.Table | Mapping[str, Any]) -> dict:
    """Per-class precision/recall/F1 and macro F1 of nearest-prototype classification.

    Only single-label tiles are scored (their label is unambiguous); macro F1 averages classes with
    support. ``confusion[true][pred]`` is included.
    """
    e = _read_embeddings(embeddings_holdout, len(bank.class_names))
    if e.x.shape[1] != bank.dim:
        raise BankError(
            f"hold-out embeddings are {e.x.shape[1]}-d but the bank is {bank.dim}-d ({bank.encoder})"
        )
    return _zero_shot(bank, e.x, e.labels)
