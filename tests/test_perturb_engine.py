"""Perturbation engine: received ligands, lasso, known-truth recovery, knockout direction, resume, cancel."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from spatial_deconv_gui.engines.base import Cancelled, RunControl
from spatial_deconv_gui.engines.perturb import model_dir as md
from spatial_deconv_gui.engines.perturb import priors
from spatial_deconv_gui.engines.perturb.lasso import fit_sgl_batch, group_weights, sgl_objective
from spatial_deconv_gui.engines.perturb.ligands import (grid_error_bound, grid_spacing, kernel_sum,
                                                        received_ligands)
from spatial_deconv_gui.engines.perturb.perturb import load_model, simulate_perturbation
from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue
from spatial_deconv_gui.engines.perturb.train import TrainConfig, train


@pytest.fixture(scope="module")
def sim():
    return simulate_grn_tissue(seed=0)


def _train(sim, out, **kw):
    s = sim.uns["perturb_sim"]
    grn, _ = priors.load_grn(s["grn_prior"])
    lr, _ = priors.load_lr(s["lr_prior"])
    cfg = TrainConfig(radius=s["radius"], contact_radius=s["contact_radius"], scale_factor=s["scale_factor"])
    return train(sim.X, sim.var_names, sim.obsm["spatial"], sim.obs["cluster"].astype(str).to_numpy(), grn, lr,
                 out, config=cfg, **kw)


@pytest.fixture(scope="module")
def trained(sim, tmp_path_factory):
    out = tmp_path_factory.mktemp("perturb_model")
    _train(sim, out)
    return out


def test_simulation_is_deterministic_and_small():
    a, b = simulate_grn_tissue(seed=4), simulate_grn_tissue(seed=4)
    assert a.shape == (1500, 60)
    np.testing.assert_array_equal(a.X, b.X)
    assert (a.X >= 0).all()
    t = a.uns["perturb_sim"]["true_modulators"]
    assert {"target", "cluster", "modulator", "kind", "coef"} <= set(t.columns)
    assert not np.array_equal(a.X, simulate_grn_tissue(seed=5).X)


def test_received_ligands_exact_matches_dense_formula():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (400, 2))
    x = rng.gamma(2.0, 1.0, (400, 3))
    radii = np.array([40.0, 40.0, 10.0])
    got = received_ligands(xy, x, radii, scale=7.0, mode="exact")
    d2 = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    want = np.stack([(7.0 * np.exp(-d2 / (2 * r * r)) * x[None, :, j]).mean(1) for j, r in enumerate(radii)], 1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    # small blocks give the same numbers (no N x N matrix needed)
    np.testing.assert_allclose(kernel_sum(xy, xy, x, 40.0, block=7), kernel_sum(xy, xy, x, 40.0), rtol=1e-13)
    # emitting only some cells equals zeroing the others
    rows = np.arange(0, 400, 3)
    part = received_ligands(xy, x[rows], radii, scale=7.0, source_index=rows, n_total=400)
    x0 = np.zeros_like(x)
    x0[rows] = x[rows]
    np.testing.assert_allclose(part, received_ligands(xy, x0, radii, scale=7.0), rtol=1e-12, atol=1e-300)


def test_grid_approximation_within_stated_bound():
    rng = np.random.default_rng(1)
    n = 6000
    xy = rng.uniform(0, 2000, (n, 2))
    x = rng.gamma(1.5, 1.0, (n, 2))
    r = 300.0
    exact = received_ligands(xy, x, r, scale=50.0, mode="exact")
    grid = received_ligands(xy, x, r, scale=50.0, mode="grid")
    bound = grid_error_bound(x, r, scale=50.0, spacing=grid_spacing(r))
    err = np.abs(grid - exact).max(axis=0)
    assert np.all(err <= bound)
    assert np.all(err > 0)  # it really was the grid path


def test_batched_lasso_matches_reference_solver():
    rng = np.random.default_rng(2)
    probs = []
    for b in range(5):
        n, p = 200 + 20 * b, 6 + b
        X = rng.standard_normal((n, p)) * rng.uniform(0.5, 2, p)
        w = np.zeros(p)
        w[:2] = [1.0, -0.7]
        y = X @ w + 0.3 * rng.standard_normal(n) + 2.0
        groups = np.array([0] * 3 + [1] * (p - 3))
        probs.append((X, y, groups))
    pmax = max(X.shape[1] for X, _, _ in probs)
    G = np.zeros((5, pmax, pmax))
    c = np.zeros((5, pmax))
    gr = np.full((5, pmax), -1)
    for i, (X, y, g) in enumerate(probs):
        Xc, yc = X - X.mean(0), y - y.mean()
        p = X.shape[1]
        G[i, :p, :p], c[i, :p], gr[i, :p] = Xc.T @ Xc, Xc.T @ yc, g
    l1, gl = 0.02, 0.05
    res = fit_sgl_batch(G, c, [X.shape[0] for X, _, _ in probs], gr, l1, gl, standardize=False, tol=1e-10,
                        max_iter=20000)
    for i, (X, y, g) in enumerate(probs):
        p = X.shape[1]
        # reference: plain proximal gradient, many iterations, numpy only
        Xc, yc = X - X.mean(0), y - y.mean()
        L = np.linalg.eigvalsh(Xc.T @ Xc / len(y)).max()
        w = np.zeros(p)
        gw = group_weights(g[None], gl)[0]
        for _ in range(20000):
            z = w - (Xc.T @ (Xc @ w - yc) / len(y)) / L
            z = np.sign(z) * np.maximum(np.abs(z) - l1 / L, 0)
            for k in range(gw.size):
                nk = np.linalg.norm(z[g == k])
                z[g == k] *= max(0.0, 1 - gw[k] / L / nk) if nk > 0 else 0.0
            w = z
        ours = res.coef[i, :p]
        np.testing.assert_allclose(ours, w, atol=1e-6)
        b = y.mean() - X.mean(0) @ ours
        assert sgl_objective(X, y, ours, b, g, l1, gl) <= sgl_objective(X, y, w, y.mean() - X.mean(0) @ w, g, l1,
                                                                        gl) + 1e-10


def test_known_truth_recovery(sim, trained):
    model = load_model(trained)
    tab = model.modulator_table()
    truth = sim.uns["perturb_sim"]["true_modulators"]
    key = lambda d: set(zip(d.target, d.cluster.astype(str), d.modulator))  # noqa: E731
    rec, tru = key(tab), key(truth)
    tp = len(rec & tru)
    precision, recall = tp / len(rec), tp / len(tru)
    assert precision >= 0.8, precision
    assert recall >= 0.8, recall


def test_knockout_of_upstream_tf_moves_targets_down(sim, trained):
    model = load_model(trained)
    s = sim.uns["perturb_sim"]
    truth = s["true_modulators"]
    up = s["upstream_tf"]
    delta = simulate_perturbation(model, up, 0.0, n_steps=4)
    gi = {g: i for i, g in enumerate(model.genes)}
    direct = sorted(set(truth[truth.modulator == up].target))
    assert len(direct) >= 5
    for g in direct:  # every simulated coefficient of the upstream TF is positive
        assert delta[:, gi[g]].mean() < 0, g
    # the cascade: targets of the second TF move down too (reached only through propagation)
    casc = sorted(set(truth[truth.modulator == s["cascade_tf"]].target) - set(direct))
    assert casc and all(delta[:, gi[g]].mean() < 0 for g in casc)
    one = simulate_perturbation(model, up, 0.0, n_steps=1)
    assert all(np.abs(one[:, gi[g]]).max() == 0 for g in casc)  # one hop does not reach them
    np.testing.assert_allclose(delta[:, gi[up]], -model.expr[:, gi[up]])
    # overexpression goes the other way
    over = simulate_perturbation(model, up, float(model.expr[:, gi[up]].max()), n_steps=2)
    assert np.mean([over[:, gi[g]].mean() for g in direct]) > 0


def test_resume_skips_finished_genes_and_reports_progress(sim, tmp_path):
    out = tmp_path / "m"
    man = _train(sim, out)
    targets = man["targets"]
    before = {t: md.coef_path(out, t).stat().st_mtime_ns for t in targets}
    victim = targets[3]
    md.coef_path(out, victim).unlink()
    events = []
    man2 = _train(sim, out, control=RunControl(events.append, max_rate=0))
    trained_now = [e.message for e in events if e.stage == "training" and e.message not in ("", "done")]
    assert trained_now == [victim]
    assert man2["status"] == "complete"
    for t in targets:
        if t != victim:
            assert md.coef_path(out, t).stat().st_mtime_ns == before[t]
    # other settings in the same folder are refused
    from spatial_deconv_gui.io.errors import InputError

    s = sim.uns["perturb_sim"]
    grn, _ = priors.load_grn(s["grn_prior"])
    with pytest.raises(InputError):
        train(sim.X, sim.var_names, sim.obsm["spatial"], sim.obs["cluster"].astype(str).to_numpy(), grn, None,
              out, config=TrainConfig(radius=50.0))


def test_cancel_then_resume(sim, tmp_path):
    out = tmp_path / "m"
    ev = threading.Event()
    seen = []

    def cb(e):
        if e.stage == "training" and e.message not in ("", "done"):
            seen.append(e.message)
            ev.set()

    with pytest.raises(Cancelled):
        s = sim.uns["perturb_sim"]
        grn, _ = priors.load_grn(s["grn_prior"])
        lr, _ = priors.load_lr(s["lr_prior"])
        cfg = TrainConfig(radius=s["radius"], contact_radius=s["contact_radius"], scale_factor=s["scale_factor"],
                          problems_per_batch=3 * 4)
        train(sim.X, sim.var_names, sim.obsm["spatial"], sim.obs["cluster"].astype(str).to_numpy(), grn, lr,
              out, config=cfg, control=RunControl(cb, cancel_event=ev, max_rate=0))
    assert 0 < len(seen) < 44
    assert md.read_manifest(out)["status"] == "training"
    done = md.finished_genes(out, md.read_manifest(out)["targets"])
    assert len(done) == len(seen)


def test_perturbation_cell_subset_and_multi_gene(trained):
    model = load_model(trained)
    gi = {g: i for i, g in enumerate(model.genes)}
    cells = np.flatnonzero(model.clusters == model.cluster_names[0])
    d = simulate_perturbation(model, ["Tf0", "Tf3"], [0.0, 3.0], cells=cells, n_steps=3)
    np.testing.assert_allclose(d[cells, gi["Tf3"]], 3.0 - model.expr[cells, gi["Tf3"]])
    others = np.setdiff1d(np.arange(model.expr.shape[0]), cells)
    assert np.all(d[others, gi["Tf0"]] == 0)
    # clipped into [0, observed max] for non-pinned genes
    new = model.expr + d
    free = [i for g, i in gi.items() if g not in ("Tf0", "Tf3")]
    assert new[:, free].min() >= 0
    assert np.all(new[:, free] <= model.expr[:, free].max(0) + 1e-12)


def test_grid_mode_perturbation_close_to_exact(trained):
    model = load_model(trained)
    exact = simulate_perturbation(model, "Lig0", 0.0, n_steps=2, ligand_mode="exact")
    grid = simulate_perturbation(model, "Lig0", 0.0, n_steps=2, ligand_mode="grid")
    scale = np.abs(exact).max()
    assert np.abs(grid - exact).max() <= 0.05 * scale


def test_clusterwise_imputation_smooths_within_clusters_only():
    from spatial_deconv_gui.engines.perturb.impute import impute_clusterwise

    rng = np.random.default_rng(0)
    cl = np.repeat(["a", "b"], 150)
    base = np.where(cl[:, None] == "a", 1.0, 5.0) * np.ones((300, 8))
    X = base + rng.normal(0, 0.5, (300, 8))
    Y = impute_clusterwise(X, cl, k=10, t=3)
    assert Y.shape == X.shape
    for c in ("a", "b"):
        m = cl == c
        assert Y[m].std(0).mean() < 0.6 * X[m].std(0).mean()
        np.testing.assert_allclose(Y[m].mean(0), X[m].mean(0), atol=0.1)  # no leakage between clusters
