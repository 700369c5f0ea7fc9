"""A long session: runs come and go and memory stays flat; two runs at once keep the event loop responsive; the
docks read slides off the GUI thread."""

from __future__ import annotations

import ctypes
import gc
import threading
import time
import weakref

import numpy as np
import psutil
import pytest

pytest.importorskip("spatial_deconv_gui.perturb_api")

from spatial_deconv_gui import perturb_api  # noqa: E402
from spatial_deconv_gui.gui.docks import knockout, train  # noqa: E402
from spatial_deconv_gui.gui.session import session_for  # noqa: E402

PLUGIN = "spatial-deconv-gui"
MB = 2**20
N_KNOCKOUTS = 50


@pytest.fixture(autouse=True)
def private_settings(tmp_path, monkeypatch):
    monkeypatch.setattr("spatial_deconv_gui.gui.docks.train._settings_path", lambda: tmp_path / "settings.json")


@pytest.fixture(scope="module")
def grn_model(tmp_path_factory):
    from spatial_deconv_gui.sample_data import grn_sample_paths

    paths = grn_sample_paths()
    return perturb_api.train_model(
        paths["spatial"], paths["grn"], paths["lr"], "cluster", tmp_path_factory.mktemp("load") / "model"
    )


def _viewer_with_model(make_napari_viewer, grn_model):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "grn_tissue")
    session_for(viewer).set_model(grn_model, viewer.layers[0])
    _, ko = viewer.window.add_plugin_dock_widget(PLUGIN, "Knockout")
    return viewer, ko


