"""Each method's stage-2 architecture where the spec leaves ``segmenter.arch`` open."""

from __future__ import annotations

import pytest

from pbip_engine.schemas.spec import parse_spec

BASE = {"run": {"output": "o"}, "data": {"synthetic": {}}, "classes": [{"name": "a", "color": [1, 2, 3]}]}


@pytest.mark.parametrize("method", ["pbip", "gland", "lpd"])
def test_cam_methods_default_to_deeplabv3plus_and_the_spec_overrides_it(tmp_path, method):
    """The CAM methods' stage 2 is DeepLab-v3+ unless the spec says otherwise (demo, same pseudo masks: PBIP
    0.87 -> 0.93 over v2, session 41; gland and LPD 0.87 -> 0.92-0.93, session 42)."""
    from pbip_engine.jobs.train_stage2 import segmenter_arch

    spec = {**BASE, "method": {"name": method}}
    assert segmenter_arch(parse_spec(spec, tmp_path)) == "deeplabv3plus"
    v2 = parse_spec({**spec, "segmenter": {"arch": "deeplabv2"}}, tmp_path)
    assert segmenter_arch(v2) == "deeplabv2"


def test_mpamatch_keeps_its_transunet(tmp_path):
    from pbip_engine.jobs.train_stage2 import segmenter_arch

    assert segmenter_arch(parse_spec({**BASE, "method": {"name": "mpamatch"}}, tmp_path)) == "transunet"
