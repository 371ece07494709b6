"""The quiet console: Ray's noise into RUN_DIR/logs/, what matters on the terminal, nothing lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pbip_engine.cli_console import should_forward

# Captured from `pbip-engine demo` (2026-12-01), ANSI colour codes included.
NOISE = [
    "\x1b[36m(PlacementGroupCleaner pid=5811)\x1b[0m Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to monitor.",
    "\x1b[36m(pid=6120)\x1b[0m - split(1, equal=True): Tasks: 0; Actors: 0; Queued blocks: 0 (0.0B); Resources: 0.0 CPU, 0.0B object store",
    "2026-12-01 03:33:01,123\tINFO logging_progress.py:123 --   Tasks: 1; Actors: 1 (running=1, restarting=0, pending=0, active=1, idle=0, util=1.0, tasks_in_flight=1); Queued blocks: 0",
    "[2026-12-01 03:33:01,456 E 123 456] core_worker.cc:2000: Actor with class name: 'MapWorker(MapBatches(ArrowEmbedder))' and ID: 'ab12' has constructor arguments in the object store and max_restarts > 0.",
    "\x1b[36m(pid=6120)\x1b[0m ✔️  Dataset val_1_0 execution finished in 0.52 seconds: 27.0 row [00:00, 51.9 row/s]",
    "\x1b[36m(PlacementGroupCleaner pid=20456)\x1b[0m ConnectionError: Found multiple active Ray instances: {'192.0.2.2:41651'}.",
]


def test_what_reaches_the_terminal():
    assert [should_forward(line) for line in NOISE] == [None] * len(NOISE)
    epoch = "\x1b[36m(RayTrainWorker pid=6071)\x1b[0m epoch 1/2: loss 2.8439, 15.6 img/s, val score -2.3466 (best -2.3466)"
    assert should_forward(epoch) == "  epoch 1/2: loss 2.8439, 15.6 img/s, val score -2.3466 (best -2.3466)"
    after_a_bar = "       \x1b[A\x1b[36m(RayTrainWorker pid=244)\x1b[0m epoch 3/8: loss 6.5, 3.6 img/s"
    assert should_forward(after_a_bar) == "  epoch 3/8: loss 6.5, 3.6 img/s"
    for line in (
        "(raylet) The node with node id: 4f2a has been marked dead because the detector has missed too many heartbeats",
        "(TrainController pid=7) Worker group failed: retrying training (1/2)",
        "(MapWorker pid=9) RayTaskError: slide synth_001: cannot read tile",
    ):
        assert should_forward(line) is not None and should_forward(line).startswith("  ray: "), line


SCRIPT = textwrap.dedent(
    """
    import subprocess, sys
    from tqdm import tqdm
    from pbip_engine.cli_console import QuietConsole

    with QuietConsole(sys.argv[1], verbose=sys.argv[2] == "1") as con:
        con.stage_log("[tile] running (abc)")
        noise = "import sys\\nfor i in range(300):\\n    print(f'(pid={i}) - ReadParquet: Tasks: 1; Actors: 0 row {i}')\\n"
        noise += "print('(RayTrainWorker pid=5) epoch 1/2: loss 2.8', file=sys.stderr)\\n" * 2
        subprocess.run([sys.executable, "-c", noise])  # a child process writing to the inherited fds
        for _ in tqdm(range(40), desc="tile slides", unit="slide", mininterval=0):
            pass
        print("(raylet) The node with node id: ab has been marked dead", file=sys.stderr)
        con.stage_log("bank: class x: 19 tiles used")
        con.stage_log("bank: slide y FAILED: unreadable")
        con.stage_log("[tile] done in 1.0s {'slides': 40}")
    print("after the run")
    """
)


def _run(tmp_path: Path, verbose: bool) -> tuple[list[str], str]:
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    log = tmp_path / f"logs{int(verbose)}" / "console.log"
    out = subprocess.run(
        [sys.executable, str(script), str(log), str(int(verbose))],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout.splitlines(), log.read_text()


def test_quiet_console_captures_everything_and_shows_little(tmp_path):
    shown, log = _run(tmp_path, verbose=False)
    assert shown == [
        "  epoch 1/2: loss 2.8",
        "tile slides: 100%|██████████| 40/40 [00:00<00:00, " + shown[1].split(", ", 1)[1],
        "  ray: (raylet) The node with node id: ab has been marked dead",
        "bank: slide y FAILED: unreadable",  # a stage's detail line only when it reports a failure
        "[tile] done in 1.0s {'slides': 40}",  # after its own bar, never before
        "after the run",
    ]
    for text in ("row 0\n", "row 299\n", "epoch 1/2", "marked dead", "[tile] running (abc)", "19 tiles used"):
        assert text in log, text  # nothing is lost
    assert "pbip-engine-console-sync" not in log


def test_verbose_shows_everything(tmp_path):
    shown, log = _run(tmp_path, verbose=True)
    assert sum("ReadParquet" in line for line in shown) == 300
    assert "row 299" in log and shown[-1] == "after the run"


def test_a_bar_is_cut_where_another_writer_appended_to_its_line():
    from pbip_engine.cli_console import BAR_END

    line = "segment slides:  25%|██▌       | 1/4 [01:32<04:37, 92.58s/slide]2026-12-01 04:59:57,821\tINFO logging_progress.py:174 -- ==="
    assert BAR_END.match(line).group(0) == "segment slides:  25%|██▌       | 1/4 [01:32<04:37, 92.58s/slide]"


def test_a_bar_line_ended_by_another_writer_is_not_the_finished_bar():
    import io

    from pbip_engine.cli_console import QuietConsole

    con = QuietConsole(None)
    con.term = io.StringIO()  # a file, not a terminal: each bar is written once, finished
    con._show("segment slides:  25%|██▌       | 1/4 [01:32<04:37, 92.58s/slide]2026-12-01 INFO x", final=True)
    con._show("segment slides: 100%|██████████| 4/4 [03:31<00:00, 52.90s/slide]", final=True)
    assert con.term.getvalue() == "segment slides: 100%|██████████| 4/4 [03:31<00:00, 52.90s/slide]\n"


def test_long_errors_and_repeated_ray_warnings_are_cut_on_the_console(tmp_path):
    import io

    from pbip_engine.cli_console import MAX_RAY_LINES, QuietConsole

    con = QuietConsole(tmp_path / "console.log")
    con.term = io.StringIO()
    con.echo("[classnet] FAILED: ControllerError: 6 worker(s) were killed\n" + "memory report line\n" * 40)
    oom = "(TrainController pid=1) ray.exceptions.OutOfMemoryError: 6 worker(s) were killed (node {})"
    for i in range(3 * MAX_RAY_LINES):
        con._show(oom.format(i % (2 * MAX_RAY_LINES)), final=True)  # each line twice, 2x the cap distinct
    shown = con.term.getvalue().splitlines()
    assert shown[:4] == [
        "[classnet] FAILED: ControllerError: 6 worker(s) were killed",
        "memory report line",
        "memory report line",
        f"  ... 38 more line(s) in {tmp_path / 'console.log'}",
    ]
    assert len(shown) == 4 + MAX_RAY_LINES + 1 and shown[-1].startswith("  ray: ... more warnings in")
    assert len(set(shown[4:])) == MAX_RAY_LINES + 1  # no line twice
