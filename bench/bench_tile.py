"""Tile-stage throughput: the whole Ray stage vs a plain read_region loop, cuCIM vs tiffslide, 1 vs 2 workers.

    python bench/bench_tile.py --slides 4 --size 6144            # synthetic cohort
    python bench/bench_tile.py --real ../shared/data/wsi          # + the real slides (TCGA needs an mpp)
    python bench/bench_tile.py --slides 8 --size 16384 --cohort /tmp/big   # ~17k tiles, cohort kept

The plain loop opens each slide with the same backend, plans the same tiles (tissue detection is
done outside the timer) and calls ``read_region`` once per tile: the floor any tiler pays. The stage
adds labels, JPEG encoding, Parquet writing and Ray scheduling. Figures are ratios within one run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import pbip_engine  # noqa: F401  (loads cuCIM before torch)

TILE_MPP, TILE_PX = 0.5, 224


def _plan(path: str, backend: str, mpp_override: float | None):
    from pbip_engine.engine.slides import open_slide
    from pbip_engine.engine.tiling import TileGridParams, plan_tiles
    from pbip_engine.engine.tissue import TissueParams, detect_tissue

    slide = open_slide(path, mpp_override=mpp_override, backends=(backend,))
    tiles = plan_tiles(
        slide, detect_tissue(slide, TissueParams()), TileGridParams(mpp=TILE_MPP, tile_px=TILE_PX)
    )
    return slide, tiles


def _plain_one(args: tuple[str, str, float | None]) -> tuple[int, float]:
    import cv2

    path, backend, mpp = args
    slide, tiles = _plan(path, backend, mpp)
    t0 = time.perf_counter()
    for t in tiles:
        region = slide.read_region((t.x, t.y), t.level, (t.read_size, t.read_size))
        cv2.resize(region, (TILE_PX, TILE_PX), interpolation=cv2.INTER_AREA)
    return len(tiles), time.perf_counter() - t0


def plain_loop(slides: list[tuple[str, float | None]], backend: str, procs: int) -> float:
    """tiles/s of bare read_region over the same tile lists, ``procs`` processes."""
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    with ctx.Pool(procs) as pool:
        res = pool.map(_plain_one, [(p, backend, m) for p, m in slides])
    wall = time.perf_counter() - t0
    read_s = sum(r[1] for r in res) / procs  # exclude process start-up and tissue detection
    return sum(r[0] for r in res) / min(read_s, wall)


def stage(slides: list[tuple[str, float | None]], backend: str, cpus: int, out: Path) -> tuple[float, int]:
    """tiles/s of the real ``tile`` stage on a local Ray with ``cpus`` CPUs (Ray start excluded)."""
    import csv

    import ray

    from pbip_engine.jobs.driver import run_pipeline
    from pbip_engine.schemas.spec import parse_spec

    overrides = out / "mpp.csv"
    with overrides.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "mpp"])
        for p, m in slides:
            if m:
                w.writerow([Path(p).name, m])
    raw = {
        "run": {"name": "bench", "output": str(out / f"run-{backend}-{cpus}")},
        "data": {"slides": [p for p, _ in slides], "mpp_overrides": str(overrides)},
        "classes": [{"name": "tissue", "color": [255, 0, 0]}],
        "tiling": {"mpp": TILE_MPP, "tile_px": TILE_PX, "backends": [backend]},
        "resources": {"workers": cpus, "cpus_per_worker": 1, "local_cpus": cpus},
    }
    spec = parse_spec(raw, out)
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
    try:
        t0 = time.perf_counter()
        summary = run_pipeline(spec, only=["tile"], log=lambda s: None, progress=False)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    n = summary.stages["tile"]["counts"]["tiles"]
    return n / wall, n


def _matches(meta: Path, slides: int, size: int) -> bool:
    import json

    m = json.loads(meta.read_text())
    return len(m["slides"]) == slides and m["size"] == size and m["seed"] == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", type=int, default=6144)
    ap.add_argument("--real", type=Path, default=None, help="folder with the real slides")
    ap.add_argument("--backends", default="cucim,tiffslide")
    ap.add_argument("--cohort", type=Path, default=None,
                    help="keep the synthetic cohort here and reuse it when it matches --slides/--size")  # fmt: skip
    args = ap.parse_args()
    from pbip_engine.engine.synth import write_cohort

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth = args.cohort or tmp / "synth"
        meta = synth / "cohort.json"
        if not (meta.is_file() and _matches(meta, args.slides, args.size)):
            t0 = time.perf_counter()
            write_cohort(synth, args.slides, args.size, seed=0)
            print(f"synthetic cohort: {args.slides} x {args.size}² in {time.perf_counter() - t0:.0f} s")
        cohorts = {"synthetic": [(str(p), None) for p in sorted((synth / "slides").glob("*.tif"))]}
        if args.real:
            real = [
                (str(p), 0.25 if p.name.startswith("tcga") else None) for p in sorted(args.real.glob("*.svs"))
            ]
            real += [(str(p), None) for p in sorted(args.real.glob("*.tif"))]
            cohorts["real"] = real
        print(f"tile {TILE_PX}px at {TILE_MPP} µm/px; cores={mp.cpu_count()}")
        print(
            f"{'cohort':<10} {'backend':<10} {'plain 1p':>9} {'stage 1w':>9} {'ratio':>6} {'plain 2p':>9} "
            f"{'stage 2w':>9} {'ratio':>6} {'2w/1w':>6}"
        )
        for name, slides in cohorts.items():
            for backend in args.backends.split(","):
                p1 = plain_loop(slides, backend, 1)
                s1, n = stage(slides, backend, 1, tmp)
                p2 = plain_loop(slides, backend, 2)
                s2, _ = stage(slides, backend, 2, tmp)
                print(
                    f"{name:<10} {backend:<10} {p1:9.0f} {s1:9.0f} {s1 / p1:6.2f} {p2:9.0f} {s2:9.0f} "
                    f"{s2 / p2:6.2f} {s2 / s1:6.2f}   ({n} tiles, {len(slides)} slides)"
                )


if __name__ == "__main__":
    main()
