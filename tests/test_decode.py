"""engine.io.decode: what counts as a broken image, and whose console lines count."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from pbip_engine.engine.io.decode import (
    ImageDecodeError,
    captured_native_output,
    decode_checked,
    decoder_complaint,
)


def _jpeg() -> bytes:
    img = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8), (5, 5), 2)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def _decode(data: bytes) -> np.ndarray:
    return decode_checked(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))


def test_stray_bytes_libjpeg_skips_are_not_a_broken_image() -> None:
    # libjpeg warns "Corrupt JPEG data: 2 extraneous bytes before marker 0xdb" and decodes every pixel.
    data = _jpeg()
    i = data.index(b"\xff\xdb")
    stray = data[:i] + b"\x12\x34" + data[i:]
    assert np.array_equal(_decode(stray), _decode(data))


def test_a_truncated_jpeg_is_refused() -> None:
    data = _jpeg()
    for cut in (300, len(data) // 2, len(data) - 2):  # headers only ... all but the end-of-image marker
        with pytest.raises(ImageDecodeError):
            _decode(data[:cut])


def test_lines_relayed_from_other_processes_are_not_this_decodes() -> None:
    # Ray's log monitor prints workers' output in the driver, maybe while the driver decodes a good image.
    relayed = "\x1b[36m(MapWorker pid=123)\x1b[0m Premature end of JPEG file\n"
    assert decoder_complaint([relayed]) is None
    assert decoder_complaint(["Premature end of JPEG file\n"]) is not None


def test_output_is_given_back_also_when_the_decoder_raises(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError), captured_native_output():
        os.write(2, b"native words\n")
        raise RuntimeError("decoder failed")
    assert "native words" in capfd.readouterr().err
