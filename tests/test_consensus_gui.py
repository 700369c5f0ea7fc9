"""Intervals and consensus in napari: the interval-width layer, the inspector's intervals, the threshold that greys
out uncertain spots on every proportion layer, the consensus and its agreement layer from the Results dock, and
the Deconvolution dock's one-click run of several methods into a consensus."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spatial_deconv_gui import api, keys
from spatial_deconv_gui.engines.base import DeconvResult
from spatial_deconv_gui.gui.docks import find_dock, open_docks
from spatial_deconv_gui.gui.result_layers import add_result
from spatial_deconv_gui.gui.session import session_for
from spatial_deconv_gui.gui.views import AGREEMENT_CMAP, UNCERTAIN_RGBA, WIDTH_CMAP, WIDTH_MAX, colormap_rgba
from spatial_deconv_gui.io import attach_result

PLUGIN = "spatial-deconv-gui"


def _run_with_interval(spatial, types, key, seed, half_width):
    """Proportions near the truth with an interval of ``half_width`` (per spot and type) around them."""
    rng = np.random.default_rng(seed)
    truth = spatial.obsm["true_proportions"].to_numpy()
    props = np.clip(truth + rng.normal(0, 0.08, truth.shape), 0, None)
    props /= props.sum(axis=1, keepdims=True)
    index = spatial.obs_names
    lower = pd.DataFrame(np.clip(props - half_width, 0, 1), index=index, columns=types)
    upper = pd.DataFrame(np.clip(props + half_width, 0, 1), index=index, columns=types)
    res = DeconvResult(
        key,
        key,
        None,
        types,
        props,
        {},
        "cpu",
        0.0,
        obsm={keys.proportions_lower(key): lower, keys.proportions_upper(key): upper},
    )
    return api.RunOutput(attach_result(spatial, res), res, None)


@pytest.fixture
def two_results(make_napari_viewer, small_pair):
    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    rng = np.random.default_rng(0)
    n = spatial.n_obs
    half_a = rng.uniform(0.01, 0.2, (n, len(types)))  # varies per spot: some spots wider than the threshold
    half_b = rng.uniform(0.01, 0.2, (n, len(types)))
    viewer = make_napari_viewer()
    runs = {}
    for name, key, seed, half in (("rctd #1", "rctd", 1, half_a), ("flash #1", "flash", 2, half_b)):
        runs[name] = _run_with_interval(spatial, types, key, seed, half)
        add_result(viewer, runs[name], spatial.obsm["spatial"], 100.0, name=name)
    return viewer, runs, types


def _widths(run):
    key = run.result.key
    return (run.adata.obsm[keys.proportions_upper(key)] - run.adata.obsm[keys.proportions_lower(key)]).to_numpy()


def _combine(results, names, qtbot):
    """The Results dock's consensus of ``names``, waited for."""
    results.combine.value = names
    results.consensus_btn.native.click()
    qtbot.waitUntil(lambda: not results.jobs.busy, timeout=30_000)


def test_interval_width_layer_follows_the_shown_type(two_results):
    viewer, runs, types = two_results
    session = session_for(viewer)
    rec = session.results["rctd #1"]
    widths = _widths(runs["rctd #1"])
    layer = rec.layers["interval_width"]
    np.testing.assert_allclose(layer.metadata["values"], widths[:, 0])
    np.testing.assert_allclose(layer.face_color, colormap_rgba(widths[:, 0], WIDTH_CMAP, 0.0, WIDTH_MAX), atol=1e-6)
    results = find_dock(viewer, "Results")
    results.run.value = "rctd #1"
    results.cell_type.value = types[2]
    np.testing.assert_allclose(layer.metadata["values"], widths[:, 2])
    np.testing.assert_allclose(layer.features["interval_width"], widths[:, 2])
    np.testing.assert_allclose(layer.face_color, colormap_rgba(widths[:, 2], WIDTH_CMAP, 0.0, WIDTH_MAX), atol=1e-6)
    assert layer.name == "rctd · interval width"  # short for the layer list; the colorbar's title names the type
    assert results.second_shown is None  # the width layer is hidden: no colorbar for it
    layer.visible = True
    assert results.second_shown == f"rctd #1: 90% interval width of {types[2]}"
    results.cell_type.value = types[1]
    assert results.second_shown == f"rctd #1: 90% interval width of {types[1]}"


