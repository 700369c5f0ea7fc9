"""SpatialData .zarr in and out: a store written by spatialdata reads back as the AnnData it came from, in the same
world frame as its images; results are written into a new store that spatialdata reads, and the source is never
touched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

sd = pytest.importorskip("spatialdata")

from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel  # noqa: E402
from spatialdata.transformations import Affine, Scale, Sequence, Translation  # noqa: E402

from spatial_deconv_gui.io.errors import InputError  # noqa: E402
from spatial_deconv_gui.io.sdata import (  # noqa: E402
    looks_like_spatialdata,
    read_spatialdata,
    write_spatialdata_fixture,
    write_spatialdata_result,
)

WORLD_PER_COORD = 2.0  # circles' scale to "global"
IMAGE_SCALE = 5.0  # world units per image pixel
RADIUS = 27.5
RCTD_PARAMS = {"mode": "full", "sigma_override": 0.84}


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


@pytest.fixture(scope="module")
def slide_pair():
    from spatial_deconv_gui.simulate import simulate_dataset

    return simulate_dataset(n_spots=300, n_genes=120, n_types=4, cells_per_type=30, seed=3)


@pytest.fixture(scope="module")
def store(slide_pair, tmp_path_factory):
    """The simulated slide as a store: circles scaled by 2 into "global", an RGB pyramid at 5 world units/pixel with
    one bright pixel under the first spot's centre."""
    spatial, _ = slide_pair
    world = spatial.obsm["spatial"] * WORLD_PER_COORD
    height, width = (np.ceil(world.max(axis=0) / IMAGE_SCALE).astype(int) + 8)[::-1]
    image = np.zeros((height, width, 3), np.uint8)
    # spatialdata: pixel i spans [i, i + 1) * scale, so the pixel holding a point is floor(point / scale)
    row, col = np.floor(world[0, ::-1] / IMAGE_SCALE).astype(int)
    image[row, col] = 255
    path = tmp_path_factory.mktemp("sdata") / "slide.zarr"
    write_spatialdata_fixture(
        spatial,
        path,
        image=image,
        spot_radius=RADIUS,
        world_per_coord=WORLD_PER_COORD,
        image_scale=IMAGE_SCALE,
        image_scale_factors=[2, 2],
    )
    return path


@pytest.fixture(scope="module")
def rctd_runs(slide_pair, store, tmp_path_factory):
    """RCTD on the .h5ad the store was made from and on the store itself."""
    import anndata as ad

    from spatial_deconv_gui import api
    from spatial_deconv_gui.engines.base import thread_cap

    spatial, reference = slide_pair
    h5ad = tmp_path_factory.mktemp("h5ad") / "slide.h5ad"
    spatial.write_h5ad(h5ad)
    slide = read_spatialdata(store, images=False)
    with thread_cap(1):
        from_h5ad = api.run_deconvolution(
            ad.read_h5ad(h5ad), reference, method="rctd", params=RCTD_PARAMS, device="cpu"
        )
        from_zarr = api.run_deconvolution(slide.adata, reference, method="rctd", params=RCTD_PARAMS, device="cpu")
    return from_h5ad, from_zarr


def test_looks_like_spatialdata_without_importing_it(store, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "images").mkdir()  # element folders but no zarr group
    h5ad = tmp_path / "x.h5ad"
    h5ad.write_bytes(b"")
    code = (
        "import sys; from spatial_deconv_gui.io.sdata import looks_like_spatialdata as f; "
        f"print(f({str(store)!r}), f({str(plain)!r}), f({str(h5ad)!r}), 'spatialdata' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False", "False"]
    empty_zarr = tmp_path / "empty.zarr"
    empty_zarr.mkdir()
    (empty_zarr / "zarr.json").write_text("{}")
    assert looks_like_spatialdata(empty_zarr)  # so that reading it says what is missing
    with pytest.raises(InputError):
        read_spatialdata(empty_zarr)


