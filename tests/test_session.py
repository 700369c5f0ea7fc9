"""The per-viewer Session: one per viewer, held by the viewer itself, and the docks talk through its signals."""

from __future__ import annotations

import gc
import weakref

from spatial_deconv_gui.gui.perturb import perturb_state
from spatial_deconv_gui.gui.session import Session, real_viewer, session_for
from spatial_deconv_gui.gui.workbench import workbench_for

PLUGIN = "spatial-deconv-gui"


def test_each_viewer_has_its_own_session(make_napari_viewer):
    first, second = make_napari_viewer(), make_napari_viewer()
    assert session_for(first) is session_for(first)
    assert session_for(first) is not session_for(second)
    assert workbench_for(first) is session_for(first).workbench
    assert perturb_state(second) is session_for(second).perturb
    assert workbench_for(first) is not workbench_for(second)


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


def test_a_new_model_reaches_every_knockout_dock_through_the_session(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "grn_tissue")
    _, knockout = viewer.window.add_plugin_dock_widget(PLUGIN, "Knockout")
    assert knockout in session_for(viewer).knockout_docks
    seen = []
    session_for(viewer).model_changed.connect(seen.append)

    class FakeModel:
        genes = ["a", "b"]
        targets = ["a"]
        cluster_names = ["c0"]
        clusters = [0]

    perturb_state(viewer).model = FakeModel()
    session_for(viewer).model_changed.emit(perturb_state(viewer).model)
    assert seen and seen[0] is perturb_state(viewer).model
    assert knockout.status.value == "model: 2 genes (1 with models)"
