"""In-silico knockouts driven like a user on the simulated tissue with a known GRN."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("spatial_deconv_gui.perturb_api")

from spatial_deconv_gui import perturb_api  # noqa: E402
from spatial_deconv_gui.gui.docks import find_dock  # noqa: E402
from spatial_deconv_gui.gui.perturb_layers import diverging_rgba, grid_vectors_yx  # noqa: E402
from spatial_deconv_gui.gui.session import session_for  # noqa: E402

PLUGIN = "spatial-deconv-gui"


@pytest.fixture(autouse=True)
def private_settings(tmp_path, monkeypatch):
    monkeypatch.setattr("spatial_deconv_gui.gui.docks.train._settings_path", lambda: tmp_path / "settings.json")


def _train(make_napari_viewer, qtbot, model_dir, show=False, **options):
    viewer = make_napari_viewer(show=show)
    viewer.open_sample(PLUGIN, "grn_tissue")
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train perturbation model")
    qtbot.waitUntil(lambda: train.ready, timeout=30_000)  # the slide's columns are read off the GUI thread
    assert train.cluster_col.value == "cluster"
    assert train.expression.value == "lognorm"
    assert str(train.grn.value).endswith("sim_grn_prior.csv") and train.radius.value == 80.0
    train.model_dir.value = str(model_dir)
    train.train_options.update(options)
    return viewer, train


def _click_and_wait(qtbot, widget, button, meter) -> tuple[float, float]:
    """Click a widget's button, wait until it is idle; returns when the click returned and when its worker
    handed back its result (the stall meter runs throughout)."""
    import time

    meter.start()
    button.native.click()
    clicked = time.perf_counter()
    returned = []
    widget.jobs.worker.returned.connect(lambda _r: returned.append(time.perf_counter()))
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert returned, widget.status.value
    return clicked, returned[0]


def test_event_loop_stays_responsive_while_training(make_napari_viewer, qtbot, tmp_path, stall_meter):
    """Longest event-loop stall from the click on Train until the model is ready: <= 150 ms.

    Training runs in a child process, so the canvas only pays for the progress messages. As in the
    workbench's test, a second attempt is allowed when the first is disturbed by other jobs on the machine.
    """

    stalls = []
    for attempt in range(2):
        viewer, train = _train(make_napari_viewer, qtbot, tmp_path / f"model{attempt}", show=True)
        clicked, done = _click_and_wait(qtbot, train, train.train_btn, stall_meter)
        assert session_for(viewer).model is not None, train.status.value
        stalls.append(stall_meter.longest(clicked, done))
        if stalls[-1] <= 0.150:
            break
    print(f"longest event-loop stall while training: {[round(1000 * s) for s in stalls]} ms")
    assert min(stalls) <= 0.150, f"event loop stalled {[round(1000 * s) for s in stalls]} ms"


def test_train_lasso_knockout_like_a_user(make_napari_viewer, qtbot, tmp_path, stall_meter):

    viewer, train = _train(make_napari_viewer, qtbot, tmp_path / "model", show=True)
    train.train_btn.native.click()
    qtbot.waitUntil(lambda: not train.busy, timeout=300_000)
    model = session_for(viewer).model
    assert model is not None, train.status.value

    _, ko = viewer.window.add_plugin_dock_widget(PLUGIN, "Knockout")
    truth = pd.read_csv(viewer.layers[0].metadata["spatial_deconv_gui"]["truth_path"])
    tf = "Tf0"  # the simulation's upstream TF
    # the user draws a lasso over the left half of the tissue
    xy = np.asarray(model.coords)[:, :2]
    x0, x1, y0, y1 = xy[:, 0].min(), np.median(xy[:, 0]), xy[:, 1].min(), xy[:, 1].max()
    lasso = np.array([[y0 - 1, x0 - 1], [y0 - 1, x1], [y1 + 1, x1], [y1 + 1, x0 - 1]])
    viewer.add_shapes([lasso], shape_type="polygon", name="lasso")
    ko.search.value = "Tf0"
    assert [c for c in ko.genes.choices] == [tf]
    ko.genes.value = [tf]
    ko.scope.value = "inside shapes"
    ko.shapes.value = viewer.layers["lasso"]
    cells = ko.selected_cells()
    assert 0.4 < len(cells) / len(xy) < 0.6 and np.all(xy[cells, 0] <= x1)
    clicked, returned = _click_and_wait(qtbot, ko, ko.run_btn, stall_meter)
    running = stall_meter.longest(clicked, returned)
    print(
        f"longest event-loop stall while the knockout ran: {1000 * running:.0f} ms;"
        f" while its layers were added: {1000 * stall_meter.longest(returned):.0f} ms"
    )
    assert running <= 0.150
    run = ko.current
    assert run is not None, ko.status.value
    # what the gene can move, from the model, in the status line (the same line `perturb run` prints)
    assert perturb_api.usage_notices(model, [tf])[0] in ko.status.value.splitlines()
    assert perturb_api.usage_header(model) in ko.status.value.splitlines()  # the mode: what the |beta| are
    assert "is used by" in ko.status.value

    # the engine's own answer for the same cells
    ref = perturb_api.run_perturbation(model, [tf], 0.0, cells=cells, steps=4)
    np.testing.assert_allclose(
        run.adata.layers["perturb_delta"].toarray(), ref.layers["perturb_delta"].toarray(), atol=1e-12
    )
    gene = ko.show_gene.value
    np.testing.assert_allclose(run.layers["delta"].face_color, diverging_rgba(run.delta(gene))[0], atol=1e-6)

    # known targets of the knocked-out TF go down (positive coefficients) in the lasso
    direct = truth[(truth.modulator == tf) & (truth.kind == "tf")].groupby("target").coef.mean()
    delta = run.adata.layers["perturb_delta"].toarray()
    names = list(run.adata.var_names)
    moved = {t: delta[cells, names.index(t)].mean() for t in direct.index}
    right = [np.sign(moved[t]) == -np.sign(c) for t, c in direct.items() if abs(moved[t]) > 1e-9]
    assert len(right) >= 5 and np.mean(right) == 1.0, moved

    # the vector field layer carries the engine's vectors
    vec_layer = run.layers["vectors"]
    uns = run.adata.uns["perturb"]
    expected = grid_vectors_yx(uns["grid_points"], uns["grid_vectors"], vec_layer.metadata["scale"])
    np.testing.assert_allclose(vec_layer.data, expected)
    assert len(vec_layer.data) > 10
    ko.per_cell.value = True
    per_cell = grid_vectors_yx(
        np.asarray(model.coords)[:, :2], run.adata.obsm["perturb_vectors"], vec_layer.metadata["scale"]
    )
    np.testing.assert_allclose(vec_layer.data, per_cell)
    assert len(per_cell) > 100
    # the summary lists the moved genes, the knocked-out TF first
    summary = find_dock(viewer, "Knockout summary")
    qtbot.waitUntil(lambda: summary.top is not None, timeout=5_000)  # the summary draws in the next turn
    assert summary.top.index[0] == tf and summary.top[tf] < 0

    out, png = ko.save(tmp_path / "ko_tf0")
    import anndata as ad

    assert ad.read_h5ad(out).layers["perturb_delta"].shape == delta.shape
    assert png.stat().st_size > 10_000


def _larger_tissue(folder):
    """A tissue of 354 targets: training takes seconds rather than the sample's fraction of a second, so a Cancel
    sent on the first progress message reaches the child process with most targets still to fit."""
    from spatial_deconv_gui import keys
    from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue, write_simulated_priors
    from spatial_deconv_gui.io.write import write_h5ad_atomic

    adata = simulate_grn_tissue(n_genes=400, n_tfs=40)
    priors = write_simulated_priors(adata, folder)
    sim = adata.uns[keys.PERTURB_SIM]
    adata.uns[keys.PERTURB_SIM] = {k: v for k, v in sim.items() if not isinstance(v, pd.DataFrame)}
    write_h5ad_atomic(adata, folder / "tissue.h5ad")
    return folder / "tissue.h5ad", priors["grn_prior"], priors["lr_prior"]


def test_cancel_mid_training_leaves_a_resumable_model(make_napari_viewer, qtbot, tmp_path):
    from spatial_deconv_gui.engines.perturb.model_dir import finished_genes

    folder = tmp_path / "model"
    tissue, grn, lr = _larger_tissue(tmp_path)
    viewer = make_napari_viewer()
    layer = viewer.open(tissue, plugin=PLUGIN)[0]
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train perturbation model")
    train.slide.value = layer
    qtbot.waitUntil(lambda: train.ready, timeout=30_000)
    assert train.cluster_col.value == "cluster" and train.expression.value == "lognorm"
    train.grn.value, train.lr.value, train.radius.value = grn, lr, 80.0
    train.model_dir.value = str(folder)
    train.train_options.update(problems_per_batch=1)  # a cancel point after every target
    cancel_once = []

    def cancel_early(event):
        if event.stage == "training" and event.fraction > 0 and not cancel_once:
            cancel_once.append(event)
            train.cancel()

    train.jobs.progressed.connect(cancel_early)
    train.train_btn.native.click()
    qtbot.waitUntil(lambda: not train.busy, timeout=300_000)
    assert train.status.value.startswith("cancelled")
    assert session_for(viewer).model is None
    import json

    targets = json.loads((folder / "manifest.json").read_text())["targets"]
    done = finished_genes(folder, targets)
    assert 0 < len(done) < len(targets)
    from spatial_deconv_gui.engines.perturb.model_dir import coef_path

    before = {g: coef_path(folder, g).stat().st_mtime_ns for g in done}
    train.train_btn.native.click()
    qtbot.waitUntil(lambda: not train.busy, timeout=300_000)
    assert session_for(viewer).model is not None, train.status.value
    assert finished_genes(folder, targets) == set(targets)
    assert all(coef_path(folder, g).stat().st_mtime_ns == t for g, t in before.items())  # not refitted


def test_two_knockouts_side_by_side_and_their_difference(make_napari_viewer, qtbot, tmp_path):
    viewer, train = _train(make_napari_viewer, qtbot, tmp_path / "model")
    train.train_btn.native.click()
    qtbot.waitUntil(lambda: not train.busy, timeout=300_000)
    _, ko = viewer.window.add_plugin_dock_widget(PLUGIN, "Knockout")
    runs = []
    for gene in ("Tf0", "Tf1"):
        ko.genes.value = [gene]
        ko.run_btn.native.click()
        qtbot.waitUntil(lambda: not ko.busy, timeout=300_000)
        runs.append(ko.current)
    a, b = runs
    assert a.name == "KO Tf0 #1" and b.name == "KO Tf1 #1"
    assert f"{a.name}: Δ" in viewer.layers and f"{b.name}: Δ" in viewer.layers  # both kept, named apart
    ko.show_gene.value = "Gene0"
    ko.compare_with.value = a.name  # current is b: the map is Δb - Δa
    layer = viewer.layers[f"{b.name} − {a.name}: Δ Gene0"]
    np.testing.assert_allclose(layer.metadata["values"], b.delta("Gene0") - a.delta("Gene0"))
    np.testing.assert_allclose(layer.face_color, diverging_rgba(b.delta("Gene0") - a.delta("Gene0"))[0], atol=1e-6)
    # picking the first run again shows its group of layers, hides the other's, and redraws from its numbers
    assert ko.showing.value == b.name and list(ko.showing.choices) == [a.name, b.name]
    ko.showing.value = a.name
    assert ko.current is a
    summary = find_dock(viewer, "Knockout summary")
    qtbot.waitUntil(lambda: summary.top.index[0] == "Tf0", timeout=5_000)  # the summary redraws next turn
    assert all(layer.visible for layer in a.layers.values())
    assert not any(layer.visible for layer in b.layers.values())
    np.testing.assert_allclose(a.layers["delta"].face_color, diverging_rgba(a.delta("Gene0"))[0], atol=1e-6)


@pytest.mark.render
def test_screenshot_after_knockout_shows_delta_map_and_vector_field(make_napari_viewer, qtbot, tmp_path):
    from qtpy.QtWidgets import QApplication

    viewer, train = _train(make_napari_viewer, qtbot, tmp_path / "model", show=True)
    train.train_btn.native.click()
    qtbot.waitUntil(lambda: not train.busy, timeout=300_000)
    _, ko = viewer.window.add_plugin_dock_widget(PLUGIN, "Knockout")

    def canvas():
        for _ in range(5):
            QApplication.processEvents()
        return viewer.screenshot(canvas_only=True, flash=False)[..., :3].reshape(-1, 3).astype(int)

    def greenish(img):  # the vector field's #39ff14, blended over the dark canvas at the layer's opacity
        r, g, b = img.T
        return int(((g > 100) & (g > r + 50) & (g > b + 50)).sum())

    ko.genes.value = ["Tf0"]
    ko.run_btn.native.click()
    qtbot.waitUntil(lambda: not ko.busy, timeout=300_000)
    run = ko.current
    assert run is not None, ko.status.value
    after = canvas()
    run.layers["vectors"].visible = False
    no_vectors = canvas()
    run.layers["vectors"].visible = True

    def pixels_near(img, rgb, tol=12):
        return int((np.abs(img - np.asarray(rgb)).sum(axis=1) < tol).sum())

    # the vector field is drawn: hiding its layer takes hundreds of green pixels off the canvas
    assert greenish(after) - greenish(no_vectors) > 300, (greenish(after), greenish(no_vectors))
    # the Δ map is drawn: the colours of the most-moved cells (saturated ends of the diverging map) are on screen
    delta = run.delta(ko.show_gene.value)
    strongest = np.argsort(-np.abs(delta))[:20]
    rgb = (run.layers["delta"].face_color[strongest, :3] * 255).round()
    shown = [pixels_near(no_vectors, c) >= 10 for c in rgb]
    assert np.mean(shown) >= 0.5, shown
    # the Δ layer covers the slide: hiding it brings back a visibly different picture
    run.layers["delta"].visible = run.layers["vectors"].visible = False
    slide_only = canvas()
    assert np.abs(slide_only - no_vectors).sum(axis=1).astype(bool).mean() > 0.05


def test_layers_coming_and_going_keep_the_train_form(make_napari_viewer, qtbot, tmp_path):
    """Another plugin layer (here a second slide) must not reset what the user picked for the slide in the form."""
    viewer, train = _train(make_napari_viewer, qtbot, tmp_path / "model")
    slide = train.slide.value
    train.radius.value = 55.0
    train.expression.value = "X"
    viewer.open_sample(PLUGIN, "simulated_slide")
    assert train.slide.value is slide
    assert train.radius.value == 55.0 and train.expression.value == "X"
    assert train.cluster_col.value == "cluster"


def test_a_streaming_layer_deleted_mid_run_still_leaves_the_run_its_map(make_napari_viewer, qtbot, tmp_path):
    viewer, train = _train(make_napari_viewer, qtbot, tmp_path / "model")
    train.train_btn.native.click()
    qtbot.waitUntil(lambda: not train.busy, timeout=300_000)
    _, ko = viewer.window.add_plugin_dock_widget(PLUGIN, "Knockout")
    model = session_for(viewer).model
    result = perturb_api.run_perturbation(model, ["Tf0"], 0.0, steps=2)
    ko.start_stream()
    viewer.layers.remove(ko._stream_layer)  # the user deletes "knockout (running)"
    for _ in ko.add_run_steps(result, ["Tf0"], 0.0):
        pass
    delta = ko.current.layers["delta"]
    assert delta in viewer.layers and delta.name == "KO Tf0 #1: Δ"
    gene = ko.show_gene.value
    np.testing.assert_allclose(delta.face_color, diverging_rgba(ko.current.delta(gene))[0], atol=1e-6)


def test_train_dock_trains_a_hybrid_model_and_the_lens_reads_its_cells(make_napari_viewer, qtbot, tmp_path):
    """The dock's *coefficients* choice reaches training: a hybrid model comes back into the session, the status
    line says how many targets kept per-cell coefficients, and the lens shows a per-cell target's own β."""
    # the sample's coefficients do not vary within a cluster: at gain 0 hybrid keeps the network where it is any
    # better on held-out cells (about half the targets) and the seed elsewhere
    viewer, train = _train(
        make_napari_viewer, qtbot, tmp_path / "hybrid", l1_reg=0.01, group_reg=0.01, hybrid_min_gain=0.0
    )
    assert not train.epochs.enabled
    train.mode.value = "hybrid"
    assert train.epochs.enabled
    train.epochs.value = 100
    params = train._training_inputs()[-1]
    assert params["mode"] == "hybrid" and params["epochs"] == 100
    train.train_btn.native.click()
    qtbot.waitUntil(lambda: not train.busy, timeout=300_000)
    model = session_for(viewer).model
    assert model is not None, train.status.value
    pc = model.manifest["percell"]
    assert model.manifest["mode"] == "hybrid" and pc["n_cnn"] > 0 and pc["n_seed"] > 0
    assert f"per-cell coefficients for {pc['n_cnn']} targets" in train.status.value
    target = model.percell.targets[0]
    k = model.cluster_names.index(model.clusters[0])
    same = np.flatnonzero(model.clusters == model.cluster_names[k])[:2]
    betas = [perturb_api.interaction_lens(model, int(c), target).modulators.beta.to_numpy() for c in same]
    assert betas[0].size and not np.array_equal(np.sort(betas[0]), np.sort(betas[1]))  # same cluster, own β
    # the lens dock and the knockout's usage lines say so: own β per cell; |β| as each cluster's mean over its cells
    _, lens = viewer.window.add_plugin_dock_widget(PLUGIN, "Interaction lens")
    assert lens.status.value.startswith("model (hybrid mode, each cell's own β): ")
    header = perturb_api.usage_header(model)
    assert f"hybrid mode, per-cell coefficients for {pc['n_cnn']} of its {len(model.targets)} targets" in header
