"""Tile-stage throughput: the whole Ray stage vs a plain read_region loop, cuCIM vs tiffslide, 1 vs 2 workers.

    python bench/bench_tile.py --slides 4 --size 6144            # synthetic cohort
    python bench/bench_tile.py --real ../shared/data/wsi          # + the real slides, 16 copies each
    python bench/bench_tile.py --slides 8 --size 16384 --cohort /tmp/big --repeat 3   # ~17k tiles, kept

The plain loop plans the same tiles (tissue detection outside its timer), then opens each slide with
the same backend and calls ``read_region`` once per tile, one slide per task: the floor any tiler pays. The stage
adds tissue detection, labels, JPEG encoding, Parquet writing, QC outputs and Ray scheduling. Process
start-up and imports are outside both timers (Ray's workers are started and warmed first). Each task
holds one CPU and so encodes inline.
Figures are ratios within one run; ``--repeat`` interleaves runs and prints the medians.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import pbip_engine  # noqa: F401  (loads cuCIM before torch)

TILE_MPP, TILE_PX = 0.5, 224


def _plan(path: str, backend: str, mpp_override: float | None):
    from pbip_engine.engine.wsi.slides import open_slide
    from pbip_engine.engine.wsi.tiling import TileGridParams, plan_tiles
    from pbip_engine.engine.wsi.tissue import TissueParams, detect_tissue

    slide = open_slide(path, mpp_override=mpp_override, backends=(backend,))
    tiles = plan_tiles(
        slide, detect_tissue(slide, TissueParams()), TileGridParams(mpp=TILE_MPP, tile_px=TILE_PX)
    )
    return slide, tiles


def _plan_list(args: tuple[str, str, float | None]) -> list:
    return _plan(*args)[1]


def _plain_one(args: tuple[str, str, float | None, list]) -> tuple[int, float, float]:
    """Open the slide and read its planned tiles; (n, start, end) on the system-wide monotonic clock."""
    import cv2

    from pbip_engine.engine.wsi.slides import open_slide

    path, backend, mpp, tiles = args
    t0 = time.monotonic()
    slide = open_slide(path, mpp_override=mpp, backends=(backend,))
    for t in tiles:
        region = slide.read_region((t.x, t.y), t.level, (t.read_size, t.read_size))
        cv2.resize(region, (TILE_PX, TILE_PX), interpolation=cv2.INTER_AREA)
    return len(tiles), t0, time.monotonic()


def _nothing(_: int) -> None:
    time.sleep(0.5)  # each process takes one, so all of them start and import before the timer


def plain_loop(slides: list[tuple[str, float | None]], backend: str, procs: int) -> float:
    """tiles/s of bare read_region over the same tile lists, ``procs`` processes, one slide per task.

    Wall time from the first read to the last, so idle time at the end counts as it does for the stage;
    the tile lists are planned before (tissue detection is the stage's work, not the floor's).
    """
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        lists = pool.map(_plan_list, [(p, backend, m) for p, m in slides])
        pool.map(_nothing, range(procs), chunksize=1)
        res = pool.map(
            _plain_one, [(p, backend, m, t) for (p, m), t in zip(slides, lists, strict=True)], chunksize=1
        )
    return sum(r[0] for r in res) / (max(r[2] for r in res) - min(r[1] for r in res))


def _warm_worker() -> None:
    import pbip_engine.engine.ingest.tile_slide
    import pbip_engine.jobs.tile  # noqa: F401

    time.sleep(0.5)  # hold the CPU so that each warm-up lands on its own worker


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
        "run": {"name": "bench", "output": tempfile.mkdtemp(prefix=f"run-{backend}-{cpus}-", dir=out)},
        "data": {"slides": [p for p, _ in slides], "mpp_overrides": str(overrides)},
        "classes": [{"name": "tissue", "color": [255, 0, 0]}],
        "tiling": {"mpp": TILE_MPP, "tile_px": TILE_PX, "backends": [backend]},
        "resources": {"workers": cpus, "cpus_per_worker": 1, "local_cpus": cpus},
    }
    spec = parse_spec(raw, out)
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
    try:
        # Start and import every worker outside the timer, as the plain loop's processes are.
        warm = ray.remote(num_cpus=1)(_warm_worker)
        ray.get([warm.remote() for _ in range(cpus)])
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


def _real_cohort(folder: Path, copies: int, into: Path) -> list[tuple[str, float | None]]:
    """The real slides, each linked ``copies`` times under new names: a cohort of small slides.

    They hold ~45 tiles each, fewer than a Ray worker's start-up is worth; copies amortise it as a
    real cohort would, while every copy still pays its own open, tissue detection and QC outputs.
    """
    files = sorted(folder.glob("*.svs")) + sorted(folder.glob("*.tif"))
    into.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(copies):
        for f in files:
            link = into / f"{f.stem}-{k:03d}{f.suffix}"
            if not link.exists():
                link.symlink_to(f.resolve())
            out.append((str(link), 0.25 if f.name.startswith("tcga") else None))  # its mpp is not in the file
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", type=int, default=6144)
    ap.add_argument("--real", type=Path, default=None, help="folder with the real slides")
    ap.add_argument("--no-synthetic", action="store_true", help="only the real slides")
    ap.add_argument("--real-copies", type=int, default=16, help="times each real slide enters the cohort")
    ap.add_argument("--backends", default="cucim,tiffslide")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repetitions; medians are printed")
    ap.add_argument("--cohort", type=Path, default=None,
                    help="keep the synthetic cohort here and reuse it when it matches --slides/--size")  # fmt: skip
    args = ap.parse_args()
    from pbip_engine.engine.synth import write_cohort

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth = args.cohort or tmp / "synth"
        meta = synth / "cohort.json"
        cohorts: dict[str, list[tuple[str, float | None]]] = {}
        if not args.no_synthetic:
            if not (meta.is_file() and _matches(meta, args.slides, args.size)):
                t0 = time.perf_counter()
                write_cohort(synth, args.slides, args.size, seed=0)
                print(f"synthetic cohort: {args.slides} x {args.size}² in {time.perf_counter() - t0:.0f} s")
            cohorts["synthetic"] = [(str(p), None) for p in sorted((synth / "slides").glob("*.tif"))]
        if args.real:
            cohorts["real"] = _real_cohort(args.real, args.real_copies, tmp / "real")
        print(f"tile {TILE_PX}px at {TILE_MPP} µm/px; cores={mp.cpu_count()}; repeat={args.repeat} (medians)")
        print(
            f"{'cohort':<10} {'backend':<10} {'plain 1p':>9} {'stage 1w':>9} {'ratio':>6} {'plain 2p':>9} "
            f"{'stage 2w':>9} {'ratio':>6} {'2w/1w':>6}"
        )
        for name, slides in cohorts.items():
            for backend in args.backends.split(","):
                rows = []
                for _ in range(args.repeat):
                    p1 = plain_loop(slides, backend, 1)
                    s1, n = stage(slides, backend, 1, tmp)
                    p2 = plain_loop(slides, backend, 2)
                    s2, _ = stage(slides, backend, 2, tmp)
                    rows.append((p1, s1, s1 / p1, p2, s2, s2 / p2, s2 / s1))
                med = [statistics.median([r[i] for r in rows]) for i in range(7)]
                spread = ""
                if args.repeat > 1:
                    spread = "  ratio ranges: " + ", ".join(
                        f"{min(r[i] for r in rows):.2f}-{max(r[i] for r in rows):.2f}" for i in (2, 5, 6)
                    )
                print(
                    f"{name:<10} {backend:<10} {med[0]:9.0f} {med[1]:9.0f} {med[2]:6.2f} {med[3]:9.0f} "
                    f"{med[4]:9.0f} {med[5]:6.2f} {med[6]:6.2f}   ({n} tiles, {len(slides)} slides){spread}"
                )


if __name__ == "__main__":
    main()
