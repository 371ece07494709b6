"""``segmenter.backbone_init: stage1``: stage 2 starts from the stage-1 model's fine-tuned backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from pbip_engine.engine.nn.backbones import create_backbone
from pbip_engine.engine.training.checkpoint import CheckpointError, save_checkpoint, submodule_weights
from pbip_engine.jobs.stages import get_stage
from pbip_engine.schemas.spec import SpecError, load_spec

GOOD = {
    "run": {"name": "t", "output": "out"},
    "data": {"synthetic": {"slides": 1, "size": 512}},
    "classes": [{"name": "tumour", "color": [255, 0, 0]}, {"name": "stroma", "color": [0, 255, 0]}],
}


def _spec(tmp_path: Path, **sections: dict):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump({**GOOD, **sections}))
    return load_spec(p)


class _Stage1(nn.Module):
    """A stage-1 model as the methods save it: a ``backbone`` beside parts stage 2 has no use for."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = create_backbone("efficientnet_lite0", pretrained=False, out_indices=(2, 3, 4))
        self.projector = nn.Linear(4, 4)


def _stage1_checkpoint(path: Path) -> _Stage1:
    torch.manual_seed(0)
    model = _Stage1()
    with torch.no_grad():  # weights no ImageNet start has: a copy is told from a fresh build
        for p in model.backbone.parameters():
            p.normal_()
    save_checkpoint(path, model, kind="stage1:pbip")
    return model


def test_stage2_starts_from_the_stage1_backbone(tmp_path: Path) -> None:
    from pbip_engine.jobs.train_stage2 import stage2_setup

    ck = tmp_path / "best.pt"
    stage1 = _stage1_checkpoint(ck)
    config = {"arch": "deeplabv3plus", "n_classes": 3, "backbone": "efficientnet_lite0", "pretrained": True,
              "crop_px": 96, "loop": {"amp": False}, "init_backbone": str(ck)}  # fmt: skip
    task, _ = stage2_setup(config)
    got, want = task.model.backbone.state_dict(), stage1.backbone.state_dict()
    for key in ("conv_stem.weight", "blocks.6.0.conv_pwl.weight", "blocks.1.0.bn1.running_mean"):
        torch.testing.assert_close(got[key], want[key])
    assert task.model.backbone.load_report == {"missing": [], "unexpected": []}
    plain, _ = stage2_setup({**config, "init_backbone": None})
    assert not torch.equal(plain.model.backbone.state_dict()["conv_stem.weight"], want["conv_stem.weight"])


def test_submodule_weights_strips_the_prefix_and_names_a_file_without_it(tmp_path: Path) -> None:
    ck = tmp_path / "best.pt"
    save_checkpoint(ck, nn.Sequential(nn.Linear(2, 2)), kind="stage1:pbip")
    with pytest.raises(CheckpointError, match=r"best\.pt: the model has no weights under 'backbone\.'"):
        submodule_weights(ck, "backbone.")
    assert set(submodule_weights(ck, "0.")) == {"weight", "bias"}


def test_stage1_init_makes_the_segmenter_follow_the_stage1_model(tmp_path: Path) -> None:
    stage = get_stage("segmenter")
    spec = _spec(tmp_path, segmenter={"backbone_init": "stage1"})
    assert "classnet" in stage.dependencies(spec)
    assert "classnet" not in stage.dependencies(_spec(tmp_path))  # the default reads only the pseudo masks


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"segmenter": {"backbone_init": "stage1", "backbone_checkpoint": "w.pth"}}, "set one of them"),
        ({"segmenter": {"backbone_init": "stage1", "backbone": "resnet18"}}, "method.backbone"),
        ({"segmenter": {"backbone_init": "stage1"}, "method": {"name": "mpamatch", "labelled": ["synth_000"]}},
         "trains no stage-1 model"),
        ({"segmenter": {"backbone_init": "ImageNet"}}, "segmenter.backbone_init"),
    ],
)  # fmt: skip
def test_stage1_init_refused_where_there_is_no_matching_stage1_backbone(
    tmp_path: Path, sections: dict, message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        _spec(tmp_path, **sections)
