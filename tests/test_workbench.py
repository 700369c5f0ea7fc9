"""The deconvolution workbench driven like a user: run RCTD on the sample, watch, explore, compare, save."""

from __future__ import annotations

import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from spatial_deconv_gui.gui.docks import find_dock
from spatial_deconv_gui.gui.layers import PLUGIN_KEY
from spatial_deconv_gui.gui.result_layers import add_result, export_csv, save_figure, save_result
from spatial_deconv_gui.gui.session import session_for
from spatial_deconv_gui.gui.views import colormap_rgba, compare_proportions, js_distance

PLUGIN = "spatial-deconv-gui"
pytest.importorskip("spatial_deconv_gui.engines.rctd")


class FakeMouse:
    type = "mouse_press"

    def __init__(self, position):
        self.position = position


@pytest.fixture(scope="module", autouse=True)
def warm_engine():
    """Compile (and cache) the numba kernels once: a first-ever JIT compile is not what the stall test measures."""
    import anndata as ad

    from spatial_deconv_gui import api
    from spatial_deconv_gui.sample_data import sample_paths

    s, r = sample_paths()
    spatial = ad.read_h5ad(s)[:200].copy()
    api.run_deconvolution(spatial, r, "rctd", params={"mode": "doublet", "n_fit": 100}, check=False)


def _viewer_with_widget(make_napari_viewer, show=False):
    viewer = make_napari_viewer(show=show)
    viewer.open_sample(PLUGIN, "simulated_slide")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    return viewer, widget


def _click_run_and_wait(qtbot, widget, timeout_s=600):
    widget.run_btn.native.click()
    assert widget.busy, widget.problems.value
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout_s * 1000)


def _timed_run(qtbot, widget, meter):
    """Click Run, wait; returns the run, the partial results seen and the longest stall while the engine ran."""
    seen_partial, stages = [], []
    widget.jobs.progressed.connect(lambda e: e.partial is not None and seen_partial.append(e.partial))
    widget.jobs.progressed.connect(lambda e: stages.append((time.perf_counter(), e.stage)))
    meter.gaps.clear()
    meter.start()
    widget.run_btn.native.click()
    clicked = time.perf_counter()
    assert widget.busy, widget.problems.value
    returned = []
    widget.jobs.worker.returned.connect(lambda _r: returned.append(time.perf_counter()))
    qtbot.waitUntil(lambda: not widget.busy, timeout=600_000)
    meter.stop()
    assert widget.last_run is not None, widget.status.value
    stall = meter.longest(clicked, returned[0])
    worst = max(((b - a, a) for a, b in meter.gaps if a >= clicked and b <= returned[0]), default=(0, 0))
    during = ([st for t, st in stages if t <= worst[1] + worst[0]][-1:] or ["start"])[0]
    print(
        f"longest event-loop stall while the engine ran: {1000 * stall:.0f} ms (during {during}); "
        f"while the result layers were added: {1000 * meter.longest(returned[0]):.0f} ms"
    )
    return widget.last_run, seen_partial, stall


def test_event_loop_stays_responsive_during_a_run(make_napari_viewer, qtbot, stall_meter):
    """Longest event-loop stall while RCTD doublet runs on the sample: <= 150 ms.

    The machine is small and may be shared (CI runs alone, developers' machines do not), so a second run is
    allowed when the first is disturbed; the better of the two must meet the bar.
    """
    stalls = []
    for _attempt in range(2):
        _, widget = _viewer_with_widget(make_napari_viewer, show=True)
        widget.mode.value = "doublet"
        widget.params_box.batch_size.value = 100
        _, _, stall = _timed_run(qtbot, widget, stall_meter)
        stalls.append(stall)
        if stall <= 0.150:
            break
    assert min(stalls) <= 0.150, f"event loop stalled {[round(1000 * s) for s in stalls]} ms"