def test_threshold_greys_uncertain_spots_on_every_proportion_layer(two_results):
    viewer, runs, types = two_results
    session = session_for(viewer)
    results = find_dock(viewer, "Results")
    results.run.value = "rctd #1"
    results.cell_type.value = types[1]
    results.run.value = "flash #1"
    results.cell_type.value = types[0]
    results.width_threshold.value = 0.2
    assert session.width_threshold == pytest.approx(0.2)
    for name, column in (("rctd #1", 1), ("flash #1", 0)):  # each layer greys by the type it shows
        rec = session.results[name]
        wide = _widths(runs[name])[:, column] > 0.2
        assert 0 < wide.sum() < len(wide)
        colours = np.asarray(rec.layers["proportions"].face_color)
        np.testing.assert_allclose(colours[wide], np.tile(UNCERTAIN_RGBA, (wide.sum(), 1)), atol=1e-6)
        expected = colormap_rgba(rec.proportions[types[column]].to_numpy(), "viridis")[~wide]
        np.testing.assert_allclose(colours[~wide], expected, atol=1e-6)
    results.width_threshold.value = 1.0  # off: no spot greyed
    assert session.width_threshold is None
    rec = session.results["rctd #1"]
    np.testing.assert_allclose(
        rec.layers["proportions"].face_color, colormap_rgba(rec.proportions[types[1]].to_numpy()), atol=1e-6
    )


def test_inspector_shows_each_types_interval(two_results):
    viewer, runs, types = two_results
    session = session_for(viewer)
    [inspector] = open_docks(viewer, ["Spot inspector"])
    assert inspector.canvas.isHidden()  # no spot yet: no empty chart
    rec = session.results["flash #1"]
    idx = 7
    inspector.show_spot(rec, idx)
    assert not inspector.canvas.isHidden()
    key = "flash"
    p = runs["flash #1"].adata.obsm[keys.proportions(key)].iloc[idx]
    lo = runs["flash #1"].adata.obsm[keys.proportions_lower(key)].iloc[idx]
    hi = runs["flash #1"].adata.obsm[keys.proportions_upper(key)].iloc[idx]
    text = inspector.text.text()
    assert "90% intervals:" in text
    for t in types:
        assert f"{t}: {p[t]:.2f} [{lo[t]:.2f}, {hi[t]:.2f}]" in text
        assert inspector.intervals[t] == pytest.approx((lo[t], hi[t]))


def test_consensus_from_the_results_dock_has_an_agreement_layer(two_results, qtbot):
    viewer, runs, types = two_results
    session = session_for(viewer)
    results = find_dock(viewer, "Results")
    _combine(results, ["rctd #1", "flash #1"], qtbot)
    rec = session.results["consensus #1"]
    assert rec.key == keys.CONSENSUS
    pa, pb = (
        runs[n].adata.obsm[keys.proportions(k)].to_numpy() for n, k in (("rctd #1", "rctd"), ("flash #1", "flash"))
    )
    wa, wb = (1 / np.maximum(_widths(runs[n]), 0.02) ** 2 for n in ("rctd #1", "flash #1"))
    expected = (wa * pa + wb * pb) / (wa + wb)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(rec.proportions.to_numpy(), expected)
    agreement = 1 - 0.5 * np.abs(pa - pb).sum(axis=1)
    layer = rec.layers["agreement"]
    np.testing.assert_allclose(layer.features["agreement"], agreement)
    np.testing.assert_allclose(layer.face_color, colormap_rgba(agreement, AGREEMENT_CMAP, 0.0, 1.0), atol=1e-6)
    assert results.run.value == "consensus #1"
    layer.visible = True
    assert results.second_shown == "consensus #1: methods' agreement (1 - mean total-variation distance)"
    assert (
        "median agreement" in results.consensus_status.value
        and "(weighted by the methods' 90% intervals)" in results.consensus_status.value
    )
    # the inspector gives a consensus spot's agreement
    [inspector] = open_docks(viewer, ["Spot inspector"])
    inspector.show_spot(rec, 3)
    assert f"agreement: {agreement[3]:.4g}" in inspector.text.text()
    # one result is not a consensus
    results.combine.value = ["rctd #1"]
    results.consensus_btn.native.click()
    assert results.consensus_status.value == "pick two or more results for a consensus"
    assert len(session.results) == 3


