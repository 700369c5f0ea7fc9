"""The flash engine (FlashDeconv's method): optimisation properties, contract, determinism, recovery."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from spatial_deconv_gui.engines import graphs
from spatial_deconv_gui.engines.base import Cancelled, RunControl
from spatial_deconv_gui.engines.flash import FlashConfig, fit_arrays, run_flash
from spatial_deconv_gui.engines.flash.engine import align
from spatial_deconv_gui.engines.flash.solver import kkt_residual
from spatial_deconv_gui.io import reference_input, spatial_input


@pytest.fixture(scope="module")
def slide():
    from spatial_deconv_gui.simulate import simulate_dataset

    s, r = simulate_dataset(n_spots=500, n_genes=200, n_types=5, cells_per_type=40, seed=11)
    return spatial_input(s), reference_input(r), s.obsm["true_proportions"].to_numpy()


def _arrays(slide):
    sin, rin, _ = slide
    common, colmap, X, types = align(sin, rin)
    return sin.counts, X, sin.coords, colmap, types


def _per_spot_pearson(p, q):
    return float(np.nanmean([np.corrcoef(a, b)[0, 1] for a, b in zip(p, q)]))


def test_result_contract(slide):
    sin, rin, _ = slide
    events = []
    res = run_flash(sin, rin, FlashConfig(), RunControl(events.append, max_rate=0))
    n, k = sin.n_spots, len(rin.type_names)
    assert res.key == "flash" and res.method == "flash" and res.cell_types == rin.type_names
    assert res.proportions.shape == (n, k)
    np.testing.assert_allclose(res.proportions.sum(axis=1), 1.0, atol=1e-12)
    assert (res.proportions >= 0).all()
    ab = res.obsm["flash_abundances"]
    assert ab.shape == (n, k) and list(ab.columns) == rin.type_names and (ab.to_numpy() >= 0).all()
    fit = res.uns["flash_fit"]
    for key in ("lambda_used", "n_iter", "converged", "objective", "objective_history", "genes_used"):
        assert key in fit
    assert res.params["lambda_used"] > 0 and res.params["converged"] is True
    assert 0 < res.params["n_iter"] < 1000
    stages = [e.stage for e in events]
    assert "genes" in stages and "solve" in stages and events[-1].fraction == 1.0
    fr = [e.fraction for e in events if e.stage == "solve"]
    assert fr == sorted(fr)


def test_objective_decreases_monotonically(slide):
    Y, X, coords, colmap, _ = _arrays(slide)
    for lam in (None, 50.0):
        fit = fit_arrays(
            Y, X, coords, FlashConfig(objective_every=1, tol=1e-7, max_iter=400), colmap=colmap, lambda_=lam
        )
        obj = np.array([v for _, v in fit.info.objective_history])
        assert obj.size > 20
        steps = np.diff(obj)
        assert (steps <= 1e-9 * abs(obj[0])).all(), steps.max()
        assert obj[-1] < obj[0]


def test_kkt_conditions_at_convergence(slide):
    Y, X, coords, colmap, _ = _arrays(slide)
    fit = fit_arrays(Y, X, coords, FlashConfig(tol=1e-9, max_iter=5000, objective_every=0), colmap=colmap)
    assert fit.info.converged
    scale = float(np.mean(np.diag(fit.G)))
    res = kkt_residual(fit.H, fit.G, fit.beta, fit.adjacency, fit.lambda_used, fit.rho_used)
    assert np.abs(res).max() < 1e-6 * scale
    # complementary slackness: zero abundances have a non-negative gradient, positive ones a zero gradient
    assert (fit.beta >= 0).all() and (fit.beta == 0).any() and (fit.beta > 0).any()


def test_higher_lambda_gives_smoother_maps(slide):
    Y, X, coords, colmap, _ = _arrays(slide)
    energies = []
    base = fit_arrays(Y, X, coords, FlashConfig(objective_every=0), colmap=colmap).lambda_used
    for lam in (0.0, base, 30 * base, 300 * base):
        fit = fit_arrays(Y, X, coords, FlashConfig(objective_every=0), colmap=colmap, lambda_=lam)
        energies.append(graphs.dirichlet_energy(fit.proportions, fit.adjacency))
    assert all(a > b for a, b in zip(energies, energies[1:])), energies
    assert energies[-1] < 0.5 * energies[0]


def test_deterministic_given_seed(slide):
    sin, rin, _ = slide
    a = run_flash(sin, rin, FlashConfig(gene_weighting="countsketch", seed=7))
    b = run_flash(sin, rin, FlashConfig(gene_weighting="countsketch", seed=7))
    c = run_flash(sin, rin, FlashConfig(gene_weighting="countsketch", seed=8))
    np.testing.assert_array_equal(a.proportions, b.proportions)
    assert np.abs(a.proportions - c.proportions).max() > 1e-6
    d = run_flash(sin, rin, FlashConfig(n_threads=1))
    e = run_flash(sin, rin, FlashConfig())
    np.testing.assert_array_equal(d.proportions, e.proportions)  # independent of the thread count


@pytest.mark.parametrize(
    "cfg, bar",
    [
        (FlashConfig(), 0.93),
        (FlashConfig(preprocess="pearson"), 0.85),
        (FlashConfig(gene_weighting="countsketch", sketch_dim=64), 0.90),
        (FlashConfig(spatial_method="grid"), 0.93),
    ],
)
def test_recovers_truth(slide, cfg, bar):
    sin, rin, truth = slide
    res = run_flash(sin, rin, cfg)
    assert _per_spot_pearson(res.proportions, truth) >= bar


def test_spatial_smoothing_helps_on_structured_domains(slide):
    sin, rin, truth = slide
    off = run_flash(sin, rin, FlashConfig(lambda_spatial="0"))
    on = run_flash(sin, rin, FlashConfig(lambda_spatial="auto"))
    err_off = np.abs(off.proportions - truth).mean()
    err_on = np.abs(on.proportions - truth).mean()
    assert err_on <= err_off * 1.001


def test_cancel_between_iterations(slide):
    sin, rin, _ = slide
    ev = threading.Event()
    seen = []

    def cb(e):
        seen.append(e)
        if e.stage == "solve" and e.fraction > 0:
            ev.set()

    with pytest.raises(Cancelled):
        run_flash(sin, rin, FlashConfig(tol=1e-12), RunControl(cb, ev, max_rate=0))
    assert any(e.stage == "solve" for e in seen)


def test_partial_results_stream():
    from spatial_deconv_gui.engines.flash.solver import IterationReporter

    got = []
    rep = IterationReporter(
        RunControl(got.append, max_rate=0), 100, 1e-4, np.array([3, 5]), ["a", "b"], partial_every_s=0.0
    )
    rep(1, 0.5, np.array([[1.0, 3.0], [0.0, 0.0]]))
    part = got[-1].partial
    assert part is not None and list(part.spot_index) == [3, 5]
    np.testing.assert_allclose(part.proportions, [[0.25, 0.75], [0.5, 0.5]])


def test_filtered_spots_are_nan(slide):
    sin, rin, _ = slide
    tot = np.asarray(sin.counts.sum(axis=1)).ravel()
    cut = int(np.quantile(tot, 0.2))
    res = run_flash(sin, rin, FlashConfig(min_counts=cut))
    fitted = tot >= cut
    assert np.isnan(res.proportions[~fitted]).all() and not np.isnan(res.proportions[fitted]).any()
    assert np.isnan(res.obsm["flash_abundances"].to_numpy()[~fitted]).all()


def test_result_round_trips_through_h5ad(slide, tmp_path):
    import anndata as ad

    from spatial_deconv_gui.io import attach_result, write_h5ad_atomic
    from spatial_deconv_gui.simulate import simulate_dataset

    s, r = simulate_dataset(n_spots=200, n_genes=100, n_types=3, cells_per_type=30, seed=2)
    res = run_flash(spatial_input(s), reference_input(r), FlashConfig(radius=None))
    out = attach_result(s, res)
    write_h5ad_atomic(out, tmp_path / "o.h5ad")
    back = ad.read_h5ad(tmp_path / "o.h5ad")
    assert back.uns["flash_fit"]["objective_history"].shape[1] == 2
    np.testing.assert_allclose(back.obsm["flash_abundances"].to_numpy(), res.obsm["flash_abundances"].to_numpy())
    assert float(back.uns["flash"]["parameters"]["lambda_used"]) == res.params["lambda_used"]


def test_spot_order_does_not_matter(slide, monkeypatch):
    from spatial_deconv_gui.engines.flash import core

    Y, X, coords, colmap, _ = _arrays(slide)
    monkeypatch.setattr(core, "PERMUTE_MIN_SPOTS", 10**9)
    plain = fit_arrays(Y, X, coords, FlashConfig(), colmap=colmap)
    monkeypatch.setattr(core, "PERMUTE_MIN_SPOTS", 0)  # solve on the space-filling-curve order
    curve = fit_arrays(Y, X, coords, FlashConfig(), colmap=colmap)
    assert plain.info.n_iter == curve.info.n_iter
    np.testing.assert_allclose(plain.proportions, curve.proportions, atol=1e-12)


def test_three_dimensional_coordinates(slide):
    Y, X, coords, colmap, _ = _arrays(slide)
    flat = fit_arrays(Y, X, coords, FlashConfig(), colmap=colmap)
    xyz = fit_arrays(Y, X, np.column_stack([coords, np.zeros(len(coords))]), FlashConfig(), colmap=colmap)
    np.testing.assert_allclose(flat.proportions, xyz.proportions, atol=1e-12)
    stacked = np.column_stack([coords, 50.0 * (np.arange(len(coords)) % 2)])  # two interleaved sections
    fit = fit_arrays(Y, X, stacked, FlashConfig(), colmap=colmap)
    assert fit.info.converged and np.isfinite(fit.proportions).all()


def test_bad_config_is_refused(slide):
    sin, rin, _ = slide
    for bad in (
        FlashConfig(lambda_spatial="smooth"),
        FlashConfig(spatial_method="radius"),
        FlashConfig(tol=0.0),
        FlashConfig(preprocess="zscore"),
    ):
        with pytest.raises(ValueError):
            run_flash(sin, rin, bad)
