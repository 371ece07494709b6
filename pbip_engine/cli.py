"""``pbip-engine`` command line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from pbip_engine.cli_cluster import split_names
from pbip_engine.engine.inference import SEGMENT_OVERLAP
from pbip_engine.schemas.spec import JobSpec, SpecError, check_inputs, json_schema, load_spec, parse_spec

DEMO_SPEC = Path(__file__).parent / "examples" / "demo.yaml"


def _load(spec_path: str) -> JobSpec:
    try:
        spec = load_spec(spec_path)
        check_inputs(spec)
    except SpecError as e:
        raise click.ClickException(str(e)) from None
    return spec


def _run(
    spec: JobSpec, stages: list[str] | None, force: list[str], address: str | None, verbose: bool = False
) -> int:
    """Run the pipeline behind a quiet console (Ray's output in RUN_DIR/logs/), then write the report."""
    from pbip_engine.cli_console import QuietConsole
    from pbip_engine.jobs.driver import run_pipeline
    from pbip_engine.jobs.ray_runtime import shutdown_ray

    # A URI output is refused by the driver with its own message; there is no folder to log into.
    log_path = None if spec.run.is_uri else Path(spec.run.output) / "logs" / "console.log"
    with QuietConsole(log_path, verbose=verbose) as con:
        try:
            summary = run_pipeline(spec, only=stages, force=force, address=address, log=con.stage_log)
        except SpecError as e:
            raise click.ClickException(str(e)) from None
        finally:
            shutdown_ray()  # while its output still goes to the log
        problems = {k: v for k, v in summary.stages.items() if v["status"] not in ("done", "not needed")}
        con.echo(f"run summary: {summary.output / 'run.json'}" + ("" if problems else " (every stage done)"))
        for name, st in problems.items():
            line = f"  {name:<16} {st['status']}"
            if st.get("failed_units"):
                line += f"  failed: {st['failed_units']}"
            if st.get("error"):
                line += f"  error: {(st['error'].splitlines() or [''])[0]}"  # all of it: run.json
            con.echo(line)
        _write_report(summary.output, con.echo)
        con.echo(
            f"logs: {con.log_path}" + ("" if verbose else " (Ray's output; --verbose shows it here too)")
        )
    return summary.exit_code


def _write_report(run_dir: Path, echo: Callable[[str], None] = click.echo) -> None:
    """The HTML report after every run; a report that cannot be built never fails the run itself."""
    from pbip_engine.jobs.report import build_report

    try:
        echo(f"report: {build_report(run_dir)}")
    except Exception as e:
        echo(f"warning: report not written: {type(e).__name__}: {e}")


class _Main(click.Group):
    """Expected errors are one ``Error:`` line (ClickException); anything else is a bug: its traceback
    goes to a log file and the console gets one line saying where, never a raw traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            log = _crash_log()
            what = str(e).splitlines()[0][:200] if str(e) else ""
            raise click.ClickException(
                f"internal error ({type(e).__name__}: {what}); the traceback is in {log} - please report it"
            ) from None


def _crash_log() -> Path:
    import tempfile
    import traceback

    path = (
        Path(tempfile.gettempdir()) / f"pbip-engine-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    )
    try:
        path.write_text(f"pbip-engine {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
    except OSError:
        traceback.print_exc()  # no writable temp folder: the traceback is all there is
        return Path("<stderr>")
    return path


def _write_out(out: str, text: str) -> None:
    """Write a command's ``--out`` file; a missing folder or no permission is the user's one-line error."""
    try:
        Path(out).write_text(text)
    except OSError as e:
        raise click.ClickException(f"--out {out}: cannot write ({e.strerror or e})") from None


@click.group(cls=_Main)
@click.version_option(package_name="pbip-engine")
def main() -> None:
    """Slides -> tiles -> embeddings -> bank -> ClassNet -> pseudo masks -> DeepLab -> masks."""


@main.command()
@click.argument("spec", type=click.Path())
def validate(spec: str) -> None:
    """Check a job spec (keys, values, paths) without running anything."""
    s = _load(spec)
    click.echo(f"{spec}: OK ({len(s.classes)} classes, output {s.run.output})")


@main.command()
@click.option(
    "--out", type=click.Path(dir_okay=False), default=None, help="write to a file instead of stdout"
)
def schema(out: str | None) -> None:
    """Print the JSON Schema of the job spec (for editor completion)."""
    text = json.dumps(json_schema(), indent=2)
    if out:
        _write_out(out, text + "\n")
    else:
        click.echo(text)


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--slides", default=4, show_default=True, type=click.IntRange(1))
@click.option("--size", default=4096, show_default=True, type=click.IntRange(512))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--mpp", default=0.5, show_default=True, type=float)
@click.option("--patches", is_flag=True, help="write a BCSS-WSSS-style patch set instead of slides")
def synth(out: str, slides: int, size: int, seed: int, mpp: float, patches: bool) -> None:
    """Write a deterministic synthetic H&E cohort (slides, truth masks, coarse QuPath outlines)."""
    from pbip_engine.engine import synth as synth_mod

    t0 = time.perf_counter()
    if patches:
        info = synth_mod.write_patch_set(
            Path(out), n_train=slides * 50, n_val=slides * 10, n_test=slides * 10, seed=seed
        )
    else:
        info = synth_mod.write_cohort(Path(out), slides, size, seed, mpp=mpp)
    click.echo(f"wrote {out} in {time.perf_counter() - t0:.1f}s: {json.dumps(_counts(info))}")


def _counts(info: dict) -> dict:
    return {k: (len(v) if isinstance(v, list | dict) else v) for k, v in info.items()}


_run_options = [
    click.option("--address", default=None, help="Ray cluster address (default: start a local Ray)"),
    click.option("--force", default=None, help="comma-separated stages to redo even if up to date ('all')"),
    click.option("--verbose", is_flag=True, help="show Ray's own output here too (always in RUN_DIR/logs/)"),
]


def _with_run_options(f):
    for opt in reversed(_run_options):
        f = opt(f)
    return f


@main.command()
@click.argument("spec", type=click.Path())
@click.option("--stages", default=None, help="comma-separated stages to run (default: all enabled)")
@_with_run_options
def run(spec: str, stages: str | None, address: str | None, force: str | None, verbose: bool) -> None:
    """Run the pipeline (or some stages) of SPEC; finished stages are skipped."""
    sys.exit(_run(_load(spec), split_names(stages), split_names(force, "--force") or [], address, verbose))


def _stage_command(stage: str, help_text: str, name: str | None = None):
    @main.command(name=name or stage, help=help_text)
    @click.argument("spec", type=click.Path())
    @_with_run_options
    def _cmd(spec: str, address: str | None, force: str | None, verbose: bool) -> None:
        sys.exit(_run(_load(spec), [stage], split_names(force, "--force") or [], address, verbose))

    return _cmd


tile_cmd = _stage_command("tile", "Tile the slides of SPEC (tissue detection, labels from outlines).")
embed_cmd = _stage_command("embed", "Embed the tiles of SPEC with its encoder (Ray Data actor pool).")
bank_cmd = _stage_command("bank", "Build the prototype bank of SPEC (cosine K-means per class).")


train_classnet_cmd = _stage_command(
    "classnet", "Train the method's stage-1 network (PBIP: ClassNet) on Ray Train.", "train-classnet"
)
pseudo_cmd = _stage_command("pseudo", "Write ClassNet pseudo masks for the labelled tiles.")
segmenter_cmd = _stage_command("segmenter", "Train the stage-2 DeepLab on the pseudo masks.")


@main.command()
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="a finished run directory (its segmenter/ stage)",
)
@click.option("--slides", "slides", default=None, help="slide path or glob")
@click.option("--images", "images", default=None, help="plain image path or glob (PNG/JPEG), e.g. GlaS")
@click.option("--mpp", type=float, default=None, help="µm/px of the inputs (required for plain images)")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--address", default=None, help="Ray cluster address (default: run in this process)")
@click.option("--overlap", default=SEGMENT_OVERLAP, show_default=True, type=click.FloatRange(0, 0.9))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--tta/--no-tta", default=True, show_default=True, help="average logits over tile mirrors")
@click.option("--tta-scales", default="1", show_default=True, help="with --tta: scales, e.g. 0.75,1,1.25")
@click.option(
    "--tile-px", default=None, type=click.IntRange(16), help="inference tile (default: the training crop)"
)
def segment(model_dir: str, slides: str | None, images: str | None, mpp: float | None, out: str,
            address: str | None, overlap: float, batch_size: int, tta: bool, tta_scales: str,
            tile_px: int | None) -> None:  # fmt: skip
    """Segment new slides or images with a trained run: OME-TIFF masks, GeoJSON, overlays."""
    from pbip_engine.jobs.infer import ModelError, segment_cli
    from pbip_engine.schemas.spec import expand_slides

    if bool(slides) == bool(images):
        raise click.ClickException("give exactly one of --slides or --images")
    if images and mpp is None:
        raise click.ClickException("--images needs --mpp (plain images carry no physical pixel size)")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise click.ClickException(f"--mpp: µm/px must be a number > 0, got {mpp}")
    try:
        scales = tuple(float(v) for v in tta_scales.split(",") if v.strip())
    except ValueError:
        raise click.ClickException(f"--tta-scales: comma-separated numbers, got {tta_scales!r}") from None
    if not scales or not all(math.isfinite(v) and v > 0 for v in scales):
        raise click.ClickException(f"--tta-scales: scales must be finite numbers > 0, got {tta_scales!r}")
    tta_arg = (scales if scales != (1.0,) else True) if tta else False
    try:
        key = "--slides" if slides else "--images"
        inputs = expand_slides([slides or images], key)
        res = segment_cli(
            Path(model_dir), inputs, Path(out), mpp, address, overlap, batch_size, tile_px, tta_arg, key
        )
    except (SpecError, ModelError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    failed = {k: v["reason"] for k, v in res.items() if v["status"] != "done"}
    resumed = sum(1 for v in res.values() if v.get("resumed"))
    kept = f" ({resumed} done by an earlier run with the same model and settings, kept)" if resumed else ""
    click.echo(f"segmented {len(res) - len(failed)}/{len(res)} into {out}{kept}")
    for k, why in failed.items():
        click.echo(f"  FAILED {k}: {why}")
    sys.exit(2 if failed else 0)


@main.command()
@click.option("--pred", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--truth", required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--classes", "n_classes", required=True, type=click.IntRange(1), help="number of tissue classes"
)
@click.option(
    "--ignore-background/--count-background",
    default=False,
    show_default=True,
    help="exclude pixels whose truth is 0, or count them as errors (PBIP's protocol)",
)
@click.option(
    "--truth-lut", default=None, help="comma-separated remap of truth values, e.g. '1,2,3,4,0' for BCSS"
)
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="write the metrics JSON here")
def evaluate(
    pred: str, truth: str, n_classes: int, ignore_background: bool, truth_lut: str | None, out: str | None
) -> None:
    """Score predicted masks against truth masks (same file stems): mIoU, FwIoU, Dice, boundary IoU."""
    from pbip_engine.engine.metrics import MetricsError, evaluate_dirs

    try:
        lut = [int(v) for v in truth_lut.split(",")] if truth_lut else None
    except ValueError:
        raise click.ClickException(
            f"--truth-lut {truth_lut!r}: give comma-separated integers, e.g. '1,2,3,4,0'"
        ) from None
    try:
        res = evaluate_dirs(pred, truth, n_classes, ignore_background, truth_lut=lut)
    except MetricsError as e:
        raise click.ClickException(str(e)) from None
    text = json.dumps(res, indent=2, default=float)
    if out:
        _write_out(out, text + "\n")
    click.echo(
        f"mIoU {res['miou']:.4f}  FwIoU {res['fwiou']:.4f}  mDice {res['mdice']:.4f}  "
        f"mbIoU {res.get('mbiou', float('nan')):.4f}  (ignore_background={res['ignore_background']}, "
        f"{res.get('n_images')} images)"
    )
    if res.get("unmatched_truth"):
        click.echo(f"({len(res['unmatched_truth'])} truth masks have no prediction and were not scored)")
    if out:
        click.echo(f"wrote {out}")


@main.command()
@click.option("--out", default="pbip-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray)")
@click.option(
    "--slides", default=None, type=click.IntRange(1), help="override the number of synthetic slides"
)
@click.option("--size", default=None, type=click.IntRange(512), help="override the synthetic slide size (px)")
@click.option(
    "--method", default=None, help="run the demo with another registered method (see `pbip-engine methods`)"
)
@click.option("--verbose", is_flag=True, help="show Ray's own output here too (always in OUT/logs/)")
def demo(
    out: str, address: str | None, slides: int | None, size: int | None, method: str | None, verbose: bool
) -> None:
    """Synthesise a small cohort and run the whole pipeline on it, locally."""
    import yaml

    from pbip_engine.methods import METHODS

    raw = yaml.safe_load(DEMO_SPEC.read_text())
    raw["run"]["output"] = str(Path(out).resolve())
    if method is not None and method != raw["method"]["name"]:
        if method not in METHODS:
            raise click.ClickException(f"--method: unknown method {method!r}; methods are {sorted(METHODS)}")
        # that method's defaults (+ its demo_keys); the demo's keys belong to its own method
        raw["method"] = {"name": method, **METHODS[method].demo_keys}
    if slides is not None:
        raw["data"]["synthetic"]["slides"] = slides
    if size is not None:
        raw["data"]["synthetic"]["size"] = size
    try:
        spec = parse_spec(raw, DEMO_SPEC.parent, source=str(DEMO_SPEC))
    except SpecError as e:
        raise click.ClickException(str(e)) from None
    t0 = time.perf_counter()
    code = _run(spec, None, [], address, verbose)
    click.echo(f"demo finished in {time.perf_counter() - t0:.0f}s; outputs under {spec.run.output}")
    out = Path(spec.run.output)
    for name in ("synth", "tile", "embed", "bank", "classnet", "pseudo", "segmenter", "segment"):
        if (out / name).is_dir():
            click.echo(f"  {name:<10} {out / name}")
    for label, path in (("pseudo masks", out / "pseudo" / "metrics.json"),
                        ("stage-2 whole-slide masks", out / "segment" / "metrics.json")):  # fmt: skip
        if path.is_file():
            m = json.loads(path.read_text())
            click.echo(
                f"{label} vs synthetic truth (tissue pixels): mIoU {m['miou']:.3f}  mDice {m['mdice']:.3f}  "
                f"bIoU {m.get('mbiou', float('nan')):.3f}"
            )
            if "multi_label" in m:
                mm = m["multi_label"]
                click.echo(
                    f"  on the {mm['n_images']} multi-label tiles (where the CAMs decide): mIoU {mm['miou']:.3f}  "
                    f"mDice {mm['mdice']:.3f}  bIoU {mm.get('mbiou', float('nan')):.3f}"
                )
    if (out / "segment" / "masks").is_dir():
        click.echo(f"QuPath-ready masks, GeoJSON and overlays: {out / 'segment' / 'masks'}")
    sys.exit(code)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report(run_dir: str) -> None:
    """Write RUN_DIR/report.html: stages, per-slide QC and masks, training curves, metrics, spec."""
    from pbip_engine.jobs.report import ReportError, build_report

    try:
        click.echo(f"wrote {build_report(run_dir)}")
    except ReportError as e:
        raise click.ClickException(str(e)) from None


@main.command()
def methods() -> None:
    """List the registered segmentation methods and their spec keys (``method:`` section)."""
    from pbip_engine.methods import METHODS
    from pbip_engine.methods.base import Method

    for name, m in sorted(METHODS.items()):
        keys = [k for k in m.config_model.model_fields if k != "name"]
        stages = ", ".join(s for s in ("bank", "classnet", "pseudo") if s in m.stages) or "no CAM stages"
        s2 = m.stage2_defaults(m.config_model(name=name))  # with the method's default keys
        # a method with its own stage-2 task trains with its own losses (its method keys), not segmenter.loss
        own_task = type(m).stage2_task is not Method.stage2_task
        stage2 = (
            f"{s2.arch} with its own losses (method keys)"
            if own_task
            else f"{s2.arch}, {s2.loss} loss by default (segmenter.arch, segmenter.loss)"
        )
        click.echo(f"{name}: {m.summary} (stages: {stages})\n  keys: {', '.join(keys)}\n  stage 2: {stage2}")


def _register_cluster_commands() -> None:
    from pbip_engine.cli_cluster import COMMANDS

    for c in COMMANDS:
        main.add_command(c)


_register_cluster_commands()