def test_one_click_runs_several_methods_into_a_consensus(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "simulated_slide")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    widget.method.value = "rctd"
    widget.mode.value = "full"
    widget.consensus_methods.value = ["rctd", "flash"]
    stages = []
    widget.jobs.progressed.connect(lambda e: stages.append(e.stage))
    widget.consensus_btn.native.click()
    assert widget.busy, widget.problems.value
    qtbot.waitUntil(lambda: not widget.busy, timeout=600_000)
    session = session_for(viewer)
    assert list(session.results) == ["RCTD full #1", "flash #1", "consensus #1"], widget.status.value
    assert any(s.startswith("rctd (1/2)") for s in stages) and any(s.startswith("flash (2/2)") for s in stages)
    rctd, flash, cons = (session.results[n] for n in session.results)
    assert rctd.interval is not None and flash.interval is not None  # both run with intervals
    direct = api.consensus([rctd.adata, flash.adata], key=["rctd", "flash"])
    np.testing.assert_allclose(cons.proportions.to_numpy(), direct.adata.obsm["consensus_proportions"].to_numpy())
    assert cons.adata.uns[keys.run_info(keys.CONSENSUS)]["parameters"]["weighting"] == "intervals"
    truth = cons.adata.obsm[keys.TRUE_PROPORTIONS][cons.cell_types].to_numpy()
    err = 0.5 * np.abs(cons.proportions.to_numpy() - truth).sum(axis=1)
    agreement = cons.agreement
    low, high = np.quantile(agreement, [0.2, 0.8])
    assert err[agreement <= low].mean() > err[agreement >= high].mean()
    assert "median agreement" in widget.status.value
    assert "(weighted by the methods' 90% intervals)" in widget.status.value


def test_cancel_during_the_consensus_runs_keeps_nothing(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "simulated_slide")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    widget.consensus_methods.value = ["flash", "rctd"]
    widget.consensus_btn.native.click()
    assert widget.busy
    widget.cancel_btn.native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert not session_for(viewer).results
    assert widget.status.value == "cancelled: no result kept"


def test_consensus_of_results_on_different_slides_says_why(two_results, small_pair, qtbot):
    viewer, runs, types = two_results
    spatial = small_pair[0][:250].copy()
    other = _run_with_interval(spatial, types, "c2l", 3, 0.05)
    add_result(viewer, other, spatial.obsm["spatial"], 100.0, name="c2l #1")
    results = find_dock(viewer, "Results")
    _combine(results, ["rctd #1", "c2l #1"], qtbot)
    assert "not of the same slide" in results.consensus_status.value
    assert "c2l #1 (250 spots) vs rctd #1 (300 spots): 50 of rctd #1's spots missing" in results.consensus_status.value
    assert "consensus #1" not in session_for(viewer).results


