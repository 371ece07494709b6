"""Open a local HTML page in the system's headless Chromium (Playwright, no `playwright install`).

Returns what a user would notice: images that did not load, console errors, failed requests, the text.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no chromium on PATH: `apt-get install -y chromium` (as .ci/run does)")


@dataclass
class PageCheck:
    images: list[dict] = field(default_factory=list)  # {src, naturalWidth, complete}
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    non_file_requests: list[str] = field(default_factory=list)  # anything that would need the network
    text: str = ""
    stage_rows: dict[str, str] = field(default_factory=dict)  # stage -> status shown


def open_page(path: Path, screenshot: Path | None = None, width: int = 1280, height: int = 900) -> PageCheck:
    from playwright.sync_api import sync_playwright

    check = PageCheck()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: check.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: check.console_errors.append(str(e)))
            page.on("requestfailed", lambda r: check.failed_requests.append(r.url))
            page.on(
                "request",
                lambda r: (
                    check.non_file_requests.append(r.url)
                    if not r.url.startswith(("file:", "data:"))
                    else None
                ),
            )
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            check.images = page.evaluate(
                "Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
                "naturalWidth: i.naturalWidth, complete: i.complete}))"
            )
            check.text = page.inner_text("body")
            check.stage_rows = page.evaluate(
                "Object.fromEntries(Array.from(document.querySelectorAll('tr.stage-row')).map("
                "r => [r.cells[0].innerText.trim(), r.cells[1].innerText.trim()]))"
            )
            if screenshot is not None:
                page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    return check