def test_run_rctd_doublet_like_a_user(make_napari_viewer, qtbot, tmp_path, stall_meter):
    viewer, widget = _viewer_with_widget(make_napari_viewer, show=True)
    widget.method.value = "rctd"
    widget.mode.value = "doublet"
    widget.params_box.batch_size.value = 100  # several batches, so results stream in
    run, seen_partial, _ = _timed_run(qtbot, widget, stall_meter)
    assert run.result.mode == "doublet"
    assert len(seen_partial) >= 2  # partial results streamed per batch

    session = session_for(viewer)
    rec = session.results[next(iter(session.results))]
    results, legend, inspector = (find_dock(viewer, n) for n in ("Results", "Legend", "Spot inspector"))
    names = [layer.name for layer in viewer.layers]
    assert {"rctd · dominant", "rctd · proportion", "rctd · spot class"} <= set(names)
    assert not any("running" in n for n in names)

    # colours are the engine's numbers
    props = np.asarray(run.result.proportions)
    types = list(run.result.cell_types)
    dom_idx = np.argmax(props, axis=1)
    expected = np.array([to_rgba(rec.palette[types[i]]) for i in dom_idx])
    np.testing.assert_allclose(rec.layers["dominant"].face_color, expected, atol=1e-6)
    results.cell_type.value = types[2]
    np.testing.assert_allclose(rec.layers["proportions"].face_color, colormap_rgba(props[:, 2]), atol=1e-6)
    classes = run.adata.obs["rctd_spot_class"].astype(str)
    assert set(classes) <= {"singlet", "doublet_certain", "doublet_uncertain", "reject"}

    # the legend lists the cell types and hides one on untick
    assert legend.labels() == types
    legend.set_visible(types[0], False)
    alpha = rec.layers["dominant"].face_color[:, 3]
    assert np.all(alpha[dom_idx == 0] == 0) and np.all(alpha[dom_idx != 0] == 1)
    legend.set_visible(types[0], True)

    # the inspector shows the clicked spot's composition
    viewer.layers.selection.active = rec.layers["dominant"]
    i = int(np.argmin(np.nanmax(props, axis=1)))  # a mixed spot
    for cb in viewer.mouse_drag_callbacks:
        cb(viewer, FakeMouse(rec.layers["dominant"].data[i]))
    assert inspector.current == (rec.name, i)
    shown = inspector.shown
    nz = {t: p for t, p in zip(types, props[i]) if p > 1e-3}
    assert shown.keys() == nz.keys() and all(abs(shown[t] - nz[t]) < 1e-12 for t in nz)
    assert run.adata.obs_names[i] in inspector.text.text()

    # save: h5ad (slot scheme), CSV, and the window as PNG
    out = save_result(rec, tmp_path / "result.h5ad")
    back = ad.read_h5ad(out)
    np.testing.assert_allclose(back.obsm["rctd_proportions"].to_numpy(), props)
    csv = pd.read_csv(export_csv(rec, tmp_path / "props.csv"), index_col=0)
    np.testing.assert_allclose(csv.to_numpy(), props, atol=1e-12)
    png = save_figure(viewer, rec, tmp_path / "window.png")
    assert png.stat().st_size > 10_000


@pytest.mark.render
def test_screenshot_after_run_shows_legend_and_coloured_spots(make_napari_viewer, qtbot, tmp_path):
    from qtpy.QtWidgets import QApplication

    viewer, widget = _viewer_with_widget(make_napari_viewer, show=True)
    widget.mode.value = "full"
    _click_run_and_wait(qtbot, widget)
    rec = next(iter(session_for(viewer).results.values()))
    legend = find_dock(viewer, "Legend")
    for _ in range(5):
        QApplication.processEvents()
    shot = viewer.screenshot(str(tmp_path / "after_run.png"), canvas_only=False, flash=False)
    # the legend dock is on screen with one row per cell type
    assert legend.isVisible() and legend.list.count() == len(rec.cell_types)
    legend_img = legend.grab().toImage()
    assert legend_img.width() > 50 and legend_img.height() > 50
    # the canvas shows the cell-type colours of the result (read unblended: the tissue image off, spots opaque)
    for layer in viewer.layers:
        if layer.metadata.get(PLUGIN_KEY, {}).get("kind") == "tissue_image":
            layer.visible = False
    assert rec.layers["dominant"].opacity < 1  # over the tissue, results let the stain show through
    rec.layers["dominant"].opacity = 1.0
    canvas = viewer.screenshot(canvas_only=True, flash=False)[..., :3].reshape(-1, 3).astype(int)
    present = 0
    for t in set(rec.dominant):
        rgb = (np.array(to_rgba(rec.palette[t])[:3]) * 255).round()
        if (np.abs(canvas - rgb).sum(axis=1) < 12).sum() > 200:
            present += 1
    assert present == len(set(rec.dominant))
    assert shot.shape[0] > 600 and shot.shape[1] > 900


