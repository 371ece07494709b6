"""Tile labels from QuPath outlines (coverage threshold, class matching) and per-slide label CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely

from pbip_engine.engine.annotations.geojson import Annotation, write_annotations
from pbip_engine.engine.annotations.tile_labels import LabelError, TileLabeler, read_slide_label_csv

CLASSES = ["Tumor", "Stroma", "Necrosis"]


@pytest.fixture
def outlines(tmp_path: Path) -> Path:
    p = tmp_path / "ann.geojson"
    write_annotations(
        p,
        [
            Annotation(" tumor ", (200, 0, 0), shapely.box(0, 0, 1000, 1000)),  # case/space-insensitive
            Annotation("TUMOR", (200, 0, 0), shapely.box(500, 0, 1500, 1000)),  # overlaps the first
            Annotation("Stroma", (0, 200, 0), shapely.box(1000, 0, 2000, 1000)),
        ],
    )
    return p


def test_coverage_threshold_and_unlabelled(outlines: Path) -> None:
    lab = TileLabeler.from_geojson(outlines, CLASSES, min_fraction=0.1)
    assert lab.label(100, 100, 200) == (True, pytest.approx(np.array([1, 0, 0])))
    ok, v = lab.label(1400, 100, 200)  # half tumour, half stroma
    assert ok and v.tolist() == [1, 1, 0] and v.dtype == np.uint8
    ok, v = lab.label(1480, 100, 200)  # tumour covers 20/200 = 10 % exactly: present
    assert v.tolist() == [1, 1, 0]
    ok, v = lab.label(1490, 100, 200)  # 5 %: absent
    assert v.tolist() == [0, 1, 0]
    assert lab.label(5000, 5000, 200) == (False, pytest.approx(np.zeros(3)))  # outside everything
    ok, v = lab.label(1990, 900, 200)  # touches stroma with 0.25 % only: unlabelled, not "no class"
    assert not ok and not v.any()


def test_overlapping_outlines_of_one_class_do_not_double_count(outlines: Path) -> None:
    lab = TileLabeler.from_geojson(outlines, CLASSES, min_fraction=0.6)
    ok, v = lab.label(400, 0, 200)  # tumour from both outlines, union covers 100 %
    assert ok and v.tolist() == [1, 0, 0]
    ok, v = lab.label(-100, 0, 200)  # half outside the union: 50 % < 60 %
    assert not ok


def test_unknown_class_lists_all_names(tmp_path: Path) -> None:
    p = tmp_path / "bad.geojson"
    write_annotations(
        p,
        [
            Annotation("Tumour", (1, 2, 3), shapely.box(0, 0, 10, 10)),
            Annotation("Fat", (1, 2, 3), shapely.box(0, 0, 10, 10)),
            Annotation("Tumor", (1, 2, 3), shapely.box(0, 0, 10, 10)),
        ],
    )
    with pytest.raises(LabelError) as ei:
        TileLabeler.from_geojson(p, CLASSES)
    msg = str(ei.value)
    assert msg.startswith(str(p))
    assert "Fat" in msg and "Tumour" in msg and "Necrosis" in msg


def test_unreadable_geojson(tmp_path: Path) -> None:
    p = tmp_path / "x.geojson"
    p.write_text("{not json")
    with pytest.raises(LabelError, match=str(p)):
        TileLabeler.from_geojson(p, CLASSES)


def test_slide_labels() -> None:
    lab = TileLabeler.from_slide_labels([0, 1, 1])
    ok, v = lab.label(0, 0, 10)
    assert ok and v.tolist() == [0, 1, 1]
    for bad in ([0, 0, 0], [0, 2, 1], []):
        with pytest.raises(LabelError):
            TileLabeler.from_slide_labels(bad)


def test_slide_label_csv_columns(tmp_path: Path) -> None:
    p = tmp_path / "l.csv"
    p.write_text("slide,stroma,TUMOR,necrosis\na.svs,1,0,0\nb,1,1,0\n")
    assert read_slide_label_csv(p, CLASSES) == {"a.svs": [0, 1, 0], "b": [1, 1, 0]}


def test_slide_label_csv_names(tmp_path: Path) -> None:
    p = tmp_path / "l.csv"
    p.write_text("slide,labels\na.svs,Tumor;necrosis\nb.svs,\n")
    assert read_slide_label_csv(p, CLASSES) == {"a.svs": [1, 0, 1], "b.svs": [0, 0, 0]}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("slide,labels\na,Tumor;Fat\n", ":2:"),
        ("slide,tumor,stroma\na,1,0\n", ":1:"),  # missing a class column
        ("slide,tumor,stroma,necrosis,fat\na,1,0,0,0\n", ":1:"),
        ("slide,tumor,stroma,necrosis\na,1,0,yes\n", ":2:"),
        ("slide,tumor,stroma,necrosis\na,1,0,0\na,0,1,0\n", ":3:"),
        ("name,labels\na,Tumor\n", ":1:"),
    ],
)
def test_slide_label_csv_errors(tmp_path: Path, text: str, where: str) -> None:
    p = tmp_path / "l.csv"
    p.write_text(text)
    with pytest.raises(LabelError) as ei:
        read_slide_label_csv(p, CLASSES)
    assert str(ei.value).startswith(f"{p}{where}")
