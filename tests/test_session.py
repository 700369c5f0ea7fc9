"""The per-viewer Session: one per viewer, held by the viewer itself, evented; the docks talk through its signals."""

from __future__ import annotations

import gc
import weakref

import numpy as np

from spatial_deconv_gui import api
from spatial_deconv_gui.engines.base import DeconvResult
from spatial_deconv_gui.gui.docks import find_dock
from spatial_deconv_gui.gui.result_layers import add_result
from spatial_deconv_gui.gui.session import Session, real_viewer, session_for
from spatial_deconv_gui.io import attach_result

PLUGIN = "spatial-deconv-gui"


def _result(spatial, types, props, key="sim"):
    res = DeconvResult(
        key=key, method=key, mode=None, cell_types=types, proportions=props, params={}, device="cpu", runtime_s=0.0
    )
    return api.RunOutput(attach_result(spatial, res), res, None)


def test_each_viewer_has_its_own_session(make_napari_viewer, small_pair):
    first, second = make_napari_viewer(), make_napari_viewer()
    assert session_for(first) is session_for(first)
    assert session_for(first) is not session_for(second)
    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    add_result(first, _result(spatial, types, spatial.obsm["true_proportions"].to_numpy()), spatial.obsm["spatial"], 50)
    assert list(session_for(first).results) == ["sim #1"] and not session_for(second).results
    assert find_dock(first, "Results") is not None and find_dock(second, "Results") is None


def test_a_proxied_viewer_reaches_the_same_session(make_napari_viewer):
    from napari.utils._proxies import PublicOnlyProxy

    viewer = make_napari_viewer()
    proxy = PublicOnlyProxy(viewer)
    assert real_viewer(proxy) is viewer
    assert session_for(proxy) is session_for(viewer)


def test_the_session_dies_with_its_owner():
    class Owner:  # any object a session can hang off; napari viewers are kept alive by Qt, so a plain one here
        pass

    owner = Owner()
    session = weakref.ref(session_for(owner))
    assert isinstance(session(), Session)
    del owner
    gc.collect()
    assert session() is None


def test_session_events_fire_in_order(make_napari_viewer, small_pair):
    viewer = make_napari_viewer()
    session = session_for(viewer)
    seen = []
    for name in ("slides_changed", "result_added", "result_selected", "spot_picked", "reference_changed"):
        getattr(session, name).connect(lambda *args, name=name: seen.append((name, *args)))
    viewer.open_sample(PLUGIN, "simulated_slide")
    assert ("slides_changed",) in seen and len(session.slides()) == 1
    seen.clear()
    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    truth = spatial.obsm["true_proportions"].to_numpy()
    for _ in range(2):
        add_result(viewer, _result(spatial, types, truth), spatial.obsm["spatial"], 50)
    assert [e for e in seen if e[0] != "slides_changed"] == [
        ("result_added", "sim #1"),
        ("result_selected", "sim #1"),
        ("result_added", "sim #2"),
        ("result_selected", "sim #2"),
    ]
    seen.clear()
    session.select_result("sim #1")
    session.select_result("sim #1")  # no change: no event
    session.pick_spot("sim #1", 7)
    session.set_reference("/some/ref.h5ad")
    assert seen == [
        ("result_selected", "sim #1"),
        ("spot_picked", "sim #1", 7),
        ("reference_changed", "/some/ref.h5ad"),
    ]
    # the docks followed: the Legend shows the dominant-type layer on screen (sim #2's hid sim #1's: one slide), the
    # inspector the picked spot
    legend = find_dock(viewer, "Legend")
    assert legend.run is session.results["sim #2"]
    session.results["sim #1"].layers["dominant"].visible = True
    assert legend.run is session.results["sim #1"] and not session.results["sim #2"].layers["dominant"].visible
    inspector = find_dock(viewer, "Spot inspector")
    assert inspector.current == ("sim #1", 7)
    nz = {t: p for t, p in zip(types, truth[7]) if p > 1e-3}
    assert inspector.shown.keys() == nz.keys() and all(abs(inspector.shown[t] - nz[t]) < 1e-12 for t in nz)
    assert find_dock(viewer, "Results").run.value == "sim #1"


def test_a_new_model_reaches_every_knockout_dock_through_the_session(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "grn_tissue")
    _, knockout = viewer.window.add_plugin_dock_widget(PLUGIN, "Knockout")
    seen = []
    session_for(viewer).model_changed.connect(seen.append)

    class FakeModel:
        genes = ["a", "b"]
        targets = ["a"]
        cluster_names = ["c0"]
        clusters = [0]

    model = FakeModel()
    session_for(viewer).set_model(model, viewer.layers[0])
    assert seen == [model] and session_for(viewer).model_slide is viewer.layers[0]
    assert knockout.status.value == "model: 2 genes (1 with models)"
    assert [c for c in knockout.genes.choices] == ["a", "b"]
    np.testing.assert_array_equal(knockout.cluster.choices, [None, "c0"])