def test_cancel_mid_run_leaves_no_result(make_napari_viewer, qtbot):
    viewer, widget = _viewer_with_widget(make_napari_viewer)
    widget.mode.value = "full"
    widget.params_box.batch_size.value = 20
    before = [layer.name for layer in viewer.layers]
    events = []
    widget.jobs.progressed.connect(events.append)
    widget.run_btn.native.click()
    qtbot.waitUntil(lambda: len(events) > 0, timeout=120_000)
    widget.cancel_btn.native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert widget.status.value.startswith("cancelled")
    assert [layer.name for layer in viewer.layers] == before
    assert widget.last_run is None
    assert not session_for(viewer).results


def test_js_distance_and_comparison_by_hand():
    p = np.array([[1.0, 0.0], [0.5, 0.5], [np.nan, np.nan]])
    q = np.array([[0.0, 1.0], [0.5, 0.5], [0.2, 0.8]])
    d = js_distance(p, q)
    assert d[0] == pytest.approx(1.0) and d[1] == pytest.approx(0.0) and np.isnan(d[2])
    # JS divergence of [0.75, 0.25] vs [0.25, 0.75] in bits: 1 - H(0.5) ... computed by hand
    a, b = np.array([[0.75, 0.25]]), np.array([[0.25, 0.75]])
    m = np.array([0.5, 0.5])
    kl = lambda x, y: np.sum(x * np.log2(x / y))
    assert js_distance(a, b)[0] == pytest.approx(np.sqrt(0.5 * kl(a[0], m) + 0.5 * kl(b[0], m)))
    cmp = compare_proportions(p, ["A", "B"], np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]]), ["B", "C"])
    assert cmp.cell_types == ["A", "B", "C"]
    assert cmp.both_fitted.tolist() == [True, True, False]
    # spot 0: A vs B -> differ; spot 1: tie A/B (argmax A) vs C -> differ
    assert cmp.same_dominant.tolist() == [False, False, False]


def test_compare_two_runs(make_napari_viewer, small_pair):
    from spatial_deconv_gui import api
    from spatial_deconv_gui.engines.base import DeconvResult
    from spatial_deconv_gui.io import attach_result

    viewer = make_napari_viewer()
    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    truth = spatial.obsm["true_proportions"].to_numpy()
    rng = np.random.default_rng(1)
    noisy = np.clip(truth + rng.normal(0, 0.1, truth.shape), 0, None)
    noisy /= noisy.sum(axis=1, keepdims=True)
    for name, props in (("truth", truth), ("noisy", noisy)):
        res = DeconvResult(
            key="sim",
            method="sim",
            mode=None,
            cell_types=types,
            proportions=props,
            params={},
            device="cpu",
            runtime_s=0.0,
        )
        add_result(
            viewer, api.RunOutput(attach_result(spatial, res), res, None), spatial.obsm["spatial"], 100.0, name=name
        )
    results = find_dock(viewer, "Results")
    results.run.value, results.run_b.value = "truth", "noisy"
    results.compare_btn.native.click()
    layer, cmp = session_for(viewer).comparison
    np.testing.assert_allclose(layer.features["js_distance"], js_distance(truth, noisy))
    agree = np.mean(truth.argmax(1) == noisy.argmax(1))
    assert cmp.agreement == pytest.approx(agree)
    assert f"{100 * agree:.1f}%" in results.summary.value


def test_flash_runs_from_the_widget_and_compares_with_rctd(make_napari_viewer, qtbot):
    viewer, widget = _viewer_with_widget(make_napari_viewer)
    widget.method.value = "flash"
    assert widget.mode.choices == ("default",)
    assert widget.params_box.lambda_spatial.value == "auto"
    assert widget.params_box.k_neighbors.value == 6
    widget.params_box.k_neighbors.value = 8
    assert widget.method_params()["k_neighbors"] == 8
    _click_run_and_wait(qtbot, widget)
    flash = widget.last_run
    assert flash is not None and flash.result.key == "flash", widget.status.value
    assert flash.adata.uns["flash"]["parameters"]["k_neighbors"] == 8
    slide = widget.slide.value
    (flash_rec,) = session_for(viewer).results.values()
    assert not slide.visible and flash_rec.layers["dominant"].visible
    widget.method.value = "rctd"
    widget.mode.value = "full"
    # the next run streams its colours onto the slide: the slide comes back and the results covering it go
    widget.run_btn.native.click()
    assert slide.visible and not any(layer.visible for layer in flash_rec.layers.values())
    qtbot.waitUntil(lambda: not widget.busy, timeout=600_000)
    session = session_for(viewer)
    a, b = list(session.results)
    results = find_dock(viewer, "Results")
    results.run.value, results.run_b.value = a, b
    results.compare_btn.native.click()
    _, cmp = session.comparison
    pa, pb = session.results[a].proportions, session.results[b].proportions[session.results[a].cell_types]
    expected = np.mean(pa.to_numpy().argmax(1) == pb.to_numpy().argmax(1))
    assert cmp.agreement == pytest.approx(expected) and cmp.agreement > 0.7


