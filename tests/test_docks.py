"""Every dock is a widget of the manifest and opens from napari's Plugins menu; a saved result opened from disk
gets its Results and Legend docks from there."""

from __future__ import annotations

import importlib

import anndata as ad
import numpy as np
import pytest
from npe2 import PluginManifest

from spatial_deconv_gui import api, keys
from spatial_deconv_gui.engines.base import DeconvResult
from spatial_deconv_gui.gui.docks import DISPLAY_NAME, DOCKS, dock_class, find_dock, open_docks
from spatial_deconv_gui.gui.session import session_for
from spatial_deconv_gui.io import attach_result

PLUGIN = "spatial-deconv-gui"


def _execute(command: str):
    from napari._app_model import get_app_model

    return get_app_model().commands.execute_command(command).result()


def test_every_dock_is_a_manifest_widget_and_opens(make_napari_viewer):
    manifest = PluginManifest.from_distribution(PLUGIN)
    assert manifest.display_name == DISPLAY_NAME
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    widgets = {w.display_name: commands[w.command] for w in manifest.contributions.widgets}
    assert set(widgets) == set(DOCKS)
    viewer = make_napari_viewer()
    for name, python_name in widgets.items():
        module, cls = python_name.split(":")
        assert getattr(importlib.import_module(module), cls) is dock_class(name)
        _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        assert isinstance(widget, dock_class(name)) and find_dock(viewer, name) is widget
    assert len(viewer.window.dock_widgets) == len(DOCKS)


def test_the_plugins_menu_and_open_docks_share_one_dock(make_napari_viewer):
    viewer = make_napari_viewer()
    _execute(f"{PLUGIN}.results_widget")  # Plugins > Spatial Deconvolution > Results
    opened = find_dock(viewer, "Results")
    assert opened is not None and f"Results ({DISPLAY_NAME})" in viewer.window.dock_widgets
    assert open_docks(viewer, ["Results"]) == [opened]
    [legend] = open_docks(viewer, ["Legend"])
    _execute(f"{PLUGIN}.legend_widget")  # toggles the Legend opened above instead of adding a second one
    assert [w for w in viewer.window.dock_widgets.values() if type(w).__name__ == "LegendDock"] == [legend]


@pytest.fixture
def saved_result(small_pair, tmp_path):
    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    props = spatial.obsm["true_proportions"].to_numpy()
    classes = np.where(props.max(axis=1) > 0.7, "singlet", "doublet_certain")
    res = DeconvResult(
        key="rctd",
        method="rctd",
        mode="doublet",
        cell_types=types,
        proportions=props,
        params={"mode": "doublet"},
        device="cpu",
        runtime_s=1.5,
        obs={"rctd_spot_class": classes},
    )
    path = api.save_result(attach_result(spatial, res), tmp_path / "saved.h5ad")
    return path, res


def test_saved_results_come_back_from_the_file(saved_result):
    path, res = saved_result
    [run] = api.saved_results(path)  # the simulated truth in obsm is no result: no run info beside it
    assert (run.result.key, run.result.method, run.result.mode) == ("rctd", "rctd", "doublet")
    assert run.result.cell_types == res.cell_types and run.result.runtime_s == 1.5
    np.testing.assert_allclose(run.result.proportions, res.proportions)
    assert list(run.result.obs["rctd_spot_class"]) == list(res.obs["rctd_spot_class"])
    assert api.saved_results(ad.AnnData(np.zeros((3, 2)))) == []
    # a DestVI model state in the same file belongs to DestVI's result only
    with_state = ad.read_h5ad(path)
    with_state.uns[keys.DESTVI_MODEL] = {"barcodes": np.asarray(with_state.obs_names, dtype=str)}
    with_state.write_h5ad(path.with_name("with_state.h5ad"))
    [run] = api.saved_results(path.with_name("with_state.h5ad"))
    assert run.result.method == "rctd" and keys.DESTVI_MODEL not in run.result.uns


