"""Deterministic synthetic H&E cohort: slides, truth masks, coarse QuPath annotations, patch sets.

Every slide is a set of *continuous functions of level-0 coordinates* (hashed lattice value noise,
warped Voronoi seeds, round islands), so any tile can be rendered on its own, seamlessly, with memory
bounded by the tile size: the writer pulls tiles from :meth:`SynthSlide.render` and
:meth:`SynthSlide.labels`. A 1/16-resolution sampling of the same functions drives the annotations,
the slide-level labels and the per-tile candidate pruning.

What makes it a real segmentation problem (the PBIP setting):

* intra-class heterogeneity -- two variants per class: solid tumour (dense large hyperchromatic
  nuclei) vs glandular tumour (paler, fewer nuclei, white gland lumens -- labelled tumour, as
  region-level annotations such as BCSS do; only glass and tissue holes are 0); dense vs paler stroma with fibres
  running in different directions; packed vs looser lymphocytes; granular eosinophilic necrosis with
  karyorrhectic fragments vs "dirty" necrosis with ghost nuclei;
* inter-class homogeneity -- one haematoxylin colour for every nucleus (tumour and lymphocytes differ
  by nuclear size and density) and one eosin colour for stroma and necrosis (they differ by texture);
* per-slide stain jitter (stain vectors, concentrations, white level), tissue outlines with holes.

Colour follows Beer-Lambert: RGB = white * exp(-(H * h + E * e)) with per-slide stain vectors h, e.
Textures scale with ``mpp`` (sizes are defined at 0.5 µm/px).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import tifffile
from PIL import Image

from pbip_engine.engine.annotations.geojson import (
    Annotation,
    clean_polygonal,
    mask_to_geometries,
    write_annotations,
)
from pbip_engine.engine.io.atomic import atomic_write_bytes
from pbip_engine.engine.outputs.tiff_writer import write_pyramid

__all__ = [
    "BCSS_PALETTE",
    "SYNTH_CLASSES",
    "SynthSlide",
    "write_cohort",
    "write_patch_set",
]

SYNTH_CLASSES: list[tuple[str, tuple[int, int, int]]] = [
    ("tumour", (200, 40, 40)),
    ("stroma", (240, 130, 190)),
    ("lymphocytes", (60, 60, 200)),
    ("necrosis", (150, 120, 40)),
]
N_CLASSES = len(SYNTH_CLASSES)
TUM, STR, LYM, NEC = 1, 2, 3, 4

BCSS_PALETTE: list[tuple[int, int, int]] = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (153, 0, 255),
    (255, 255, 255),
]
"""BCSS-WSSS mask palette: indices 0 TUM, 1 STR, 2 LYM, 3 NEC, 4 BACK (as the MLPS and PBIP code store them)."""

_MASK64 = (1 << 64) - 1
_C1 = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0xC2B2AE3D27D4EB4F)
_C3 = np.uint64(0x165667B19E3779F9)
_NOISE_STD = 0.48  # std of cubic B-spline value noise with unit-variance lattice values


# --------------------------------------------------------------------------------------- noise ---
def _mix64(x: int) -> int:
    """splitmix64 finaliser on a Python int (platform independent key derivation)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _key(*parts: int) -> int:
    h = 0x1234567
    for p in parts:
        h = _mix64(h ^ (_mix64(int(p) & _MASK64) + 0x9E3779B97F4A7C15))
    return h


