"""What the user sees of the result layers: one result layer of a slide at a time (showing one hides the others
that would cover it), a Legend that follows the dominant-type layer on screen, short layer names, and greyed-out
spots visible over both a dark canvas and a light H&E."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spatial_deconv_gui import api, keys
from spatial_deconv_gui.engines.base import DeconvResult
from spatial_deconv_gui.gui.docks import find_dock
from spatial_deconv_gui.gui.docks.legend import NOTHING_SHOWN
from spatial_deconv_gui.gui.layers import OVERLAY_OPACITY, PLUGIN_KEY, RESULT_LAYER_KINDS
from spatial_deconv_gui.gui.result_layers import add_result, compare_results
from spatial_deconv_gui.gui.session import session_for
from spatial_deconv_gui.gui.views import (
    UNCERTAIN_EDGE_RGBA,
    UNCERTAIN_EDGE_WIDTH,
    UNCERTAIN_RGBA,
    colormap_rgba,
)
from spatial_deconv_gui.io import attach_result

PLUGIN = "spatial-deconv-gui"


def _run(spatial, types, key, seed, classes=False, half_width=None):
    rng = np.random.default_rng(seed)
    props = np.clip(
        spatial.obsm["true_proportions"].to_numpy() + rng.normal(0, 0.05, (spatial.n_obs, len(types))), 0, 1
    )
    props /= props.sum(axis=1, keepdims=True)
    obs = {f"{key}_spot_class": np.where(props.max(axis=1) > 0.7, "singlet", "doublet_certain")} if classes else {}
    obsm = {}
    if half_width is not None:
        index = spatial.obs_names
        obsm = {
            keys.proportions_lower(key): pd.DataFrame(np.clip(props - half_width, 0, 1), index=index, columns=types),
            keys.proportions_upper(key): pd.DataFrame(np.clip(props + half_width, 0, 1), index=index, columns=types),
        }
    res = DeconvResult(key, key, None, types, props, {}, "cpu", 0.0, obs=obs, obsm=obsm)
    return api.RunOutput(attach_result(spatial, res), res, None)


@pytest.fixture
def three_results(make_napari_viewer, small_pair):
    """The sample slide and its H&E (untouched bystanders), two results on one slide, one on another slide."""
    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "simulated_slide")
    a = add_result(viewer, _run(spatial, types, "rctd", 1, classes=True), spatial.obsm["spatial"], 100.0)
    b = add_result(viewer, _run(spatial, types, "flash", 2), spatial.obsm["spatial"], 100.0)
    other = spatial[:250].copy()
    c = add_result(viewer, _run(other, types, "rctd", 3), other.obsm["spatial"], 100.0)
    return viewer, (a, b, c), types


def _base_layers(viewer):
    return [
        layer for layer in viewer.layers if layer.metadata.get(PLUGIN_KEY, {}).get("kind") not in RESULT_LAYER_KINDS
    ]


def _shown(rec) -> set[str]:
    return {what for what, layer in rec.layers.items() if layer.visible}


def test_showing_a_result_layer_hides_the_ones_covering_it_on_that_slide(three_results):
    viewer, (a, b, c), types = three_results
    base = {layer.name: layer.visible for layer in _base_layers(viewer)}
    assert len(base) == 2 and all(base.values())  # the sample slide and its H&E
    assert a.spots_id == b.spots_id != c.spots_id
    # each new result's dominant-type layer came in visible and hid the one before it on the same slide only
    assert (_shown(a), _shown(b), _shown(c)) == (set(), {"dominant"}, {"dominant"})
    # ticking a proportion layer's eye shows it: the dominant-type layer above it is hidden
    a.layers["proportions"].visible = True
    assert viewer.layers.index(b.layers["dominant"]) > viewer.layers.index(a.layers["proportions"])
    assert (_shown(a), _shown(b), _shown(c)) == ({"proportions"}, set(), {"dominant"})
    a.layers["spot_class"].visible = True
    assert (_shown(a), _shown(b)) == ({"spot_class"}, set())
    b.layers["dominant"].visible = True
    assert (_shown(a), _shown(b), _shown(c)) == (set(), {"dominant"}, {"dominant"})
    # a comparison lies on the same spots: it joins the group
    layer, _ = compare_results(viewer, a, b)
    assert layer.visible and (_shown(a), _shown(b), _shown(c)) == (set(), set(), {"dominant"})
    # hiding is no showing: nothing else changes
    layer.visible = False
    assert (_shown(a), _shown(b), _shown(c)) == (set(), set(), {"dominant"})
    # the slides and their images stay as the user left them throughout
    assert {layer.name: layer.visible for layer in _base_layers(viewer)} == base


def test_the_legend_follows_the_topmost_visible_dominant_type_layer(three_results):
    viewer, (a, b, c), types = three_results
    legend = find_dock(viewer, "Legend")
    assert legend.run is c  # the last added, on top
    assert legend.labels() == types and legend.title.text() == f"{c.name}: dominant type"
    c.layers["dominant"].visible = False
    assert legend.run is b  # the next visible one down
    a.layers["proportions"].visible = True  # hides b's dominant type: none is visible
    assert legend.run is None and legend.title.text() == NOTHING_SHOWN
    assert legend.list.count() == 0 and legend.list.isHidden()
    a.layers["dominant"].visible = True
    assert legend.run is a and legend.labels() == types and not legend.list.isHidden()
    # unticking a type still hides its spots on the layer the legend shows
    legend.set_visible(types[0], False)
    colours = np.asarray(a.layers["dominant"].face_color)
    assert (colours[a.dominant == types[0], 3] == 0).all() and (colours[a.dominant != types[0], 3] > 0).all()
    # two slides' dominant types visible: the legend is the top one's, and follows a move
    c.layers["dominant"].visible = True
    assert legend.run is c
    viewer.layers.move(viewer.layers.index(c.layers["dominant"]), 0)
    assert legend.run is a
    viewer.layers.remove(a.layers["dominant"])
    assert legend.run is c


def test_result_layer_names_are_short_and_tell_results_apart(three_results, small_pair):
    viewer, (a, b, c), types = three_results
    assert (a.name, b.name, c.name) == ("rctd #1", "flash #1", "rctd #2")  # the results' own names, as before
    assert (a.label, b.label, c.label) == ("rctd", "flash", "rctd #2")
    assert [a.layers[k].name for k in ("proportions", "spot_class", "dominant")] == [
        "rctd · proportion",
        "rctd · spot class",
        "rctd · dominant",
    ]
    assert b.layers["dominant"].name == "flash · dominant" and c.layers["dominant"].name == "rctd #2 · dominant"
    names = [layer.name for layer in viewer.layers]
    assert len(set(names)) == len(names) and max(len(n) for n in names) <= 20
    # the Results dock recolours the proportion layer without renaming it
    results = find_dock(viewer, "Results")
    results.run.value = a.name
    results.cell_type.value = types[2]
    assert a.layers["proportions"].name == "rctd · proportion"
    np.testing.assert_allclose(
        a.layers["proportions"].face_color, colormap_rgba(a.proportions[types[2]].to_numpy()), atol=1e-6
    )
    # a comparison is found again by its name: comparing twice keeps one layer
    compare_results(viewer, a, b)
    compare_results(viewer, a, b)
    assert [layer.name for layer in viewer.layers].count("compare · rctd vs flash") == 1


def _luminance(rgb) -> float:
    """WCAG relative luminance of an sRGB colour."""
    c = np.asarray(rgb, dtype=float)
    c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(c @ [0.2126, 0.7152, 0.0722])


def _contrast(a, b) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)))
    return (lb + 0.05) / (la + 0.05)


def _over(rgba, background, opacity) -> np.ndarray:
    """The colour seen where a layer of ``opacity`` draws ``rgba`` over ``background``."""
    alpha = rgba[3] * opacity
    return np.asarray(rgba[:3]) * alpha + np.asarray(background) * (1 - alpha)


def test_greyed_spots_are_visible_on_a_dark_canvas_and_on_the_h_and_e(make_napari_viewer, small_pair):
    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "simulated_slide")
    [image] = [layer for layer in viewer.layers if getattr(layer, "rgb", False)]
    pixels = np.asarray(image.data).reshape(-1, 3) / 255.0
    stain = np.median(pixels, axis=0)  # the H&E's typical (light pink) colour
    dark_stain = np.quantile(pixels, 0.05, axis=0)  # and its dark end (nuclei)
    black = np.zeros(3)  # napari's canvas
    half = np.random.default_rng(5).uniform(0.01, 0.2, (spatial.n_obs, len(types)))
    rec = add_result(viewer, _run(spatial, types, "rctd", 1, half_width=half), spatial.obsm["spatial"], 100.0)
    layer = rec.layers["proportions"]
    assert layer.opacity == OVERLAY_OPACITY  # over a tissue image result layers are see-through
    np.testing.assert_array_equal(layer.border_width, 0.0)  # no threshold: no rings
    session_for(viewer).set_width_threshold(0.25)
    wide = rec.interval_widths[types[0]].to_numpy() > 0.25
    assert 0 < wide.sum() < len(wide)
    np.testing.assert_allclose(np.asarray(layer.face_color)[wide], np.tile(UNCERTAIN_RGBA, (wide.sum(), 1)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.border_color)[wide], np.tile(UNCERTAIN_EDGE_RGBA, (wide.sum(), 1)))
    np.testing.assert_allclose(layer.border_width, np.where(wide, UNCERTAIN_EDGE_WIDTH, 0.0))
    # the face carries it on the dark canvas, the ring on the H&E (WCAG contrast; 4.5 is body text's bar)
    assert _contrast(_over(UNCERTAIN_RGBA, black, 1.0), black) > 7
    assert _contrast(_over(UNCERTAIN_RGBA, black, OVERLAY_OPACITY), black) > 4.5
    assert _contrast(_over(UNCERTAIN_EDGE_RGBA, stain, OVERLAY_OPACITY), stain) > 4.5
    assert _contrast(_over(UNCERTAIN_EDGE_RGBA, dark_stain, OVERLAY_OPACITY), dark_stain) > 3
    assert _contrast(UNCERTAIN_EDGE_RGBA[:3], UNCERTAIN_RGBA[:3]) > 7  # the ring stands out from its face
    # the old faint grey (0.8, alpha 0.25) disappeared into the stain
    assert _contrast(_over([0.8, 0.8, 0.8, 0.25], stain, OVERLAY_OPACITY), stain) < 1.05
    # threshold off: colours and rings back to the map's
    session_for(viewer).set_width_threshold(None)
    np.testing.assert_array_equal(layer.border_width, 0.0)
    np.testing.assert_allclose(layer.face_color, colormap_rgba(rec.proportions[types[0]].to_numpy()), atol=1e-6)
