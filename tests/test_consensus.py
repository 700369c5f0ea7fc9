"""A consensus of several results (`spatial-deconv consensus`, `api.consensus`): the combination and the agreement
by hand, agreement tracking the consensus error on a simulated slide (RCTD + FlashDeconv), and bad inputs."""

from __future__ import annotations

import hashlib
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from spatial_deconv_gui import api, keys
from spatial_deconv_gui.cli import main
from spatial_deconv_gui.engines import consensus as engine
from spatial_deconv_gui.engines.base import DeconvResult
from spatial_deconv_gui.io import attach_result
from spatial_deconv_gui.simulate import simulate_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the numerics by hand ------------------------------------------------------------------------------------
def test_inverse_variance_weights_by_hand():
    p1, p2 = np.array([[0.6, 0.4]]), np.array([[0.2, 0.8]])
    lo1, hi1 = p1 - 0.05, p1 + 0.05  # width 0.1 -> weight 100
    lo2, hi2 = p2 - 0.1, p2 + 0.1  # width 0.2 -> weight 25
    out, used = engine.combine([p1, p2], [lo1, lo2], [hi1, hi2])
    assert used == "intervals"
    np.testing.assert_allclose(out, [[65 / 125, 60 / 125]])
    out, used = engine.combine([p1, p2], [lo1, None], [hi1, None])  # one result without an interval: equal
    assert used == "equal"
    np.testing.assert_allclose(out, [[0.4, 0.6]])
    # a [0, 0] interval counts as MIN_WIDTH wide, not as certainty
    w = engine.weights_from_intervals(np.array([0.0, 0.3]), np.array([0.0, 0.5]))
    np.testing.assert_allclose(w, [1 / engine.MIN_WIDTH**2, 25.0])


def test_weights_differ_by_type_and_rows_are_renormalised():
    p1, p2 = np.array([[0.5, 0.5]]), np.array([[0.1, 0.9]])
    lo1, hi1 = np.array([[0.45, 0.0]]), np.array([[0.55, 1.0]])  # sure of type 0 (w 100), unsure of type 1 (w 1)
    lo2, hi2 = np.array([[0.0, 0.85]]), np.array([[1.0, 0.95]])  # unsure of type 0 (w 1), sure of type 1 (w 100)
    out, _ = engine.combine([p1, p2], [lo1, lo2], [hi1, hi2])
    raw = np.array([(0.5 * 100 + 0.1) / 101, (0.5 + 0.9 * 100) / 101])
    np.testing.assert_allclose(out[0], raw / raw.sum())
    assert out.sum() == pytest.approx(1.0)


def test_consensus_interval_by_hand():
    # spot 0: the methods agree within their intervals (widths 0.1 and 0.2: σ = width / 3.29, weights 4 : 1);
    # spot 1: they contradict each other (0.2 vs 0.8, each ±0.05), so the spread widens the interval
    p1, p2 = np.array([[0.6, 0.4], [0.2, 0.8]]), np.array([[0.58, 0.42], [0.8, 0.2]])
    lo1, hi1 = p1 - 0.05, p1 + 0.05
    lo2 = np.array([[0.48, 0.32], [0.75, 0.15]])
    hi2 = np.array([[0.68, 0.52], [0.85, 0.25]])
    point, _ = engine.combine([p1, p2], [lo1, lo2], [hi1, hi2])
    np.testing.assert_allclose(point, [[0.596, 0.404], [0.5, 0.5]])  # (4 x 0.6 + 0.58) / 5; rows sum to 1 already
    lo, hi = engine.combined_interval([p1, p2], [lo1, lo2], [hi1, hi2])
    # spot 0: σ = (Σ 1/σ_m²)^-½ = (0.2 / 3.29) / √5, so ±1.645 σ = ±0.1 / √5; χ² = 0.087 < 1: not widened
    np.testing.assert_allclose(lo[0], [0.596 - 0.1 / np.sqrt(5), 0.404 - 0.1 / np.sqrt(5)])
    np.testing.assert_allclose(hi[0], [0.596 + 0.1 / np.sqrt(5), 0.404 + 0.1 / np.sqrt(5)])
    # spot 1: equal weights w, σ = (2w)^-½, Birge ratio √χ² = √(2 w 0.3²): σ × ratio = 0.3 (half their distance)
    np.testing.assert_allclose(lo[1], [0.5 - 1.6448536 * 0.3] * 2, atol=1e-7)
    np.testing.assert_allclose(hi[1], [0.5 + 1.6448536 * 0.3] * 2, atol=1e-7)
    # without the spread, spot 1's interval would be narrower than either input's (±0.05 / √2)
    lo_n, hi_n = engine.combined_interval([p1, p2], [lo1, lo2], [hi1, hi2], spread=False)
    np.testing.assert_allclose(hi_n[1] - lo_n[1], [0.1 / np.sqrt(2)] * 2)
    np.testing.assert_allclose(lo_n[0], lo[0])


