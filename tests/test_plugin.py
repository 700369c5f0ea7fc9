"""The napari plugin: manifest, reader, sample data, dock widget, notifications and rendering."""

from __future__ import annotations

import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from spatial_deconv_gui.gui.layers import PLUGIN_KEY, spatial_layer_data, spot_size
from spatial_deconv_gui.gui.reader import get_reader
from spatial_deconv_gui.io import InputError

PLUGIN = "spatial-deconv-gui"


def test_manifest_is_valid_and_discovered():
    from npe2 import PluginManager, PluginManifest

    manifest = PluginManifest.from_distribution(PLUGIN)
    assert {c.id for c in manifest.contributions.commands} >= {
        f"{PLUGIN}.get_reader",
        f"{PLUGIN}.sample_slide",
        f"{PLUGIN}.deconvolution_widget",
    }
    pm = PluginManager.instance()
    pm.discover()
    assert PLUGIN in pm._manifests
    assert [r.command for r in pm.iter_compatible_readers(["slide.h5ad"]) if r.command.startswith(PLUGIN)]


def test_npe2_validate_cli():
    exe = os.path.join(os.path.dirname(sys.executable), "npe2")
    out = subprocess.run([exe, "validate", PLUGIN], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_napari_lists_the_plugin():
    exe = os.path.join(os.path.dirname(sys.executable), "napari")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    out = subprocess.run([exe, "--info"], capture_output=True, text=True, timeout=180, env=env)
    assert f"- {PLUGIN}: 0.1.0" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.shared_data
def test_reader_opens_shared_visium_as_points(shared_data):
    path = str(shared_data / "spacexr_visium_hippocampus_spatial.h5ad")
    reader = get_reader(path)
    assert reader is not None
    [(data, kwargs, kind)] = reader(path)
    adata = ad.read_h5ad(path)
    assert kind == "points" and data.shape == (313, 2)
    np.testing.assert_allclose(data, adata.obsm["spatial"][:, ::-1])
    assert list(kwargs["features"].columns) == list(adata.obs.columns)
    np.testing.assert_allclose(kwargs["features"]["nUMI"], adata.obs["nUMI"])
    meta = kwargs["metadata"][PLUGIN_KEY]
    assert meta["adata_path"].endswith("spacexr_visium_hippocampus_spatial.h5ad")
    assert kwargs["size"] == pytest.approx(spot_size(adata.obsm["spatial"]))


@pytest.mark.shared_data
def test_reader_refuses_a_reference(shared_data):
    path = str(shared_data / "spacexr_visium_hippocampus_reference.h5ad")
    with pytest.raises(InputError, match="single-cell reference, not a slide"):
        get_reader(path)(path)


def test_reader_ignores_other_files():
    assert get_reader("image.tif") is None


def test_spot_size_is_median_neighbour_distance():
    xy = np.array([[0, 0], [100, 0], [200, 0], [0, 150]], dtype=float)
    assert spot_size(xy) == pytest.approx(100.0)


def test_user_category_colours_are_used(small_pair):
    spatial, _ = small_pair
    s = spatial.copy()
    cats = list(s.obs["true_dominant_type"].cat.categories)
    s.uns["true_dominant_type_colors"] = ["#ff0000", "#00ff00", "#0000ff", "#ffff00"][: len(cats)]
    _, kwargs, _ = spatial_layer_data(s)
    first = cats.index(s.obs["true_dominant_type"].iloc[0])
    expected = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1], [1, 1, 0, 1]])[first]
    np.testing.assert_allclose(kwargs["face_color"][0], expected)
    assert kwargs["metadata"][PLUGIN_KEY]["colour_column"] == "true_dominant_type"


def _sample_viewer(make_napari_viewer, show=False):
    viewer = make_napari_viewer(show=show)
    viewer.open_sample(PLUGIN, "simulated_slide")
    return viewer


