"""Expression within a cell type, driven like a user: a small DestVI run from the Deconvolution widget, then pick a
gene (through the search), a cell type and Paint; the painted values and colours are DestVI's imputation."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from spatial_deconv_gui import api
from spatial_deconv_gui.gui.docks import find_dock
from spatial_deconv_gui.gui.result_layers import add_result, impute_values
from spatial_deconv_gui.gui.session import session_for
from spatial_deconv_gui.gui.views import colormap_rgba

PLUGIN = "spatial-deconv-gui"
pytest.importorskip("spatial_deconv_gui.engines.destvi")


def _colormap_position(rgba: np.ndarray, cmap: str) -> np.ndarray:
    """Where on the colormap (0..1) each colour sits: the nearest of 256 entries."""
    lut = matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3]
    d = ((np.asarray(rgba)[:, None, :3] - lut[None]) ** 2).sum(-1)
    return d.argmin(1) / 255.0


@pytest.fixture
def destvi_run(make_napari_viewer, qtbot, small_pair_files):
    """napari with the small simulated slide opened from its file and a short DestVI run done in the widget."""
    sp_path, ref_path = small_pair_files
    viewer = make_napari_viewer()
    viewer.open(str(sp_path), plugin=PLUGIN)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    widget.slide.reset_choices()
    widget.slide.value = viewer.layers[0]
    widget.reference.value = str(ref_path)
    assert widget.cell_type_col.value == "cell_type"
    widget.method.value = "destvi"
    widget.params_box.sc_epochs.value = 2
    widget.params_box.max_epochs.value = 2
    widget.params_box.seed.value = 3
    widget.run_btn.native.click()
    assert widget.busy, widget.problems.value
    qtbot.waitUntil(lambda: not widget.busy, timeout=240_000)
    assert widget.last_run is not None and widget.last_run.result.key == "destvi", widget.status.value
    assert widget.last_run.result.params["seed"] == 3  # the widget's seed reaches the engine
    return viewer, widget.last_run


def test_paint_expression_within_a_cell_type(destvi_run, qtbot, monkeypatch):
    from spatial_deconv_gui.engines.destvi.engine import impute_expression

    viewer, run = destvi_run
    results = find_dock(viewer, "Results")
    rec = session_for(viewer).results[results.run.value]
    imp = results.impute
    # the control appears for the DestVI result
    assert imp.available and imp.native.isVisibleTo(results.native)
    types = list(run.result.cell_types)
    genes = [str(g) for g in run.adata.uns["destvi_model"]["genes"]]
    assert list(imp.cell_type.choices) == types and len(imp.gene.choices) == len(genes)

    # search narrows the gene list; pick a gene and a type; Paint
    gene = genes[7]
    imp.search.value = gene[-3:].lower()
    assert gene in imp.gene.choices and all(gene[-3:].lower() in g.lower() for g in imp.gene.choices)
    assert len(imp.gene.choices) < len(genes)
    imp.gene.value = gene
    imp.cell_type.value = types[1]
    imp.paint_btn.native.click()
    assert imp.busy  # the imputation runs in a worker
    qtbot.waitUntil(lambda: not imp.busy, timeout=60_000)

    layer = rec.layers["expression"]
    assert layer in viewer.layers and layer.name == f"destvi · {gene} in {types[1]}"
    assert layer.visible and not rec.layers["dominant"].visible  # shown alone over its slide
    expected = impute_expression(run.result, types[1], genes=[gene]).loc[list(run.adata.obs_names), gene]
    expected = expected.to_numpy()
    np.testing.assert_allclose(layer.features["expression"].to_numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(layer.metadata["values"], expected, rtol=0, atol=1e-6)
    assert expected.std() > 0  # the map is not flat: the colour test below means something
    # the colours follow the values: 0 at the bottom of the colormap, the largest value at its top
    vmax = expected.max()
    assert layer.metadata["vmin"] == 0.0 and layer.metadata["vmax"] == pytest.approx(vmax, abs=1e-12)
    np.testing.assert_allclose(layer.face_color, colormap_rgba(expected, "viridis", 0.0, vmax), atol=1e-6)
    pos = _colormap_position(layer.face_color, "viridis")
    assert np.abs(pos - expected / vmax).max() <= 1.0 / 255 + 1e-9
    # with a colorbar named after the gene and type, spanning the values
    [cbar_ax] = imp.colorbar_fig.axes
    assert gene in cbar_ax.get_title() and types[1] in cbar_ax.get_title()
    assert cbar_ax.get_xlim() == pytest.approx((0.0, vmax))
    assert imp.status.value.startswith(f"shown: {gene} in {types[1]}")

    # another colormap recolours the same values; another gene and type reuse the layer
    imp.cmap.value = "magma"
    np.testing.assert_allclose(layer.face_color, colormap_rgba(expected, "magma", 0.0, vmax), atol=1e-6)
    imp.search.value = ""
    imp.gene.value, imp.cell_type.value = genes[0], types[0]
    imp.paint_btn.native.click()
    qtbot.waitUntil(lambda: not imp.busy, timeout=60_000)
    second = impute_expression(run.adata, types[0], genes=[genes[0]]).to_numpy()[:, 0]
    assert rec.layers["expression"] is layer and layer.name.endswith(f"{genes[0]} in {types[0]}")
    np.testing.assert_allclose(layer.features["expression"].to_numpy(), second, rtol=0, atol=1e-6)

    # a search matching no gene says so instead of painting
    imp.search.value = "no-such-gene"
    assert imp.gene.value is None
    imp.paint_btn.native.click()
    assert not imp.busy and "no gene matches" in imp.status.value

    # a failure inside the worker becomes a notification
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    monkeypatch.setattr(
        "spatial_deconv_gui.engines.destvi.engine.impute_expression",
        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("imputation exploded")),
    )
    imp.search.value = ""
    imp.gene.value = genes[2]
    imp.paint_btn.native.click()
    qtbot.waitUntil(lambda: not imp.busy, timeout=60_000)
    assert shown == ["Expression within a cell type: RuntimeError: imputation exploded"]
    assert imp.status.value.startswith("failed")


def test_control_hidden_for_other_methods_and_chunks_add_up(make_napari_viewer, small_pair):
    """Not shown for a result without a DestVI model; the chunked imputation equals one call over all spots."""
    from spatial_deconv_gui.engines.base import DeconvResult
    from spatial_deconv_gui.io import attach_result

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
    rec = add_result(
        viewer, api.RunOutput(attach_result(spatial, res), res, None), spatial.obsm["spatial"], 100.0, name="truth"
    )
    results = find_dock(viewer, "Results")
    assert not results.impute.available and not results.impute.native.isVisibleTo(results.native)
    with pytest.raises(ValueError, match="needs a DestVI result"):
        impute_values(rec, "Gene0001", types[0])

    # a fake DestVI state (random decoder) to check the chunking against impute_expression directly
    from spatial_deconv_gui.engines.destvi.engine import impute_expression

    rng = np.random.default_rng(0)
    S, K, T, D, H, G = 37, 3, 2, 4, 6, 9
    st = {
        "decoder_linears_0_weight": rng.normal(size=(H, D + 1 + T)),
        "decoder_linears_0_bias": rng.normal(size=H),
        "px_decoder_weight": rng.normal(size=(G, H)),
        "px_decoder_bias": rng.normal(size=G),
        "per_ct_bias": rng.normal(size=(T, G)),
        "beta": rng.normal(size=G),
        "batch_embedding": rng.normal(size=1),
        "gamma_modes": rng.normal(size=(S, K, T, D)).astype(np.float32),
        "mode_weights": rng.dirichlet(np.ones(K), size=(S, T)).transpose(0, 2, 1).astype(np.float32),
        "genes": np.array([f"g{i}" for i in range(G)]),
        "cell_types": np.array(["A", "B"]),
        "barcodes": np.array([f"s{i}" for i in range(S)]),
        "n_layers": 1,
    }
    steps = api.destvi_imputation_steps(st, "B", "g4", chunk=10)
    fractions = []
    while True:
        try:
            fractions.append(next(steps))
        except StopIteration as stop:
            values = stop.value
            break
    assert fractions == pytest.approx([10 / 37, 20 / 37, 30 / 37, 1.0])
    np.testing.assert_allclose(values, impute_expression(st, "B", genes=["g4"]).to_numpy()[:, 0], rtol=1e-12)

    # values reach the slide's spots by barcode (a slide in another order, with a spot the model lacks)
    obs = ["extra"] + [f"s{i}" for i in range(S - 1, -1, -1)]
    aligned = api.in_slide_order(st, obs, values)
    assert np.isnan(aligned[0]) and np.array_equal(aligned[1:], values[::-1])
