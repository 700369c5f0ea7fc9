"""Per-spot intervals of the trained models (`run --uncertainty` for cell2location and DestVI): hand-derived
quantiles of the guide's draws, the whole-cell rule, coverage of simulated truth, widths against depth, the point
estimate inside, DestVI's seed ensemble, and the refusals."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from scipy.stats import norm

from spatial_deconv_gui import api, keys
from spatial_deconv_gui.cli import main
from spatial_deconv_gui.engines.c2l.intervals import posterior_intervals
from spatial_deconv_gui.engines.c2l.model import SpatialModel, SpatialPriors
from spatial_deconv_gui.engines.destvi.intervals import draw_intervals
from spatial_deconv_gui.io.errors import InputError
from spatial_deconv_gui.simulate import simulate_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _stats(adata, key, truth_slot=keys.TRUE_UMI_FRACTIONS):
    point = adata.obsm[keys.proportions(key)].to_numpy()
    lower = adata.obsm[keys.proportions_lower(key)].to_numpy()
    upper = adata.obsm[keys.proportions_upper(key)].to_numpy()
    truth = adata.obsm[truth_slot].to_numpy()
    covered = (truth >= lower - 1e-12) & (truth <= upper + 1e-12)
    inside = ((point >= lower - 1e-12) & (point <= upper + 1e-12)).all()
    return covered.mean(), (upper - lower).mean(), inside


def _slide(umi_per_cell):
    return simulate_dataset(n_spots=120, n_genes=240, n_types=4, umi_per_cell=umi_per_cell, seed=1)


# ---------------------------------------------------------------------------------------------------
# cell2location
# ---------------------------------------------------------------------------------------------------


def _guide_model(loc: np.ndarray, scale: np.ndarray) -> SpatialModel:
    model = SpatialModel(np.ones((loc.shape[1], 5)), loc.shape[0], SpatialPriors(), dtype=torch.float64)
    site = model.guide.sites["w_sf"]
    with torch.no_grad():
        model.guide.loc[site.start : site.start + site.size] = torch.as_tensor(loc.ravel())
        raw = torch.log(torch.expm1(torch.as_tensor(scale.ravel())))  # softplus⁻¹
        model.guide.raw_scale[site.start : site.start + site.size] = raw
    return model


def test_c2l_interval_is_the_quantile_of_the_guide_draws():
    """Two types: the first's proportion is sigmoid(u1 - u2), u1 - u2 ~ N(log 2, 0.3² + 0.4²), so its 90 % interval
    is sigmoid(log 2 ± 1.645 x 0.5), the second's the mirror image."""
    model = _guide_model(np.log([[4.0, 2.0]]), np.array([[0.3, 0.4]]))
    point = np.array([[2 / 3, 1 / 3]])
    lower, upper, widened = posterior_intervals(model, point, n_samples=40_000, seed=1, min_cells=0.0)
    z = norm.ppf(0.95) * 0.5
    expect_lo, expect_hi = 1 / (1 + np.exp(-(np.log(2) - z))), 1 / (1 + np.exp(-(np.log(2) + z)))
    np.testing.assert_allclose([lower[0, 0], upper[0, 0]], [expect_lo, expect_hi], atol=0.004)
    np.testing.assert_allclose([lower[0, 1], upper[0, 1]], [1 - expect_hi, 1 - expect_lo], atol=0.004)
    assert widened == 0
    again = posterior_intervals(model, point, n_samples=40_000, seed=1, min_cells=0.0)
    np.testing.assert_array_equal(lower, again[0])  # seeded