def test_spots_without_counts_are_named_in_the_dock(make_napari_viewer, qtbot, tmp_path):
    """Empty spots are left out of the fit with a notice the user sees, and come back as NaN rows."""
    import scipy.sparse as sp

    from spatial_deconv_gui.sample_data import sample_paths

    spatial, reference = sample_paths()
    adata = ad.read_h5ad(spatial)
    x = sp.lil_matrix(adata.X)
    x[:3] = 0
    adata.X = sp.csr_matrix(x)
    adata.write_h5ad(tmp_path / "with_empty_spots.h5ad")
    viewer = make_napari_viewer()
    layer = next(
        lay for lay in viewer.open(tmp_path / "with_empty_spots.h5ad", plugin=PLUGIN) if lay.name == "with_empty_spots"
    )
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    widget.slide.value = layer
    widget.reference.value = str(reference)
    widget.method.value = "flash"
    _click_run_and_wait(qtbot, widget)
    run = widget.last_run
    assert run is not None, widget.status.value
    assert "note:" in widget.status.value and "no counts" in widget.status.value
    props = run.adata.obsm[f"{run.result.key}_proportions"]
    assert props.iloc[:3].isna().all().all() and np.isfinite(props.iloc[3:].to_numpy()).all()


def test_stop_now_keeps_the_answer_so_far(make_napari_viewer, qtbot):
    """cell2location with a long epoch cap, stopped from the dock once training streams: the answer is kept and
    marked as the user's stop, after far fewer epochs than the cap."""
    from spatial_deconv_gui import keys

    viewer, widget = _viewer_with_widget(make_napari_viewer)
    widget.method.value = "c2l"
    widget.params_box.signatures.value = "means"
    widget.params_box.max_epochs.value = 200_000
    assert not widget.stop_btn.enabled
    stopped = []

    def stop_once_training(event):
        if event.stage == "spatial" and event.fraction > 0 and not stopped:
            stopped.append(event)
            widget.stop_btn.native.click()

    widget.jobs.progressed.connect(stop_once_training)
    widget.run_btn.native.click()
    assert widget.stop_btn.enabled
    qtbot.waitUntil(lambda: not widget.busy, timeout=600_000)
    run = widget.last_run
    assert stopped and run is not None, widget.status.value
    info = run.adata.uns[keys.run_info(run.result.key)]
    assert info[keys.STOP_REASON] == "user" and info[keys.STOPPED_EARLY_BY_USER]
    assert 0 < info[keys.EPOCHS_RUN] < 200_000
    props = run.adata.obsm[keys.proportions(run.result.key)].to_numpy()
    assert np.isfinite(props).all() and np.allclose(props.sum(axis=1), 1.0)


def test_interval_tick_box_writes_the_interval_slots(make_napari_viewer, qtbot):
    """The tick box is offered for the methods that give intervals, and a ticked run carries q05 <= p <= q95."""
    from spatial_deconv_gui import keys

    viewer, widget = _viewer_with_widget(make_napari_viewer)
    for method in ("c2l", "destvi", "rctd"):
        widget.method.value = method
        assert widget.uncertainty.enabled, method
    widget.method.value = "flash"
    assert widget.uncertainty.enabled
    widget.uncertainty.value = True
    _click_run_and_wait(qtbot, widget)
    run = widget.last_run
    assert run is not None, widget.status.value
    key = run.result.key
    p, lo, hi = (run.adata.obsm[f(key)] for f in (keys.proportions, keys.proportions_lower, keys.proportions_upper))
    assert list(lo.columns) == list(p.columns) and (lo.index == p.index).all()
    assert (lo.to_numpy() <= p.to_numpy() + 1e-12).all() and (p.to_numpy() <= hi.to_numpy() + 1e-12).all()
    assert 0 < float((hi - lo).to_numpy().mean()) < 0.5