def _hash_u01(key: int, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float32 hashed from integer lattice coordinates (broadcasting)."""
    with np.errstate(over="ignore"):
        h = (np.asarray(iy, np.int64).view(np.uint64) * _C1) ^ (
            np.asarray(ix, np.int64).view(np.uint64) * _C2
        )
        h = h ^ np.uint64(key)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
        h = h * _C3
    return ((h >> np.uint64(40)).astype(np.float32)) * np.float32(1.0 / (1 << 24))


@dataclass(frozen=True)
class _Grid:
    """A regular sampling grid in level-0 coordinates: sample (i, j) sits at (x0 + step*(j+0.5), ...)."""

    x0: float
    y0: float
    w: int
    h: int
    step: float = 1.0

    def xs(self) -> np.ndarray:
        return (self.x0 + self.step * (np.arange(self.w, dtype=np.float64) + 0.5)).astype(np.float32)

    def ys(self) -> np.ndarray:
        return (self.y0 + self.step * (np.arange(self.h, dtype=np.float64) + 0.5)).astype(np.float32)


@functools.lru_cache(maxsize=512)
def _bspline_matrix(x0: float, n: int, step: float, cell: float) -> tuple[np.ndarray, int]:
    """(n, L) cubic B-spline interpolation weights from lattice nodes k*cell to the n samples.

    Cached: neighbouring tiles of one row (column) share their y (x) matrices.
    """
    u = (x0 + step * (np.arange(n, dtype=np.float64) + 0.5)) / cell
    k = np.floor(u).astype(np.int64)
    t = (u - k).astype(np.float32)
    k0 = int(k.min()) - 1
    L = int(k.max()) + 3 - k0
    W = np.zeros((n, L), np.float32)
    rows = np.arange(n)
    t2, t3 = t * t, t * t * t
    W[rows, k - 1 - k0] = (1 - t) ** 3 / 6
    W[rows, k - k0] = (3 * t3 - 6 * t2 + 4) / 6
    W[rows, k + 1 - k0] = (-3 * t3 + 3 * t2 + 3 * t + 1) / 6
    W[rows, k + 2 - k0] = t3 / 6
    W.flags.writeable = False
    return W, k0


def _noise(key: int, g: _Grid, cell: float, cell_y: float | None = None) -> np.ndarray:
    """Seamless smooth value noise (approx. zero mean, unit std) sampled on grid ``g``.

    A pure function of level-0 coordinates: any tile evaluates exactly the values its neighbours do.
    """
    cy = cell if cell_y is None else cell_y
    Wx, kx0 = _bspline_matrix(g.x0, g.w, g.step, cell)
    Wy, ky0 = _bspline_matrix(g.y0, g.h, g.step, cy)
    iy = np.arange(ky0, ky0 + Wy.shape[1])[:, None]
    ix = np.arange(kx0, kx0 + Wx.shape[1])[None, :]
    v = (_hash_u01(key, iy, ix) - np.float32(0.5)) * np.float32(math.sqrt(12.0))
    return (Wy @ v @ Wx.T) * np.float32(1.0 / _NOISE_STD)


_COARSE = 8  # full-resolution grids evaluate large-scale fields every _COARSE px, then upsample


def _coarse(g: _Grid, fn: Callable[[_Grid], np.ndarray], factor: int = _COARSE) -> np.ndarray:
    """Evaluate smooth field(s) on a globally aligned grid every ``factor`` px, bilinearly upsampled.

    The coarse samples sit at fixed level-0 positions (multiples of ``factor``), so the result is
    still one function of level-0 coordinates: tiles agree exactly where they overlap. ``fn`` may
    return (h, w) or (h, w, channels).
    """
    if g.step != 1:
        return fn(g)
    c = factor
    cx0 = (math.floor(g.x0 / c) - 1) * c
    cy0 = (math.floor(g.y0 / c) - 1) * c
    cw = math.ceil((g.x0 + g.w - cx0) / c) + 1
    ch = math.ceil((g.y0 + g.h - cy0) / c) + 1
    f = fn(_Grid(cx0, cy0, cw, ch, c))
    up = cv2.resize(f, (cw * c, ch * c), interpolation=cv2.INTER_LINEAR)
    ox, oy = int(g.x0 - cx0), int(g.y0 - cy0)
    return up[oy : oy + g.h, ox : ox + g.w]


# ------------------------------------------------------------------------------ slide model ---
# Per (class, variant) appearance. E: eosin, Hd: diffuse haematoxylin, Hn: nuclear haematoxylin.
# nuclei: {type: probability that a grid site of that type holds a nucleus}.
_NUCLEUS_TYPES = {
    # name: (grid spacing px, sigma_x, sigma_y, position jitter) at 0.5 µm/px
    "tum": (20.0, 4.8, 4.8, 0.7),
    "lym": (13.0, 3.2, 3.2, 0.45),
    "fib_h": (34.0, 7.0, 2.0, 0.8),
    "fib_v": (34.0, 2.0, 7.0, 0.8),
    "frag": (13.0, 1.8, 1.8, 0.8),
}
_APPEARANCE: dict[tuple[int, int], dict] = {
    (TUM, 0): dict(E=0.32, Hd=0.16, Hn=1.05, tex="smooth", nuclei={"tum": 0.85}),
    (TUM, 1): dict(E=0.42, Hd=0.07, Hn=0.78, tex="gland", nuclei={"tum": 0.55}),
    (STR, 0): dict(E=0.95, Hd=0.02, Hn=0.95, tex="fibre_h", nuclei={"fib_h": 0.45}),
    (STR, 1): dict(E=0.55, Hd=0.02, Hn=0.85, tex="fibre_v", nuclei={"fib_v": 0.3}),
    (LYM, 0): dict(E=0.18, Hd=0.08, Hn=1.25, tex="smooth", nuclei={"lym": 0.95}),
    (LYM, 1): dict(E=0.5, Hd=0.04, Hn=1.05, tex="smooth", nuclei={"lym": 0.62}),
    (NEC, 0): dict(E=0.62, Hd=0.03, Hn=1.0, tex="granular", nuclei={"frag": 0.5}),
    (NEC, 1): dict(E=0.5, Hd=0.16, Hn=0.3, tex="dirty", nuclei={"tum": 0.4, "frag": 0.3}),
}
_TEX_FIBRE_H, _TEX_FIBRE_V, _TEX_GRANULAR, _TEX_DIRTY, _TEX_GLAND = 1, 2, 3, 4, 5
_TEX_CODE = {"smooth": 0, "fibre_h": 1, "fibre_v": 2, "granular": 3, "dirty": 4, "gland": 5}


def _table(name: str, dtype=np.float32) -> np.ndarray:
    """Lookup table indexed [class, variant] (class 0 = background -> 0)."""
    t = np.zeros((N_CLASSES + 1, 2), dtype)
    for (c, v), app in _APPEARANCE.items():
        t[c, v] = _TEX_CODE[app["tex"]] if name == "tex" else app[name]
    return t


_E_T, _HD_T, _HN_T, _TEX_T = _table("E"), _table("Hd"), _table("Hn"), _table("tex", np.uint8)

_NUC_PROB = {
    t: np.array(
        [
            [_APPEARANCE.get((c, v), {"nuclei": {}})["nuclei"].get(t, 0.0) for v in (0, 1)]
            for c in range(N_CLASSES + 1)
        ],
        np.float32,
    )
    for t in _NUCLEUS_TYPES
}

_BASE_H = np.array([1.30, 1.62, 0.62], np.float32)  # haematoxylin optical density per unit (R, G, B)
_BASE_E = np.array([0.06, 0.80, 0.30], np.float32)  # eosin


@dataclass
class SynthSlide:
    """One synthetic slide: label and RGB functions of level-0 coordinates.

    ``index`` selects the slide within a cohort; ``required`` are classes guaranteed to be present
    (placed as large islands); other classes of ``classes`` appear at random.
    """

    seed: int
    index: int
    size: int
    mpp: float = 0.5
    classes: tuple[int, ...] | None = None
    required: tuple[int, ...] = ()
    lowres_step: int = field(init=False)
    seeds: np.ndarray = field(init=False, repr=False)  # (N, 2) xy
    seed_class: np.ndarray = field(init=False, repr=False)
    seed_var: np.ndarray = field(init=False, repr=False)
    islands: np.ndarray = field(init=False, repr=False)  # (K, 3) x, y, r
    island_class: np.ndarray = field(init=False, repr=False)
    island_var: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        S = int(self.size)
        if S < 64:
            raise ValueError(f"synthetic slide size must be >= 64 px, got {S}")
        if not self.mpp > 0:
            raise ValueError(f"mpp must be positive, got {self.mpp}")
        self.px = 0.5 / self.mpp  # texture scale: sizes are defined at 0.5 µm/px
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(self.index), 0x5EED])
        self._k = _key(self.seed, self.index)
        self.lowres_step = int(min(16, max(4, S // 256)))
        # tissue: jittered ellipse with noisy outline
        self.cx, self.cy = S * (0.5 + rng.uniform(-0.06, 0.06, 2))
        self.rx, self.ry = S * rng.uniform(0.32, 0.4, 2)
        self.hole_thr = float(rng.uniform(1.75, 2.05))
        # stain (per-slide jitter)
        self.h_od = (_BASE_H * rng.uniform(0.88, 1.12, 3) * rng.uniform(0.8, 1.15)).astype(np.float32)
        self.e_od = (_BASE_E * rng.uniform(0.85, 1.15, 3) * rng.uniform(0.8, 1.2)).astype(np.float32)
        self.white = np.clip(rng.uniform(236, 250) + rng.uniform(-4, 4, 3), 225, 253).astype(np.float32)
        # classes present
        if self.classes is None:
            present = set(self.required) or {int(rng.integers(1, N_CLASSES + 1))}
            for c in range(1, N_CLASSES + 1):
                if rng.random() < 0.5:
                    present.add(c)
            if len(present) < 2:
                present.add(int(rng.choice([c for c in range(1, N_CLASSES + 1) if c not in present])))
            self.classes = tuple(sorted(present))
        cls = np.array(self.classes, np.int64)
        # Voronoi seeds (inside the tissue where possible)
        n_seeds = int(rng.integers(9, 16))
        pts = self._tissue_points(rng, n_seeds)
        weights = np.array([{TUM: 3.0, STR: 3.0, LYM: 0.7, NEC: 1.2}[int(c)] for c in cls])
        sc = rng.choice(cls, size=n_seeds, p=weights / weights.sum())
        sc[: len(cls)] = rng.permutation(cls)[: min(len(cls), n_seeds)]  # every present class gets a seed
        self.seeds = pts.astype(np.float32)
        self.seed_class = sc.astype(np.uint8)
        self.seed_var = rng.integers(0, 2, n_seeds).astype(np.uint8)
        # islands: required classes as big islands, then small aggregates (lymphocytes, necrosis, nests)
        isl, icls = [], []
        for c in self.required:
            isl.append(S * rng.uniform(0.07, 0.09))
            icls.append(c)
        n_small = int(rng.integers(3, 9))
        wsmall = np.array([{TUM: 0.6, STR: 0.2, LYM: 2.0, NEC: 1.0}[int(c)] for c in cls])
        for c in rng.choice(cls, size=n_small, p=wsmall / wsmall.sum()):
            isl.append(S * rng.uniform(0.03, 0.06))
            icls.append(int(c))
        ipts = self._tissue_points(rng, len(isl), spread=0.7)
        self.islands = np.column_stack([ipts, np.array(isl, np.float64)]).astype(np.float32)
        self.island_class = np.array(icls, np.uint8)
        self.island_var = rng.integers(0, 2, len(isl)).astype(np.uint8)
        self.region_class = np.concatenate([self.seed_class, self.island_class])
        self.region_var = np.concatenate([self.seed_var, self.island_var])
        self._lowres: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        max_sigma = max(max(sx, sy) for _, sx, sy, _ in _NUCLEUS_TYPES.values())
        self._margin = math.ceil(4.0 * max_sigma * self.px) + 2  # cv2 kernel radius is 4 sigma

    # ---- continuous fields -------------------------------------------------------------------
    def _tissue_points(self, rng: np.random.Generator, n: int, spread: float = 1.0) -> np.ndarray:
        out = []
        for _ in range(n):
            for _try in range(50):
                a, r = rng.uniform(0, 2 * np.pi), spread * math.sqrt(rng.uniform(0, 1))
                x, y = self.cx + r * self.rx * math.cos(a), self.cy + r * self.ry * math.sin(a)
                if self._tissue(_Grid(x - 0.5, y - 0.5, 1, 1))[0, 0]:
                    break
            out.append((x, y))
        return np.array(out, np.float64).reshape(n, 2)

    def _shape_exact(self, g: _Grid) -> np.ndarray:
        """(4, h, w): tissue score (> 0 is tissue), hole score, x and y warp of the region field."""
        S, k, px = self.size, self._k, self.px
        xs, ys = g.xs(), g.ys()
        r2 = ((xs[None, :] - self.cx) / self.rx) ** 2 + ((ys[:, None] - self.cy) / self.ry) ** 2
        # keep a margin of glass around the section: fade out over the outer 6 % of the slide
        ex = np.clip(np.minimum(xs, S - xs) / (0.06 * S), 0, 1)
        ey = np.clip(np.minimum(ys, S - ys) / (0.06 * S), 0, 1)
        out = np.empty((4, g.h, g.w), np.float32)
        out[0] = (
            1.0
            - r2
            - 2.0 * (1.0 - ey[:, None] * ex[None, :])
            + 0.33 * _noise(k + 1, g, S / 3.5)
            + 0.16 * _noise(k + 2, g, S / 9)
            + 0.04 * _noise(k + 3, g, S / 30)
            + 0.012 * _noise(k + 4, g, 24 * px)
        )
        out[1] = _noise(k + 5, g, S / 16) + 0.3 * _noise(k + 6, g, S / 50) + 0.12 * _noise(k + 7, g, 20 * px)
        for i in (0, 1):
            out[2 + i] = (
                0.07 * S * _noise(k + 11 + i, g, S / 4)
                + 0.025 * S * _noise(k + 13 + i, g, S / 14)
                + 0.008 * S * _noise(k + 17 + i, g, S / 40)
                + 5 * px * _noise(k + 15 + i, g, 40 * px)
            )
        return out

    def _shape(self, g: _Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tissue mask, warped x, warped y); full-resolution grids use 4-px coarse sampling."""
        if g.step == 1:
            f = _coarse(g, lambda gc: np.moveaxis(self._shape_exact(gc), 0, -1), factor=4)
            f = np.moveaxis(f, -1, 0)
        else:
            f = self._shape_exact(g)
        tissue = (f[0] > 0) & (f[1] < self.hole_thr)
        return tissue, g.xs()[None, :] + f[2], g.ys()[:, None] + f[3]

    def _tissue(self, g: _Grid) -> np.ndarray:
        return self._shape(g)[0]

    def _regions(self, wx: np.ndarray, wy: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
        """Region id per warped sample (seed index, or N + island index), ignoring tissue."""
        n_seeds = len(self.seeds)
        seed_ids = np.arange(n_seeds) if candidates is None else candidates[candidates < n_seeds]
        isl_ids = (
            np.arange(len(self.islands))
            if candidates is None
            else candidates[candidates >= n_seeds] - n_seeds
        )
        if len(seed_ids) == 0:
            seed_ids = np.arange(n_seeds)
        best_d = np.full(wx.shape, np.inf, np.float32)
        region = np.zeros(wx.shape, np.uint8)
        for i in seed_ids:
            d = (wx - self.seeds[i, 0]) ** 2 + (wy - self.seeds[i, 1]) ** 2
            closer = d < best_d
            best_d = np.where(closer, d, best_d)
            region[closer] = i
        for j in sorted(isl_ids.tolist(), reverse=True):  # required islands (first) are drawn last
            x, y, r = self.islands[j]
            inside = (wx - x) ** 2 + (wy - y) ** 2 < r * r
            region[inside] = n_seeds + j
        return region

    def _lumens(self, g: _Grid) -> np.ndarray:
        """Opacity (0..1) of gland lumens: white holes in glandular tumour, ~7 % of its area."""
        k, px = self._k, self.px
        v = _noise(k + 21, g, 24 * px) + 0.35 * _noise(k + 22, g, 9 * px)
        return np.clip((v - 1.6) * 5.0, 0.0, 1.0)

    def _candidates(self, x0: float, y0: float, w: int, h: int) -> np.ndarray:
        ids, _, _ = self.lowres()
        s = self.lowres_step
        m = 3
        r0, r1 = max(0, int(y0 // s) - m), min(ids.shape[0], int((y0 + h) // s) + m + 1)
        c0, c1 = max(0, int(x0 // s) - m), min(ids.shape[1], int((x0 + w) // s) + m + 1)
        win = ids[r0:r1, c0:c1]
        return np.unique(win) if win.size else np.arange(len(self.region_class))

    def _label_fields(self, g: _Grid, candidates: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        tissue, wx, wy = self._shape(g)
        region = self._regions(wx, wy, candidates)
        cls = self.region_class[region]
        var = self.region_var[region]
        cls[~tissue] = 0
        return cls, var

    # ---- public sampling ---------------------------------------------------------------------
    def lowres(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(region ids, class labels, variants) sampled every ``lowres_step`` px (cached)."""
        if self._lowres is None:
            s = self.lowres_step
            n = -(-self.size // s)
            ids = np.empty((n, n), np.uint8)
            cls = np.empty((n, n), np.uint8)
            band = 128
            for r in range(0, n, band):
                g = _Grid(0, r * s, n, min(band, n - r), s)
                tissue, wx, wy = self._shape(g)
                region = self._regions(wx, wy)
                ids[r : r + g.h] = region
                c = self.region_class[region]
                c[~tissue] = 0
                cls[r : r + g.h] = c
            self._lowres = (ids, cls, self.region_var[ids])
        return self._lowres

    def labels(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Ground-truth uint8 labels (0 background, 1..4 :data:`SYNTH_CLASSES`) of a level-0 region."""
        cls, _ = self._label_fields(_Grid(x, y, w, h), self._candidates(x, y, w, h))
        return cls

    def render(self, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 (h, w, 3), labels uint8 (h, w)) of a level-0 region.

        Everything but a faint per-region grain is a function of level-0 coordinates, so regions
        rendered separately tile seamlessly; the grain is seeded by (seed, slide, x, y).
        """
        px = self.px
        M = self._margin
        gp = _Grid(x - M, y - M, w + 2 * M, h + 2 * M)
        cls_p, var_p = self._label_fields(gp, self._candidates(gp.x0, gp.y0, gp.w, gp.h))
        k = self._k
        crop = (slice(M, M + h), slice(M, M + w))
        cls, var = cls_p[crop], var_p[crop]
        g = _Grid(x, y, w, h)
        idx = cls * np.uint8(2) + var
        tex = np.take(_TEX_T.ravel(), idx)
        E = np.take(_E_T.ravel(), idx)
        Hd = np.take(_HD_T.ravel(), idx)
        rng = np.random.default_rng(
            [int(self.seed) & 0xFFFFFFFF, self.index, int(x) & 0xFFFFFFFF, int(y) & 0xFFFFFFFF, 7]
        )
        grain = cv2.GaussianBlur(rng.standard_normal((h, w), np.float32), (0, 0), 0.8 * px)
        present = set(np.flatnonzero(np.bincount(tex.ravel(), minlength=8)).tolist())

        # eosin textures, evaluated only when the class variant is in this region
        if _TEX_FIBRE_H in present or _TEX_FIBRE_V in present:
            wav = _coarse(
                g, lambda gc: 14 * px * _noise(k + 31, gc, 70 * px) + 40 * px * _noise(k + 32, gc, 260 * px)
            )
            wav += 3 * px * _noise(k + 33, g, 18 * px)
            lam = np.float32(2 * np.pi / (11.0 * px))
            for code, coord, streak in (
                (_TEX_FIBRE_H, g.ys()[:, None], (90 * px, 5 * px)),
                (_TEX_FIBRE_V, g.xs()[None, :], (5 * px, 90 * px)),
            ):
                if code in present:
                    sines = np.sin((coord + wav) * lam)
                    br = _noise(k + 34 + code, g, streak[0], streak[1])
                    f = np.clip(0.62 + 0.28 * sines + 0.3 * br, 0.12, 1.25)
                    sel = tex == code
                    E[sel] *= f[sel]
        if _TEX_GRANULAR in present or _TEX_DIRTY in present:
            gr = _noise(k + 41, g, 3.5 * px) + 0.5 * _noise(k + 42, g, 12 * px)
            pale = _noise(k + 43, g, 18 * px) > 1.2  # clefts of cell-free debris
            for code, amp in ((_TEX_GRANULAR, 0.35), (_TEX_DIRTY, 0.22)):
                if code in present:
                    sel = tex == code
                    f = np.clip(1.0 + amp * gr, 0.2, 1.8)
                    f[pale] *= 0.45
                    E[sel] *= f[sel]
                    Hd[sel] *= f[sel]
        lumen = None
        if _TEX_GLAND in present:
            sel = tex == _TEX_GLAND
            f = 1.0 + 0.15 * _noise(k + 51, g, 30 * px)
            E[sel] *= f[sel]
            lumen = np.where(sel, self._lumens(g), np.float32(0.0))

        # nuclei: impulses on hashed jittered grids, blurred into blobs on the padded region
        nuc = None
        pidx = cls_p * np.uint8(2) + var_p
        pidx_present = np.bincount(pidx.ravel(), minlength=2 * (N_CLASSES + 1)) > 0
        for t_i, (tname, (spacing, sx, sy, jit)) in enumerate(_NUCLEUS_TYPES.items()):
            prob = _NUC_PROB[tname].ravel()
            if not prob[pidx_present].any():
                continue
            gsp = spacing * px
            kx = np.arange(math.floor(gp.x0 / gsp) - 1, math.floor((gp.x0 + gp.w) / gsp) + 2)
            ky = np.arange(math.floor(gp.y0 / gsp) - 1, math.floor((gp.y0 + gp.h) / gsp) + 2)
            kt = k + 100 * (t_i + 1)
            u = _hash_u01(kt, ky[:, None, None], kx[None, :, None] * 4 + np.arange(4)[None, None, :])
            lo = 0.5 - jit / 2
            cxs = np.floor((kx[None, :] + lo + jit * u[..., 0]) * gsp - gp.x0).astype(np.int64).ravel()
            cys = np.floor((ky[:, None] + lo + jit * u[..., 1]) * gsp - gp.y0).astype(np.int64).ravel()
            ua, up = u[..., 2].ravel(), u[..., 3].ravel()
            ok = (cxs >= 0) & (cxs < gp.w) & (cys >= 0) & (cys < gp.h)
            cxs, cys, ua, up = cxs[ok], cys[ok], ua[ok], up[ok]
            keep = up < prob[pidx[cys, cxs]]
            if not keep.any():
                continue
            canvas = np.zeros((gp.h, gp.w), np.float32)
            np.add.at(canvas, (cys[keep], cxs[keep]), 0.75 + 0.6 * ua[keep])
            sxp, syp = sx * px, sy * px
            blob = cv2.GaussianBlur(canvas, (0, 0), sigmaX=sxp, sigmaY=syp)[crop]
            blob = np.clip(blob * np.float32(2 * np.pi * sxp * syp * 4.0) - 1.2, 0.0, 1.0)
            nuc = blob if nuc is None else np.maximum(nuc, blob)
        if lumen is not None:
            clear = 1.0 - lumen
            E *= 0.05 + 0.95 * clear
            Hd *= clear
            if nuc is not None:
                nuc *= clear
        Hc = Hd
        if nuc is not None:
            chromatin = 0.82 + 0.1 * _noise(k + 61, g, 2.5 * px) + 0.1 * grain
            Hc = Hd + nuc * np.take(_HN_T.ravel(), idx) * chromatin
        E *= 1.0 + 0.06 * grain

        rgb = np.empty((h, w, 3), np.uint8)
        for ch in range(3):
            v = np.exp(-(Hc * self.h_od[ch] + E * self.e_od[ch])) * self.white[ch] + 1.5 * grain
            rgb[..., ch] = np.clip(v, 0, 255)
        return rgb, cls


# ------------------------------------------------------------------------------- annotations ---
def _annotations(slide: SynthSlide, rng: np.random.Generator) -> tuple[list[Annotation], list[list[float]]]:
    """QuPath annotations as a pathologist draws them, and the dense areas (cx, cy, r) among them.

    Two kinds, both from the low-resolution label field (the same functions as the truth):

    * rough outlines: a random 50-70 % of each class's regions, eroded and simplified. When none of the
      chosen regions survives the erosion, the other regions are tried, then a lighter erosion, so every
      class present on the slide is annotated when it has any sizeable region;
    * dense areas (:func:`_dense_areas`): 3-4 elliptic areas where classes meet, annotated class by class
      along the true boundaries. Eroded outlines never reach across a class boundary, so without these
      every labelled tile would carry one label and the CAMs would have nothing to localise.
    """
    _, cls_low, _ = slide.lowres()
    s, S = slide.lowres_step, slide.size
    erode = S * rng.uniform(0.02, 0.03)
    tol = S * 0.004
    min_area = (0.02 * S) ** 2
    out: list[Annotation] = []
    geoms = mask_to_geometries(cls_low, range(1, N_CLASSES + 1), scale=s)
    for c, geom in geoms.items():
        regions = sorted(getattr(geom, "geoms", [geom]), key=lambda p: -p.area)
        frac = rng.uniform(0.5, 0.7)
        chosen = [i for i in range(len(regions)) if rng.random() < frac]
        rest = [i for i in range(len(regions)) if i not in chosen]
        polys: list = []
        for subset, e in ((chosen, erode), (rest, erode), (range(len(regions)), erode / 2)):
            for i in subset:
                g = clean_polygonal(regions[i].buffer(-e, join_style="round").simplify(tol))
                polys.extend(p for p in getattr(g, "geoms", [g]) if p.area >= min_area)
            if polys:
                break
        name, color = SYNTH_CLASSES[c - 1]
        out.extend(Annotation(name=name, color=color, geometry=p) for p in polys)
    dense, areas = _dense_areas(slide, rng, cls_low, geoms)
    return out + dense, areas


def _dense_areas(
    slide: SynthSlide, rng: np.random.Generator, cls_low: np.ndarray, geoms: dict
) -> tuple[list[Annotation], list[list[float]]]:
    """Every class inside 3-4 areas centred where two or more classes meet (junctions of three first).

    Inside an area the outlines follow the truth (lightly simplified), as BCSS-style region annotation
    does, so a tile there is labelled with every class it holds. Slivers thinner than a few low-res
    pixels are dropped: they are where the low-res field and the full-resolution truth disagree.
    """
    import shapely
    from shapely import affinity
    from shapely.geometry import Point

    s, S = slide.lowres_step, slide.size
    r_low = max(1, round(0.04 * S / s))
    kernel = np.ones((2 * r_low + 1, 2 * r_low + 1), np.uint8)
    n_near = sum(
        (cv2.dilate((cls_low == c).astype(np.uint8), kernel) > 0).astype(np.int32)
        for c in range(1, N_CLASSES + 1)
    )
    ys, xs = np.nonzero((n_near >= 2) & (cls_low > 0))
    if len(ys) == 0:
        return [], []
    order = np.lexsort((rng.random(len(ys)), -n_near[ys, xs]))
    n_areas, radius = int(rng.integers(3, 5)), S * rng.uniform(0.12, 0.16)
    centres: list[tuple[float, float]] = []
    for j in order:
        cx, cy = (xs[j] + 0.5) * s, (ys[j] + 0.5) * s
        if all(math.hypot(cx - x, cy - y) >= 2 * radius for x, y in centres):
            centres.append((cx, cy))
            if len(centres) == n_areas:
                break
    out: list[Annotation] = []
    areas: list[list[float]] = []
    for cx, cy in centres:
        squash = rng.uniform(0.8, 1.25)
        area = affinity.rotate(
            affinity.scale(Point(cx, cy).buffer(radius, quad_segs=16), squash, 1 / squash),
            rng.uniform(0, 180),
        )
        areas.append([round(float(cx), 1), round(float(cy), 1), round(radius * max(squash, 1 / squash), 1)])
        for c, geom in geoms.items():
            piece = clean_polygonal(shapely.intersection(geom, area).simplify(S * 0.0015))
            name, color = SYNTH_CLASSES[c - 1]
            for p in getattr(piece, "geoms", [piece]):
                if p.area >= (0.03 * S) ** 2 and not p.buffer(-2 * s).is_empty:
                    out.append(Annotation(name=name, color=color, geometry=p))
    return out, areas


# -------------------------------------------------------------------------------- file utils ---


def _palette_png(labels: np.ndarray, palette: list[tuple[int, int, int]]) -> bytes:
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [v for rgb in palette for v in rgb]
    im.putpalette(flat + [0] * (768 - len(flat)))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _rgb_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


THUMB_PALETTE = [(255, 255, 255)] + [c for _, c in SYNTH_CLASSES]


def _required(i: int, n: int) -> tuple[int, ...]:
    """Classes slide i must contain so that every class appears in a cohort of n slides."""
    return tuple(c for c in range(1, N_CLASSES + 1) if (c - 1) % n == i % n and i < N_CLASSES)


@contextlib.contextmanager
def _single_thread_blas() -> Iterator[None]:
    """The noise fields are many tiny matmuls: multi-threaded BLAS only adds contention there."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


# ------------------------------------------------------------------------------------ cohort ---
def write_cohort(
    out: Path,
    n_slides: int,
    size: int,
    seed: int,
    mpp: float = 0.5,
    progress: Callable[[int], None] | None = None,
    *,
    tile: int = 256,
    quality: int = 85,
) -> dict:
    """Write a synthetic cohort (slides, truth masks, coarse annotations, labels.csv, cohort.json).

    Same arguments give byte-identical files. ``progress(k)`` is called after the k-th slide.
    Returns the cohort dictionary also written to ``out/cohort.json`` (paths relative to ``out``).
    """
    out = Path(out)
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    with _single_thread_blas():
        return _write_cohort(out, n_slides, size, seed, mpp, progress, tile, quality)


def _write_cohort(
    out: Path,
    n_slides: int,
    size: int,
    seed: int,
    mpp: float,
    progress: Callable[[int], None] | None,
    tile: int,
    quality: int,
) -> dict:
    for d in ("slides", "truth", "annotations"):
        (out / d).mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in SYNTH_CLASSES]
    slides = []
    for i in range(n_slides):
        sid = f"synth_{i:03d}"
        sl = SynthSlide(seed=seed, index=i, size=size, mpp=mpp, required=_required(i, n_slides))
        counts = np.zeros(256, np.int64)

        def mask_tile(
            x: int, y: int, w: int, h: int, sl: SynthSlide = sl, counts: np.ndarray = counts
        ) -> np.ndarray:
            lab = sl.labels(x, y, w, h)
            counts[:] += np.bincount(lab.ravel(), minlength=256)
            return lab

        mask_path = out / "truth" / f"{sid}.mask.tif"
        shapes = write_pyramid(
            mask_path, mask_tile, (size, size), mpp, kind="labels", tile=tile,
            class_names=names, class_colors=[c for _, c in SYNTH_CLASSES],
        )  # fmt: skip
        write_pyramid(
            out / "slides" / f"{sid}.tif", lambda x, y, w, h, sl=sl: sl.render(x, y, w, h)[0], (size, size), mpp,
            kind="rgb", tile=tile, quality=quality,
        )  # fmt: skip
        with tifffile.TiffFile(mask_path) as tf:
            thumb = tf.pages[len(shapes) - 1].asarray()
        atomic_write_bytes(out / "truth" / f"{sid}.thumb.png", _palette_png(thumb, THUMB_PALETTE))
        ann, dense = _annotations(sl, np.random.default_rng([int(seed) & 0xFFFFFFFF, i, 0xA77]))
        write_annotations(out / "annotations" / f"{sid}.geojson", ann, id_seed=f"pbip-synth/{seed}/{sid}")
        total = int(counts[1 : N_CLASSES + 1].sum())
        slides.append(
            {
                "id": sid,
                "slide": f"slides/{sid}.tif",
                "mask": f"truth/{sid}.mask.tif",
                "thumb": f"truth/{sid}.thumb.png",
                "annotations": f"annotations/{sid}.geojson",
                "labels": [int(counts[c] > 0) for c in range(1, N_CLASSES + 1)],
                "class_fraction": [
                    round(float(counts[c]) / max(total, 1), 6) for c in range(1, N_CLASSES + 1)
                ],
                "tissue_fraction": round(total / float(size * size), 6),
                "n_annotations": len(ann),
                "annotated_classes": sorted({a.name for a in ann}),
                "dense_areas": dense,  # [cx, cy, r]: areas annotated class by class (r bounds the ellipse)
            }
        )
        if progress is not None:
            progress(i + 1)
    missing = set(names) - {n for s in slides for n in s["annotated_classes"]}
    if missing:
        raise RuntimeError(f"synthetic cohort (seed {seed}) has no annotation for classes {sorted(missing)}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide", *names])
    for s in slides:
        w.writerow([s["id"], *s["labels"]])
    atomic_write_bytes(out / "labels.csv", buf.getvalue().encode())
    cohort = {
        "format": "pbip-synth-cohort",
        "version": 1,
        "classes": [{"name": n, "color": list(c)} for n, c in SYNTH_CLASSES],
        "background": 0,
        "mpp": mpp,
        "size": size,
        "seed": seed,
        "labels_csv": "labels.csv",
        "slides": slides,
    }
    atomic_write_bytes(out / "cohort.json", (json.dumps(cohort, indent=1, sort_keys=True) + "\n").encode())
    return cohort


# --------------------------------------------------------------------------------- patch set ---
def _label_suffix(labels: list[int], style: str) -> str:
    if style == "bcss":
        return "[" + "".join(str(v) for v in labels) + "]"
    return "-[" + " ".join(str(v) for v in labels) + "]"


def write_patch_set(
    out: Path,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    patch: int = 224,
    *,
    label_style: Literal["bcss", "luad"] = "bcss",
    mpp: float = 0.5,
    slide_size: int = 2048,
) -> dict:
    """Write a BCSS-WSSS-style patch set cut from small in-memory synthetic slides.

    Layout: ``training/<name>[1010].png`` (``label_style="luad"``: ``<name>-[1 0 1 0].png``), label
    order = :data:`SYNTH_CLASSES` = BCSS order [TUM, STR, LYM, NEC]; ``val|test/img/<name>.png`` and
    ``val|test/mask/<name>.png``, palettised with :data:`BCSS_PALETTE`, values 0-3 = classes, 4 = BACK
    (our background 0). Splits come from disjoint slides. Every patch is >= 50 % tissue with >= 1 class.
    """
    out = Path(out)
    if label_style not in ("bcss", "luad"):
        raise ValueError(f"label_style must be 'bcss' or 'luad', got {label_style!r}")
    if patch < 16 or slide_size < patch:
        raise ValueError(f"need 16 <= patch <= slide_size, got patch={patch}, slide_size={slide_size}")
    with _single_thread_blas():
        return _write_patch_set(out, n_train, n_val, n_test, seed, patch, label_style, mpp, slide_size)


def _write_patch_set(
    out: Path,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    patch: int,
    label_style: str,
    mpp: float,
    slide_size: int,
) -> dict:
    dirs = {"train": out / "training", "val": out / "val", "test": out / "test"}
    dirs["train"].mkdir(parents=True, exist_ok=True)
    for sp in ("val", "test"):
        (dirs[sp] / "img").mkdir(parents=True, exist_ok=True)
        (dirs[sp] / "mask").mkdir(parents=True, exist_ok=True)
    result: dict = {
        "classes": [n for n, _ in SYNTH_CLASSES],
        "background_index": 4,
        "palette": [list(c) for c in BCSS_PALETTE],
        "label_style": label_style,
        "patch": patch,
    }
    for split_i, (split, n_want) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        items: list[dict] = []
        slide_i = 0
        while len(items) < n_want:
            if slide_i > 50 + n_want:
                raise RuntimeError(f"could not cut {n_want} {split} patches (seed {seed})")
            sl = SynthSlide(seed=seed, index=1000 * (split_i + 1) + slide_i, size=slide_size, mpp=mpp)
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, split_i, slide_i, 0xBA7C])
            n_grid = slide_size // patch
            cells = [(r, c) for r in range(n_grid) for c in range(n_grid)]
            for r, c in (cells[j] for j in rng.permutation(len(cells))):
                if len(items) >= n_want:
                    break
                x, y = c * patch, r * patch
                lab = sl.labels(x, y, patch, patch)
                if (lab > 0).mean() < 0.5:
                    continue
                rgb, lab = sl.render(x, y, patch, patch)
                present = [int((lab == k).any()) for k in range(1, N_CLASSES + 1)]
                if not any(present):
                    continue
                name = f"synth{split}_{slide_i:03d}_x{x}_y{y}"
                if split == "train":
                    fname = name + _label_suffix(present, label_style) + ".png"
                    atomic_write_bytes(dirs["train"] / fname, _rgb_png(rgb))
                    items.append({"file": f"training/{fname}", "labels": present})
                else:
                    bcss = np.where(lab == 0, 4, lab.astype(np.int16) - 1).astype(np.uint8)
                    atomic_write_bytes(dirs[split] / "img" / f"{name}.png", _rgb_png(rgb))
                    atomic_write_bytes(dirs[split] / "mask" / f"{name}.png", _palette_png(bcss, BCSS_PALETTE))
                    items.append(
                        {
                            "file": f"{split}/img/{name}.png",
                            "mask": f"{split}/mask/{name}.png",
                            "labels": present,
                        }
                    )
            slide_i += 1
        result[split] = items
    return result
