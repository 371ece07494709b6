"""Decoders that report broken data only on the console: capture what they print and make it an error.

libjpeg(-turbo), inside cuCIM and inside OpenCV alike, meets a truncated or corrupt stream with a
warning on stderr ("Premature end of JPEG file") and returns pixels anyway: grey where the data ran
out, garbage after a bad Huffman code. Its console output is the only error channel there is, so the
readers that use such decoders (cuCIM slides, plain images, training patches) route it through here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from pbip_engine.engine.io.terminal import ANSI

# What libjpeg(-turbo) prints when it cannot decode (all of) a stream while still returning pixels.
# "Corrupt JPEG data: N extraneous bytes before marker" is not one: libjpeg skips the stray bytes and
# decodes the whole image.
DECODE_ERROR = re.compile(
    r"ERROR in line|Not a JPEG file|Corrupt JPEG(?! data: \d+ extraneous bytes)|Premature end of JPEG|"
    r"Invalid JPEG|Bogus |Unsupported marker|Huffman|Wrong JPEG|JPEG datastream|Improper call to JPEG",
)
# Lines another thread printed meanwhile (Ray's log monitor relays workers' output as "(Name pid=N) ...")
# are not this decode's.
_RELAYED = re.compile(r"^\s*\([^)]*pid=\d+")  # matched after ANSI codes are removed
_capture_lock = threading.Lock()
_sink_fd: dict[int, int] = {}  # pid -> the capture file's descriptor (one per process, forks included)


class ImageDecodeError(ValueError):
    """An encoded image that OpenCV could not decode, or decoded only in part; the message is the reason
    alone, so each caller names the file in its own error type."""


def _capture_fd() -> int:
    pid = os.getpid()
    if pid not in _sink_fd:
        with tempfile.TemporaryFile() as f:
            _sink_fd[pid] = os.dup(f.fileno())
    return _sink_fd[pid]


@contextlib.contextmanager
def captured_native_output() -> Iterator[list[str]]:
    """Route this process' stdout/stderr (the file descriptors, which native code writes to) into a temp
    file for the block; yields a list that receives the text. Anything captured is written back to
    stderr afterwards, so nothing is hidden from the user; only one block runs at a time."""
    sink: list[str] = []
    with _capture_lock:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        fd = _capture_fd()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            try:
                yield sink
            finally:
                with contextlib.suppress(Exception):
                    _libc_fflush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
        finally:
            for d in saved:
                os.close(d)
            # read back also when the block raised, so what the decoder printed is never swallowed
            n = os.lseek(fd, 0, os.SEEK_CUR)
            text = os.pread(fd, n, 0).decode("utf-8", "replace") if n else ""
            if text:
                sink.append(text)
                os.write(2, text.encode("utf-8", "replace"))


def decoder_complaint(captured: list[str]) -> str | None:
    """The decoder's own words on one line (at most 200 characters) where it reported a broken stream."""
    lines = (captured[0] if captured else "").splitlines()
    own = "\n".join(ln for ln in lines if not _RELAYED.match(ANSI.sub("", ln)))
    if DECODE_ERROR.search(own):
        return " ".join(own.split())[:200]
    return None


def decode_checked(decode: Callable[[], np.ndarray | None]) -> np.ndarray:
    """Run an OpenCV decode (``cv2.imread``/``cv2.imdecode``) and refuse a partial image.

    OpenCV returns a truncated JPEG as a whole image, grey from where the data ran out; segmenting or
    training on it would be silently wrong, so the decoder's warning raises :class:`ImageDecodeError`.
    """
    with captured_native_output() as out:
        img = decode()
    said = decoder_complaint(out)
    if img is None:
        printed = " ".join(out[0].split())[:200] if out else ""
        raise ImageDecodeError("not a decodable image" + (f" ({printed})" if printed else ""))
    if said is not None:
        raise ImageDecodeError(f"truncated or corrupt image data (decoder: {said})")
    return img


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None)


def _libc_fflush() -> None:
    """Flush C stdio buffers: native code printing to a non-terminal stdout is block-buffered."""
    _libc().fflush(None)
