"""Perturbation engine: received ligands, lasso, known-truth recovery, knockout direction, resume, cancel."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

from spatial_deconv_gui.engines.base import Cancelled, RunControl
from spatial_deconv_gui.engines.perturb import model_dir as md
from spatial_deconv_gui.engines.perturb import priors
from spatial_deconv_gui.engines.perturb.lasso import fit_sgl_batch, group_weights, sgl_objective
from spatial_deconv_gui.engines.perturb.ligands import grid_error_bound, grid_spacing, kernel_sum, received_ligands
from spatial_deconv_gui.engines.perturb.perturb import load_model, simulate_perturbation
from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue
from spatial_deconv_gui.engines.perturb.train import TrainConfig, train


@pytest.fixture(scope="module")
def sim():
    return simulate_grn_tissue(seed=0)


def _train(sim, out, problems_per_batch=512, **kw):
    s = sim.uns["perturb_sim"]
    grn, _ = priors.load_grn(s["grn_prior"])
    lr, _ = priors.load_lr(s["lr_prior"])
    cfg = TrainConfig(
        radius=s["radius"],
        contact_radius=s["contact_radius"],
        scale_factor=s["scale_factor"],
        problems_per_batch=problems_per_batch,
    )
    return train(
        sim.X,
        sim.var_names,
        sim.obsm["spatial"],
        sim.obs["cluster"].astype(str).to_numpy(),
        grn,
        lr,
        out,
        config=cfg,
        **kw,
    )


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
    res = fit_sgl_batch(
        G, c, [X.shape[0] for X, _, _ in probs], gr, l1, gl, standardize=False, tol=1e-10, max_iter=20000
    )
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
        assert (
            sgl_objective(X, y, ours, b, g, l1, gl)
            <= sgl_objective(X, y, w, y.mean() - X.mean(0) @ w, g, l1, gl) + 1e-10
        )


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
    man = _train(sim, out, problems_per_batch=3)  # 3 clusters: one target per batch, so one store shard each
    targets = man["targets"]
    before = {t: md.coef_path(out, t).stat().st_mtime_ns for t in targets}
    victim = targets[3]
    md.coef_path(out, victim).unlink()
    events = []
    man2 = _train(sim, out, problems_per_batch=3, control=RunControl(events.append, max_rate=0))
    trained_now = [e.message.split(" (")[0] for e in events if e.stage == "training" and e.message not in ("", "done")]
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
        train(
            sim.X,
            sim.var_names,
            sim.obsm["spatial"],
            sim.obs["cluster"].astype(str).to_numpy(),
            grn,
            None,
            out,
            config=TrainConfig(radius=50.0),
        )


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
        cfg = TrainConfig(
            radius=s["radius"],
            contact_radius=s["contact_radius"],
            scale_factor=s["scale_factor"],
            problems_per_batch=3 * 4,
        )
        train(
            sim.X,
            sim.var_names,
            sim.obsm["spatial"],
            sim.obs["cluster"].astype(str).to_numpy(),
            grn,
            lr,
            out,
            config=cfg,
            control=RunControl(cb, cancel_event=ev, max_rate=0),
        )
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


# ---- per-pair radius: a ligand in a secreted and a contact pair is received at both radii ----------------------


def _dense_received(xy, x, r, s):
    d2 = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    return s * (np.exp(-d2 / (2.0 * r * r)) @ x) / len(x)


def _two_kind_tissue(n=80, seed=7):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (n, 2))
    genes = ["Lg", "Ra", "Rb", "Tfx", "Tg"]
    X = rng.gamma(3.0, 1.0, (n, len(genes))) + 0.1
    X[:, 4] = 1.0 + 0.8 * X[:, 3] + 0.1 * rng.standard_normal(n) + 5.0
    grn = priors.load_grn(pd.DataFrame({"tf": ["Tfx"], "target": ["Tg"]}))[0]
    lr = priors.load_lr(
        pd.DataFrame(
            {
                "ligand": ["Lg", "Lg"],
                "receptor": ["Ra", "Rb"],
                "annotation": ["Secreted Signaling", "Cell-Cell Contact"],
            }
        )
    )[0]
    return xy, genes, X, grn, lr


@pytest.mark.parametrize("rule", ["pair", "ligand"])
def test_per_pair_radius_training_receives_ligand_at_each_radius(tmp_path, rule):
    xy, genes, X, grn, lr = _two_kind_tissue()
    r_s, r_c, s = 30.0, 8.0, 2.5
    cfg = TrainConfig(
        radius=r_s,
        contact_radius=r_c,
        scale_factor=s,
        receptor_thresh=0.0,
        r2_threshold=0.0,
        ligand_mode="exact",
        radius_rule=rule,
    )
    man = train(X, genes, xy, np.array(["c0"] * len(X)), grn, lr, tmp_path / "m", config=cfg)
    assert man["radius_rule"] == rule
    if rule == "pair":
        assert man["lr_radius"] == {"Lg$Ra": r_s, "Lg$Rb": r_c}
        assert man["received_channels"] == [["Lg", r_s], ["Lg", r_c]]
    else:  # SpaceTravLR's rule: the ligand's first pair (secreted) decides for both
        assert man["lr_radius"] == {"Lg$Ra": r_s, "Lg$Rb": r_s}
        assert man["received_channels"] == [["Lg", r_s]]
    W = np.load(tmp_path / "m" / md.RECEIVED)
    want = np.column_stack([_dense_received(xy, X[:, 0], r, s) for _, r in man["received_channels"]])
    np.testing.assert_allclose(W, want, rtol=1e-12, atol=0)
    if rule == "pair":
        assert np.abs(W[:, 0] - W[:, 1]).min() > 1e-3  # two distinct received values per cell
    model = load_model(tmp_path / "m")
    assert model.channels == [tuple(c) for c in man["received_channels"]]
    tab = model.modulator_table()
    got = dict(zip(tab.modulator, tab.radius))
    assert got.get("Lg$Rb", r_c if rule == "pair" else r_s) == (r_c if rule == "pair" else r_s)


def _hand_model(manifest_extra: dict, b_a=0.7, b_b=-0.4):
    """Two cells 5 apart; ligand Lg in a secreted (r=5) and a contact (r=2.5) pair; Tg = b_a Lg$Ra + b_b Lg$Rb."""
    from spatial_deconv_gui.engines.perturb.perturb import model_from_tables

    genes = ["Lg", "Ra", "Rb", "Tg"]
    X = np.array([[2.0, 1.5, 3.0, 20.0], [4.0, 0.5, 2.0, 10.0]])  # Tg below its max in cell 1: no clipping
    xy = np.array([[0.0, 0.0], [3.0, 4.0]])
    man = {"clusters": ["c0"], "targets": ["Tg"], "scale_factor": 1.0, "ligand_radius": {"Lg": 5.0}}
    man.update(manifest_extra)
    tab = pd.DataFrame(
        {
            "cluster": ["c0"],
            "n_cells": [2],
            "r2": [1.0],
            "gated": [False],
            "intercept": [0.0],
            "beta_Lg$Ra": [b_a],
            "beta_Lg$Rb": [b_b],
        }
    )
    return model_from_tables(man, genes, X, xy, np.array(["c0", "c0"]), {"Tg": tab}), X


def test_per_pair_radius_hand_derived_received_values_and_knockout():
    from spatial_deconv_gui.engines.perturb.perturb import Propagator

    pair = {"format_version": 2, "radius_rule": "pair", "lr_radius": {"Lg$Ra": 5.0, "Lg$Rb": 2.5}, "tfl_radius": {}}
    model, X = _hand_model(pair)
    # d^2 = 25: exp(-25 / (2 * 5^2)) = e^-0.5 (secreted), exp(-25 / (2 * 2.5^2)) = e^-2 (contact); s = 1, N = 2
    w_sec = np.array([(2.0 + 4.0 * np.exp(-0.5)) / 2, (4.0 + 2.0 * np.exp(-0.5)) / 2])
    w_con = np.array([(2.0 + 4.0 * np.exp(-2.0)) / 2, (4.0 + 2.0 * np.exp(-2.0)) / 2])
    assert model.channels == [("Lg", 5.0), ("Lg", 2.5)]
    prop = Propagator(model, ligand_mode="exact")
    np.testing.assert_allclose(prop.W0, np.column_stack([w_sec, w_con]), rtol=1e-14)
    # knock Lg out everywhere: every received value drops to 0, so one hop gives
    # delta_Tg = b_a * Ra * (-w_sec) + b_b * Rb * (-w_con)
    d = simulate_perturbation(model, "Lg", 0.0, n_steps=1, clip=False)  # no cap at the observed max
    want = 0.7 * X[:, 1] * (-w_sec) + (-0.4) * X[:, 2] * (-w_con)
    np.testing.assert_allclose(d[:, 3], want, rtol=1e-13)
    # a format-1 folder (one radius per ligand) loads with SpaceTravLR's rule: both pairs at r = 5
    old, _ = _hand_model({})
    assert old.radius_rule == "ligand" and old.channels == [("Lg", 5.0)]
    d_old = simulate_perturbation(old, "Lg", 0.0, n_steps=1, clip=False)
    np.testing.assert_allclose(d_old[:, 3], (0.7 * X[:, 1] - 0.4 * X[:, 2]) * (-w_sec), rtol=1e-13)
    # a folder naming LR pairs without radii, or from a newer format, is refused with a clear message
    from spatial_deconv_gui.io.errors import InputError

    with pytest.raises(InputError, match="no radius for"):
        _hand_model({**pair, "lr_radius": {"Lg$Ra": 5.0}})
    with pytest.raises(InputError, match="format 9"):
        _hand_model({**pair, "format_version": 9})


def test_numba_and_torch_kernel_sums_agree():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 500, (900, 2))
    x = rng.gamma(2.0, 1.0, (900, 2))
    for sym in (True, False):
        a = kernel_sum(xy, xy, x, 60.0, symmetric=sym, backend="numba")
        b = kernel_sum(xy, xy, x, 60.0, symmetric=sym, backend="torch")
        np.testing.assert_allclose(a, b, rtol=1e-12)
    part = kernel_sum(xy[:50], xy[100:700], x[100:700], 60.0, backend="numba")
    d2 = ((xy[:50, None] - xy[None, 100:700]) ** 2).sum(-1)
    np.testing.assert_allclose(part, np.exp(-d2 / 7200.0) @ x[100:700], rtol=1e-13)
    # one thread or several (pieces of work with their own buffers): same sums
    from spatial_deconv_gui.engines.base import thread_cap

    with thread_cap(1):
        one = kernel_sum(xy, xy, x, 60.0, symmetric=True)
    with thread_cap(2):
        two = kernel_sum(xy, xy, x, 60.0, symmetric=True)
    np.testing.assert_allclose(one, two, rtol=1e-13)
    # far beyond the radius everything underflows to 0
    far = kernel_sum(np.array([[0.0, 0.0]]), np.array([[1e4, 0.0]]), np.ones((1, 1)), 1.0)
    assert far[0, 0] == 0.0


def test_format1_model_folder_loads_with_one_radius_per_ligand(trained, tmp_path):
    import json
    import shutil

    from spatial_deconv_gui.engines.perturb.perturb import Propagator

    old = tmp_path / "old"
    shutil.copytree(trained, old)
    man = json.loads((old / md.MANIFEST).read_text())
    for k in ("radius_rule", "lr_radius", "tfl_radius", "received_channels"):
        man.pop(k)
    man["format_version"] = 1
    (old / md.MANIFEST).write_text(json.dumps(man))
    new_m, old_m = load_model(trained), load_model(old)
    assert old_m.radius_rule == "ligand" and new_m.radius_rule == "pair"
    # the simulated prior gives each ligand one annotation: both rules give the same radii and results
    assert old_m.channels == new_m.channels == [(g, man["ligand_radius"][g]) for g in man["ligands"]]
    assert old_m.received_cache is not None
    np.testing.assert_array_equal(Propagator(old_m).W0, Propagator(new_m).W0)
    np.testing.assert_allclose(
        simulate_perturbation(old_m, "Tf2", 0.0, n_steps=3),
        simulate_perturbation(new_m, "Tf2", 0.0, n_steps=3),
        rtol=0,
        atol=1e-12,
    )


def test_numba_hop_matches_sparse_products(sim, tmp_path):
    from spatial_deconv_gui.engines.perturb.perturb import Propagator

    tfl = pd.DataFrame({"ligand": ["Lig0", "Lig1", "Lig3"], "tf": ["Tf3", "Tf4", "Tf5"], "weight": [0.5, 0.5, 0.5]})
    _train(sim, tmp_path / "m", tfl=priors.load_tfl(tfl)[0])
    model = load_model(tmp_path / "m")
    assert len(model.tfl_pairs) and len(model.lr_pairs)
    prop = Propagator(model)
    rng = np.random.default_rng(5)
    n, g = model.expr.shape
    dmod = rng.standard_normal((n, g)) * (rng.random((n, g)) < 0.5)
    dW = rng.standard_normal((n, len(model.channels)))
    F = np.where(rng.random((n, g)) < 0.2, 0.0, prop.F0)  # some receptors absent
    W = prop.W0 + dW
    got = prop.hop(F, model.expr, W, dmod, dW)
    want = prop._hop_numpy(F, model.expr, W, dmod, dW)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    assert np.abs(want).max() > 0.1


def test_received_change_updated_from_previous_state(trained, monkeypatch):
    from spatial_deconv_gui.engines.perturb.perturb import Propagator
    from spatial_deconv_gui.engines.perturb.train import filtered

    model = load_model(trained)
    prop = Propagator(model, ligand_mode="exact")
    gi = {g: i for i, g in enumerate(model.genes)}
    rng = np.random.default_rng(8)
    X1 = model.expr.copy()
    X1[:, gi["Lig0"]] *= 0.5  # every cell: a full pass
    F1 = filtered(X1)
    dW1 = prop.delta_received(F1)
    X2 = X1.copy()
    few = rng.choice(len(X2), 30, replace=False)
    X2[few, gi["Lig3"]] += 1.0  # 30 cells of another ligand (other radius)
    F2 = filtered(X2)
    calls = []
    real = prop._received
    monkeypatch.setattr(
        prop,
        "_received",
        lambda v, r, source_index=None: (
            calls.append((v.shape, None if source_index is None else len(source_index))) or real(v, r, source_index)
        ),
    )
    inc = prop.delta_received(F2, (F1[:, prop.lig_idx], dW1))
    assert calls == [((30, 1), 30)]  # only the 30 changed cells emit, one channel
    np.testing.assert_allclose(inc, prop.delta_received(F2), rtol=1e-12, atol=1e-14)
    calls.clear()
    same = prop.delta_received(F2, (F2[:, prop.lig_idx], inc))
    assert calls == [] and np.array_equal(same, inc)  # nothing moved: no kernel pass
