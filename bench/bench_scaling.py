"""1 vs 2 scaling of the real pipeline stages on CPU: Ray Train workers, segment actors, cluster nodes.

    python bench/bench_scaling.py [--parts a,b,c] [--slides 4] [--size 2048] [--epochs 3]
                                  [--local-cpus N] [--c-cpus-per-worker 1] [--workdir DIR] [--out scaling.json]

Every figure is taken from a real ``pbip-engine run`` of a small synthetic cohort (the stock driver, in
its own process, as a user would run it), twice, with only the resources changed; the 2/1 ratio of the
two runs is the result. Stages whose resources change are re-run with ``--force STAGE`` (``resources``
is not part of any stage's input hash, so without it the driver would skip them as up to date).

Resources are the package's own mapping (``pbip_engine.jobs.resources``): every actor and Ray Train
worker reserves ``cpus_per_worker`` less 0.25 CPU and computes on ``cpus_per_worker`` torch threads;
Ray Data reads and writes take 0.25 CPU each. Parts a and b run on the driver's embedded local Ray,
with ``resources.local_cpus`` logical CPUs when ``--local-cpus`` is given and all of the machine's
otherwise (the same for both runs of a part).

(a) ``classnet`` on Ray Train, ``resources.workers`` 1 vs 2 (``cpus_per_worker: 1``, gloo DDP, one
    torch thread per worker). Figure: training images/s in steady state = sum over the epochs after the
    first of (rank 0's images x world size) / sum of rank 0's epoch seconds, from the stage's
    ``classnet/metrics.jsonl`` (Ray Train splits the dataset into equal shards). With a single epoch
    the first (warm-up) epoch is used and flagged. Also: epochs x labelled tiles / the stage's seconds
    from ``run.json`` (includes Ray start-up, worker set-up and checkpointing).
(b) ``segment`` with 1 vs 2 ``SegmentPredictor`` actors (``autoscale: {min: N, max: N}``,
    ``cpus_per_worker: 1``), after ``classnet`` (if part a did not train one), ``pseudo`` and a
    1-epoch ``segmenter`` in the same run folder. Figure: the stage's own ``mpix_per_s`` (tissue
    megapixels / the summed per-slide seconds of the streaming pipeline, from ``run.json``: Ray start-up
    is excluded, the actors' start and model load are not, since the first slide's clock starts with
    the pipeline).
(c) ``tile`` + ``embed`` on a ``LocalCluster`` (head with 0 CPUs + N worker nodes of 1 CPU, token
    auth, killed by session id afterwards), N = 1 vs 2, the driver joining with ``--address``;
    ``cpus_per_worker`` ``--c-cpus-per-worker`` (default 1: one tile task per node, then one embed
    actor per node with room left on its node for the reads and writes that feed it). The synthetic
    cohort is copied in. Figures: tiles / each stage's seconds from ``run.json`` (the tile stage's
    seconds include the driver connecting to the cluster; embed's include the actor pool's start and
    model loads).

``os.cpu_count()`` and the 1-minute load average before and after each measurement are recorded: on
a busy host the ratios mean little. Driver logs, specs and run folders stay in ``--workdir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import pbip_engine
from pbip_engine.engine.io.atomic import atomic_write_text
from pbip_engine.jobs.resources import fit_cpus

DEMO = Path(pbip_engine.__file__).parent / "examples" / "demo.yaml"
PBIP = str(Path(sys.executable).parent / "pbip-engine")
NS = (1, 2)


# -- helpers ----------------------------------------------------------------------------------------


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def base_spec(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    raw = yaml.safe_load(DEMO.read_text())
    raw["run"].update(name="bench-scaling", output=str(output))
    raw["data"]["synthetic"].update(slides=args.slides, size=args.size)
    raw["stage1"]["epochs"] = args.epochs
    raw["segmenter"]["epochs"] = args.segmenter_epochs
    raw["resources"] = {
        "workers": 1,
        "cpus_per_worker": 1,
        "autoscale": {"min": 1, "max": 2},
    }
    if args.local_cpus is not None:  # else the embedded Ray takes all of the machine's CPUs
        raw["resources"]["local_cpus"] = args.local_cpus
    return raw


def write_spec(raw: dict[str, Any], path: Path, **resources: Any) -> Path:
    raw = copy.deepcopy(raw)
    raw["resources"].update(resources)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Runner:
    """Runs ``pbip-engine`` driver processes, logs each to a file, and keeps a record of every call."""

    def __init__(self, workdir: Path, timeout: float) -> None:
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.calls: list[dict[str, Any]] = []

    def __call__(self, name: str, args: list[str], env_extra: dict[str, str] | None = None) -> dict[str, Any]:
        """``pbip-engine ARGS`` in its own process, ``env_extra`` added to the environment."""
        env = dict(os.environ)
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):  # never join someone else's cluster by accident
            env.pop(k, None)
        env.update(env_extra or {})
        cmd, shown = [PBIP, *args], shlex.join(["pbip-engine", *args])
        log = self.logs / f"{name}.log"
        print(f"  $ {shown}   (log: {log})", flush=True)
        t0 = time.perf_counter()
        with log.open("w") as fh:
            p = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                rc = p.wait(timeout=self.timeout)
            except BaseException:  # timeout or Ctrl-C: stop our own driver (its embedded Ray goes with it)
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                    raise
                rc = None
        rec = {
            "name": name,
            "cmd": shown,
            "rc": rc,
            "wall_s": round(time.perf_counter() - t0, 2),
            "log": str(log),
        }
        self.calls.append(rec)
        if rc != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            why = f"timed out after {self.timeout:.0f}s" if rc is None else f"exit code {rc}"
            raise RuntimeError(f"{rec['cmd']}: {why}; log tail:\n{tail}")
        return rec


def stage_record(out: Path, stage: str) -> dict[str, Any]:
    run = json.loads((out / "run.json").read_text())
    st = run["stages"][stage]
    if st.get("skipped"):
        raise RuntimeError(f"{out}: stage {stage} was skipped as up to date (not re-run)")
    if st["status"] != "done":
        raise RuntimeError(f"{out}: stage {stage} ended {st['status']}: {st}")
    return st


def measure(runner: Runner, name: str, args: list[str], env_extra: dict[str, str] | None = None) -> dict:
    before = load1()
    rec = runner(name, args, env_extra)
    return {"driver_wall_s": rec["wall_s"], "cmd": rec["cmd"], "load1_before": before, "load1_after": load1()}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(b / a, 3) if a and b is not None else None


def local_cpus_text(local_cpus: int | None) -> str:
    return f"local_cpus {local_cpus}" if local_cpus else f"local Ray on all {os.cpu_count()} CPUs"


def per_worker_text(cpus: float, who: str) -> str:
    """What ``cpus_per_worker: cpus`` means for each actor/worker (``fit_cpus``)."""
    return (
        f"cpus_per_worker {cpus:g}: each {who} reserves {fit_cpus(cpus):g} CPU, "
        f"computes on {max(1, int(cpus))} torch thread(s)"
    )


def fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.{nd}f}"  # keep small rates readable
    return str(v)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# -- preparation ------------------------------------------------------------------------------------


def ensure_stages(runner: Runner, spec: Path, out: Path, stages: list[str], tag: str) -> None:
    """Run ``stages`` once (the driver skips those already up to date)."""
    runner(f"prep-{tag}", ["run", str(spec), "--stages", ",".join(stages)])
    run = json.loads((out / "run.json").read_text())
    for s in stages:
        if run["stages"][s]["status"] != "done":
            raise RuntimeError(f"preparation stage {s}: {run['stages'][s]}")


# -- part a: ClassNet on Ray Train, 1 vs 2 workers ---------------------------------------------------


def classnet_figures(out: Path, labelled: int) -> dict[str, Any]:
    rows = [json.loads(x) for x in (out / "classnet" / "metrics.jsonl").read_text().splitlines() if x]
    steady = [r for r in rows if r["epoch"] > r.get("start_epoch", 0)] or rows
    imgs = sum(r["images"] * r["world_size"] for r in steady)
    secs = sum(r["seconds"] for r in steady)
    st = stage_record(out, "classnet")
    return {
        "world_size": rows[-1]["world_size"],
        "epochs": len(rows),
        "epochs_measured": [r["epoch"] for r in steady],
        "warmup_included": len(rows) < 2,
        "images_per_epoch": rows[-1]["images"] * rows[-1]["world_size"],
        "epoch_s": [round(r["seconds"], 2) for r in rows],
        "img_per_s_steady": round(imgs / secs, 3) if secs else None,
        "stage_s": st["seconds"],
        "img_per_s_stage": round(len(rows) * labelled / st["seconds"], 3),
        "loss_last": rows[-1].get("total"),
    }


def part_a(args, runner: Runner, raw: dict[str, Any], out: Path, specs: Path) -> dict[str, Any]:
    spec0 = write_spec(raw, specs / "prep.yaml")
    ensure_stages(runner, spec0, out, ["synth", "tile", "embed", "bank"], "a")
    # the stage manifest, not run.json: a tile stage skipped as up to date (reused --workdir) has no counts there
    labelled = json.loads((out / "manifests" / "tile.json").read_text())["counts"]["labelled_tiles"]
    res: dict[str, Any] = {"labelled_tiles": labelled, "runs": {}}
    for n in NS:
        spec = write_spec(raw, specs / f"a-workers{n}.yaml", workers=n, cpus_per_worker=1)
        m = measure(
            runner, f"a-workers{n}", ["run", str(spec), "--stages", "classnet", "--force", "classnet"]
        )
        m.update(classnet_figures(out, labelled))
        shutil.copy2(out / "classnet" / "metrics.jsonl", runner.logs / f"a-workers{n}-metrics.jsonl")
        res["runs"][n] = m
        print(f"  workers={n}: {m['img_per_s_steady']} img/s steady, stage {m['stage_s']} s", flush=True)
    r1, r2 = res["runs"][1], res["runs"][2]
    res["ratio_steady"] = ratio(r1["img_per_s_steady"], r2["img_per_s_steady"])
    res["ratio_stage"] = ratio(r1["img_per_s_stage"], r2["img_per_s_stage"])
    return res


def report_a(res: dict[str, Any], local_cpus: int | None) -> str:
    rows = []
    for n, r in res["runs"].items():
        rows.append(
            [
                n,
                r["images_per_epoch"],
                ",".join(map(str, r["epochs_measured"])) + (" (warm-up)" if r["warmup_included"] else ""),
                " / ".join(map(str, r["epoch_s"])),
                r["img_per_s_steady"],
                r["stage_s"],
                r["img_per_s_stage"],
                f"{r['load1_before']} → {r['load1_after']}",
            ]
        )
    rows.append(["**2/1**", "", "", "", res["ratio_steady"], "", res["ratio_stage"], ""])
    return (
        f"### (a) ClassNet on Ray Train, 1 vs 2 CPU workers (gloo; {per_worker_text(1, 'worker')}; "
        f"{local_cpus_text(local_cpus)})\n\n"
        "`pbip-engine run SPEC --stages classnet --force classnet` with `resources.workers` N. "
        "img/s steady = Σ(rank-0 images × world size) / Σ rank-0 epoch seconds over the epochs after the "
        "first (classnet/metrics.jsonl, the stage's own timing); img/s stage = epochs × labelled tiles / "
        "stage seconds (run.json, includes Ray start-up). "
        f"{res['labelled_tiles']} labelled tiles.\n\n"
        + table(
            [
                "workers",
                "images/epoch",
                "epochs measured",
                "epoch s",
                "img/s steady",
                "stage s",
                "img/s stage",
                "load1 before → after",
            ],
            rows,
        )
    )


# -- part b: segment with 1 vs 2 predictor actors ----------------------------------------------------


def part_b(args, runner: Runner, raw: dict[str, Any], out: Path, specs: Path) -> dict[str, Any]:
    spec0 = write_spec(raw, specs / "prep.yaml")
    ensure_stages(
        runner, spec0, out, ["synth", "tile", "embed", "bank", "classnet", "pseudo", "segmenter"], "b"
    )
    res: dict[str, Any] = {"runs": {}}
    for n in NS:
        spec = write_spec(raw, specs / f"b-actors{n}.yaml", cpus_per_worker=1, autoscale={"min": n, "max": n})
        m = measure(runner, f"b-actors{n}", ["run", str(spec), "--stages", "segment", "--force", "segment"])
        st = stage_record(out, "segment")
        units = json.loads((out / "manifests" / "segment.json").read_text()).get("units", {})
        m.update(
            stage_s=st["seconds"],
            pipeline_s=round(sum(u.get("seconds", 0.0) for u in units.values()), 3),
            tiles=sum(u.get("n_tiles", 0) for u in units.values()),
            **{k: st["counts"][k] for k in ("slides_done", "tissue_mpix", "mpix_per_s")},
        )
        res["runs"][n] = m
        print(f"  actors={n}: {m['mpix_per_s']} tissue MP/s, stage {m['stage_s']} s", flush=True)
    res["ratio"] = ratio(res["runs"][1]["mpix_per_s"], res["runs"][2]["mpix_per_s"])
    return res


def report_b(res: dict[str, Any], local_cpus: int | None) -> str:
    rows = [
        [
            n,
            r["slides_done"],
            r["tiles"],
            r["tissue_mpix"],
            r["pipeline_s"],
            r["mpix_per_s"],
            r["stage_s"],
            f"{r['load1_before']} → {r['load1_after']}",
        ]
        for n, r in res["runs"].items()
    ]
    rows.append(["**2/1**", "", "", "", "", res["ratio"], "", ""])
    return (
        f"### (b) segment, 1 vs 2 predictor actors ({per_worker_text(1, 'actor')}; "
        f"{local_cpus_text(local_cpus)})\n\n"
        "`pbip-engine run SPEC --stages segment --force segment` with `resources.autoscale: {min: N, max: N}`. "
        "MP/s = the stage's own `mpix_per_s` (tissue megapixels / summed per-slide pipeline seconds, "
        "run.json: Ray start-up excluded, actor start + model load included).\n\n"
        + table(
            [
                "actors",
                "slides",
                "512-px tiles",
                "tissue MP",
                "pipeline s",
                "tissue MP/s",
                "stage s",
                "load1 before → after",
            ],
            rows,
        )
    )


# -- part c: tile + embed on 1 vs 2 local cluster nodes ----------------------------------------------


def part_c(
    args, runner: Runner, raw: dict[str, Any], out: Path, specs: Path, workdir: Path
) -> dict[str, Any]:
    from pbip_engine.jobs.local_cluster import LocalCluster

    spec0 = write_spec(raw, specs / "prep.yaml")
    ensure_stages(runner, spec0, out, ["synth"], "c")
    res: dict[str, Any] = {"runs": {}}
    for n in NS:
        out_n = workdir / f"c-nodes{n}"
        shutil.rmtree(out_n, ignore_errors=True)
        shutil.copytree(out / "synth", out_n / "synth")  # synth's output does not depend on run.output
        raw_n = copy.deepcopy(raw)
        raw_n["run"]["output"] = str(out_n)
        spec = write_spec(
            raw_n,
            specs / f"c-nodes{n}.yaml",
            cpus_per_worker=args.c_cpus_per_worker,
            autoscale={"min": n, "max": n},
        )
        t0 = time.perf_counter()
        with LocalCluster(workers=n, head_cpus=0, worker_cpus=1) as cluster:
            start_s = round(time.perf_counter() - t0, 2)
            env = cluster.client_env()
            m = measure(
                runner,
                f"c-nodes{n}",
                ["run", str(spec), "--stages", "tile,embed", "--address", cluster.gcs_address],
                env,
            )
            m["nodes_alive"] = len(cluster.alive_nodes())
        m["cluster_start_s"] = start_s
        tile, embed = stage_record(out_n, "tile"), stage_record(out_n, "embed")
        units = json.loads((out_n / "manifests" / "tile.json").read_text()).get("units", {})
        m.update(
            tiles=tile["counts"]["tiles"],
            tile_s=tile["seconds"],
            tile_tasks_s=round(sum(u.get("seconds", 0.0) for u in units.values()), 3),
            tile_per_s=round(tile["counts"]["tiles"] / tile["seconds"], 2),
            embed_tiles=embed["counts"]["tiles"],
            embed_s=embed["seconds"],
            embed_per_s=round(embed["counts"]["tiles"] / embed["seconds"], 2),
        )
        res["runs"][n] = m
        print(f"  nodes={n}: tile {m['tile_per_s']} tiles/s, embed {m['embed_per_s']} tiles/s", flush=True)
    r1, r2 = res["runs"][1], res["runs"][2]
    res["ratio_tile"] = ratio(r1["tile_per_s"], r2["tile_per_s"])
    res["ratio_embed"] = ratio(r1["embed_per_s"], r2["embed_per_s"])
    return res


def report_c(res: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [
        [
            n,
            r["tiles"],
            r["tile_s"],
            r["tile_per_s"],
            r["embed_s"],
            r["embed_per_s"],
            r["cluster_start_s"],
            f"{r['load1_before']} → {r['load1_after']}",
        ]
        for n, r in res["runs"].items()
    ]
    rows.append(["**2/1**", "", "", res["ratio_tile"], "", res["ratio_embed"], "", ""])
    return (
        "### (c) tile + embed on 1 vs 2 local Ray worker nodes (1 CPU each, head 0 CPUs; "
        f"{per_worker_text(args.c_cpus_per_worker, 'embed actor')}, each tile task "
        f"{args.c_cpus_per_worker:g} CPU)\n\n"
        "`pbip-engine run SPEC --stages tile,embed --address GCS` against a `LocalCluster(workers=N)`, "
        "`resources.autoscale: {min: N, max: N}`; Ray Data reads and writes 0.25 CPU each. tiles/s = tiles / the stage's seconds (run.json; tile's "
        "include the driver joining the cluster, embed's the actor start and model load). Cluster start "
        "is not in any figure.\n\n"
        + table(
            [
                "nodes",
                "tiles",
                "tile s",
                "tile tiles/s",
                "embed s",
                "embed tiles/s",
                "cluster start s",
                "load1 before → after",
            ],
            rows,
        )
    )


# -- main ------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="a,b,c", help="comma-separated subset of a,b,c")
    ap.add_argument("--slides", type=int, default=4, help="synthetic slides")
    ap.add_argument("--size", type=int, default=2048, help="synthetic slide edge (px at 0.5 µm/px)")
    ap.add_argument("--epochs", type=int, default=3, help="ClassNet epochs of part a (>= 2 for steady state)")
    ap.add_argument("--segmenter-epochs", type=int, default=1, help="segmenter epochs (part b preparation)")
    ap.add_argument(
        "--local-cpus",
        type=int,
        default=None,
        help="logical CPUs of the embedded Ray (parts a, b; default: all of the machine's)",
    )
    ap.add_argument(
        "--c-cpus-per-worker",
        type=float,
        default=1.0,
        help="resources.cpus_per_worker of part c (tile tasks, embed actors)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per driver process")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in ("a", "b", "c")]
    if bad:
        ap.error(f"--parts: unknown {bad}")

    import ray
    import torch

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="pbip-scaling-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    out, specs = workdir / "run", workdir / "specs"
    raw = base_spec(args, out)
    runner = Runner(workdir, args.timeout)
    report: dict[str, Any] = {
        "argv": shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_avg_start": os.getloadavg(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "workdir": str(workdir),
        "cohort": {
            "slides": args.slides,
            "size": args.size,
            "tiling": raw["tiling"],
            "encoder": raw["encoder"],
        },
        "parts": {},
    }
    print(
        f"bench_scaling: parts {parts}, {args.slides} slides of {args.size}², cpus={os.cpu_count()}, "
        f"load1={load1()}, workdir {workdir}",
        flush=True,
    )
    t_all = time.perf_counter()
    texts = []
    funcs = {
        "a": (lambda: part_a(args, runner, raw, out, specs), lambda r: report_a(r, args.local_cpus)),
        "b": (lambda: part_b(args, runner, raw, out, specs), lambda r: report_b(r, args.local_cpus)),
        "c": (
            lambda: part_c(args, runner, raw, out, specs, workdir),
            lambda r: report_c(r, args),
        ),
    }
    for p in parts:
        print(f"part {p}:", flush=True)
        t0 = time.perf_counter()
        n_calls = len(runner.calls)
        try:
            res = funcs[p][0]()
            res["part_s"] = round(time.perf_counter() - t0, 1)
            texts.append(funcs[p][1](res) + f"\n\npart {p} took {res['part_s']} s (preparation included)")
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}", "part_s": round(time.perf_counter() - t0, 1)}
            texts.append(f"### ({p}) FAILED\n\n```\n{res['error']}\n```")
        res["calls"] = runner.calls[n_calls:]
        report["parts"][p] = res
        print(f"part {p} done in {res['part_s']} s", flush=True)
    report["machine"]["load_avg_end"] = os.getloadavg()
    report["total_s"] = round(time.perf_counter() - t_all, 1)

    print()
    print(f"## Scaling 1 vs 2 — `python {report['argv']}`\n")
    print(
        f"cpu_count {os.cpu_count()}; load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.2f}' for x in report['machine']['load_avg_start'])}, at end "
        f"{'/'.join(f'{x:.2f}' for x in report['machine']['load_avg_end'])}; cohort {args.slides} synthetic "
        f"slides of {args.size}² px (0.5 µm/px), tiles {raw['tiling']['tile_px']} px at "
        f"{raw['tiling']['mpp']} µm/px, ray {ray.__version__}, total {report['total_s']} s\n"
    )
    print("\n\n".join(texts))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nJSON: {args.out}")
    failed = any("error" in r for r in report["parts"].values())
    if tmp is not None:
        if failed:  # keep the logs of a failed run
            tmp._finalizer.detach()  # type: ignore[attr-defined]
            print(f"kept {workdir} (a part failed; logs in {runner.logs})")
        else:
            tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