def test_interval_layers_on_a_raster_slide(make_napari_viewer, small_pair):
    """Past the points limit results are drawn as RGBA rasters: the width layer and the greying hold there too."""
    from spatial_deconv_gui.gui.layers import napari_points, spot_colors
    from spatial_deconv_gui.gui.raster import choose_pitch, make_raster

    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    half = np.random.default_rng(4).uniform(0.01, 0.2, (spatial.n_obs, len(types)))
    run = _run_with_interval(spatial, types, "rctd", 1, half)
    yx = napari_points(spatial.obsm["spatial"])
    raster = make_raster(yx, choose_pitch(yx, 100.0), spacing=100.0)
    viewer = make_napari_viewer()
    rec = add_result(viewer, run, spatial.obsm["spatial"], 100.0, name="rctd #1", raster=raster)
    widths = _widths(run)
    assert type(rec.layers["interval_width"]).__name__ == "Image"
    expected = colormap_rgba(widths[:, 0], WIDTH_CMAP, 0.0, WIDTH_MAX)
    np.testing.assert_allclose(spot_colors(rec.layers["interval_width"]), expected, atol=1 / 255)
    session_for(viewer).set_width_threshold(0.25)
    wide = widths[:, 0] > 0.25
    assert 0 < wide.sum() < len(wide)
    colours = spot_colors(rec.layers["proportions"])
    np.testing.assert_allclose(colours[wide], np.tile(UNCERTAIN_RGBA, (wide.sum(), 1)), atol=1 / 255)
    expected = colormap_rgba(rec.proportions[types[0]].to_numpy())[~wide]
    np.testing.assert_allclose(colours[~wide], expected, atol=1 / 255)


# -- the Results dock's colorbars, and greying on a consensus --------------------------------------------------
def _bar_end_colours(canvas, bar) -> tuple[np.ndarray, np.ndarray]:
    """The RGBA drawn 3 % in from each end of a colorbar, read from the rendered canvas."""
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba(), dtype=float) / 255.0
    box = bar.ax.get_window_extent()
    row = pixels.shape[0] - 1 - int(round((box.y0 + box.y1) / 2))  # the buffer's rows run top to bottom
    left, right = (int(round(box.x0 + f * box.width)) for f in (0.03, 0.97))
    return pixels[row, left], pixels[row, right]


def _assert_colorbar(dock, title, cmap, vmax):
    import matplotlib

    assert not dock.second_colorbar.isHidden()
    assert dock.second_shown == title and dock.second_bar.ax.get_title() == title
    assert dock.second_bar.cmap.name == cmap
    assert (dock.second_bar.norm.vmin, dock.second_bar.norm.vmax) == (0.0, vmax)
    low, high = _bar_end_colours(dock.second_colorbar, dock.second_bar)
    colours = matplotlib.colormaps[cmap]
    np.testing.assert_allclose(low[:3], colours(0.03)[:3], atol=0.03)
    np.testing.assert_allclose(high[:3], colours(0.97)[:3], atol=0.03)


def test_second_colorbar_takes_no_room_until_a_width_or_agreement_layer_is_shown(two_results, qtbot):
    viewer, runs, types = two_results
    session = session_for(viewer)
    results = find_dock(viewer, "Results")
    assert results.second_colorbar.isHidden() and results.second_shown is None  # no value layer visible
    assert not results.colorbar.isHidden()  # the proportion colorbar: a result is shown
    assert results.impute.colorbar.isHidden()  # nothing painted
    width = session.results["flash #1"].layers["interval_width"]
    width.visible = True
    _assert_colorbar(results, f"flash #1: 90% interval width of {types[0]}", WIDTH_CMAP, WIDTH_MAX)
    width.visible = False
    assert results.second_colorbar.isHidden() and results.second_shown is None
    _combine(results, ["rctd #1", "flash #1"], qtbot)
    cons = session.results["consensus #1"]
    agreement = cons.layers["agreement"]
    agreement.visible = True
    title = "consensus #1: methods' agreement (1 - mean total-variation distance)"
    _assert_colorbar(results, title, AGREEMENT_CMAP, 1.0)
    width.visible = True  # one slide: showing the width hides the agreement above it, and the colorbar follows
    assert viewer.layers.index(agreement) > viewer.layers.index(width) and not agreement.visible
    _assert_colorbar(results, f"flash #1: 90% interval width of {types[0]}", WIDTH_CMAP, WIDTH_MAX)
    agreement.visible = True
    assert not width.visible and results.second_shown == title
    viewer.layers.remove(agreement)
    assert results.second_colorbar.isHidden() and results.second_shown is None


