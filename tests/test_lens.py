"""The interaction lens (issue 16, item 3): a cell's modulators of a gene, the neighbours sending its ligands, and
who responds to a ligand knockout - checked against the model's coefficient tables, hand computations and the
propagation engine, on the simulated GRN tissue."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spatial_deconv_gui import perturb_api as api
from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue, write_simulated_priors
from spatial_deconv_gui.io.errors import InputError


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    a = simulate_grn_tissue(n_cells=600, seed=2)
    a.write_h5ad(d / "sim.h5ad")
    return a, d / "sim.h5ad", write_simulated_priors(a, d)


def _train(sim, folder, **options):
    a, path, pr = sim
    s = a.uns["perturb_sim"]
    return api.train_model(
        path,
        pr["grn_prior"],
        pr["lr_prior"],
        "cluster",
        folder,
        radius=s["radius"],
        contact_radius=s["contact_radius"],
        scale_factor=s["scale_factor"],
        **options,
    )


@pytest.fixture(scope="module")
def model(sim, tmp_path_factory):
    return _train(sim, tmp_path_factory.mktemp("m") / "model")


def _hand_received(model, cell, ligand, radius):
    x = model.expr[:, model.genes.index(ligand)]
    d2 = ((model.coords - model.coords[cell]) ** 2).sum(axis=1)
    return model.scale_factor / len(x) * float(np.exp(-d2 / (2 * radius**2)) @ np.where(x > 1e-9, x, 0.0))


def _lr_cells(model):
    """(target, cluster, a cell of that cluster) for every target with a ligand-receptor coefficient."""
    table = model.modulator_table()
    lr = table[table.kind == "lr"].drop_duplicates(["target", "cluster"])
    return [(t, c, int(np.flatnonzero(model.clusters == c)[3])) for t, c in zip(lr.target, lr.cluster)]


def test_listed_betas_are_the_coefficients_of_the_cells_cluster(model):
    table = model.modulator_table()
    cases = _lr_cells(model)
    assert len(cases) >= 5
    index = api.lens_index(model)
    for target, cluster, cell in cases:
        lens = api.interaction_lens(model, cell, target, index=index)
        assert lens.cluster == cluster
        # the coefficient tables the model was trained into, read independently of the propagation matrices
        want = table[(table.target == target) & (table.cluster == cluster)].set_index("modulator").coef
        got = lens.modulators.set_index("modulator").beta
        assert sorted(got.index) == sorted(want.index)
        np.testing.assert_allclose(got[want.index].to_numpy(), want.to_numpy(), rtol=0, atol=1e-12)
        assert np.all(np.diff(np.abs(lens.modulators.beta.to_numpy())) <= 0)  # largest |β| first
        for r in lens.modulators.itertuples():
            if r.kind == "tf":
                feature = model.expr[cell, model.genes.index(r.modulator)]
            else:  # LR: received ligand x the cell's receptor
                received = _hand_received(model, cell, r.ligand, r.radius)
                assert r.received == pytest.approx(received, rel=1e-10)
                feature = received * model.expr[cell, model.genes.index(r.partner)]
            assert r.feature == pytest.approx(feature, rel=1e-10)
            assert r.term == pytest.approx(r.beta * feature, rel=1e-10)
        top2 = api.interaction_lens(model, cell, target, top=2, index=index)
        assert top2.modulators.modulator.tolist() == lens.modulators.modulator.tolist()[:2]


def test_senders_are_the_cells_within_the_pair_radius_expressing_the_ligand(model):
    xy = model.coords
    checked = set()
    for target, _cluster, cell in _lr_cells(model):
        lens = api.interaction_lens(model, cell, target)
        for r in lens.modulators[lens.modulators.kind == "lr"].itertuples():
            lig = model.expr[:, model.genes.index(r.ligand)]
            rec = model.expr[cell, model.genes.index(r.partner)]
            d = np.sqrt(((xy - xy[cell]) ** 2).sum(axis=1))
            expected = np.flatnonzero((d <= r.radius) & (lig > 1e-9) & (np.arange(len(d)) != cell))
            got = lens.senders[lens.senders.modulator == r.modulator]
            if rec <= 1e-9:  # the cell lacks the receptor: nothing supported, nothing drawn
                assert not r.supported and len(got) == 0
                continue
            assert r.supported and r.n_senders == len(expected) > 0
            assert sorted(got.sender) == sorted(expected.tolist())
            j = got.sender.to_numpy()
            np.testing.assert_allclose(got.distance, d[j], rtol=1e-12)
            np.testing.assert_allclose(got.support, np.sqrt(lig[j] * rec), rtol=1e-12)
            share = model.scale_factor / len(d) * np.exp(-(d[j] ** 2) / (2 * r.radius**2)) * lig[j]
            np.testing.assert_allclose(got.share, share, rtol=1e-12)
            np.testing.assert_allclose(got.term_share, r.beta * share * rec, rtol=1e-12)
            assert r.within_radius == pytest.approx(share.sum() / r.received, rel=1e-10)
            assert r.own_share == pytest.approx(model.scale_factor / len(d) * lig[cell], rel=1e-12)
            checked.add(r.radius)
    assert checked == {80.0, 30.0}  # secreted and contact pairs both seen


def _first_step_term_by_term(model, ligand, value=0.0, cells=None):
    """The first step of a perturbation of ``ligand`` written out term by term from the model's coefficients (the
    computation ``who_responds`` had before it called propagation): Δ_t = Σ β f(x_R) dW over the ligand's LR
    terms, β f(x_TF) dW over its TF-ligand terms, β D where it is a TF (D -> its received change under the
    'ligand' rule), β 1[x_R > 0] W0 D where it is a receptor or a TF-ligand pair's TF; then the gene pinned and
    X0 + Δ clipped to [0, observed max]. Returns (Δ, {target column: terms that reach it})."""
    from spatial_deconv_gui.engines.perturb.expression import filtered
    from spatial_deconv_gui.engines.perturb.lens import LensIndex, term_coefficients
    from spatial_deconv_gui.engines.perturb.ligands import received_ligands
    from spatial_deconv_gui.engines.perturb.modulators import LR, TF, TFL

    idx = LensIndex(model)
    n, g = idx.n_cells(), idx.gi[ligand]
    rows = np.arange(n) if cells is None else np.asarray(cells, dtype=np.int64)
    X0, F0 = model.expr, idx.F
    D = np.zeros(n)
    D[rows] = value - X0[rows, g]
    dF = filtered(X0[:, g] + D) - F0[:, g]
    chans = [c for c, (lig, _) in enumerate(model.channels) if lig == ligand]
    dW, W0 = np.zeros((n, len(model.channels))), np.zeros((n, len(model.channels)))
    for c in chans:
        dW[:, c] = received_ligands(model.coords, dF[:, None], [model.channels[c][1]], scale=model.scale_factor)[:, 0]
    for c, (lig, r) in enumerate(model.channels):
        W0[:, c] = received_ligands(model.coords, F0[:, [idx.gi[lig]]], [r], scale=model.scale_factor)[:, 0]
    d_own = dW[:, chans[0]] if model.radius_rule == "ligand" and chans else D
    delta = np.zeros_like(X0)
    via = {}

    def add(kind, row, q, how):
        cols, beta = term_coefficients(idx, kind, row)
        delta[:, cols] += beta * q[:, None]
        for c in cols:
            via.setdefault(int(c), set()).add(how)

    add(TF, g, d_own, f"{ligand} (as a TF)")
    for p, (a, b) in enumerate(model.lr_pairs):
        if ligand in (a, b):
            ch, fb = int(model.lr_channel[p]), F0[:, idx.gi[b]]
            q = (fb * dW[:, ch] if a == ligand else 0.0) + (
                np.where(fb > 0, W0[:, ch], 0.0) * d_own if b == ligand else 0.0
            )
            add(LR, p, q, f"{a}${b}")
    for p, (a, b) in enumerate(model.tfl_pairs):
        if ligand in (a, b):
            ch = int(model.tfl_channel[p])
            q = (F0[:, idx.gi[b]] * dW[:, ch] if a == ligand else 0.0) + (W0[:, ch] * d_own if b == ligand else 0.0)
            add(TFL, p, q, f"{a}#{b}")
    delta = np.clip(X0 + delta, 0.0, X0.max(axis=0)) - X0
    delta[rows, g] = D[rows]
    return delta, {c: ", ".join(sorted(v)) for c, v in via.items() if c != g}


def _check_against_term_by_term(model, resp, ligand, value=0.0, cells=None):
    want, via = _first_step_term_by_term(model, ligand, value, cells)
    np.testing.assert_allclose(resp.delta, want, rtol=0, atol=1e-12)
    assert dict(zip(resp.targets.target, resp.targets.via)) == {model.genes[c]: v for c, v in via.items()}


def test_who_responds_is_the_first_propagation_step_of_the_knockout(model):
    table = model.modulator_table()
    index = api.lens_index(model)
    for gene in list(model.ligands) + ["Rec0", "Rec3", "Tf0"]:  # ligands, receptors (the R-side term), a TF
        resp = api.who_responds(model, gene, index=index)
        step = next(iter(api.perturbation_steps(model, gene, 0.0, steps=1)))
        np.testing.assert_array_equal(resp.delta, step.delta)  # propagation's own first step
        _check_against_term_by_term(model, resp, gene)
        uses = table[table.modulator.map(lambda m, g=gene: g in m.replace("#", "$").split("$"))]
        assert set(resp.targets.target) == set(uses.target) - {gene}
        # any other gene that moves is only clipped back to 0 where it was observed below 0 (the simulation's
        # noise leaves a few such values), as every propagation step does
        others = np.ones(len(model.genes), dtype=bool)
        others[[model.genes.index(g) for g in [gene, *resp.targets.target]]] = False
        x0 = model.expr[:, others]
        np.testing.assert_array_equal(step.delta[:, others], np.where(x0 < 0, -x0, 0.0))
        if len(resp.targets):
            top = resp.targets.target.iloc[0]
            assert resp.targets.mean_abs_delta.iloc[0] == pytest.approx(np.abs(resp.of(top)).mean())
    # in a part of the tissue, and set to a value instead of 0
    cells = np.flatnonzero(model.clusters == model.cluster_names[0])
    resp = api.who_responds(model, "Lig2", 0.5, cells=cells, index=index)
    step = next(iter(api.perturbation_steps(model, "Lig2", 0.5, cells=cells, steps=1)))
    np.testing.assert_array_equal(resp.delta, step.delta)
    _check_against_term_by_term(model, resp, "Lig2", 0.5, cells)


def test_who_responds_under_the_ligand_radius_rule(sim, tmp_path):
    model = _train(sim, tmp_path / "model", radius_rule="ligand")
    assert model.radius_rule == "ligand"
    for gene in list(model.ligands) + ["Rec1"]:
        resp = api.who_responds(model, gene)
        _check_against_term_by_term(model, resp, gene)


def test_bad_lens_requests_are_named(model):
    with pytest.raises(InputError, match="out of range"):
        api.interaction_lens(model, 10**6, model.targets[0])
    with pytest.raises(InputError, match="not a gene of the model"):
        api.interaction_lens(model, 0, "NoSuchGene")
    with pytest.raises(InputError, match="not a gene of the model"):
        api.who_responds(model, "NoSuchGene")


def test_tf_ligand_terms_in_the_lens_and_in_who_responds(sim, tmp_path):
    tfl = pd.DataFrame(
        {"ligand": ["Lig0", "Lig1", "Lig2", "Lig3", "Lig0"], "tf": ["Tf0", "Tf1", "Tf2", "Tf3", "Tf4"], "weight": 1.0}
    )
    model = _train(sim, tmp_path / "model", tfl=tfl)
    table = model.modulator_table()
    rows = table[table.kind == "tfl"]
    assert len(rows) >= 2
    xy = model.coords
    for target, cluster, modulator in zip(rows.target, rows.cluster, rows.modulator):
        cell = int(np.flatnonzero(model.clusters == cluster)[0])
        lens = api.interaction_lens(model, cell, target)
        r = lens.modulators.set_index("modulator").loc[modulator]
        lig, tf = modulator.split("#")
        x_tf = model.expr[cell, model.genes.index(tf)]
        assert r.kind == "tfl" and r.beta == pytest.approx(
            rows.set_index(["target", "cluster", "modulator"]).coef[(target, cluster, modulator)]
        )
        received = _hand_received(model, cell, lig, r.radius)
        assert r.feature == pytest.approx(received * x_tf, rel=1e-10)
        got = lens.senders[lens.senders.modulator == modulator]
        lv = model.expr[:, model.genes.index(lig)]
        d = np.sqrt(((xy - xy[cell]) ** 2).sum(axis=1))
        expected = np.flatnonzero((d <= r.radius) & (lv > 1e-9) & (np.arange(len(d)) != cell))
        assert sorted(got.sender) == sorted(expected.tolist())
        np.testing.assert_allclose(got.support, np.sqrt(lv[got.sender.to_numpy()] * x_tf), rtol=1e-12)
    for gene in list(model.ligands) + ["Tf2", "Tf4"]:  # ligands, and TFs of TF-ligand terms
        _check_against_term_by_term(model, api.who_responds(model, gene), gene)


def test_who_responds_refuses_cells_out_of_range(model):
    n = model.expr.shape[0]
    for cells in ([-1], [n]):
        with pytest.raises(InputError, match="cells out of range"):
            api.who_responds(model, model.ligands[0], cells=cells)
