"""A quiet console for ``pbip-engine run``/``demo``: Ray's output goes to ``RUN_DIR/logs/``, the user sees
one line per stage, the engine's own progress bars, the training epochs and the warnings that matter.

Ray prints from many places (the driver's loggers, worker output that the log monitor forwards, Ray
Data's progress tables, C++ glog lines from the raylet), so filtering Python loggers is not enough: for the
duration of the run, file descriptors 1 and 2 are pointed at a pipe. A thread copies every byte to
``RUN_DIR/logs/console.log`` (nothing is lost) and forwards to the real terminal only:

* progress bars of the engine's own steps (tqdm bars whose description starts with a lower-case word,
  e.g. ``tile slides``; Ray Data's bars start with ``-``, ``Running`` or a check mark), drawn in place on a
  terminal and once, finished, when stdout is a file;
* the training loop's ``epoch i/n: ...`` lines (once each);
* lines that report a failure, an error, a retry/restart or a lost node (minus known harmless Ray
  warnings, such as Ray Train's "Failed to query Ray Train Controller actor state"), each distinct line
  once and at most :data:`MAX_RAY_LINES` of them.

The engine's messages are written with :meth:`QuietConsole.echo`, straight to the terminal (and into the
log); of the driver's log (:meth:`QuietConsole.stage_log`) the ``[stage] ...`` lines are shown, a stage's
untagged detail lines only when they report a failure. ``verbose=True`` forwards everything, as before.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import IO

from pbip_engine.engine.io.terminal import ANSI

RAY_PREFIX = re.compile(r"^\((?P<who>[\w.]+) pid=\d+(?:, ip=[\d.]+)?\)\s*")
ENGINE_BAR = re.compile(r"^[a-z][a-z0-9 _-]*: +(\d+%\||\d+[a-z/]* \[)")  # with a total, or a count
BAR_END = re.compile(r"^[^|]*\|[^|]*\|[^\]]*\]")  # "desc: 40%|####      | 2/5 [00:01<00:02, 2.0it/s]"
EPOCH = re.compile(r"\bepoch \d+/\d+:")
IMPORTANT = re.compile(
    r"(?i)(\bfail(ed|ure|ing)?\b|\w*error\b|traceback|\bretr(y|ying|ied)\b|\brestart(ing|ed)?\b(?!=)"
    r"|\bnode\b.*\b(dead|died|lost|removed|failed)\b|out of memory|\boom\b|\bkilled\b)"
)
HARMLESS = re.compile(
    r"Failed to query Ray Train Controller actor state"
    r"|\(PlacementGroupCleaner pid="  # Ray Train's clean-up actor (e.g. "multiple active Ray instances")
    r"|has constructor arguments in the object store"
    r"|Tasks: \d+.*Actors: \d+"  # Ray Data's progress tables ("restarting=0", "failed=0")
)
SYNC_MARK = b"\x00pbip-engine-console-sync\x00"
STAGE_START = re.compile(r"^\[[\w-]+\] running\b")
MAX_LINE = 400
MAX_RAY_LINES = 20  # forwarded Ray warnings per run; the rest is in the log
MAX_MESSAGE_LINES = 3  # of a multi-line engine message (a stage's error) on the console


def _close_progress_bars() -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):  # a library's bar in a bad state must not hide the result
            bar.close()


def _fileno(stream: object) -> int | None:
    try:
        return stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None


def should_forward(line: str) -> str | None:
    """What the terminal shows of one captured line (ANSI codes and Ray's ``(pid=...)`` prefix removed),
    or None to keep it in the log only."""
    text = ANSI.sub("", line).strip()
    if not text or HARMLESS.search(text):
        return None
    epoch = EPOCH.search(text)
    if epoch:  # may follow the remains of a progress bar on the same line
        return "  " + text[epoch.start() :][:MAX_LINE]
    if IMPORTANT.search(RAY_PREFIX.sub("", text)):
        return "  ray: " + text[:MAX_LINE]
    return None


class QuietConsole:
    """Context manager that captures fds 1 and 2 into ``log_path`` and forwards what matters (see above)."""

    def __init__(self, log_path: str | Path | None, verbose: bool = False) -> None:
        """``log_path=None``: capture nothing, :meth:`echo` prints (a run that has no folder to log into)."""
        self.log_path = Path(log_path) if log_path is not None else None
        self.verbose = verbose
        self.term: IO[str] | None = None
        self._log: IO[bytes] | None = None
        self._saved: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._open: str | None = None  # "bar" / "status": what the terminal's current, unfinished line holds
        self._tty = False
        self._own_term = False
        self._log_nl = True  # the log file ends with a newline
        self._synced = threading.Event()
        self._seen: set[str] = set()
        self._ray_lines = 0

    # -- the engine's own messages ---------------------------------------------------------------------
    def echo(self, msg: str = "") -> None:
        """A line for the user: on the terminal and in the log, after what was printed before it.

        A long multi-line message (a stage's error with Ray's memory report) is cut to its first lines on
        the console; the log keeps all of it."""
        self._sync()
        shown = msg
        lines = msg.splitlines()
        if not self.verbose and self.log_path is not None and len(lines) > MAX_MESSAGE_LINES:
            more = len(lines) - MAX_MESSAGE_LINES
            shown = "\n".join([*lines[:MAX_MESSAGE_LINES], f"  ... {more} more line(s) in {self.log_path}"])
        with self._lock:
            self._end_bar()
            out = self.term or sys.stdout
            out.write(shown + "\n")
            out.flush()
            self._log_line(msg)

    def _log_line(self, msg: str) -> None:
        if self._log is not None:
            head = b"" if self._log_nl else b"\n"
            self._log.write(head + f"[pbip-engine {time.strftime('%H:%M:%S')}] {msg}\n".encode())
            self._log.flush()
            self._log_nl = True

    def _sync(self) -> None:
        """Wait until the pump has shown everything this process wrote so far (a marker through the pipe),
        so that a stage's result line never overtakes its own progress bar."""
        if self._thread is None or threading.current_thread() is self._thread:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        self._synced.clear()
        os.write(2, SYNC_MARK + b"\n")
        self._synced.wait(timeout=2.0)

    def stage_log(self, msg: str) -> None:
        """The driver's log: "[stage] running" is a transient status line on a terminal (the stage's
        result line replaces it) and goes to the log only when stdout is a file; the rest is echoed."""
        if self.verbose or self.term is None:
            self.echo(msg)
            return
        if not STAGE_START.match(msg):
            if msg.startswith("[") or IMPORTANT.search(msg):
                self.echo(msg)
            else:  # a stage's detail line ("bank: class x: 19 tiles used"): the log keeps it
                with self._lock:
                    self._log_line(msg)
            return
        self._sync()
        with self._lock:
            self._log_line(msg)
            if self._tty:
                self._end_bar()
                self.term.write(msg + "\x1b[K")
                self.term.flush()
                self._open = "status"

    # -- capture ---------------------------------------------------------------------------------------
    def __enter__(self) -> QuietConsole:
        if self.log_path is None:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        if _fileno(sys.stdout) == 1:
            self.term = open(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
            self._own_term = True
        else:  # stdout replaced in-process (click's CliRunner, an embedding program): write to that
            self.term, self._own_term = sys.stdout, False
        self._tty = self.term.isatty()
        r, w = os.pipe()
        os.dup2(w, 1)
        os.dup2(w, 2)
        os.close(w)
        self._thread = threading.Thread(target=self._pump, args=(r,), name="pbip-console", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is None:
            return
        _close_progress_bars()  # Ray Data's driver-side bars would print their last state at exit
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)  # closes the pipe's write end on 1 and 2: the pump sees EOF
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        if self._thread is not None:
            self._thread.join(timeout=5)  # a process that outlived the run may still hold the pipe
        with self._lock:
            self._end_bar()
            if self.term is not None and self._own_term:
                self.term.close()
            self.term = None
            if self._log is not None:
                self._log.close()
                self._log = None

    def _end_bar(self) -> None:
        """Finish the terminal's open line: a progress bar stays (newline), a status line is erased."""
        if self._open is not None and self.term is not None:
            self.term.write("\n" if self._open == "bar" else "\r\x1b[K")
        self._open = None

    def _pump(self, fd: int) -> None:
        pending = b""
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                marked = SYNC_MARK in chunk
                if marked:
                    chunk = chunk.replace(SYNC_MARK + b"\n", b"")
                with self._lock:
                    if self._log is not None and chunk:
                        self._log.write(chunk)
                        self._log.flush()
                        self._log_nl = chunk.endswith(b"\n")
                pending += chunk
                # tqdm redraws with "\r"; everything else ends lines with "\n".
                parts = re.split(rb"(\r|\n)", pending)
                pending = parts.pop()
                for seg, sep in zip(parts[0::2], parts[1::2], strict=True):
                    self._show(seg.decode("utf-8", "replace"), final=sep == b"\n")
                if marked:
                    self._synced.set()
        if pending:
            self._show(pending.decode("utf-8", "replace"), final=True)

    def _show(self, seg: str, final: bool) -> None:
        with self._lock:
            term = self.term
            if term is None:
                return
            if self.verbose:
                term.write(seg + ("\n" if final else "\r"))
                return
            text = ANSI.sub("", seg).strip()
            if ENGINE_BAR.match(text):
                bar = BAR_END.match(text)
                if bar and bar.end() < len(text):
                    # Another writer appended to the bar's line; that newline is its, not the bar's end.
                    text, final = bar.group(0), False
                if self._tty:
                    term.write("\r" + text + "\x1b[K")
                    self._open = "bar"
                    if final:
                        self._end_bar()
                elif final:  # a file gets each bar once, finished
                    term.write(text + "\n")
                term.flush()
                return
            line = should_forward(seg)
            if line is None or line in self._seen:  # Ray repeats lines (per worker, per retry)
                return
            self._seen.add(line)
            if line.startswith("  ray: "):
                self._ray_lines += 1
                if self._ray_lines > MAX_RAY_LINES:
                    if self._ray_lines == MAX_RAY_LINES + 1:
                        line = f"  ray: ... more warnings in {self.log_path}"
                    else:
                        return
            self._end_bar()
            term.write(line + "\n")
            term.flush()