def test_consensus_interval_is_clipped_holds_the_point_and_skips_unfitted_spots():
    p1 = np.array([[0.01, 0.99], [np.nan, np.nan], [np.nan, np.nan]])
    p2 = np.array([[0.03, 0.97], [0.4, 0.6], [np.nan, np.nan]])
    lo1, hi1 = np.clip(p1 - 0.1, 0, 1), np.clip(p1 + 0.1, 0, 1)
    lo2, hi2 = np.clip(p2 - 0.1, 0, 1), np.clip(p2 + 0.1, 0, 1)
    out = engine.consensus([p1, p2], ["x", "y"], [lo1, lo2], [hi1, hi2])
    assert out.weighting == "intervals"
    assert out.lower[0, 0] == 0.0 and out.upper[0, 1] == 1.0  # clipped to [0, 1]
    assert (out.lower[:2] <= out.proportions[:2]).all() and (out.proportions[:2] <= out.upper[:2]).all()
    # spot 1: only the second method fitted it: its own interval (the rows need no renormalising)
    np.testing.assert_allclose(out.lower[1], lo2[1])
    np.testing.assert_allclose(out.upper[1], hi2[1])
    assert np.isnan(out.lower[2]).all() and np.isnan(out.upper[2]).all()
    # equal weights (asked for, or an input without an interval): no interval
    assert engine.consensus([p1, p2], ["x", "y"], [lo1, lo2], [hi1, hi2], weighting="equal").lower is None
    assert engine.consensus([p1, p2], ["x", "y"], [lo1, None], [hi1, None]).upper is None


def test_agreement_is_one_minus_mean_pairwise_total_variation():
    a = np.array([[1.0, 0.0], [0.5, 0.5], [np.nan, np.nan]])
    b = np.array([[0.0, 1.0], [0.5, 0.5], [0.3, 0.7]])
    c = np.array([[0.5, 0.5], [0.7, 0.3], [np.nan, np.nan]])
    agree = engine.spot_agreement([a, b, c])
    # spot 0: TV(a,b) = 1, TV(a,c) = 0.5, TV(b,c) = 0.5; spot 1: 0, 0.2, 0.2; spot 2: one method only
    np.testing.assert_allclose(agree[:2], [1 - 2 / 3, 1 - 0.4 / 3])
    assert np.isnan(agree[2])
    table = engine.type_agreement([a, b, c], ["x", "y"], engine.combine([a, b, c])[0])
    # spots 0 and 1 (all fitted): |a-b| = (1, 0), |a-c| = (0.5, 0.2), |b-c| = (0.5, 0.2) for type x
    assert table.loc["x", "mean_abs_difference"] == pytest.approx(np.mean([0.5, 0.35, 0.35]))
    assert table.loc["x", "agreement"] == pytest.approx(1 - np.mean([0.5, 0.35, 0.35]))


def test_unfitted_spots_have_no_say():
    a = np.array([[0.2, 0.8], [np.nan, np.nan]])
    b = np.array([[0.6, 0.4], [0.3, 0.7]])
    out, _ = engine.combine([a, b])
    np.testing.assert_allclose(out, [[0.4, 0.6], [0.3, 0.7]])
    out, _ = engine.combine([a, np.full_like(b, np.nan)])
    assert np.isnan(out[1]).all()