def test_a_saved_result_opened_from_disk_gets_its_docks_from_the_plugins_menu(make_napari_viewer, qtbot, saved_result):
    path, res = saved_result
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin=PLUGIN)
    session = session_for(viewer)
    assert not session.results
    _execute(f"{PLUGIN}.results_widget")
    qtbot.waitUntil(lambda: len(session.results) == 1, timeout=30_000)
    qtbot.waitUntil(
        lambda: find_dock(viewer, "Legend") is not None and find_dock(viewer, "Legend").run is not None, timeout=10_000
    )
    [(name, rec)] = session.results.items()
    assert name == "saved: rctd doublet"
    np.testing.assert_allclose(rec.proportions.to_numpy(), res.proportions)
    assert find_dock(viewer, "Results").run.value == name
    legend = find_dock(viewer, "Legend")
    assert legend.labels() == res.cell_types and legend.run is rec
    assert {"dominant", "proportions", "spot_class"} <= set(rec.layers)
    # opening the Legend from the menu afterwards reads nothing twice
    _execute(f"{PLUGIN}.legend_widget")
    assert len(session.results) == 1


def test_the_right_dock_column_fits_on_a_screen(make_napari_viewer):
    """Deconvolution, Results and Spot inspector stack on the right; their controls scroll instead of making the
    window's minimum height the sum of theirs (1764 px in the sample demo before they scrolled)."""
    from qtpy.QtWidgets import QApplication

    from spatial_deconv_gui.gui.scrolling import MIN_SHOWN, SCREEN_SHARE

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "simulated_slide")
    open_docks(viewer, ["Deconvolution", "Results", "Spot inspector"])
    screen = QApplication.primaryScreen().availableGeometry().height()
    controls = 0
    for name in ("Deconvolution", "Results"):
        dock = find_dock(viewer, name)
        shown = dock.scroll.minimumSizeHint().height()
        assert shown == max(MIN_SHOWN, min(dock.body.native.minimumSizeHint().height(), int(SCREEN_SHARE * screen)))
        assert dock.body.native.minimumSizeHint().height() > shown  # these controls do scroll
        pinned = dock.footer.native.minimumSizeHint().height() if dock.footer.native.isVisibleTo(dock.native) else 0
        assert dock.native.minimumSizeHint().height() < shown + pinned + 40  # the dock asks for no more than that
        controls += dock.body.native.minimumSizeHint().height()
    window = viewer.window._qt_window.minimumSizeHint().height()
    assert window < controls  # less than the two docks' controls alone, let alone the column
    assert window <= 2 * max(MIN_SHOWN, int(SCREEN_SHARE * screen)) + 500, window
    # napari resets a dock's choices on layer changes by calling the dock's reset_choices: it reaches the controls
    from magicgui.widgets import ComboBox

    asked = []
    dock = find_dock(viewer, "Results")
    dock.body.append(ComboBox(name="probe", choices=lambda _w: asked.append(1) or ["a"]))
    asked.clear()
    dock.reset_choices()
    assert asked


def test_scrolling_docks_keep_their_controls_full_width(make_napari_viewer, qtbot):
    """The scroll area scrolls only vertically, so it must be as wide as the widest controls, as napari lays them
    out (its stylesheet) and once a method's parameters are in: 'confidence threshold' was cut off."""
    from qtpy.QtWidgets import QLabel

    viewer = make_napari_viewer(show=True)
    [dock] = open_docks(viewer, ["Deconvolution"])
    bar = dock.scroll.verticalScrollBar().sizeHint().width()
    for method in [m for m in dock.method.choices if m in api.available_methods()] + ["rctd"]:
        dock.method.value = method
        qtbot.wait(50)  # Qt's layout passes
        assert len(dock.params_box) > 0
        assert dock.scroll.width() >= dock.body.native.minimumSizeHint().width() + bar, method
        for label in dock.params_box.native.findChildren(QLabel):
            assert label.width() >= label.minimumSizeHint().width(), (method, label.text())
    texts = [label.text() for label in dock.params_box.native.findChildren(QLabel)]
    assert "confidence threshold" in texts


def _inside(widget, outer) -> bool:
    """Whether ``widget`` is shown and lies wholly within ``outer``'s rectangle (both on screen)."""
    from qtpy.QtCore import QPoint, QRect

    top_left = widget.mapTo(outer, QPoint(0, 0))
    return widget.isVisible() and outer.rect().contains(QRect(top_left, widget.size()))


