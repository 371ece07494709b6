"""Run a bench's measuring half in a child process and read back its ``RESULT {json}`` line.

A fresh process per setting makes ``ru_maxrss`` (peak RSS) that setting's own figure, not the largest of all
the settings run before it in one interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

MARK = "RESULT "


def report(result: dict[str, Any]) -> None:
    """The child's side: print ``result`` as the line :func:`run_child` reads."""
    print(MARK + json.dumps(result, default=str))


def run_child(cmd: list[str]) -> dict[str, Any]:
    """The parent's side: run ``cmd``; its last ``RESULT`` line as a dict, or exit with its output shown."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker failed (rc {proc.returncode}): {' '.join(cmd[:4])} ...")
    return json.loads(lines[-1][len(MARK) :])
