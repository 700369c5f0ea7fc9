"""Closing a dock or the viewer while a run goes: the run is cancelled, no child process is left, no handler of
the closed dock runs again, and a closed dock stops reacting to the mouse and the session. A child process that
crashes is reported in its dock, and the dock trains again afterwards."""

from __future__ import annotations

import numpy as np
import psutil
import pytest

pytest.importorskip("spatial_deconv_gui.perturb_api")

from spatial_deconv_gui import api, perturb_api  # noqa: E402
from spatial_deconv_gui.engines.base import DeconvResult  # noqa: E402
from spatial_deconv_gui.gui.docks import find_dock, train  # noqa: E402
from spatial_deconv_gui.gui.result_layers import add_result  # noqa: E402
from spatial_deconv_gui.gui.session import session_for  # noqa: E402
from spatial_deconv_gui.io import attach_result  # noqa: E402

PLUGIN = "spatial-deconv-gui"


class FakeMouse:
    def __init__(self, position, type="mouse_press"):
        self.position = position
        self.type = type


@pytest.fixture(autouse=True)
def private_settings(tmp_path, monkeypatch):
    monkeypatch.setattr("spatial_deconv_gui.gui.docks.train._settings_path", lambda: tmp_path / "settings.json")


@pytest.fixture
def errors_shown(monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    return shown


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _close_dock(viewer, dock):
    """What the dock's close button does."""
    viewer.window.remove_dock_widget(getattr(dock, "native", dock))


def _train_dock(make_napari_viewer, qtbot, model_dir):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "grn_tissue")
    _, dock = viewer.window.add_plugin_dock_widget(PLUGIN, "Train perturbation model")
    qtbot.waitUntil(lambda: dock.ready, timeout=30_000)
    assert dock.cluster_col.value == "cluster"
    dock.model_dir.value = str(model_dir)
    return viewer, dock


def _click_train_and_wait_for_the_child(qtbot, dock) -> int:
    events = []
    dock.jobs.progressed.connect(events.append)
    dock.train_btn.native.click()
    assert dock.busy, dock.status.value
    qtbot.waitUntil(lambda: dock.jobs.child_pid is not None and len(events) > 0, timeout=120_000)
    pid = dock.jobs.child_pid
    assert not _gone(pid)
    return pid


def test_closing_the_train_dock_mid_training_ends_its_child_process(make_napari_viewer, qtbot, tmp_path, errors_shown):
    viewer, dock = _train_dock(make_napari_viewer, qtbot, tmp_path / "model")
    pid = _click_train_and_wait_for_the_child(qtbot, dock)
    _close_dock(viewer, dock)
    assert dock.jobs.closed and dock.jobs.control.cancelled
    qtbot.waitUntil(lambda: _gone(pid), timeout=10_000)
    qtbot.waitUntil(lambda: not dock.jobs.busy, timeout=10_000)
    assert session_for(viewer).model is None and errors_shown == []
    assert not dock.jobs.start(lambda control: 1, lambda _r: None)  # a closed dock's runner starts nothing


def test_closing_the_viewer_ends_a_child_that_never_checks_cancel(
    make_napari_viewer, qtbot, tmp_path, monkeypatch, errors_shown
):
    monkeypatch.setattr(train, "WARM_TRAINING", "jobs_for_tests:stuck")
    viewer, dock = _train_dock(make_napari_viewer, qtbot, tmp_path / "model")
    pid = _click_train_and_wait_for_the_child(qtbot, dock)
    viewer.close()
    qtbot.waitUntil(lambda: _gone(pid), timeout=10_000)  # ended at once, not at a cancel check it never makes
    qtbot.waitUntil(lambda: not dock.jobs.busy, timeout=10_000)
    assert dock.jobs.closed and errors_shown == []


def test_closing_the_viewer_mid_deconvolution_cancels_the_run(make_napari_viewer, qtbot, errors_shown):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "simulated_slide")
    _, dock = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    dock.mode.value = "full"
    dock.params_box.batch_size.value = 20
    events, finished = [], []
    dock.jobs.progressed.connect(events.append)
    dock.run_btn.native.click()
    dock.jobs.worker.finished.connect(lambda: finished.append(True))
    qtbot.waitUntil(lambda: len(events) > 0, timeout=120_000)
    control = dock.jobs.control
    viewer.close()
    assert control.cancelled
    qtbot.waitUntil(lambda: bool(finished), timeout=120_000)  # the worker left at its next cancellation check
    assert not dock.jobs.busy and not session_for(viewer).results and errors_shown == []


