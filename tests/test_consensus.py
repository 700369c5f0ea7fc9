"""A consensus of several results (`spatial-deconv consensus`, `api.consensus`): the combination and the agreement
by hand, agreement tracking the consensus error on a simulated slide (RCTD + FlashDeconv), and bad inputs."""

from __future__ import annotations

import hashlib

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
    assert main(["consensus", str(a), str(b), "-o", str(out), "--align-types", "-q"]) == 0
    res = ad.read_h5ad(out)
    cons = res.obsm[keys.proportions(keys.CONSENSUS)]
    assert list(cons.columns) == ["A", "B", "C"]
    pa, pb = (ad.read_h5ad(p).obsm[f"{k}_proportions"][["A", "B", "C"]] for p, k in ((a, "rctd"), (b, "flash")))
    pa, pb = (p.div(p.sum(axis=1), axis=0).to_numpy() for p in (pa, pb))  # each renormalised over A, B, C
    np.testing.assert_allclose(cons.to_numpy(), (pa + pb) / 2)  # no intervals: equal weights
    assert list(res.uns[keys.run_info(keys.CONSENSUS)]["parameters"]["dropped_types"]) == ["D", "E"]


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