def test_a_docks_colorbars_are_hidden_before_any_result(make_napari_viewer):
    viewer = make_napari_viewer()
    [results] = open_docks(viewer, ["Results"])
    assert results.colorbar.isHidden() and results.second_colorbar.isHidden()
    for line in (results.summary, results.consensus_status, results.interval_note):  # empty lines take no room
        assert line.native.isHidden()


def test_greying_applies_to_a_consensus_layer(two_results, qtbot):
    viewer, runs, types = two_results
    session = session_for(viewer)
    results = find_dock(viewer, "Results")
    _combine(results, ["rctd #1", "flash #1"], qtbot)
    rec = session.results["consensus #1"]
    lower = rec.adata.obsm[keys.proportions_lower(keys.CONSENSUS)]
    upper = rec.adata.obsm[keys.proportions_upper(keys.CONSENSUS)]
    widths = (upper - lower)[types[1]].to_numpy()
    assert results.interval_note.native.isHidden()  # it has an interval: nothing to explain
    results.cell_type.value = types[1]
    layer = rec.layers["interval_width"]
    np.testing.assert_allclose(layer.metadata["values"], widths)
    np.testing.assert_allclose(layer.face_color, colormap_rgba(widths, WIDTH_CMAP, 0.0, WIDTH_MAX), atol=1e-6)
    threshold = float(np.quantile(widths, 0.5))
    results.width_threshold.value = round(threshold, 2)
    wide = widths > session.width_threshold
    assert 0 < wide.sum() < len(wide)
    colours = np.asarray(rec.layers["proportions"].face_color)
    np.testing.assert_allclose(colours[wide], np.tile(UNCERTAIN_RGBA, (wide.sum(), 1)), atol=1e-6)
    expected = colormap_rgba(rec.proportions[types[1]].to_numpy(), "viridis")[~wide]
    np.testing.assert_allclose(colours[~wide], expected, atol=1e-6)
    # the inspector gives the consensus's interval per type
    [inspector] = open_docks(viewer, ["Spot inspector"])
    inspector.show_spot(rec, 5)
    t = types[1]
    assert inspector.intervals[t] == pytest.approx((lower[t].iloc[5], upper[t].iloc[5]))


def test_a_consensus_without_intervals_says_why_greying_skips_it(make_napari_viewer, small_pair, qtbot):
    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    viewer = make_napari_viewer()
    with_interval = _run_with_interval(spatial, types, "rctd", 1, 0.05)
    props = np.full((spatial.n_obs, len(types)), 1 / len(types))
    plain = DeconvResult("c2l", "c2l", None, types, props, {}, "cpu", 0.0)
    plain = api.RunOutput(attach_result(spatial, plain), plain, None)
    add_result(viewer, with_interval, spatial.obsm["spatial"], 100.0, name="rctd #1")
    add_result(viewer, plain, spatial.obsm["spatial"], 100.0, name="c2l #1")
    results = find_dock(viewer, "Results")
    assert results.interval_note.native.isHidden()  # greying is off: nothing to explain
    results.width_threshold.value = 0.3
    assert results.interval_note.value == (
        "c2l #1 has no interval, so greying skips it: run it with per-spot 90% intervals."
    )
    assert not results.interval_note.native.isHidden()
    _combine(results, ["rctd #1", "c2l #1"], qtbot)
    rec = session_for(viewer).results["consensus #1"]
    assert rec.interval is None and "interval_width" not in rec.layers
    assert results.run.value == "consensus #1"
    assert results.interval_note.value == (
        "consensus #1 has no interval, so greying skips it: c2l #1 carries no interval (run with --uncertainty)."
    )
    assert "equal weights and no consensus interval" in results.consensus_status.value
    results.run.value = "rctd #1"
    assert results.interval_note.native.isHidden()
    results.run.value = "c2l #1"
    assert not results.interval_note.native.isHidden()
    results.width_threshold.value = 1.0  # greying off again
    assert results.interval_note.native.isHidden()
