"""Per-slide QA pictures of the pseudo masks, to see at a glance where the CAMs put each class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def slide_mosaics(
    index: list[dict[str, Any]], out_dir: Path, colors: Sequence[Sequence[int]], max_px: int = 1024
) -> int:
    """One QA picture per slide: every tile's pseudo mask placed at its position."""
    import cv2

    from pbip_engine.engine.metrics import read_mask
    from pbip_engine.engine.pseudo.cams import palette_lut

    palette = palette_lut([(255, 255, 255), *colors])
    by_slide: dict[str, list[dict[str, Any]]] = {}
    for r in index:
        by_slide.setdefault(r["slide_id"], []).append(r)
    for sid, rows in by_slide.items():
        w = max(r["x"] + r["size0"] for r in rows)
        h = max(r["y"] + r["size0"] for r in rows)
        s = max_px / max(w, h)
        canvas = np.full((int(h * s) + 1, int(w * s) + 1, 3), 255, np.uint8)
        for r in rows:
            m = read_mask(out_dir / r["mask_path"])
            e = max(1, round(r["size0"] * s))
            x0, y0 = int(r["x"] * s), int(r["y"] * s)
            canvas[y0 : y0 + e, x0 : x0 + e] = palette[
                cv2.resize(m, (e, e), interpolation=cv2.INTER_NEAREST)
            ][: canvas.shape[0] - y0, : canvas.shape[1] - x0]
        path = out_dir / "heatmaps" / f"{sid}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), canvas[:, :, ::-1])
    return len(by_slide)