def test_run_controls_are_pinned_under_the_scrolled_controls(make_napari_viewer, qtbot):
    """On a 1000-px screen the Deconvolution dock's Run was below the fold of its scrolled controls: Run, Cancel,
    Stop now and the progress bar sit under the scroll area, in view however short the dock or far it scrolls."""
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "simulated_slide")
    dock = dock_class("Deconvolution")(viewer)  # undocked: the test sets its height (a dock area would)
    widget = dock.native
    widget.resize(420, 300)
    widget.show()
    qtbot.waitExposed(widget)
    qtbot.wait(50)  # Qt's layout passes
    bar = dock.scroll.verticalScrollBar()
    assert bar.maximum() > 0  # the controls are taller than the dock: they scroll
    pinned = [dock.run_btn, dock.cancel_btn, dock.stop_btn, dock.progress, dock.status]
    for control in pinned:
        assert not dock.scroll.isAncestorOf(control.native)  # not in the scroll area...
        assert dock.footer.native.isAncestorOf(control.native)
    places = []
    for value in (bar.minimum(), bar.maximum()):
        bar.setValue(value)
        qtbot.wait(20)
        for control in pinned:
            assert _inside(control.native, widget), (control, value)  # ...so on screen, scrolled to either end
        places.append([control.native.mapTo(widget, control.native.rect().topLeft()) for control in pinned])
    assert places[0] == places[1]  # scrolling does not move them
    # they sit under the scroll area, the footer no taller than its controls need
    assert dock.footer.native.geometry().top() >= dock.scroll.geometry().bottom()
    assert dock.footer.native.height() <= dock.footer.native.sizeHint().height() + 2
    # and still work from there: Run starts, Cancel stops
    dock.run_btn.native.click()
    assert dock.busy and dock.cancel_btn.enabled and not dock.run_btn.enabled, (dock.problems.value, dock.status.value)
    dock.cancel_btn.native.click()
    qtbot.waitUntil(lambda: not dock.busy, timeout=120_000)
    assert dock.run_btn.enabled and dock.status.value == "cancelled: no result kept"


def test_the_spot_inspector_scrolls_when_its_content_is_taller(make_napari_viewer, qtbot, small_pair):
    """A spot with an interval per type makes the inspector's text longer than a column of docks leaves it: the
    chart and text scroll inside the dock, which asks for no more than a scrolling dock's share of height."""
    import pandas as pd

    from spatial_deconv_gui.gui.result_layers import add_result
    from spatial_deconv_gui.gui.scrolling import MIN_SHOWN

    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    props = spatial.obsm["true_proportions"].to_numpy()
    bounds = {
        keys.proportions_lower("rctd"): pd.DataFrame(
            np.clip(props - 0.1, 0, 1), index=spatial.obs_names, columns=types
        ),
        keys.proportions_upper("rctd"): pd.DataFrame(
            np.clip(props + 0.1, 0, 1), index=spatial.obs_names, columns=types
        ),
    }
    res = DeconvResult("rctd", "rctd", "full", types, props, {}, "cpu", 0.0, obsm=bounds)
    viewer = make_napari_viewer()
    rec = add_result(viewer, api.RunOutput(attach_result(spatial, res), res, None), spatial.obsm["spatial"], 100.0)
    inspector = widget = dock_class("Spot inspector")(viewer)  # undocked: the test sets its height
    widget.resize(360, 260)
    widget.show()
    qtbot.waitExposed(widget)
    inspector.show_spot(rec, 4)
    qtbot.wait(50)
    assert "90% intervals:" in inspector.text.text()
    bar = inspector.scroll.verticalScrollBar()
    content = inspector.body.height()
    assert (
        content > inspector.scroll.viewport().height()
        and bar.maximum() == content - inspector.scroll.viewport().height()
    )
    assert inspector.minimumSizeHint().height() <= MIN_SHOWN + 10 < content  # the dock can shrink below its content
    # scrolled to the end, the text's last line is in view
    bar.setValue(bar.maximum())
    qtbot.wait(20)
    text = inspector.text
    bottom = text.mapTo(inspector.scroll.viewport(), text.rect().bottomLeft()).y()
    assert 0 < bottom <= inspector.scroll.viewport().height()