def test_sample_data_and_widget(make_napari_viewer):
    viewer = _sample_viewer(make_napari_viewer)
    image, layer = viewer.layers  # the simulated H&E beneath, the spots above
    assert image.metadata[PLUGIN_KEY]["kind"] == "tissue_image" and image.rgb
    assert layer.data.shape == (1200, 2)
    np.testing.assert_allclose(layer.size, 55.0)  # Visium spots, in µm
    assert str(layer.units[0]) == "micrometer" and layer.opacity < 1
    assert "true_dominant_type" in layer.features.columns
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    assert widget.slide.value is layer
    assert str(widget.reference.value).endswith("sample_reference.h5ad")
    assert widget.cell_type_col.value == "cell_type"
    assert "nUMI" in widget.cell_type_col.choices
    report = widget.check_inputs()
    assert report is not None and report.ok
    assert widget.status.value == "inputs OK"


def test_widget_shows_problems_instead_of_running(make_napari_viewer, small_pair, tmp_path):
    viewer = _sample_viewer(make_napari_viewer)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    _, reference = small_pair
    bad = reference.copy()
    bad.var_names = [f"X{i}" for i in range(bad.n_vars)]
    bad.write_h5ad(tmp_path / "bad_ref.h5ad")
    widget.reference.value = str(tmp_path / "bad_ref.h5ad")
    assert widget.check_inputs() is None
    assert "only 0 gene(s) are shared" in widget.problems.value
    assert "problem" in widget.status.value


def test_worker_errors_become_notifications(make_napari_viewer, qtbot, monkeypatch):
    viewer = _sample_viewer(make_napari_viewer)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)

    def broken(*_args, **_kwargs):
        raise InputError("the reference is broken.", "use another one.")

    monkeypatch.setattr("spatial_deconv_gui.api.run_deconvolution", broken)
    before = widget.slide.value.face_color.copy()
    widget.run_btn.native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=30_000)
    assert shown == ["Deconvolution: the reference is broken. Fix: use another one."]
    assert widget.status.value.startswith("failed")
    assert "the reference is broken." in widget.problems.value
    np.testing.assert_array_equal(widget.slide.value.face_color, before)  # the slide keeps its colours


@pytest.mark.render
def test_screenshot_draws_the_tissue(make_napari_viewer):
    viewer = _sample_viewer(make_napari_viewer, show=True)
    image, layer = viewer.layers
    image.visible = False
    layer.opacity = 1.0
    viewer.reset_view()
    with_layer = viewer.screenshot(canvas_only=True, flash=False)
    layer.visible = False
    without = viewer.screenshot(canvas_only=True, flash=False)
    drawn = np.abs(with_layer[..., :3].astype(int) - without[..., :3].astype(int)).sum(axis=-1) > 30
    rows, cols = np.nonzero(drawn)
    assert rows.size > 0, "nothing drawn"
    # Pixels per world unit from the drawn extent; every spot is then a 55 µm disc (no holes, no spill).
    radius = float(np.mean(layer.size)) / 2
    lo, hi = layer.data.min(axis=0) - radius, layer.data.max(axis=0) + radius
    px_per_unit = (rows.max() - rows.min() + 1) / (hi[0] - lo[0])
    assert (cols.max() - cols.min() + 1) / (hi[1] - lo[1]) == pytest.approx(px_per_unit, rel=0.05)
    coverage = drawn.sum() / (len(layer.data) * np.pi * radius**2 * px_per_unit**2)
    # discs ~11 px across: their antialiased rim adds about a pixel all round (~1.2-1.3x the area)
    assert 0.8 < coverage < 1.4, coverage
    assert drawn.mean() > 0.05  # the tissue fills a good part of the canvas after reset_view


def test_check_button_validates_in_a_worker(make_napari_viewer, qtbot):
    viewer = _sample_viewer(make_napari_viewer)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    widget.validate_btn.native.click()
    assert widget.status.value == "checking inputs..."
    qtbot.waitUntil(lambda: widget.status.value == "inputs OK", timeout=30_000)
