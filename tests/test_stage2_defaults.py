"""Each method's stage-2 architecture where the spec leaves ``segmenter.arch`` open."""

from __future__ import annotations

from pbip_engine.schemas.spec import parse_spec


def test_pbip_defaults_to_deeplabv3plus_and_the_spec_overrides_it(tmp_path):
    """PBIP's stage 2 is DeepLab-v3+ unless the spec says otherwise (demo: 0.87 -> 0.93 over v2, session 41);
    the methods without a measured choice keep DeepLab-v2."""
    from pbip_engine.jobs.train_stage2 import segmenter_arch

    base = {"run": {"output": "o"}, "data": {"synthetic": {}}, "classes": [{"name": "a", "color": [1, 2, 3]}]}
    assert segmenter_arch(parse_spec(base, tmp_path)) == "deeplabv3plus"
    v2 = parse_spec({**base, "segmenter": {"arch": "deeplabv2"}}, tmp_path)
    assert segmenter_arch(v2) == "deeplabv2"
    for method in ("gland", "lpd"):
        assert segmenter_arch(parse_spec({**base, "method": {"name": method}}, tmp_path)) == "deeplabv2"