def _resident() -> float:
    """This process's resident memory after a full collection, with free heap pages handed back to the system
    (glibc keeps them otherwise, and they would read as growth)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def _delete_layers(viewer, record):
    for layer in list(record.layers.values()):
        if layer in viewer.layers:
            viewer.layers.remove(layer)


def test_the_docks_read_the_slide_off_the_gui_thread(make_napari_viewer, qtbot, grn_model, tmp_path, monkeypatch):
    reads = []

    def recorded(function):
        def wrapper(*args, **kwargs):
            reads.append((function.__name__, threading.current_thread() is threading.main_thread()))
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(train, "slide_columns", recorded(train.slide_columns))
    monkeypatch.setattr(train, "read_slide_adata", recorded(train.read_slide_adata))
    monkeypatch.setattr(knockout, "slide_adata", recorded(knockout.slide_adata))
    viewer, ko = _viewer_with_model(make_napari_viewer, grn_model)
    _, tr = viewer.window.add_plugin_dock_widget(PLUGIN, "Train perturbation model")
    qtbot.waitUntil(lambda: tr.ready, timeout=30_000)
    assert tr.cluster_col.value == "cluster" and tr.expression.value == "lognorm"
    # the knockout's AnnData still carries the slide's obs, read in the worker
    ko.genes.value = ["Tf0"]
    ko.run_btn.native.click()
    qtbot.waitUntil(lambda: not ko.busy, timeout=120_000)
    assert ko.current is not None, ko.status.value
    assert list(ko.current.adata.obs["cluster"]) == list(grn_model.clusters)
    assert [name for name, _ in reads] == ["slide_columns", "slide_adata"]
    assert not any(on_gui for _, on_gui in reads), reads


@pytest.mark.slow
def test_fifty_knockouts_in_a_row_keep_memory_flat(make_napari_viewer, qtbot, grn_model):
    """50 knockouts from the dock, each run's layers deleted by the user before the next: every run, its AnnData
    and its layers are freed (the session forgets a run whose layers are gone), and after a warm-up of 10 the
    process grows by less than 24 MB over the last 40 (measured: 1-7 MB, allocator noise)."""
    viewer, ko = _viewer_with_model(make_napari_viewer, grn_model)
    session = session_for(viewer)
    genes = list(grn_model.genes)
    ko.steps.value = 1
    rss, kept, alive, took = [], [], [], []
    for i in range(N_KNOCKOUTS):
        t0 = time.perf_counter()
        ko.genes.value = [genes[i % 8]]
        ko.run_btn.native.click()
        qtbot.waitUntil(lambda: not ko.busy, timeout=120_000)
        run = ko.current
        assert run is not None and run.name in session.perturbations, ko.status.value
        kept.append(run.adata.layers["perturb_delta"].data.nbytes + run.adata.obsm["perturb_vectors"].nbytes)
        alive += [weakref.ref(run), weakref.ref(run.adata)] + [weakref.ref(x) for x in run.layers.values()]
        _delete_layers(viewer, run)
        assert run.name not in session.perturbations and ko.current is None
        del run
        took.append(time.perf_counter() - t0)
        if i >= 9:
            rss.append(_resident())
    gc.collect()
    assert [type(r()).__name__ for r in alive if r() is not None] == []
    growth = (rss[-1] - rss[0]) / MB
    print(f"RSS after runs 10..50: {[round(r / MB) for r in rss[::5]]} MB; growth {growth:.1f} MB;")
    print(f"one run's Δ and vectors: {np.mean(kept) / MB:.2f} MB; median {np.median(took):.2f} s a knockout")
    assert not session.perturbations
    assert growth < 24, f"grew {growth:.1f} MB over 40 knockouts"


@pytest.mark.slow
def test_twenty_deconvolution_runs_keep_memory_flat(make_napari_viewer, qtbot):
    """20 FlashDeconv runs from the Deconvolution dock on the sample, each result's layers deleted before the next
    run: every result, its AnnData and its layers are freed, and after a warm-up of 5 the process grows by less
    than 24 MB over the last 15."""
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "simulated_slide")
    _, dock = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    dock.method.value = "flash"
    session = session_for(viewer)
    rss, alive, took = [], [], []
    for i in range(20):
        t0 = time.perf_counter()
        dock.run_btn.native.click()
        qtbot.waitUntil(lambda: not dock.busy, timeout=300_000)
        assert dock.last_run is not None and len(session.results) == 1, dock.status.value
        [rec] = session.results.values()
        alive += [weakref.ref(rec), weakref.ref(rec.adata)] + [weakref.ref(x) for x in rec.layers.values()]
        _delete_layers(viewer, rec)
        assert not session.results and session.selected_result is None
        dock.last_run = None  # the dock's own handle on the last run (scripting), dropped like the user's layers
        del rec
        took.append(time.perf_counter() - t0)
        if i >= 4:
            rss.append(_resident())
    growth = (rss[-1] - rss[0]) / MB
    print(f"RSS after runs 5..20: {[round(r / MB) for r in rss[::3]]} MB; growth {growth:.1f} MB;")
    print(f"median {np.median(took):.2f} s a run")
    gc.collect()
    assert [type(r()).__name__ for r in alive if r() is not None] == []
    assert growth < 24, f"grew {growth:.1f} MB over 15 runs"


@pytest.fixture(scope="module")
def warm_rctd():
    """Compile (and cache) RCTD's numba kernels once: a first-ever JIT compile is not what the stall test
    measures (the workbench's stall test does the same)."""
    import anndata as ad

    from spatial_deconv_gui import api
    from spatial_deconv_gui.sample_data import sample_paths

    s, r = sample_paths()
    api.run_deconvolution(
        ad.read_h5ad(s)[:200].copy(), r, "rctd", params={"mode": "doublet", "n_fit": 100}, check=False
    )


@pytest.mark.slow
def test_two_runs_at_once_keep_the_event_loop_responsive(
    make_napari_viewer, qtbot, tmp_path, stall_meter, warm_rctd, grn_model
):
    """RCTD (a worker thread) and perturbation training (a child process) started together from their docks in one
    viewer: the longest event-loop stall from the first click until both jobs handed back their results is at
    most 150 ms. As in the single-run stall tests, a second attempt is allowed when the first is disturbed by other
    jobs on the machine; the better of the two must meet the bar."""
    stalls = []
    for attempt in range(2):
        viewer = make_napari_viewer(show=True)
        viewer.open_sample(PLUGIN, "simulated_slide")
        viewer.open_sample(PLUGIN, "grn_tissue")
        _, deconv = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
        _, tr = viewer.window.add_plugin_dock_widget(PLUGIN, "Train perturbation model")
        (_, simulated), (_, tissue) = session_for(viewer).slides()  # in the order opened
        deconv.slide.value, tr.slide.value = simulated, tissue
        qtbot.waitUntil(lambda: tr.ready, timeout=30_000)
        deconv.mode.value = "doublet"
        deconv.params_box.batch_size.value = 100
        tr.model_dir.value = str(tmp_path / f"model{attempt}")
        returned, stages = {}, []
        deconv.jobs.progressed.connect(lambda e: stages.append((time.perf_counter(), "deconvolution", e.stage)))
        tr.jobs.progressed.connect(lambda e: stages.append((time.perf_counter(), "training", e.stage)))
        stall_meter.gaps.clear()
        stall_meter.start()
        deconv.run_btn.native.click()
        first = time.perf_counter()
        deconv.jobs.worker.returned.connect(lambda _r: returned.setdefault("deconvolution", time.perf_counter()))
        tr.train_btn.native.click()
        tr.jobs.worker.returned.connect(lambda _r: returned.setdefault("training", time.perf_counter()))
        assert deconv.busy and tr.busy, (deconv.problems.value, tr.status.value)
        qtbot.waitUntil(lambda: not deconv.busy and not tr.busy, timeout=600_000)
        stall_meter.stop()
        assert deconv.last_run is not None, deconv.status.value
        assert session_for(viewer).model is not None, tr.status.value
        both = max(returned.values())
        stalls.append(stall_meter.longest(first, both))
        overlap = min(returned.values()) - first
        worst = max(((b - a, a) for a, b in stall_meter.gaps if a >= first and b <= both), default=(0, first))
        during = [(job, stage) for t, job, stage in stages if t <= worst[1] + worst[0]][-2:]
        print(
            f"two runs at once: longest stall {1000 * stalls[-1]:.0f} ms, {worst[1] - first:.1f} s after the first "
            f"click (last events: {during}), over {both - first:.1f} s (both running for the first {overlap:.1f} s); "
            f"stalls over 100 ms: {sum(b - a > 0.1 for a, b in stall_meter.gaps if a >= first and b <= both)}"
        )
        if stalls[-1] <= 0.150:
            break
    assert min(stalls) <= 0.150, f"event loop stalled {[round(1000 * s) for s in stalls]} ms"