@pytest.mark.parametrize("how, said", [("segfault", "killed by signal SIGSEGV"), ("exit", "exit code 3")])
def test_a_crashed_training_process_is_reported_and_the_dock_trains_again(
    make_napari_viewer, qtbot, tmp_path, monkeypatch, errors_shown, how, said
):
    real = train.WARM_TRAINING
    viewer, dock = _train_dock(make_napari_viewer, qtbot, tmp_path / "model")
    monkeypatch.setattr(train, "WARM_TRAINING", "jobs_for_tests:crash")
    dock.train_options["how"] = how
    dock.train_btn.native.click()
    qtbot.waitUntil(lambda: not dock.busy, timeout=120_000)
    assert dock.status.value.startswith("failed: RuntimeError: the crash process ended without an answer")
    assert said in dock.status.value
    assert len(errors_shown) == 1 and said in errors_shown[0] and errors_shown[0].startswith("Train: ")
    assert session_for(viewer).model is None and dock.train_btn.enabled and not dock.cancel_btn.enabled
    # the app goes on: the same dock trains the model
    monkeypatch.setattr(train, "WARM_TRAINING", real)
    del dock.train_options["how"]
    dock.train_btn.native.click()
    qtbot.waitUntil(lambda: not dock.busy, timeout=300_000)
    model = session_for(viewer).model
    assert model is not None, dock.status.value
    assert model.manifest["status"] == "complete" and len(model.targets) > 10
    assert dock.status.value == f"ready: {len(model.targets)} targets, {len(model.cluster_names)} clusters"
    assert perturb_api.load_model(tmp_path / "model").targets == model.targets


def _viewer_with_a_result(make_napari_viewer, small_pair):
    viewer = make_napari_viewer()
    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    res = DeconvResult(
        key="sim",
        method="sim",
        mode=None,
        cell_types=types,
        proportions=spatial.obsm["true_proportions"].to_numpy(),
        params={},
        device="cpu",
        runtime_s=0.0,
    )
    run = api.RunOutput(attach_result(spatial, res), res, None)
    rec = add_result(viewer, run, spatial.obsm["spatial"], 100.0, name="truth")
    return viewer, rec


def _click(viewer, position, kind="mouse_press"):
    callbacks = viewer.mouse_drag_callbacks if kind == "mouse_press" else viewer.mouse_move_callbacks
    for callback in list(callbacks):
        callback(viewer, FakeMouse(position, kind))


def test_a_closed_spot_inspector_stops_reacting(make_napari_viewer, small_pair):
    viewer, rec = _viewer_with_a_result(make_napari_viewer, small_pair)
    session = session_for(viewer)
    inspector = find_dock(viewer, "Spot inspector")
    first, second = rec.coords_yx[0], rec.coords_yx[1]
    _click(viewer, first)
    assert inspector.current == ("truth", 0) and session.spot == ("truth", 0)
    _close_dock(viewer, inspector)
    assert inspector._on_click not in viewer.mouse_drag_callbacks
    assert inspector._on_hover not in viewer.mouse_move_callbacks
    _click(viewer, second)
    _click(viewer, second, "mouse_move")
    session.pick_spot("truth", 1)  # another dock picking a spot reaches a closed inspector no more
    assert inspector.current == ("truth", 0) and session.spot == ("truth", 1)


def test_a_closed_lens_stops_reacting(make_napari_viewer, tmp_path):
    from spatial_deconv_gui.sample_data import grn_sample_paths

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "grn_tissue")
    session = session_for(viewer)
    paths = grn_sample_paths()
    model = perturb_api.train_model(paths["spatial"], paths["grn"], paths["lr"], "cluster", tmp_path / "model")
    session.set_model(model, viewer.layers[0])
    _, lens = viewer.window.add_plugin_dock_widget(PLUGIN, "Interaction lens")
    cells = session.cells_yx()
    _click(viewer, cells[3])
    assert session.cell == 3 and lens.lens is not None and lens.lens.cell == 3
    drawn = [layer.name for layer in viewer.layers]
    _close_dock(viewer, lens)
    assert lens._on_click not in viewer.mouse_drag_callbacks and lens._on_hover not in viewer.mouse_move_callbacks
    _click(viewer, cells[7])
    assert session.cell == 3  # the click reached no closed dock
    session.pick_cell(7)  # and a cell picked elsewhere does not redraw the closed lens
    session.set_model(model, viewer.layers[0])
    assert lens.lens.cell == 3 and [layer.name for layer in viewer.layers] == drawn
    assert np.isfinite(cells).all()
