"""bench/bench_segment.py and bench/bench_pseudo_blocks.py run on small inputs and print their ratio lines.

BENCHMARKS.md's cost of ``segment.overlap`` and the pseudo stage's memory in blocks come from these lines, so
the tests prove each line is printed and compares what it says.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _bench(script: str, *args: str) -> str:
    """Run ``bench/<script>`` with ``args`` on one thread; its stdout, after asserting it exited cleanly."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args],
                          capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_two_overlaps_on_one_slide_print_ratios(tmp_path: Path) -> None:
    out = _bench("bench_segment.py", "--size", "3000", "--tile-px", "96", "--threads", "1",
                 "--overlap", "0.25", "0.5", "--workdir", str(tmp_path))  # fmt: skip
    tiles = [int(n) for n in re.findall(r"^  tiles (\d+),", out, re.M)]
    assert len(tiles) == 2 and "overlap 25%" in out and "overlap 50%" in out, out
    assert tiles[1] > tiles[0], tiles  # the half overlap plans more tiles on the same slide
    ratio = re.search(r"overlap 50%: tiles ([\d.]+)x, wall ([\d.]+)x", out)
    assert ratio is not None, out
    assert float(ratio.group(1)) == pytest.approx(tiles[1] / tiles[0], abs=0.01)
    assert (tmp_path / "out_0.25").is_dir() and (tmp_path / "out_0.5").is_dir()


def test_pseudo_blocks_bench_reads_one_slide_as_one_canvas_and_in_blocks() -> None:
    out = _bench("bench_pseudo_blocks.py", "--side", "640", "--block-px", "0", "256")
    files = [int(n) for n in re.findall(r"tiles, (\d+) region file", out)]
    tiles = set(re.findall(r"(\d+) tiles,", out))
    assert files[0] == 1 and files[1] > 1 and len(tiles) == 1, out  # the same tiles, one canvas vs blocks
    assert re.search(r"block_px 256 / one canvas: wall [\d.]+x, memory above the tiles [\d.]+x", out), out
