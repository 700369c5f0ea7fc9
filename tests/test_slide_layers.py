"""Every format opens in napari with its spots on their image pixels, in one µm world frame."""

from __future__ import annotations

import numpy as np
import pytest

from spatial_deconv_gui.gui.layers import PLUGIN_KEY
from spatial_deconv_gui.simulate import simulate_dataset

PLUGIN = "spatial-deconv-gui"


def _layers_by_kind(viewer):
    out = {}
    for layer in viewer.layers:
        out.setdefault(layer.metadata.get(PLUGIN_KEY, {}).get("kind"), []).append(layer)
    return out


def _pixels_under_spots(image_layer, spots_layer) -> np.ndarray:
    """The image pixel (row, col) under every spot, through napari's own data -> world -> data transforms."""
    world = np.array([spots_layer.data_to_world(p) for p in spots_layer.data])
    return np.rint([image_layer.world_to_data(w) for w in world]).astype(int)


@pytest.fixture(scope="module")
def cells():
    spatial, _ = simulate_dataset(n_spots=150, n_genes=40, n_types=3, seed=5)
    # cells ~10 µm apart, in µm, off the pixel edges (a point on an edge belongs to either pixel)
    spatial.obsm["spatial"] = spatial.obsm["spatial"] / 10.0 + 3.037
    return spatial


def test_xenium_cells_sit_on_their_morphology_pixels(make_napari_viewer, cells, tmp_path):
    from spatial_deconv_gui.io.xenium import write_xenium_bundle

    pixel_size = 0.5
    xy = cells.obsm["spatial"]
    shape = tuple((np.ceil(xy.max(axis=0) / pixel_size).astype(int) + 8)[::-1])
    image = np.zeros(shape, np.uint16)
    rows, cols = np.floor(xy[:, ::-1] / pixel_size).astype(int).T  # pixel (r, c) covers [c, c + 1) * size µm
    image[rows, cols] = 60000
    folder = write_xenium_bundle(cells, tmp_path / "bundle", pixel_size=pixel_size, image=image)
    viewer = make_napari_viewer()
    viewer.open(str(folder), plugin=PLUGIN)
    kinds = _layers_by_kind(viewer)
    [morphology], [spots] = kinds["tissue_image"], kinds["spatial"]
    assert viewer.layers.index(morphology) < viewer.layers.index(spots)  # the stain is drawn beneath
    assert [type(layer).__name__ for layer in kinds["cell_boundaries"]] == ["Shapes"]
    level0 = np.asarray(morphology.data[0] if morphology.multiscale else morphology.data)
    under = _pixels_under_spots(morphology, spots)
    assert (level0[under[:, 0], under[:, 1]] == 60000).all()
    assert str(spots.units[0]) == "micrometer" and str(morphology.units[0]) == "micrometer"
    np.testing.assert_allclose(spots.data, xy[:, ::-1])  # Xenium centroids are already µm


def test_spatialdata_spots_sit_on_their_image_pixels(make_napari_viewer, cells, tmp_path):
    pytest.importorskip("spatialdata")
    from spatial_deconv_gui.io.sdata import write_spatialdata_fixture

    image_scale = 2.0  # world units per image pixel
    xy = cells.obsm["spatial"] * 10.0
    shape = tuple((np.ceil(xy.max(axis=0) / image_scale).astype(int) + 8)[::-1])
    image = np.zeros((*shape, 3), np.uint8)
    rows, cols = np.floor(xy[:, ::-1] / image_scale).astype(int).T  # spatialdata: pixel i spans [i, i + 1) * scale
    image[rows, cols] = (255, 0, 0)
    spatial = cells.copy()
    spatial.obsm["spatial"] = xy
    store = write_spatialdata_fixture(
        spatial, tmp_path / "slide.zarr", image=image, spot_radius=27.5, image_scale=image_scale
    )
    viewer = make_napari_viewer()
    viewer.open(str(store), plugin=PLUGIN)
    kinds = _layers_by_kind(viewer)
    [picture], [spots] = kinds["tissue_image"], kinds["spatial"]
    data = np.asarray(picture.data[0] if picture.multiscale else picture.data)
    under = _pixels_under_spots(picture, spots)
    np.testing.assert_array_equal(data[under[:, 0], under[:, 1]], np.tile([255, 0, 0], (len(under), 1)))
    np.testing.assert_allclose(spots.size, 55.0)  # circle radius 27.5 -> a 55-unit disc


def test_several_tables_ask_which(make_napari_viewer, cells, tmp_path, monkeypatch):
    pytest.importorskip("spatialdata")
    from spatial_deconv_gui.gui import reader
    from spatial_deconv_gui.io.sdata import write_spatialdata_fixture

    second = cells.copy()
    second.X = second.X * 2
    store = write_spatialdata_fixture(cells, tmp_path / "two.zarr", extra_tables={"doubled": second})
    asked = []
    monkeypatch.setattr(reader, "choose_table", lambda path, names: asked.append(names) or "doubled")
    viewer = make_napari_viewer()
    viewer.open(str(store), plugin=PLUGIN)
    assert asked == [["doubled", "table"]]
    [spots] = _layers_by_kind(viewer)["spatial"]
    assert spots.metadata[PLUGIN_KEY]["read_options"] == {"table": "doubled"}
    from spatial_deconv_gui.gui.perturb_layers import slide_adata

    assert (slide_adata(spots).X != second.X).nnz == 0  # the widgets re-read the table the user chose


def test_knockout_layers_use_the_slide_world_frame(cells):
    from types import SimpleNamespace

    from spatial_deconv_gui.gui.session import Session

    state = Session(viewer=None)
    state.model = SimpleNamespace(coords=cells.obsm["spatial"])
    state.model_slide = SimpleNamespace(metadata={PLUGIN_KEY: {"world_per_coord": 0.25}})
    np.testing.assert_allclose(state.cells_yx(), cells.obsm["spatial"][:, ::-1] * 0.25)


def test_a_big_single_level_image_is_drawn_from_a_lazy_pyramid():
    import dask.array as da

    from spatial_deconv_gui.io.slide import SlideImage

    big = da.zeros((9000, 3000, 3), dtype=np.uint8, chunks=(1024, 1024, 3))
    kwargs = SlideImage("he", [big], scale=0.5).layer_kwargs()
    assert kwargs["multiscale"] and [lv.shape for lv in kwargs["data"]] == [
        (9000, 3000, 3),
        (4500, 1500, 3),
        (2250, 750, 3),
        (1125, 375, 3),
        (563, 188, 3),
    ]
    assert kwargs["scale"] == (0.5, 0.5)  # level 0's pixel size; napari derives the others from the shapes
    stains = SlideImage("dapi", [np.zeros((2, 10000, 200), np.uint16)], rgb=False, channel_axis=0)
    assert [lv.shape for lv in stains.display_levels()][:2] == [(2, 10000, 200), (2, 5000, 100)]
    small = SlideImage("hires", [np.zeros((2000, 2000, 3), np.uint8)])
    assert small.layer_kwargs()["multiscale"] is False and small.layer_kwargs()["data"] is small.levels[0]