def test_store_reads_back_as_the_anndata(slide_pair, store):
    spatial, _ = slide_pair
    slide = read_spatialdata(store)
    a = slide.adata
    assert (slide.format, slide.table, slide.region, slide.path) == ("spatialdata", "table", "spots", store)
    assert list(a.obs_names) == list(spatial.obs_names) and list(a.var_names) == list(spatial.var_names)
    np.testing.assert_array_equal(_dense(a.X), _dense(spatial.X))
    np.testing.assert_array_equal(a.obs["nUMI"], spatial.obs["nUMI"])
    # obsm['spatial'] stays in the element's units; world = coords * the circles' scale
    np.testing.assert_array_equal(a.obsm["spatial"], spatial.obsm["spatial"])
    assert slide.world_per_coord == WORLD_PER_COORD
    np.testing.assert_allclose(slide.world_yx(), spatial.obsm["spatial"][:, ::-1] * WORLD_PER_COORD, rtol=0, atol=1e-9)
    assert slide.spot_diameter == pytest.approx(2 * RADIUS * WORLD_PER_COORD)
    assert slide.unit == "px"  # spatialdata writes the placeholder unit "unit"
    assert a.uns["spatialdata_attrs"]["region"] == "spots" and slide.notices == []


def test_image_is_lazy_and_lands_under_its_spot(slide_pair, store):
    import dask.array as da

    spatial, _ = slide_pair
    slide = read_spatialdata(store)
    (image,) = slide.images
    assert isinstance(image.levels[0], da.Array) and image.rgb and image.channel_axis is None
    assert len(image.levels) == 3 and image.levels[0].shape[0] > image.levels[1].shape[0] > image.levels[2].shape[0]
    assert image.levels[0].shape[2] == 3
    assert image.scale == IMAGE_SCALE
    # the centre of pixel (0, 0) is half a pixel in from the image's corner at the origin
    assert image.translate == (IMAGE_SCALE / 2, IMAGE_SCALE / 2)
    level0 = np.asarray(image.levels[0][..., 0])
    bright = np.array(np.unravel_index(np.argmax(level0), level0.shape), dtype=float)
    bright_world = np.asarray(image.translate) + bright * image.scale
    spot_world = slide.world_yx()[0]
    assert np.abs(bright_world - spot_world).max() <= IMAGE_SCALE / 2 + 1e-9  # within half a pixel
    assert not read_spatialdata(store, images=False).images


def test_several_tables_are_listed_and_picked(slide_pair, tmp_path):
    spatial, _ = slide_pair
    other = spatial.copy()
    other.X = other.X * 2
    path = write_spatialdata_fixture(spatial, tmp_path / "two.zarr", extra_tables={"doubled": other})
    with pytest.raises(InputError) as exc:
        read_spatialdata(path)
    assert exc.value.code == "several_tables"
    assert "table" in exc.value.problem and "doubled" in exc.value.problem and "--table" in exc.value.fix
    picked = read_spatialdata(path, table="doubled")
    assert picked.table == "doubled"
    np.testing.assert_array_equal(_dense(picked.adata.X), 2 * _dense(spatial.X))
    with pytest.raises(InputError) as exc:
        read_spatialdata(path, table="nope")
    assert exc.value.code == "unknown_element" and "doubled" in exc.value.problem and "table" in exc.value.problem


def test_rctd_on_the_store_equals_rctd_on_the_h5ad(rctd_runs):
    from_h5ad, from_zarr = rctd_runs
    a, b = from_h5ad.adata.obsm["rctd_proportions"], from_zarr.adata.obsm["rctd_proportions"]
    assert list(a.columns) == list(b.columns) and list(a.index) == list(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=0, atol=1e-12)


