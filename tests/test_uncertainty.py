"""Per-spot intervals (`run --uncertainty`): coverage of simulated truth, the point estimate inside, RCTD's
observed information against a finite-difference Hessian, widths against depth, and the CLI's slots."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from spatial_deconv_gui import api, keys
from spatial_deconv_gui.cli import main
from spatial_deconv_gui.engines.rctd.intervals import observed_information, simplex_intervals
from spatial_deconv_gui.engines.rctd.irwls import SharedDesign
from spatial_deconv_gui.engines.rctd.likelihood import build_tables
from spatial_deconv_gui.engines.rctd.modes import SolverSettings, fit_full
from spatial_deconv_gui.simulate import simulate_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rctd_tables"))


def _interval_stats(adata, key):
    point = adata.obsm[keys.proportions(key)].to_numpy()
    lower = adata.obsm[keys.proportions_lower(key)].to_numpy()
    upper = adata.obsm[keys.proportions_upper(key)].to_numpy()
    truth = adata.obsm[keys.TRUE_PROPORTIONS].to_numpy()
    fitted = ~np.isnan(point).any(axis=1)
    covered = (truth >= lower - 1e-12) & (truth <= upper + 1e-12)
    inside = (point >= lower - 1e-12) & (point <= upper + 1e-12)
    return covered[fitted].mean(), (upper - lower)[fitted].mean(), inside[fitted].all(), fitted


def _slide(umi_per_cell, seed=1):
    return simulate_dataset(n_spots=150, n_genes=300, n_types=5, umi_per_cell=umi_per_cell, seed=seed)


@pytest.fixture(scope="module")
def rctd_runs(cache_dir):
    out = {}
    for umi in (100, 800):
        s, r = _slide(umi)
        params = {"mode": "full", "cache_dir": cache_dir, "n_fit": 100}
        out[umi] = api.run_deconvolution(s, r, "rctd", params=params, device="cpu", uncertainty=True).adata
    return out


def test_rctd_intervals_cover_the_truth(rctd_runs):
    for umi, adata in rctd_runs.items():
        coverage, width, inside, fitted = _interval_stats(adata, "rctd")
        assert fitted.sum() >= 140
        assert inside
        assert 0.75 <= coverage <= 0.99, (umi, coverage)
        assert width < 0.2, (umi, width)
        lower = adata.obsm[keys.proportions_lower("rctd")]
        assert list(lower.columns) == list(adata.obsm[keys.proportions("rctd")].columns)
        assert (lower.index == adata.obs_names).all()


def test_rctd_intervals_narrow_as_depth_rises(rctd_runs):
    _, width_shallow, _, _ = _interval_stats(rctd_runs[100], "rctd")
    _, width_deep, _, _ = _interval_stats(rctd_runs[800], "rctd")
    # 8x the counts: Poisson alone would shrink widths ~sqrt(8) = 2.8x; the lognormal platform noise caps the gain
    assert width_deep < 0.7 * width_shallow, (width_shallow, width_deep)


def test_interval_scales_with_the_information():
    """Four times the information halves an interior spot's interval (the Gaussian part, before projection)."""
    w = np.array([[0.3, 0.25, 0.25, 0.2]])
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    info = (a @ a.T + 4 * np.eye(4))[None] * 400.0
    lo1, hi1 = simplex_intervals(w, info, n_draws=4000)
    lo4, hi4 = simplex_intervals(w, 4 * info, n_draws=4000)
    np.testing.assert_allclose((hi4 - lo4) / (hi1 - lo1), 0.5, rtol=0.02)
    point = w / w.sum()
    assert np.all((lo4 <= point) & (point <= hi4))


def test_zero_weight_type_gets_a_one_sided_interval():
    w = np.array([[0.6, 0.4, 0.0]])
    info = np.diag([900.0, 900.0, 900.0])[None]
    lo, hi = simplex_intervals(w, info, n_draws=2000)
    assert lo[0, 2] == 0.0 and 0.02 < hi[0, 2] < 0.1  # half the draws sit at zero; sd 1/30 of weight
    assert lo[0, 0] < 0.6 < hi[0, 0]


def test_observed_information_is_the_hessian_of_the_likelihood_at_the_fit(cache_dir):
    rng = np.random.default_rng(4)
    n_genes, n_types, n_spots = 120, 4, 6
    P = rng.gamma(0.8, 1.0, (n_genes, n_types)) * rng.lognormal(0, 1.0, (n_genes, n_types))
    P /= P.sum(axis=0, keepdims=True)
    props = rng.dirichlet(np.full(n_types, 6.0), n_spots)
    numi = rng.uniform(800, 1500, n_spots)
    y = rng.poisson((props @ P.T) * numi[:, None]).astype(np.float64)
    table = build_tables([0.6], int(y.max()), cache_dir=cache_dir)[0].to_torch("cpu", torch.float64)
    P_t, y_t, u_t = (torch.as_tensor(a, dtype=torch.float64) for a in (P, y, numi))
    w, _ = fit_full(P_t, y_t, u_t, table, SolverSettings())
    assert w.min() > 0.02  # interior fits: the likelihood is smooth around them
    info = observed_information(P_t, y_t, u_t, table, w)
    design = SharedDesign(P_t, y_t, u_t, table)
    idx = torch.arange(n_spots)

    def nll(wv):
        return design.score(torch.as_tensor(wv), idx).numpy()

    h = 1e-4
    fd = np.empty_like(info)
    for i in range(n_types):
        for j in range(n_types):
            ei, ej = np.eye(n_types)[i] * h, np.eye(n_types)[j] * h
            fd[:, i, j] = (nll(w + ei + ej) - nll(w + ei - ej) - nll(w - ei + ej) + nll(w - ei - ej)) / (4 * h * h)
    np.testing.assert_allclose(info, fd, rtol=1e-3, atol=1e-3 * np.abs(info).max())
    # positive definite at the fit: a maximum of the likelihood
    assert np.linalg.eigvalsh(info).min() > 0


