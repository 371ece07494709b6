"""Subprocess of test_slide_fuzz: the tile and segment paths on each file given, one JSON line per file.

Run in a fresh interpreter so that cuCIM loads (it must come before torch) and so that an address-space
limit (``RLIMIT_AS``) bounds what any case may allocate; a per-case alarm turns a hang into a result.
The segment path uses the real planner, tile reader and writer with a fixed colour rule in place of a
trained network (red-ish -> class 1, blue-ish -> class 2), so outputs can be compared byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

import pbip_engine  # noqa: F401  (first: cuCIM must load before torch)

CARD = {"mpp": 4.0, "class_names": ["red", "blue"], "class_colors": [[255, 0, 0], [0, 0, 255]]}
TILE_PX = 64


class Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang("case exceeded its time limit")


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def tile_case(path: Path, out: Path) -> dict:
    import pyarrow.parquet as pq

    from pbip_engine.engine.ingest.tile_slide import tile_slide
    from pbip_engine.engine.wsi.tiling import TileGridParams
    from pbip_engine.engine.wsi.tissue import TissueParams

    res = tile_slide(path, "s", out, class_names=["red", "blue"], slide_labels=[1, 0], encode_threads=0,
                     grid=TileGridParams(mpp=CARD["mpp"], tile_px=TILE_PX, overlap=0.0, min_tissue=0.1),
                     tissue=TissueParams())  # fmt: skip
    rec = {"status": res.status, "reason": res.reason}
    if res.status == "done":
        t = pq.read_table(out / "tiles" / "s.parquet", columns=["x", "y", "image"])
        rec["hash"] = hashlib.sha1(json.dumps(t.select(["x", "y"]).to_pydict()).encode()).hexdigest()
        rec["pixels"] = hashlib.sha1(b"".join(t.column("image").to_pylist())).hexdigest()
    return rec


def _colour_stream(plans: list, overrides: dict):
    from pbip_engine.engine.inference.segment_slide import TileReader

    reader = TileReader(TILE_PX, overrides)
    for t in [p.tile_table() for p in plans]:
        for i in range(0, len(t["x"]), 32):
            b = reader({k: v[i : i + 32] for k, v in t.items()})
            img = b.pop("image").astype(np.float32)
            r, bl = img[..., 0], img[..., 2]
            b["logits"] = np.stack([np.zeros_like(r), r - bl, bl - r], axis=1).astype(np.float16)
            yield b


def segment_case(path: Path, out: Path) -> dict:
    import tifffile

    from pbip_engine.engine.inference.cohort import segment_cohort

    for _, r in segment_cohort([path], CARD, out, _colour_stream, overlap=0.25, blend="average",
                               tile_px=TILE_PX):  # fmt: skip
        if isinstance(r, Exception):
            return {"status": "failed", "reason": f"{type(r).__name__}: {r}"[:300]}
        mask = tifffile.imread(out / f"{r['slide_id']}.mask.ome.tif", level=0)
        return {"status": "done", "hash": hashlib.sha1(np.ascontiguousarray(mask).tobytes()).hexdigest()}
    return {"status": "failed", "reason": "no result"}


def main() -> None:
    limit_gb, seconds = float(sys.argv[1]), int(sys.argv[2])
    import pbip_engine.engine.inference.segment_slide
    import pbip_engine.engine.ingest.tile_slide  # noqa: F401  (imports before the limit)

    cap = _vm_bytes() + int(limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.signal(signal.SIGALRM, _alarm)
    for name in sys.argv[3:]:
        path = Path(name)
        rec: dict = {"file": path.name}
        for what, fn in (("tile", tile_case), ("segment", segment_case)):
            with tempfile.TemporaryDirectory() as d:
                signal.alarm(seconds)
                try:
                    rec[what] = fn(path, Path(d))
                except (Hang, MemoryError) as e:
                    rec[what] = {"status": "crash", "reason": f"{type(e).__name__}: {e}"}
                except Exception as e:  # the paths must turn every problem into a result
                    rec[what] = {"status": "crash", "reason": f"raised {type(e).__name__}: {e}"[:300]}
                finally:
                    signal.alarm(0)
        print(json.dumps(rec), flush=True)
    os._exit(0)  # skip interpreter teardown (cuCIM/zarr threads)


if __name__ == "__main__":
    main()