# -- agreement tracks the error (simulated truth, RCTD + FlashDeconv) ------------------------------------------
@pytest.fixture(scope="module")
def two_methods(tmp_path_factory):
    slide, reference = simulate_dataset(n_spots=200, n_genes=300, n_types=5, umi_per_cell=100, seed=1)
    cache = str(tmp_path_factory.mktemp("rctd_tables"))
    rctd = api.run_deconvolution(
        slide, reference, "rctd", params={"mode": "full", "n_fit": 100, "cache_dir": cache}, uncertainty=True
    )
    flash = api.run_deconvolution(slide, reference, "flash", params={"n_bootstrap": 20}, uncertainty=True)
    return slide, rctd.adata, flash.adata


def test_agreement_falls_as_the_consensus_error_rises(two_methods):
    slide, rctd, flash = two_methods
    run = api.consensus([rctd, flash])
    assert run.result.mode == "intervals"
    truth = slide.obsm[keys.TRUE_UMI_FRACTIONS].to_numpy()
    cons = run.adata.obsm[keys.proportions(keys.CONSENSUS)].to_numpy()
    agreement = run.adata.obs[keys.CONSENSUS_AGREEMENT].to_numpy()
    error = engine.total_variation(cons, truth)
    ok = np.isfinite(agreement) & np.isfinite(error)
    assert ok.sum() >= 190
    rho = spearmanr(agreement[ok], error[ok]).statistic
    assert rho < -0.3, rho
    # the fifth of spots the methods agree least on is wrong much more often than the fifth they agree most on
    low, high = np.quantile(agreement[ok], [0.2, 0.8])
    assert error[ok][agreement[ok] <= low].mean() > 2 * error[ok][agreement[ok] >= high].mean()
    # the interval-weighted consensus is at least as good as the better method
    errors = {
        k: np.nanmean(engine.total_variation(a.obsm[keys.proportions(k)].to_numpy(), truth))
        for k, a in (("rctd", rctd), ("flash", flash))
    }
    assert np.nanmean(error) <= min(errors.values()), (np.nanmean(error), errors)
    assert np.allclose(np.nansum(cons, axis=1)[ok], 1.0)
    assert ((0 <= agreement[ok]) & (agreement[ok] <= 1)).all()


def test_consensus_file_carries_every_slot(two_methods, tmp_path):
    _, rctd, flash = two_methods
    a, b, out = tmp_path / "a.h5ad", tmp_path / "b.h5ad", tmp_path / "c.h5ad"
    rctd.write_h5ad(a)
    flash.write_h5ad(b)
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    assert main(["consensus", str(a), str(b), "--output", str(out), "-q"]) == 0
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)] == digests  # inputs untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad", "b.h5ad", "c.h5ad"]  # no temporaries left
    res = ad.read_h5ad(out)
    cons = res.obsm[keys.proportions(keys.CONSENSUS)]
    assert list(cons.index) == list(res.obs_names) and list(cons.columns) == list(rctd.obsm["rctd_proportions"].columns)
    direct = api.consensus([rctd, flash])
    np.testing.assert_allclose(cons.to_numpy(), direct.adata.obsm[keys.proportions(keys.CONSENSUS)].to_numpy())
    np.testing.assert_allclose(
        res.obs[keys.CONSENSUS_AGREEMENT].to_numpy(), direct.adata.obs[keys.CONSENSUS_AGREEMENT].to_numpy()
    )
    table = res.uns[keys.CONSENSUS_TYPE_AGREEMENT]
    assert list(table.index) == list(cons.columns)
    assert ((table["agreement"] > 0) & (table["agreement"] <= 1)).all()
    assert res.uns[keys.run_info(keys.CONSENSUS)]["parameters"]["weighting"] == "intervals"
    for slot in ("flash_proportions", "flash_proportions_q05", "rctd_proportions_q95"):  # both methods beside it
        assert slot in res.obsm
    # the consensus's own interval, from the engine, point inside
    lo, hi = engine.combined_interval(
        [a.obsm[f"{k}_proportions"].to_numpy() for a, k in ((rctd, "rctd"), (flash, "flash"))],
        [
            np.clip(rctd.obsm["rctd_proportions_q05"].to_numpy(), 0, 1),
            np.clip(flash.obsm["flash_proportions_q05"].to_numpy(), 0, 1),
        ],
        [
            np.clip(rctd.obsm["rctd_proportions_q95"].to_numpy(), 0, 1),
            np.clip(flash.obsm["flash_proportions_q95"].to_numpy(), 0, 1),
        ],
    )
    lower, upper = res.obsm[keys.proportions_lower(keys.CONSENSUS)], res.obsm[keys.proportions_upper(keys.CONSENSUS)]
    assert list(lower.columns) == list(cons.columns) and list(upper.index) == list(res.obs_names)
    np.testing.assert_allclose(lower.to_numpy(), lo)
    np.testing.assert_allclose(upper.to_numpy(), hi)
    fitted = ~np.isnan(cons.to_numpy()).any(axis=1)
    assert ((lower.to_numpy() <= cons.to_numpy()) & (cons.to_numpy() <= upper.to_numpy()))[fitted].all()
    assert res.uns[keys.run_info(keys.CONSENSUS)]["parameters"]["interval"] == api.CONSENSUS_INTERVAL
    saved = {r.result.key for r in api.saved_results(out)}
    assert saved == {"rctd", "flash", keys.CONSENSUS}