def test_c2l_type_below_half_a_cell_reaches_zero():
    """A type at ~0.3 cells (every draw below half a cell) is absent in every draw: its interval is [0, point] and
    the other type's [point, 1]; with the rule off both stay strictly inside (0, 1)."""
    model = _guide_model(np.log([[5.0, 0.3]]), np.array([[0.1, 0.1]]))
    point = np.array([[5.0 / 5.3, 0.3 / 5.3]])
    lower, upper, widened = posterior_intervals(model, point, n_samples=500, seed=0, min_cells=0.5)
    np.testing.assert_allclose(lower[0], [point[0, 0], 0.0], atol=1e-12)
    np.testing.assert_allclose(upper[0], [1.0, point[0, 1]], atol=1e-12)
    assert widened == 2  # both quantiles (1 and 0) sit at the corner; widened to the point estimate
    lower0, upper0, _ = posterior_intervals(model, point, n_samples=500, seed=0, min_cells=0.0)
    assert lower0[0, 1] > 0.03 and upper0[0, 0] < 0.97


@pytest.fixture(scope="module")
def c2l_runs():
    out = {}
    for umi in (100, 800):
        s, r = _slide(umi)
        params = {"n_cells_per_location": 6.0, "reference_epochs": 200}
        out[umi] = api.run_deconvolution(s, r, "c2l", params=params, device="cpu", uncertainty=True)
    return out


def test_c2l_intervals_cover_the_truth_and_narrow_with_depth(c2l_runs):
    widths = {}
    for umi, run in c2l_runs.items():
        coverage, widths[umi], inside = _stats(run.adata, "c2l")
        assert inside
        # measured 0.98 / 0.99 (UMI-fraction truth), mean widths 0.12 / 0.07
        assert 0.8 <= coverage <= 1.0 and widths[umi] < 0.2, (umi, coverage, widths[umi])
        assert run.result.stop["reason"] in ("converged", "cap")
        lower = run.adata.obsm[keys.proportions_lower("c2l")]
        assert list(lower.columns) == list(run.adata.obsm[keys.proportions("c2l")].columns)
        assert (lower.index == run.adata.obs_names).all()
    assert widths[800] < 0.7 * widths[100], widths


# ---------------------------------------------------------------------------------------------------
# DestVI
# ---------------------------------------------------------------------------------------------------

DESTVI = {"sc_epochs": 100, "convergence_window": 100, "interval_samples": 60}


@pytest.fixture(scope="module")
def destvi_runs():
    out = {}
    for umi in (100, 800):
        s, r = _slide(umi)
        out[umi] = api.run_deconvolution(s, r, "destvi", params=dict(DESTVI), device="cpu", uncertainty=True)
    s, r = _slide(800)
    out["ensemble"] = api.run_deconvolution(
        s, r, "destvi", params={**DESTVI, "seeds": 2}, device="cpu", uncertainty=True
    )
    return out


def test_destvi_intervals_cover_the_truth_and_hold_the_point_estimate(destvi_runs):
    widths = {}
    for umi in (100, 800):
        run = destvi_runs[umi]
        coverage, widths[umi], inside = _stats(run.adata, "destvi")
        assert inside
        # measured 0.99 / 1.00 on this 4-type slide; the benchmark's harder slides are lower (RESULTS.md)
        assert 0.75 <= coverage <= 1.0 and widths[umi] < 0.25, (umi, coverage, widths[umi])
    # Not asserted: narrower at depth. The predictive draws go through the encoder DestVI was trained to, and
    # where training stops moves with the thread count: one run gave widths 0.025 -> 0.017, a clean-clone CI run
    # 0.044 -> 0.044 (cell2location's test keeps the depth check).


