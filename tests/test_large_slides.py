"""Past the points limit, slides and results are drawn as RGBA rasters: checked at 1M spots."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.colors import to_rgba

from spatial_deconv_gui.gui.layers import PLUGIN_KEY, spatial_layer_data, spot_colors
from spatial_deconv_gui.gui.raster import POINTS_LIMIT, make_raster, paint


def _grid_slide(n: int, pitch: float = 2.0) -> ad.AnnData:
    """A Visium HD-like square grid of n bins with a few counts each (cheap to build at 1M)."""
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n)))
    rows, cols = np.divmod(np.arange(n), side)
    x = sp.random(n, 5, density=0.4, format="csr", random_state=0, data_rvs=lambda k: rng.integers(1, 9, k)).astype(
        np.int32
    )
    a = ad.AnnData(
        X=x,
        obs=pd.DataFrame(
            {"zone": pd.Categorical(np.where(cols < side // 2, "left", "right"))}, index=pd.RangeIndex(n).astype(str)
        ),
    )
    a.obsm["spatial"] = np.column_stack([cols * pitch, rows * pitch]) + 10.0
    a.uns["zone_colors"] = ["#ff0000", "#0000ff"]
    return a


def test_raster_maps_each_spot_to_its_own_pixel():
    yx = np.array([[0.0, 0.0], [0.0, 2.0], [2.0, 0.0], [4.1, 3.9]])
    r = make_raster(yx, 2.0)
    assert r.shape == (3, 3)
    assert r.pixel.tolist() == [0, 1, 3, 8]
    colours = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1], [1, 1, 0, 1]], dtype=np.float32)
    img = paint(r, colours)
    assert (img.reshape(-1, 4)[[0, 1, 3, 8]] == colours * 255).all()
    assert (img[..., 3] > 0).sum() == 4  # the other five pixels stay transparent background


def test_irregular_spots_get_a_finer_pitch_and_stay_visible():
    from spatial_deconv_gui.gui.layers import spot_size
    from spatial_deconv_gui.gui.raster import choose_pitch, read_colours

    rng = np.random.default_rng(0)
    yx = rng.uniform(0, 1000, size=(20_000, 2))  # Slide-seq-like random beads
    spacing = spot_size(yx)
    pitch = choose_pitch(yx, spacing)
    r = make_raster(yx, pitch, spacing)
    assert pitch < spacing and r.footprint == round(spacing / pitch)
    assert 1 - np.unique(r.pixel).size / len(yx) <= 0.01
    colours = rng.uniform(0, 1, size=(len(yx), 4)).astype(np.float32)
    got = read_colours(r, paint(r, colours))
    unique_pixel = np.bincount(r.pixel, minlength=r.shape[0] * r.shape[1])[r.pixel] == 1
    np.testing.assert_allclose(got[unique_pixel], colours[unique_pixel], atol=1 / 255)


@pytest.mark.slow
def test_one_million_spots_open_as_a_raster_and_take_results(make_napari_viewer):
    from spatial_deconv_gui import api
    from spatial_deconv_gui.engines.base import DeconvResult
    from spatial_deconv_gui.gui.docks import find_dock
    from spatial_deconv_gui.gui.result_layers import add_result, set_hidden
    from spatial_deconv_gui.io import attach_result

    n = 1_000_000
    adata = _grid_slide(n)
    data, kwargs, kind = spatial_layer_data(adata, name="hd")
    assert n > POINTS_LIMIT and kind == "image"
    meta = kwargs["metadata"][PLUGIN_KEY]
    raster = meta["raster"]
    assert data.shape == (*raster.shape, 4) and raster.shape == (1000, 1000)
    assert np.unique(raster.pixel).size == n  # a regular grid loses no spot
    left = adata.obs["zone"].to_numpy() == "left"
    flat = data.reshape(-1, 4)
    np.testing.assert_allclose(flat[raster.pixel[left]] / 255, np.tile(to_rgba("#ff0000"), (left.sum(), 1)))

    viewer = make_napari_viewer()
    slide = viewer.add_image(data, **kwargs)
    # world position of a spot = its coordinates (x, y) -> napari (y, x)
    i = 123_456
    y, x = adata.obsm["spatial"][i, 1], adata.obsm["spatial"][i, 0]
    assert slide.world_to_data((y, x)) == pytest.approx(tuple(np.divmod(raster.pixel[i], 1000)), abs=1e-6)

    rng = np.random.default_rng(1)
    props = rng.dirichlet(np.ones(3), size=n)
    res = DeconvResult(
        key="big",
        method="big",
        mode=None,
        cell_types=["A", "B", "C"],
        proportions=props,
        params={},
        device="cpu",
        runtime_s=0.0,
    )
    rec = add_result(
        viewer,
        api.RunOutput(attach_result(adata, res), res, None),
        adata.obsm["spatial"],
        meta["spot_size"],
        name="big",
        raster=raster,
    )
    dom = rec.layers["dominant"]
    assert type(dom).__name__ == "Image"
    expected = np.array([to_rgba(rec.palette[t]) for t in "ABC"])[props.argmax(axis=1)]
    np.testing.assert_allclose(spot_colors(dom), expected, atol=1 / 255)
    set_hidden(rec, {"B"})
    assert np.all(spot_colors(dom)[props.argmax(axis=1) == 1, 3] == 0)
    inspector = find_dock(viewer, "Spot inspector")
    assert inspector.inspect_at((y, x)) == i
    assert inspector.current == ("big", i)