# -- bad inputs -----------------------------------------------------------------------------------------------
def _result_file(path, slide, types, key, seed, rename=None):
    rng = np.random.default_rng(seed)
    props = rng.dirichlet(np.ones(len(types)), size=slide.n_obs)
    res = DeconvResult(key, key, None, list(types), props, {}, "cpu", 0.0)
    adata = attach_result(slide, res)
    if rename:
        adata = adata[:, :].copy()
        adata.obs_names = [rename.get(n, n) for n in adata.obs_names]
    adata.write_h5ad(path)
    return path


@pytest.fixture
def slide():
    s, _ = simulate_dataset(n_spots=40, n_genes=30, n_types=4, seed=5)
    return s


TYPES = ["A", "B", "C", "D"]


def test_results_of_different_slides_are_refused_with_the_spots(slide, tmp_path, capsys):
    a = _result_file(tmp_path / "a.h5ad", slide, TYPES, "rctd", 0)
    b = _result_file(tmp_path / "b.h5ad", slide[:35].copy(), TYPES, "flash", 1, rename={"spot000000": "other1"})
    out = tmp_path / "c.h5ad"
    assert main(["consensus", str(a), str(b), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not of the same slide" in err
    assert "b.h5ad (flash) (35 spots) vs a.h5ad (rctd) (40 spots)" in err
    assert "6 of a.h5ad (rctd)'s spots missing (e.g. spot000000, spot000035" in err
    assert "1 spots not in a.h5ad (rctd) (e.g. other1)" in err
    assert not out.exists()


def test_different_cell_types_are_listed_and_aligned_on_request(slide, tmp_path, capsys):
    a = _result_file(tmp_path / "a.h5ad", slide, TYPES, "rctd", 0)
    b = _result_file(tmp_path / "b.h5ad", slide, ["A", "B", "C", "E"], "flash", 1)
    out = tmp_path / "c.h5ad"
    assert main(["consensus", str(a), str(b), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "different cell types" in err and "a.h5ad (rctd): D; b.h5ad (flash): E" in err
    assert "Shared by all (3): A, B, C" in err and "--align-types" in err
    assert not out.exists()
    assert main(["consensus", str(a), str(b), "-o", str(out), "--align-types", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["weighting"] == "equal" and summary["interval"] is False
    res = ad.read_h5ad(out)
    cons = res.obsm[keys.proportions(keys.CONSENSUS)]
    assert list(cons.columns) == ["A", "B", "C"]
    pa, pb = (ad.read_h5ad(p).obsm[f"{k}_proportions"][["A", "B", "C"]] for p, k in ((a, "rctd"), (b, "flash")))
    pa, pb = (p.div(p.sum(axis=1), axis=0).to_numpy() for p in (pa, pb))  # each renormalised over A, B, C
    np.testing.assert_allclose(cons.to_numpy(), (pa + pb) / 2)  # no intervals: equal weights
    params = res.uns[keys.run_info(keys.CONSENSUS)]["parameters"]
    assert params["interval"] == "none" and keys.proportions_lower(keys.CONSENSUS) not in res.obsm
    assert params["no_interval_because"] == "rctd, flash carry no interval (run with --uncertainty)"
    assert list(res.uns[keys.run_info(keys.CONSENSUS)]["parameters"]["dropped_types"]) == ["D", "E"]


def test_a_consensus_without_intervals_drops_an_earlier_consensus_interval(slide):
    def with_interval(key, seed):
        props = np.random.default_rng(seed).dirichlet(np.ones(4), size=slide.n_obs)
        bounds = {
            keys.proportions_lower(key): pd.DataFrame(np.clip(props - 0.1, 0, 1), columns=TYPES),
            keys.proportions_upper(key): pd.DataFrame(np.clip(props + 0.1, 0, 1), columns=TYPES),
        }
        return attach_result(slide, DeconvResult(key, key, None, TYPES, props, {}, "cpu", 0.0, obsm=bounds))

    first = api.consensus([with_interval("rctd", 0), with_interval("flash", 1)])
    assert keys.proportions_upper(keys.CONSENSUS) in first.adata.obsm
    plain = attach_result(
        slide, DeconvResult("c2l", "c2l", None, TYPES, np.full((slide.n_obs, 4), 0.25), {}, "cpu", 0.0)
    )
    second = api.consensus([first.adata, plain], key=["rctd", "c2l"])
    assert second.result.mode == "equal"
    assert keys.proportions_lower(keys.CONSENSUS) not in second.adata.obsm
    assert keys.proportions_upper(keys.CONSENSUS) not in second.adata.obsm
    assert (
        "equal weights and no consensus interval: c2l carries no interval (run with --uncertainty)." in second.notices
    )


def test_a_single_result_or_an_unknown_key_is_a_clear_error(slide, tmp_path, capsys):
    a = _result_file(tmp_path / "a.h5ad", slide, TYPES, "rctd", 0)
    out = tmp_path / "c.h5ad"
    assert main(["consensus", str(a), "-o", str(out)]) == 2
    assert "a consensus needs two or more results; got 1" in capsys.readouterr().err
    b = _result_file(tmp_path / "b.h5ad", slide, TYPES, "flash", 1)
    assert main(["consensus", str(a), str(b), "-o", str(out), "--key", "c2l"]) == 2
    assert "a.h5ad has no result with key 'c2l' (it has: rctd)" in capsys.readouterr().err
    assert main(["consensus", str(a), str(b), "-o", str(out), "--weighting", "intervals"]) == 2
    assert "rctd, flash has none" in capsys.readouterr().err
    assert main(["consensus", str(a), str(b), "-o", str(a)]) == 2  # never over an input
    assert not out.exists()


def test_one_file_with_two_results_needs_a_key_per_input(slide, tmp_path, capsys):
    both = attach_result(
        ad.read_h5ad(_result_file(tmp_path / "a.h5ad", slide, TYPES, "rctd", 0)),
        DeconvResult("flash", "flash", None, TYPES, np.full((slide.n_obs, 4), 0.25), {}, "cpu", 0.0),
    )
    both.write_h5ad(tmp_path / "both.h5ad")
    out = tmp_path / "c.h5ad"
    assert main(["consensus", str(tmp_path / "both.h5ad"), str(tmp_path / "both.h5ad"), "-o", str(out)]) == 2
    assert "holds 2 results (flash, rctd)" in capsys.readouterr().err
    argv = ["consensus", str(tmp_path / "both.h5ad"), str(tmp_path / "both.h5ad"), "-o", str(out), "-q"]
    assert main([*argv, "--key", "rctd", "--key", "flash"]) == 0
    res = ad.read_h5ad(out)
    expected = (res.obsm["rctd_proportions"].to_numpy() + 0.25) / 2
    np.testing.assert_allclose(res.obsm[keys.proportions(keys.CONSENSUS)].to_numpy(), expected)
    assert isinstance(res.uns[keys.CONSENSUS_TYPE_AGREEMENT], pd.DataFrame)


def test_the_weighting_reads_as_english(slide, tmp_path, capsys):
    """The status lines said "(intervals weights)": they name the weighting in words, in the CLI and the GUI."""
    assert api.weighting_phrase("intervals") == "weighted by the methods' 90% intervals"
    assert api.weighting_phrase("equal") == "equal weights"
    a = _result_file(tmp_path / "a.h5ad", slide, TYPES, "rctd", 0)
    b = _result_file(tmp_path / "b.h5ad", slide, TYPES, "flash", 1)
    assert main(["consensus", str(a), str(b), "-o", str(tmp_path / "c.h5ad")]) == 0
    err = capsys.readouterr().err
    assert "consensus of rctd, flash (equal weights): median agreement " in err and "weights weights" not in err