def test_flash_bootstrap_covers_the_truth():
    for umi in (100, 800):
        s, r = _slide(umi)
        run = api.run_deconvolution(s, r, "flash", params={"n_bootstrap": 30}, device="cpu", uncertainty=True)
        coverage, width, inside, _ = _interval_stats(run.adata, "flash")
        assert inside
        assert 0.8 <= coverage <= 0.99, (umi, coverage)
        assert width < 0.2, (umi, width)
        assert run.result.params["n_bootstrap"] == 30


def test_flash_bootstrap_is_reproducible():
    s, r = _slide(200)
    a, b = (
        api.run_deconvolution(s, r, "flash", params={"n_bootstrap": 5}, device="cpu", uncertainty=True).adata
        for _ in range(2)
    )
    slot = keys.proportions_upper("flash")
    np.testing.assert_array_equal(a.obsm[slot].to_numpy(), b.obsm[slot].to_numpy())


def test_cli_writes_interval_slots(small_pair_files, tmp_path, capsys):
    s, r = small_pair_files
    out = tmp_path / "flash.h5ad"
    code = main(["run", str(s), str(r), "--method", "flash", "--uncertainty", "--n-bootstrap", "10", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    res = ad.read_h5ad(out)
    point = res.obsm[keys.proportions("flash")]
    lower, upper = res.obsm[keys.proportions_lower("flash")], res.obsm[keys.proportions_upper("flash")]
    for table in (lower, upper):
        assert list(table.index) == list(point.index) == list(res.obs_names)
        assert list(table.columns) == list(point.columns)
    assert ((lower.to_numpy() <= point.to_numpy()) & (point.to_numpy() <= upper.to_numpy())).all()
    assert np.nanmean(upper.to_numpy() - lower.to_numpy()) < 0.3


def test_cli_without_uncertainty_writes_no_interval(small_pair_files, tmp_path):
    s, r = small_pair_files
    out = tmp_path / "flash.h5ad"
    assert main(["run", str(s), str(r), "--method", "flash", "-q", "-o", str(out)]) == 0
    assert keys.proportions_lower("flash") not in ad.read_h5ad(out).obsm


@pytest.mark.parametrize(
    "method, extra, message",
    [
        ("destvi", ["--seeds", "0"], "seeds must be a positive integer"),
        ("rctd", ["--mode", "multi"], "not multi"),
        ("flash", ["--gene-weighting", "countsketch"], "gene_weighting 'expected'"),
    ],
)
def test_uncertainty_without_an_interval_is_a_clear_error(small_pair_files, tmp_path, capsys, method, extra, message):
    s, r = small_pair_files
    out = tmp_path / "x.h5ad"
    code = main(["run", str(s), str(r), "--method", method, "--uncertainty", "-q", "-o", str(out), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert not out.exists()


def test_rctd_doublet_intervals_on_mostly_pure_spots(cache_dir):
    s, r = simulate_dataset(n_spots=150, n_genes=300, n_types=5, umi_per_cell=200, domain_sharpness=6.0, seed=2)
    params = {"mode": "doublet", "cache_dir": cache_dir, "n_fit": 100}
    adata = api.run_deconvolution(s, r, "rctd", params=params, device="cpu", uncertainty=True).adata
    point = adata.obsm[keys.proportions("rctd")].to_numpy()
    lower = adata.obsm[keys.proportions_lower("rctd")].to_numpy()
    upper = adata.obsm[keys.proportions_upper("rctd")].to_numpy()
    truth = adata.obsm[keys.TRUE_UMI_FRACTIONS].to_numpy()
    fitted = ~np.isnan(point).any(axis=1)
    assert ((point >= lower) & (point <= upper))[fitted].all()
    # types outside the chosen pair are [0, 0], as their proportions are
    assert (upper[fitted][point[fitted] == 0] <= 0.5).all()
    assert (((point == 0) & (upper > 0)).sum(axis=1) <= 1)[fitted].all()  # only a singlet's second type
    singlet = (adata.obs[keys.spot_class("rctd")] == "singlet").to_numpy()
    assert singlet.sum() > 30
    assert np.allclose(upper[singlet].max(axis=1), 1.0)  # a singlet's first type reaches 1
    covered = (truth >= lower - 1e-12) & (truth <= upper + 1e-12)
    assert 0.85 <= covered[fitted].mean() <= 0.99, covered[fitted].mean()