def test_result_round_trip(store, rctd_runs, tmp_path):
    result = rctd_runs[1].adata
    before = _tree_digest(store)
    out = tmp_path / "result.zarr"
    assert write_spatialdata_result(result, store, out) == out
    assert _tree_digest(store) == before
    assert [p.name for p in tmp_path.iterdir()] == ["result.zarr"]  # no temporary folder left behind

    back = sd.read_zarr(out)
    assert set(back.images) == {"image"} and set(back.shapes) == {"spots"}
    table = back.tables["table"]
    props = table.obsm["rctd_proportions"]
    assert isinstance(props, pd.DataFrame)
    assert list(props.columns) == list(result.obsm["rctd_proportions"].columns)
    np.testing.assert_array_equal(props.to_numpy(), result.obsm["rctd_proportions"].to_numpy())
    assert list(table.obs["rctd_dominant_type"].astype(str)) == list(result.obs["rctd_dominant_type"].astype(str))
    assert table.uns["rctd"]["method"] == result.uns["rctd"]["method"]
    assert list(table.uns["rctd"]["cell_types"]) == list(props.columns)
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == ("spots", "region", "spot_id")
    again = read_spatialdata(out)
    np.testing.assert_array_equal(again.adata.obsm["spatial"], result.obsm["spatial"])
    assert len(again.images) == 1 and again.world_per_coord == WORLD_PER_COORD

    # an existing output is replaced whole, the input never
    (out / "stale.txt").write_text("from an earlier run")
    write_spatialdata_result(result, store, out)
    assert not (out / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["result.zarr"]
    with pytest.raises(InputError) as exc:
        write_spatialdata_result(result, store, store)
    assert exc.value.code == "output_is_input"
    with pytest.raises(InputError) as exc:
        write_spatialdata_result(result, store, tmp_path)  # a folder holding other things
    assert exc.value.code in ("output_exists", "output_is_input")
    assert _tree_digest(store) == before


def test_rows_must_match_the_source_table(store, slide_pair, tmp_path):
    spatial, _ = slide_pair
    with pytest.raises(InputError) as exc:
        write_spatialdata_result(spatial[:10].copy(), store, tmp_path / "o.zarr")
    assert exc.value.code == "rows_mismatch"
    assert not (tmp_path / "o.zarr").exists()


def _write(sdata, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata.write(path)
    return path


def _table(n: int, region, ids, offset: int = 0):
    import anndata as ad

    rng = np.random.default_rng(offset)
    a = ad.AnnData(
        X=rng.poisson(3, (n, 6)).astype(np.float32),
        obs=pd.DataFrame(index=[f"c{offset + i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(6)]),
    )
    a.obs["region"] = pd.Categorical(region if not isinstance(region, str) else [region] * n)
    a.obs["cell"] = np.asarray(ids)
    return a


def test_translated_rotated_polygons_and_points(tmp_path):
    from shapely.geometry import Polygon

    squares = [Polygon([(x, y), (x + 2, y), (x + 2, y + 2), (x, y + 2)]) for x, y in [(0, 0), (10, 4), (3, 8)]]
    import geopandas as gpd

    moved = Sequence([Scale([3.0, 3.0], axes=("x", "y")), Translation([100.0, -50.0], axes=("x", "y"))])
    shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=squares, index=[7, 8, 9]), transformations={"global": moved})
    rotation = Affine(
        np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float), input_axes=("x", "y"), output_axes=("x", "y")
    )
    image = Image2DModel.parse(
        np.zeros((1, 8, 8), np.uint16), dims=("c", "y", "x"), transformations={"global": rotation}
    )
    table = TableModel.parse(_table(3, "cells", [9, 7, 8]), region="cells", region_key="region", instance_key="cell")
    path = _write(
        sd.SpatialData(shapes={"cells": shapes}, images={"tilted": image}, tables={"table": table}),
        tmp_path / "poly.zarr",
    )
    slide = read_spatialdata(path)
    centroids = np.array([[4.0, 9.0], [1.0, 1.0], [11.0, 5.0]])  # instances 9, 7, 8: table order
    np.testing.assert_allclose(slide.adata.obsm["spatial"], centroids * 3 + [100, -50])
    assert slide.world_per_coord == 1.0 and slide.spot_diameter is None
    assert slide.images == [] and "tilted" in slide.notices[0]

    points = PointsModel.parse(
        pd.DataFrame({"x": [1.0, 2.0], "y": [5.0, 6.0]}, index=[0, 1]),
        transformations={"global": Scale([0.5, 0.5], axes=("x", "y"))},
    )
    grey = Image2DModel.parse(np.zeros((2, 4, 4), np.uint16), dims=("c", "y", "x"), c_coords=["DAPI", "PolyT"])
    table = TableModel.parse(_table(2, "dots", [1, 0]), region="dots", region_key="region", instance_key="cell")
    path = _write(
        sd.SpatialData(points={"dots": points}, images={"stain": grey}, tables={"table": table}),
        tmp_path / "points.zarr",
    )
    slide = read_spatialdata(path)
    np.testing.assert_array_equal(slide.adata.obsm["spatial"], [[2.0, 6.0], [1.0, 5.0]])
    assert slide.world_per_coord == 0.5
    (stain,) = slide.images
    assert stain.channel_axis == 0 and stain.channel_names == ["DAPI", "PolyT"] and stain.translate == (0.5, 0.5)


def test_missing_instances_are_reported(tmp_path):
    shapes = ShapesModel.parse(np.array([[0.0, 0.0], [1.0, 1.0]]), geometry=0, radius=np.ones(2), index=[0, 1])
    table = TableModel.parse(_table(3, "spots", [0, 1, 5]), region="spots", region_key="region", instance_key="cell")
    path = _write(sd.SpatialData(shapes={"spots": shapes}, tables={"table": table}), tmp_path / "bad.zarr")
    with pytest.raises(InputError) as exc:
        read_spatialdata(path)
    assert exc.value.code == "missing_instances"
    assert "1 of 3" in exc.value.problem and "5" in exc.value.problem


def test_table_over_two_regions(tmp_path):
    def circles(xy):
        return ShapesModel.parse(np.asarray(xy, float), geometry=0, radius=np.ones(len(xy)), index=np.arange(len(xy)))

    table = _table(5, ["left", "right", "left", "right", "right"], [0, 0, 1, 1, 2])
    table = TableModel.parse(table, region=["left", "right"], region_key="region", instance_key="cell")
    path = _write(
        sd.SpatialData(
            shapes={"left": circles([[0, 0], [1, 1]]), "right": circles([[5, 5], [6, 6], [7, 7]])},
            tables={"table": table},
        ),
        tmp_path / "two_regions.zarr",
    )
    left = read_spatialdata(path)
    assert left.region == "left" and list(left.adata.obs_names) == ["c0", "c2"] and "right" in left.notices[0]
    right = read_spatialdata(path, region="right")
    np.testing.assert_array_equal(right.adata.obsm["spatial"], [[5, 5], [6, 6], [7, 7]])

    result = right.adata.copy()
    result.obsm["toy_proportions"] = pd.DataFrame(
        [[0.1, 0.9], [0.5, 0.5], [1.0, 0.0]], index=result.obs_names, columns=["A", "B"]
    )
    result.obs["toy_dominant_type"] = pd.Categorical(["B", "A", "A"])
    result.obs["toy_converged"] = [True, False, True]
    out = write_spatialdata_result(result, path, tmp_path / "out.zarr")
    back = sd.read_zarr(out).tables["table"]
    assert list(back.uns["spatialdata_attrs"]["region"]) == ["left", "right"]
    props = back.obsm["toy_proportions"]
    assert list(props.columns) == ["A", "B"] and np.isnan(props.to_numpy()[[0, 2]]).all()
    np.testing.assert_array_equal(props.to_numpy()[[1, 3, 4]], [[0.1, 0.9], [0.5, 0.5], [1.0, 0.0]])
    assert list(back.obs["toy_dominant_type"].astype(object).where(back.obs["toy_dominant_type"].notna(), None)) == [
        None,
        "B",
        None,
        "A",
        "A",
    ]
    assert back.obs["toy_converged"].isna().tolist() == [True, False, True, False, False]


def test_micrometre_axes_give_micrometres(store, tmp_path):
    import json
    import shutil

    copy = tmp_path / "um.zarr"
    shutil.copytree(store, copy)
    meta_file = copy / "shapes" / "spots" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    for transform in meta["attributes"]["coordinateTransformations"]:
        for axis in transform["output"]["axes"]:
            axis["unit"] = "micrometer"
    meta_file.write_text(json.dumps(meta))
    assert read_spatialdata(copy, images=False).unit == "µm"


def test_without_spatialdata_the_error_says_what_to_install(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # as if it were not installed
    with pytest.raises(InputError) as exc:
        read_spatialdata(store)
    assert exc.value.code == "missing_dependency" and 'pip install "spatial-deconv-gui[spatial]"' in exc.value.fix
