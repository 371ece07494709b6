"""QuPath GeoJSON I/O and exact mask vectorisation."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box

from pbip_engine.engine.annotations.geojson import (
    Annotation,
    GeoJSONError,
    mask_to_geometries,
    read_annotations,
    write_annotations,
)


def feature(geom: dict, props: dict | None) -> dict:
    f = {"type": "Feature", "geometry": geom}
    if props is not None:
        f["properties"] = props
    return f


SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}


def covered(geom, shape: tuple[int, int]) -> np.ndarray:
    """Which pixel centres lie inside ``geom``."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    return shapely.contains_xy(geom, xx.ravel(), yy.ravel()).reshape(shape)


def test_round_trip_with_holes_multipolygon_measurements(tmp_path):
    ring = Polygon([(0, 0), (100, 0), (100, 80), (0, 80)], [[(20, 20), (40, 20), (40, 40), (20, 40)]])
    multi = MultiPolygon([box(200, 200, 250, 260), box(300, 300, 310.5, 320.25)])
    anns = [
        Annotation("tumour", (200, 40, 40), ring, {"score": 0.75}),
        Annotation("stroma", (240, 130, 190), multi),
    ]
    for name in ("a.geojson", "b.json", "c.geojson.gz"):
        p = tmp_path / name
        write_annotations(p, anns)
        back = read_annotations(p)
        assert [a.name for a in back] == ["tumour", "stroma"]
        assert [a.color for a in back] == [(200, 40, 40), (240, 130, 190)]
        assert back[0].geometry.equals(ring) and len(back[0].geometry.interiors) == 1
        assert back[1].geometry.equals(multi)
        assert back[0].measurements == {"score": 0.75} and back[1].measurements is None
    raw = json.loads(gzip.decompress((tmp_path / "c.geojson.gz").read_bytes()))
    assert raw["type"] == "FeatureCollection"
    props = raw["features"][0]["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"] == {"name": "tumour", "color": [200, 40, 40]}
    ids = [f["id"] for f in raw["features"]]
    assert len(set(ids)) == 2 and all(len(i) == 36 for i in ids)
    assert list(tmp_path.iterdir()) and not [x for x in tmp_path.iterdir() if x.name.startswith(".")]


def test_id_seed_makes_bytes_deterministic(tmp_path):
    anns = [Annotation("a", (1, 2, 3), box(0, 0, 5, 5)), Annotation("b", (1, 2, 3), box(9, 9, 12, 12))]
    write_annotations(tmp_path / "1.geojson", anns, id_seed="x")
    write_annotations(tmp_path / "2.geojson", anns, id_seed="x")
    write_annotations(tmp_path / "3.geojson", anns)
    assert (tmp_path / "1.geojson").read_bytes() == (tmp_path / "2.geojson").read_bytes()
    assert (tmp_path / "1.geojson").read_bytes() != (tmp_path / "3.geojson").read_bytes()
    write_annotations(tmp_path / "d.geojson", anns, object_type="detection")
    raw = json.loads((tmp_path / "d.geojson").read_text())
    assert {f["properties"]["objectType"] for f in raw["features"]} == {"detection"}


def test_classification_variants_and_containers(tmp_path):
    feats = [
        feature(SQUARE, {"classification": "Tumor"}),
        feature(SQUARE, {"classification": {"name": "Stroma", "color": [1, 2, 3]}}),
        feature(
            SQUARE,
            {"classification": {"name": "Necrosis", "colorRGB": -16777216 + (10 << 16) + (20 << 8) + 30}},
        ),
        feature(SQUARE, {"classification": {"names": ["Tumor", "Positive"], "color": [9, 9, 9, 255]}}),
        feature(
            SQUARE,
            {"classification": "Other", "color": [7, 8, 9], "measurements": [{"name": "m", "value": 2}]},
        ),
    ]
    p = tmp_path / "list.json"
    p.write_text(json.dumps(feats))
    anns = read_annotations(p)
    assert [(a.name, a.color) for a in anns] == [
        ("Tumor", (255, 0, 0)),
        ("Stroma", (1, 2, 3)),
        ("Necrosis", (10, 20, 30)),
        ("Tumor:Positive", (9, 9, 9)),
        ("Other", (7, 8, 9)),
    ]
    assert anns[4].measurements == {"m": 2.0}
    single = tmp_path / "one.geojson"
    single.write_text(json.dumps(feats[1]))
    assert [a.name for a in read_annotations(single)] == ["Stroma"]


