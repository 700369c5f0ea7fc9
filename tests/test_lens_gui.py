"""The Interaction lens dock driven like a user on the sample tissue with a known GRN: click a cell, pick a gene,
read the modulators and the senders drawn; hover; map who responds to a ligand knockout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("spatial_deconv_gui.perturb_api")

from spatial_deconv_gui import perturb_api  # noqa: E402
from spatial_deconv_gui.gui.lens_layers import DIM_RGBA, SEGMENTS, VEIL  # noqa: E402
from spatial_deconv_gui.gui.session import session_for  # noqa: E402
from spatial_deconv_gui.gui.views import colormap_rgba  # noqa: E402

PLUGIN = "spatial-deconv-gui"


class FakeMouse:
    def __init__(self, position, type="mouse_press"):
        self.position = position
        self.type = type


@pytest.fixture(scope="module")
def grn_model(tmp_path_factory):
    """The sample tissue's model, trained once through the API with the simulation's radii and scale."""
    import anndata as ad

    from spatial_deconv_gui.sample_data import grn_sample_paths

    paths = grn_sample_paths()
    sim = ad.read_h5ad(paths["spatial"]).uns["perturb_sim"]
    return perturb_api.train_model(
        paths["spatial"],
        paths["grn"],
        paths["lr"],
        "cluster",
        tmp_path_factory.mktemp("lens") / "model",
        radius=float(sim["radius"]),
        contact_radius=float(sim["contact_radius"]),
        scale_factor=float(sim["scale_factor"]),
    )


def _viewer_with_model(make_napari_viewer, grn_model):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "grn_tissue")
    session = session_for(viewer)
    session.set_model(grn_model, viewer.layers[0])
    _, dock = viewer.window.add_plugin_dock_widget(PLUGIN, "Interaction lens")
    return viewer, session, dock


def _lr_case(model):
    table = model.modulator_table()
    row = table[(table.kind == "lr") & (table.coef.abs() > 0.05)].iloc[0]
    cells = np.flatnonzero(model.clusters == row.cluster)
    rec = model.expr[cells, model.genes.index(row.modulator.split("$")[1])]
    return row.target, int(cells[np.argmax(rec)])  # a cell that clearly expresses the receptor


def test_clicking_a_cell_shows_its_modulators_and_senders(make_napari_viewer, grn_model):
    viewer, session, dock = _viewer_with_model(make_napari_viewer, grn_model)
    model = grn_model
    assert dock.status.value.startswith("model (seed mode, β of the cell's cluster): ")  # which β the table lists
    gene, cell = _lr_case(model)
    dock.gene.value = gene
    yx = session.cells_yx()
    for cb in viewer.mouse_drag_callbacks:  # a click on the cell
        cb(viewer, FakeMouse(yx[cell]))
    assert session.cell == cell and dock.lens is not None and dock.lens.cell == cell
    want = perturb_api.interaction_lens(model, cell, gene, top=int(dock.top.value))
    pd.testing.assert_frame_equal(dock.lens.modulators, want.modulators)
    pd.testing.assert_frame_equal(dock.lens.senders, want.senders)
    rows = dock.table_rows()
    assert [r[0] for r in rows] == want.modulators.modulator.tolist()
    assert [float(r[1]) for r in rows] == pytest.approx(want.modulators.beta.tolist(), rel=1e-3)
    sent = want.modulators[want.modulators.n_senders > 0]
    assert [r[3] for r in rows if r[3]] == [str(n) for n in sent.n_senders]
    assert model.obs_names[cell] in dock.status.value

    # one segment per (term, sender), from the sender to the clicked cell, coloured by support
    senders = want.senders
    assert len(senders) > 0
    segments = viewer.layers[SEGMENTS]
    start = yx[senders.sender.to_numpy()]
    np.testing.assert_allclose(segments.data[:, 0], start)
    np.testing.assert_allclose(segments.data[:, 0] + segments.data[:, 1], np.tile(yx[cell], (len(senders), 1)))
    support = senders.support.to_numpy()
    # colours on one scale for every cell: 0 to sqrt(max L * max R) over the slide for the terms listed
    terms = want.modulators[want.modulators.kind == "lr"]
    top = max(
        np.sqrt(model.expr[:, model.genes.index(a)].max() * model.expr[:, model.genes.index(b)].max())
        for a, b in zip(terms.ligand, terms.partner)
    )
    assert support.max() <= top and segments.metadata["vmax"] == pytest.approx(top)
    np.testing.assert_allclose(segments.edge_color, colormap_rgba(support, "plasma", 0, top), atol=1e-6)
    # every other cell dimmed, the cell and its senders clear
    veil = viewer.layers[VEIL]
    clear = np.zeros(len(yx), dtype=bool)
    clear[senders.sender.to_numpy()] = True
    clear[cell] = True
    np.testing.assert_allclose(veil.face_color[~clear], np.tile(DIM_RGBA, ((~clear).sum(), 1)), atol=1e-6)
    assert np.all(veil.face_color[clear, 3] == 0)

    # another gene redraws the same cell's lens; a click off the tissue keeps it
    other = next(t for t in model.targets if t != gene)
    dock.gene.value = other
    assert dock.lens.target == other and dock.lens.cell == cell
    for cb in viewer.mouse_drag_callbacks:
        cb(viewer, FakeMouse(yx.min(axis=0) - 500))
    assert session.cell == cell

    # following the mouse: the lens of the hovered cell, back to the clicked one off the tissue
    dock.follow_hover.value = True
    hovered = (cell + 7) % len(yx)
    for cb in viewer.mouse_move_callbacks:
        cb(viewer, FakeMouse(yx[hovered], "mouse_move"))
    assert dock.lens.cell == hovered and viewer.layers[VEIL].metadata["cell"] == hovered
    for cb in viewer.mouse_move_callbacks:
        cb(viewer, FakeMouse(yx.min(axis=0) - 500, "mouse_move"))
    assert dock.lens.cell == cell
    for cb in viewer.mouse_move_callbacks:
        cb(viewer, FakeMouse(yx[hovered], "mouse_move"))
    assert dock.lens.cell == hovered
    dock.follow_hover.value = False  # unticked: the clicked cell again, at once
    assert dock.lens.cell == cell


def test_who_responds_maps_the_first_step_of_a_ligand_knockout(make_napari_viewer, qtbot, grn_model):
    viewer, _session, dock = _viewer_with_model(make_napari_viewer, grn_model)
    model = grn_model
    usage = perturb_api.gene_usage(model, list(model.ligands))
    ligand = usage.sort_values("n_targets", ascending=False).gene.iloc[0]
    dock.ligand.value = ligand
    dock.respond_btn.native.click()
    qtbot.waitUntil(lambda: not dock.busy, timeout=120_000)
    assert dock.response is not None, dock.status.value
    step = next(iter(perturb_api.perturbation_steps(model, ligand, 0.0, steps=1)))
    top = dock.response.targets.target.iloc[0]
    assert dock.responder.value == top
    np.testing.assert_allclose(dock.responder_values(), step.delta[:, model.genes.index(top)], atol=1e-10)
    dock.responder.value = "all responders (Σ|Δ|)"
    cols = [model.genes.index(g) for g in dock.response.targets.target]
    np.testing.assert_allclose(dock.responder_values(), np.abs(step.delta[:, cols]).sum(axis=1), atol=1e-10)
    assert f"KO {ligand}" in dock.status.value
