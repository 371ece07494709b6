"""bench/bench_segment.py runs on a small slide and compares overlaps on the same slide.

BENCHMARKS.md's cost of ``segment.overlap`` comes from this script's ratio line, so the test proves the line
is printed and that it compares what it says (the half overlap plans more tiles than the quarter).
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


def test_two_overlaps_on_one_slide_print_ratios(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_segment.py"), "--size", "3000", "--tile-px", "96", "--threads", "1",
         "--overlap", "0.25", "0.5", "--workdir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    tiles = [int(n) for n in re.findall(r"^  tiles (\d+),", out, re.M)]
    assert len(tiles) == 2 and "overlap 25%" in out and "overlap 50%" in out, out
    assert tiles[1] > tiles[0], tiles  # the half overlap plans more tiles on the same slide
    ratio = re.search(r"overlap 50%: tiles ([\d.]+)x, wall ([\d.]+)x", out)
    assert ratio is not None, out
    assert float(ratio.group(1)) == pytest.approx(tiles[1] / tiles[0], abs=0.01)
    assert (tmp_path / "out_0.25").is_dir() and (tmp_path / "out_0.5").is_dir()