def test_unclassified_feature(tmp_path):
    p = tmp_path / "u.geojson"
    p.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [feature(SQUARE, {"classification": "A"}), feature(SQUARE, {})],
            }
        )
    )
    with pytest.raises(GeoJSONError, match=r"u\.geojson: feature 1.*no classification"):
        read_annotations(p)
    assert [a.name for a in read_annotations(p, require_class=False)] == ["A"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid"),
        ('{"type": "Topology"}', "expected a FeatureCollection"),
        (
            '{"type": "FeatureCollection", "features": [{"type": "Point"}]}',
            "feature 0: not a GeoJSON Feature",
        ),
        (
            json.dumps([feature(SQUARE, {"classification": {"name": "x", "color": "red"}})]),
            "feature 0: invalid colour",
        ),
        (
            json.dumps([feature({"type": "Polygon", "coordinates": "?"}, {"classification": "x"})]),
            "invalid geometry",
        ),
        (json.dumps([feature(SQUARE, {"classification": {"color": [1, 2, 3]}})]), "no 'name'"),
    ],
)
def test_bad_files_name_the_file(tmp_path, content, match):
    p = tmp_path / "bad.geojson"
    p.write_text(content)
    with pytest.raises(GeoJSONError, match=match) as e:
        read_annotations(p)
    assert str(p) in str(e.value)
    with pytest.raises(GeoJSONError, match="not found"):
        read_annotations(tmp_path / "missing.geojson")


def test_invalid_polygons_are_made_valid(tmp_path):
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10), (0, 0)])
    assert not bowtie.is_valid
    collection = shapely.GeometryCollection([shapely.LineString([(0, 0), (5, 5)]), box(20, 20, 30, 30)])
    line_only = shapely.LineString([(0, 0), (1, 1)])
    p = tmp_path / "v.geojson"
    write_annotations(
        p,
        [
            Annotation("a", (1, 1, 1), bowtie),
            Annotation("b", (1, 1, 1), collection),
            Annotation("c", (1, 1, 1), line_only),
        ],
    )
    raw = json.loads(p.read_text())
    assert len(raw["features"]) == 2  # the line has no area and is dropped
    geoms = [shapely.geometry.shape(f["geometry"]) for f in raw["features"]]
    assert all(g.is_valid and g.geom_type in ("Polygon", "MultiPolygon") for g in geoms)
    assert geoms[0].area == pytest.approx(50.0)
    assert geoms[1].equals(box(20, 20, 30, 30))
    # reading an invalid polygon written by someone else also yields valid geometry
    q = tmp_path / "w.geojson"
    q.write_text(json.dumps([feature(shapely.geometry.mapping(bowtie), {"classification": "a"})]))
    (a,) = read_annotations(q)
    assert a.geometry.is_valid and a.geometry.area == pytest.approx(50.0)


def test_mask_to_geometries_exact_with_holes_and_transform():
    m = np.zeros((12, 12), np.uint8)
    m[1:9, 1:9] = 1
    m[3, 3] = 0  # one-pixel hole
    m[5:7, 5:7] = 2  # a hole in class 1 filled by class 2
    m[8, 1:9] = 1
    m[10, 10] = 1  # a single isolated pixel
    m[0, 11] = 1  # diagonal neighbours only touch at a corner
    m[1, 10] = 1
    g = mask_to_geometries(m)
    assert set(g) == {1, 2}
    for k in (1, 2):
        assert g[k].is_valid
        assert g[k].area == pytest.approx((m == k).sum())
        np.testing.assert_array_equal(covered(g[k], m.shape), m == k)
    big = max(g[1].geoms, key=lambda p: p.area)
    assert len(big.interiors) == 2
    # scale / offset: a 4x downsampled mask maps back to level-0 coordinates
    t = mask_to_geometries(m, labels=[2], scale=4.0, offset=(100, 50))
    assert t[2].equals(box(100 + 20, 50 + 20, 100 + 28, 50 + 28))
    assert mask_to_geometries(m, labels=[7]) == {}


def test_mask_to_geometries_random_masks_area_matches_pixels():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.7):
        m = (rng.random((40, 50)) < density).astype(np.uint8) * rng.integers(1, 4, (40, 50)).astype(np.uint8)
        for k, geom in mask_to_geometries(m).items():
            assert geom.is_valid
            assert geom.area == pytest.approx((m == k).sum())
            np.testing.assert_array_equal(covered(geom, m.shape), m == k)


def test_min_area_and_simplify():
    m = np.zeros((60, 60), np.uint8)
    yy, xx = np.mgrid[0:60, 0:60]
    m[(yy - 30) ** 2 + (xx - 30) ** 2 < 20**2] = 1
    m[2:4, 2:4] = 1  # 4 px speck
    full = mask_to_geometries(m)[1]
    assert len(full.geoms) == 2
    filtered = mask_to_geometries(m, min_area=10)[1]
    assert filtered.geom_type == "Polygon" and filtered.area == pytest.approx((m == 1).sum() - 4)
    simple = mask_to_geometries(m, simplify=1.5, min_area=10)[1]
    assert len(simple.exterior.coords) < len(filtered.exterior.coords)
    assert simple.is_valid and simple.area == pytest.approx(filtered.area, rel=0.05)
    assert mask_to_geometries(m, min_area=1e6) == {}
