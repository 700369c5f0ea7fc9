"""RCTD numerics: likelihood tables vs direct integration, spline vs table, QP step vs a generic solver."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize

from spatial_deconv_gui.engines.rctd import _kernels
from spatial_deconv_gui.engines.rctd.irwls import newton_step, newton_step_torch, nonneg_qp_torch
from spatial_deconv_gui.engines.rctd.likelihood import (
    SIGMA_GRID,
    LikelihoodTable,
    _ht_constants,
    build_tables,
    compute_log_tables,
    heavy_tail_pdf,
    lambda_grid,
    spline_second_derivatives,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def x():
    return lambda_grid()


def test_lambda_grid_and_sigma_grid(x):
    assert len(x) == 439
    assert x[0] == pytest.approx(1e-4) and x[-1] == 1600.0
    assert np.all(np.diff(x) > 0)
    assert len(SIGMA_GRID) == 126 and SIGMA_GRID[0] == 10 and SIGMA_GRID[-1] == 200


def test_interval_lookup_brackets_lambda(x):
    table = LikelihoodTable(1.0, x, np.zeros((2, len(x))), np.zeros((2, len(x))), 1000).to_torch("cpu", torch.float64)
    rng = np.random.default_rng(1)
    lam = np.exp(rng.uniform(np.log(1e-4), np.log(1599.9), 5000))
    m = table.interval(torch.as_tensor(lam)).numpy()
    assert np.all(x[m] <= lam + 1e-15) and np.all(lam < x[m + 1])


def test_heavy_tail_pdf_is_a_density():
    for sigma in (0.3, 1.0, 1.7):
        total, _ = integrate.quad(
            lambda e: heavy_tail_pdf(np.array([e]), sigma)[0], -np.inf, np.inf, points=None, limit=400
        )
        assert total == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("sigma", [0.25, 0.84, 1.6])
def test_table_matches_direct_integration(x, sigma):
    logq = compute_log_tables([sigma], 41, x)[0]
    a, c, norm = _ht_constants()

    def pdf(e):  # scalar version of the noise density, written out independently of heavy_tail_pdf
        u = abs(e) / sigma
        core = norm * math.exp(-0.5 * u * u) / math.sqrt(2 * math.pi) if u < 3 else norm * a / (u - c) ** 2
        return core / sigma

    for k, i in [(0, 0), (0, 250), (1, 120), (3, 200), (10, 260), (25, 330), (40, 438), (40, 10)]:
        lam = x[i]

        def integrand(e, k=k, lam=lam):
            mu = lam * math.exp(e)
            return math.exp(k * math.log(mu) - mu - math.lgamma(k + 1)) * pdf(e)

        brk = sorted({-3 * sigma, 3 * sigma, min(max(math.log(max(k, 0.5) / lam), -19.9), 19.9)})
        val, _ = integrate.quad(integrand, -20.0, 20.0, points=brk, limit=800, epsabs=0, epsrel=1e-12)
        # the table is spacexr's equally weighted sum with step h=4e-3 over [-20, 20], i.e. the trapezoid rule
        # plus h/2 at each end; with that end correction it agrees with the integral to ~1e-7 relative
        val += 0.5 * 4e-3 * (integrand(-20.0) + integrand(20.0))
        assert logq[k, i] == pytest.approx(math.log(val), abs=2e-7), (k, i)


def test_tables_rows_and_sigmas_are_consistent(x, tmp_path):
    both = compute_log_tables([0.5, 1.2], 64, x)
    np.testing.assert_allclose(compute_log_tables([0.5, 1.2], 64, x, backend="numpy"), both, rtol=0, atol=1e-11)
    alone = compute_log_tables([1.2], 64, x)[0]
    np.testing.assert_allclose(both[1], alone, rtol=0, atol=1e-12)
    # probabilities over k sum to <= 1 and near 1 for small lambda
    p = np.exp(both[0])
    assert np.all(p.sum(axis=0) <= 1 + 1e-9)
    # near 1 where lambda is small enough for k < 64 to hold the mass (the +-20 truncation loses ~1e-4)
    assert p[:, :120].sum(axis=0).min() > 0.999
    # disk cache round trip
    t1 = build_tables([0.84], 30, cache=True, cache_dir=tmp_path)[0]
    t2 = build_tables([0.84], 30, cache=True, cache_dir=tmp_path)[0]
    assert any(tmp_path.iterdir())
    np.testing.assert_array_equal(t1.logq, t2.logq)
    t3 = build_tables([0.84], 30, cache=False)[0]
    np.testing.assert_allclose(t1.logq, t3.logq, atol=1e-12)


def test_spline_matches_table_at_knots_and_is_smooth(x):
    table = build_tables([0.84], 60, cache=False)[0]
    tt = table.to_torch("cpu", torch.float64)
    ks = np.array([0, 1, 5, 20, 60])
    inner = np.arange(1, len(x) - 1)
    y = torch.as_tensor(np.repeat(ks, len(inner)), dtype=torch.float64)
    lam = torch.as_tensor(np.tile(x[inner], len(ks)))
    d0, d1, d2 = tt.derivatives(y, lam)
    expect = table.logq[ks][:, inner].ravel()
    np.testing.assert_allclose(d0.numpy(), expect, rtol=0, atol=1e-9)
    # the natural spline's second derivative at the knots is the solved coefficient
    np.testing.assert_allclose(d2.numpy(), table.z[ks][:, inner].ravel(), rtol=1e-6, atol=1e-9)
    # derivatives are consistent with the value (central differences between knots)
    rng = np.random.default_rng(0)
    lam2 = torch.as_tensor(np.exp(rng.uniform(np.log(2e-4), np.log(1500), 400)))
    y2 = torch.as_tensor(rng.integers(0, 60, 400).astype(float))
    h = lam2 * 1e-6
    f_hi, _, _ = tt.derivatives(y2, lam2 + h)
    f_lo, _, _ = tt.derivatives(y2, lam2 - h)
    _, g, _ = tt.derivatives(y2, lam2)
    np.testing.assert_allclose(g.numpy(), ((f_hi - f_lo) / (2 * h)).numpy(), rtol=1e-4, atol=1e-6)
    # numba kernel agrees with the torch path
    d1n = np.empty((1, 400))
    d2n = np.empty((1, 400))
    _kernels.spline_derivs(
        y2.numpy()[None], lam2.numpy()[None], tt.coef_np, tt.x_np, tt.mtab_np, tt.n_int, tt.x_max, tt.k_cap, d1n, d2n
    )
    _, d1t, d2t = tt.derivatives(y2, lam2)
    np.testing.assert_allclose(d1n[0], d1t.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d2n[0], d2t.numpy(), rtol=1e-12, atol=1e-12)
    # and the spline tracks the true likelihood between knots (interpolation error)
    mid = 0.5 * (x[300] + x[301])
    lg = compute_log_tables([0.84], 61, np.array([x[300], mid, x[301]]))[0]
    v, _, _ = tt.derivatives(torch.tensor([7.0]), torch.tensor([mid]))
    assert float(v) == pytest.approx(lg[7, 1], abs=1e-5)


def test_spline_second_derivatives_reproduce_cubic():
    xs = np.sort(np.random.default_rng(3).uniform(0, 5, 30))
    xs[0], xs[-1] = 0.0, 5.0
    vals = np.sin(xs)[None, :]
    z = spline_second_derivatives(vals, xs)
    assert z[0, 0] == 0 and z[0, -1] == 0
    # interior second derivatives approximate -sin
    assert np.abs(z[0, 5:-5] + np.sin(xs[5:-5])).max() < 0.05


def _reference_step(H, g, w):
    evals, V = np.linalg.eigh(H)
    fl = np.maximum(evals, 1e-3)
    D = (V * fl) @ V.T / fl.max() + 1e-7 * np.eye(len(g))
    d = g / fl.max()
    res = optimize.minimize(
        lambda v: 0.5 * v @ D @ v - d @ v,
        np.zeros(len(g)),
        jac=lambda v: D @ v - d,
        bounds=[(-wi, None) for wi in w],
        method="L-BFGS-B",
        options=dict(ftol=1e-16, gtol=1e-13, maxiter=20000),
    )
    return D, d, res.x


@pytest.mark.parametrize("k", [1, 2, 4, 9])
def test_qp_step_matches_bruteforce(k):
    rng = np.random.default_rng(k)
    B = 60
    A = rng.normal(size=(B, k, k))
    H = A @ A.transpose(0, 2, 1) - rng.uniform(0, 2) * np.eye(k)  # some indefinite: exercises the projection
    g = rng.normal(size=(B, k)) * 3
    w = rng.uniform(0, 1, size=(B, k)) * (rng.uniform(size=(B, k)) > 0.3)
    ours = newton_step(torch.as_tensor(H), torch.as_tensor(g), torch.as_tensor(w)).numpy()
    ours_t = newton_step_torch(torch.as_tensor(H), torch.as_tensor(g), torch.as_tensor(w)).numpy()
    for b in range(B):
        D, d, ref = _reference_step(H[b], g[b], w[b])
        f = lambda v: 0.5 * v @ D @ v - d @ v  # noqa: E731
        assert np.all(ours[b] >= -w[b] - 1e-12)
        # no feasible point does better than ours (beyond rounding)
        scale = 1 + abs(f(ref))
        assert f(ours[b]) <= f(ref) + 1e-9 * scale
        assert f(ours_t[b]) <= f(ref) + 1e-9 * scale
        # KKT: zero gradient on free variables, non-negative gradient on those at the bound
        grad = D @ ours[b] - d
        at_bound = ours[b] <= -w[b] + 1e-10
        assert np.abs(grad[~at_bound]).max(initial=0) < 1e-8 * (1 + np.abs(d).max())
        assert grad[at_bound].min(initial=0) > -1e-8 * (1 + np.abs(d).max())
    np.testing.assert_allclose(ours, ours_t, rtol=1e-6, atol=1e-8)


def test_nonneg_qp_kernels_agree_on_degenerate_cases():
    D = torch.eye(3, dtype=torch.float64)[None].repeat(3, 1, 1)
    c = torch.tensor([[-1.0, -2.0, -3.0], [1.0, 2.0, 3.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    y = nonneg_qp_torch(D, c)
    np.testing.assert_allclose(y.numpy(), np.clip(c.numpy(), 0, None))
    out = np.empty(3)
    for b in range(3):
        _kernels.nonneg_qp(D[b].numpy(), c[b].numpy(), out)
        np.testing.assert_allclose(out, np.clip(c[b].numpy(), 0, None))