def test_destvi_seed_ensemble_holds_the_spread_across_seeds(destvi_runs):
    run = destvi_runs["ensemble"]
    training = run.adata.uns["destvi_training"]
    members = np.asarray(training["ensemble_proportions"])
    assert members.shape[0] == 2 and list(training["ensemble_seeds"]) == [0, 1]
    point = run.adata.obsm[keys.proportions("destvi")].to_numpy()
    lower = run.adata.obsm[keys.proportions_lower("destvi")].to_numpy()
    upper = run.adata.obsm[keys.proportions_upper("destvi")].to_numpy()
    np.testing.assert_allclose(point, members.mean(axis=0))
    assert (lower <= members.min(axis=0)).all() and (upper >= members.max(axis=0)).all()
    # member 0 is the single-seed run (seed 0, same slide): trained identically
    single = destvi_runs[800].adata.obsm[keys.proportions("destvi")].to_numpy()
    np.testing.assert_allclose(members[0], single, atol=1e-6)
    assert (members[0] != members[1]).any()
    # the ensemble's interval is at least as wide as one seed's on average: it adds the spread across seeds
    single_width = (
        destvi_runs[800].adata.obsm[keys.proportions_upper("destvi")].to_numpy()
        - destvi_runs[800].adata.obsm[keys.proportions_lower("destvi")].to_numpy()
    ).mean()
    assert (upper - lower).mean() >= single_width
    assert run.result.params["seeds"] == 2 and run.result.params["seeds_run"] == 2


def test_destvi_draw_intervals_count_tiny_shares_as_absent():
    draws = np.zeros((100, 1, 3))
    draws[:, 0, 0] = np.linspace(0.6, 0.8, 100)
    draws[:, 0, 1] = 1 - draws[:, 0, 0] - 0.005
    draws[:, 0, 2] = 0.005  # below 1 % in every draw: absent
    lower, upper = draw_intervals(draws, [np.array([[0.7, 0.295, 0.005]])], min_share=0.01)
    assert lower[0, 2] == 0.0 and upper[0, 2] == 0.005  # widened to the point estimate only
    # renormalised without the absent type: the first type's share is x / (1 - 0.005)
    np.testing.assert_allclose(upper[0, 0], np.quantile(draws[:, 0, 0] / 0.995, 0.95))
    lower0, _ = draw_intervals(draws, [np.array([[0.7, 0.295, 0.005]])], min_share=0.0)
    assert lower0[0, 2] == 0.005


# ---------------------------------------------------------------------------------------------------
# refusals and the CLI
# ---------------------------------------------------------------------------------------------------


def test_both_models_give_intervals():
    assert {"c2l", "destvi"} <= set(api.methods_with_intervals())


@pytest.mark.parametrize("seeds", ["0", "-2"])
def test_destvi_seeds_below_one_is_a_clear_error(small_pair_files, tmp_path, capsys, seeds):
    s, r = small_pair_files
    out = tmp_path / "x.h5ad"
    code = main(["run", str(s), str(r), "--method", "destvi", "--uncertainty", "--seeds", seeds, "-q", "-o", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"seeds must be a positive integer (the number of models trained), got {seeds}" in err
    assert not out.exists()


def test_a_method_without_intervals_is_refused_by_name():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class NoIntervals:
        seed: int = 0

    with pytest.raises(InputError, match="nointervals gives no per-spot interval yet") as err:
        api.check_intervals("nointervals", NoIntervals)
    assert "c2l" in str(err.value) and "destvi" in str(err.value)


def test_cli_writes_c2l_interval_slots(small_pair_files, tmp_path, capsys):
    s, r = small_pair_files
    out = tmp_path / "c2l.h5ad"
    flags = ["--max-epochs", "300", "--reference-epochs", "30", "--interval-samples", "50"]
    code = main(["run", str(s), str(r), "--method", "c2l", "--uncertainty", *flags, "-q", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    res = ad.read_h5ad(out)
    point = res.obsm[keys.proportions("c2l")]
    lower, upper = res.obsm[keys.proportions_lower("c2l")], res.obsm[keys.proportions_upper("c2l")]
    for table in (lower, upper):
        assert list(table.index) == list(res.obs_names) and list(table.columns) == list(point.columns)
    assert ((lower.to_numpy() <= point.to_numpy()) & (point.to_numpy() <= upper.to_numpy())).all()
    assert res.uns[keys.run_info("c2l")]["parameters"]["interval_samples"] == 50
