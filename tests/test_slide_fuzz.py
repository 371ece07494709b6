"""Fuzz test (issue 20): flipped, zeroed and truncated bytes of a real tiled TIFF and SVS, through the
tile and segment paths, in a subprocess with an address-space limit and a per-case alarm.

Every case must end as ``done`` or ``failed`` with a reason: never an exception out of the paths, a
MemoryError under the limit, a hang, or a dead process. A ``done`` case whose mutation could not change
what the reader sees (the first bytes after the last tile) must be identical to the clean file's output.
Bit flips inside compressed JPEG data decode to other pixels in every decoder without an error (JPEG
carries no checksum), so such a case may legitimately finish with different pixels: the test reports
how many did, and requires the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from wsi_synth import he_like, write_pyramid

HERE = Path(__file__).resolve().parent
SVS = Path("/work/shared/data/wsi/CMU-1-Small-Region.svs")
N_MUTATIONS = 14  # per file
MEMORY_GB = 1.5  # beyond what the interpreter has mapped after its imports
CASE_SECONDS = 60


def _mutations(data: bytes, rng: np.random.Generator, n: int) -> list[tuple[str, bytes, list[int]]]:
    """(name, mutated bytes, changed offsets) - a truncation changes no offset but removes the tail."""
    out = []
    for i in range(n):
        kind = ("flip-header", "flip", "zero", "truncate")[i % 4]
        b = bytearray(data)
        if kind == "flip-header":  # the first bytes: the TIFF header, and the first IFD or tile
            at = [int(rng.integers(0, min(len(b), 512)))]
            b[at[0]] ^= 1 << int(rng.integers(0, 8))
        elif kind == "flip":
            at = sorted(int(a) for a in rng.integers(0, len(b), 4))
            for a in at:
                b[a] ^= 0xFF
        elif kind == "zero":
            start = int(rng.integers(0, len(b) - 256))
            at = list(range(start, start + 256))
            b[start : start + 256] = bytes(256)
        else:
            at = []
            b = b[: int(rng.integers(8, len(b)))]
        out.append((f"{i:02d}-{kind}", bytes(b), at))
    return out


def _tile_data_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of the compressed tiles of every page (JPEG data: no checksum to catch a flip)."""
    import tifffile

    with tifffile.TiffFile(path) as t:
        return [
            (o, o + n) for page in t.pages for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)
        ]


@pytest.mark.slow
def test_mutated_slides_end_done_or_failed_never_crash(tmp_path: Path) -> None:
    rng = np.random.default_rng(20)
    tif = write_pyramid(tmp_path / "base.tif", he_like(768, 768, [(250, 250, 160), (520, 500, 180)]),
                        mpp=1.0, n_levels=3, tile=128, compression="jpeg")  # fmt: skip
    bases = [tif] + ([SVS] if SVS.is_file() else [])
    files: list[Path] = []
    changed_at: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
    for base in bases:
        data = base.read_bytes()
        d = tmp_path / base.stem
        d.mkdir()
        files.append(d / f"clean{base.suffix}")
        files[-1].write_bytes(data)
        ranges = _tile_data_ranges(base)
        for name, blob, at in _mutations(data, rng, N_MUTATIONS):
            files.append(d / f"{name}{base.suffix}")
            files[-1].write_bytes(blob)
            changed_at[f"{d.name}/{files[-1].name}"] = (at, ranges)
    # The limit is on address space, not memory: glibc reserves a 64 MB arena per decoding thread, and after
    # a few dozen cases those reservations alone reached the cap and a native decoder died on a failed
    # malloc (SIGSEGV). Two arenas keep the reservations flat, so the cap bounds what the cases allocate.
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    r = subprocess.run(
        [sys.executable, str(HERE / "slide_fuzz_worker.py"), str(MEMORY_GB), str(CASE_SECONDS),
         *map(str, files)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert r.returncode == 0 and len(lines) == len(files), (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    results = {f"{f.parent.name}/{f.name}": rec for f, rec in zip(files, lines, strict=True)}
    report = []
    for key, rec in results.items():
        for what in ("tile", "segment"):
            res = rec[what]
            assert res["status"] in ("done", "failed"), (key, what, res)
            if res["status"] == "failed":
                assert res.get("reason"), (key, what, res)
        clean = results[f"{key.split('/')[0]}/clean{Path(key).suffix}"]
        assert clean["tile"]["status"] == clean["segment"]["status"] == "done", clean
        changed = [w for w in ("tile", "segment") if rec[w]["status"] == "done" and rec[w] != clean[w]]
        why = {w: rec[w].get("reason") for w in ("tile", "segment") if rec[w]["status"] == "failed"}
        report.append(f"{key}: tile {rec['tile']['status']}, segment {rec['segment']['status']}"
                      + (f", output differs: {changed}" if changed else "") + (f" {why}" if why else ""))  # fmt: skip
        if changed:  # only a flip inside compressed pixel data may pass unnoticed
            at, ranges = changed_at[key]
            assert at and all(any(lo <= a < hi for lo, hi in ranges) for a in at), (key, rec, at)
    print("\n".join(report))
    n_failed = sum(rec[w]["status"] == "failed" for rec in results.values() for w in ("tile", "segment"))
    assert n_failed > 0  # the mutations do reach the readers
