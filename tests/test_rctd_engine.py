"""RCTD end to end: recovery of simulated mixtures, fidelity to R spacexr on its Slide-seq vignette, and the
engine contract (filters, outputs, progress, cancellation, config checks)."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_deconv_gui.engines.base import Cancelled, RunControl
from spatial_deconv_gui.engines.rctd import RCTDConfig, check_config, run_rctd, validate_config
from spatial_deconv_gui.io.inputs import ReferenceInput, SpatialInput

DATA = Path(__file__).parents[1] / ".." / "shared" / "data"


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------
# simulation
# ---------------------------------------------------------------------------------------------------


def _profiles(rng, n_genes, n_types):
    base = rng.gamma(2.0, 1.0, n_genes)
    logfc = rng.normal(0, 0.8, (n_genes, n_types))
    # each type over-expresses its own block of markers, so types are identifiable
    block = n_genes // n_types
    for t in range(n_types):
        logfc[t * block : (t + 1) * block, t] += 2.0
    prof = base[:, None] * np.exp(logfc)
    return prof / prof.sum(axis=0, keepdims=True)


def _nb(rng, mean, dispersion=5.0):
    return rng.poisson(rng.gamma(dispersion, mean / dispersion))


def simulate(proportions, n_genes=240, n_cells=30, seed=0, umi=(400, 1200)):
    """Reference (cells of each type) and slide (spots with the given type proportions), NB counts, plus a
    per-gene platform effect between the two."""
    rng = np.random.default_rng(seed)
    n_spots, n_types = proportions.shape
    prof = _profiles(rng, n_genes, n_types)
    genes = np.array([f"g{i}" for i in range(n_genes)])
    labels = np.repeat([f"type{t}" for t in range(n_types)], n_cells)
    cell_umi = rng.integers(800, 3000, len(labels)).astype(float)
    type_idx = np.repeat(np.arange(n_types), n_cells)
    ref_counts = _nb(rng, cell_umi[:, None] * prof[:, type_idx].T)
    platform = np.exp(rng.normal(0, 0.3, n_genes))
    spot_umi = rng.integers(umi[0], umi[1], n_spots).astype(float)
    mean = spot_umi[:, None] * (proportions @ prof.T) * platform[None, :]
    spot_counts = _nb(rng, mean)
    spatial = SpatialInput(
        sp.csr_matrix(spot_counts),
        genes,
        np.array([f"s{i}" for i in range(n_spots)]),
        rng.uniform(0, 100, (n_spots, 2)),
        spot_counts.sum(axis=1).astype(float),
    )
    reference = ReferenceInput(sp.csr_matrix(ref_counts), genes, labels, ref_counts.sum(axis=1).astype(float))
    return spatial, reference


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rctd_tables"))


@pytest.fixture(scope="module")
def mixtures():
    rng = np.random.default_rng(11)
    n_spots, n_types = 120, 5
    props = np.zeros((n_spots, n_types))
    for i in range(n_spots):
        k = rng.integers(1, 4)
        chosen = rng.choice(n_types, k, replace=False)
        props[i, chosen] = rng.dirichlet(np.full(k, 2.0))
    spatial, reference = simulate(props, seed=1)
    return spatial, reference, props


@pytest.fixture(scope="module")
def full_result(mixtures, cache_dir):
    spatial, reference, _ = mixtures
    return run_rctd(spatial, reference, RCTDConfig(mode="full", cache_dir=cache_dir))


def test_full_mode_recovers_simulated_proportions(mixtures, full_result):
    _, _, truth = mixtures
    res = full_result
    assert res.key == "rctd" and res.mode == "full"
    assert res.cell_types == [f"type{t}" for t in range(5)]
    p = res.proportions
    assert p.shape == truth.shape and not np.isnan(p).any()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    mae = np.abs(p - truth).mean()
    corr = np.median([np.corrcoef(a, b)[0, 1] for a, b in zip(p, truth)])
    assert mae < 0.04, mae
    assert corr > 0.97, corr
    assert (p.argmax(1) == truth.argmax(1)).mean() > 0.9
    # sigma was estimated from the data and reported
    assert 0.1 <= res.params["sigma"] <= 2.0 and len(res.params["sigma_path"]) >= 2
    assert res.obs["rctd_converged"].mean() > 0.9
    w = res.obsm["rctd_weights"]
    assert isinstance(w, pd.DataFrame) and list(w.columns) == res.cell_types
    assert res.uns["rctd_mode"] == "full" and res.uns["rctd_cell_type_names"] == res.cell_types


def test_float32_matches_float64(mixtures, full_result, cache_dir):
    spatial, reference, _ = mixtures
    cfg = RCTDConfig(mode="full", dtype="float32", sigma_override=full_result.params["sigma"], cache_dir=cache_dir)
    r32 = run_rctd(spatial, reference, cfg)
    assert np.abs(r32.proportions - full_result.proportions).max() < 5e-3


def test_doublet_mode_on_simulated_singlets_and_doublets(cache_dir):
    rng = np.random.default_rng(5)
    n_types, n_spots = 5, 100
    props = np.zeros((n_spots, n_types))
    pairs = []
    for i in range(n_spots):
        if i < 50:
            t = i % n_types
            props[i, t] = 1.0
            pairs.append({t})
        else:
            a, b = rng.choice(n_types, 2, replace=False)
            f = rng.uniform(0.35, 0.65)
            props[i, a], props[i, b] = f, 1 - f
            pairs.append({a, b})
    spatial, reference = simulate(props, seed=2, umi=(600, 1500))
    res = run_rctd(spatial, reference, RCTDConfig(mode="doublet", cache_dir=cache_dir))
    names = res.cell_types
    first = np.array([names.index(t) for t in res.obs["rctd_first_type"]])
    second = np.array([names.index(t) for t in res.obs["rctd_second_type"]])
    cls = np.asarray(res.obs["rctd_spot_class"]).astype(str)
    assert set(cls) <= {"singlet", "doublet_certain", "doublet_uncertain", "reject"}
    singlet_ok = np.mean([first[i] in pairs[i] for i in range(50)])
    assert singlet_ok >= 0.95
    assert np.mean(cls[:50] == "singlet") >= 0.85
    doublet_ok = np.mean([{first[i], second[i]} == pairs[i] for i in range(50, 100)])
    assert doublet_ok >= 0.8
    assert np.mean(np.isin(cls[50:], ["doublet_certain", "doublet_uncertain"])) >= 0.8
    wd = res.obsm["rctd_weights_doublet"].to_numpy()
    np.testing.assert_allclose(wd.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(res.proportions.sum(axis=1), 1.0, atol=1e-9)
    # singlets put everything on the first type; doublets split it by the pair weights
    s = np.flatnonzero(cls == "singlet")
    assert np.all(res.proportions[s, first[s]] == 1.0)
    assert np.isfinite(res.obs["rctd_singlet_score"]).all() and np.isfinite(res.obs["rctd_min_score"]).all()


def test_multi_mode_selects_present_types(mixtures, full_result, cache_dir):
    spatial, reference, truth = mixtures
    cfg = RCTDConfig(mode="multi", sigma_override=full_result.params["sigma"], cache_dir=cache_dir)
    res = run_rctd(spatial, reference, cfg)
    idx = res.obsm["rctd_cell_type_indices"]
    sub = res.obsm["rctd_sub_weights"]
    n = res.obs["rctd_n_types"]
    assert idx.shape == (truth.shape[0], 4) and sub.shape == (truth.shape[0], 4)
    assert np.all((n >= 1) & (n <= 4))
    for i in range(truth.shape[0]):
        assert np.all(idx[i, n[i] :] == -1)
        assert sub[i, : n[i]].sum() == pytest.approx(1.0)
    # the dominant true type is among the selected ones
    hit = [truth[i].argmax() in idx[i, : n[i]] for i in range(truth.shape[0])]
    assert np.mean(hit) >= 0.95
    # proportions are the sub-weights expanded to all types
    np.testing.assert_allclose(res.proportions.sum(axis=1), 1.0, atol=1e-9)
    assert np.abs(res.proportions - truth).mean() < 0.05


def test_filtered_spots_are_reported_not_dropped(cache_dir):
    rng = np.random.default_rng(3)
    props = rng.dirichlet(np.ones(4), 60)
    spatial, reference = simulate(props, seed=4)
    n_umi = spatial.n_umi.copy()
    n_umi[[0, 7, 30]] = 50  # below umi_min
    spatial = SpatialInput(spatial.counts, spatial.genes, spatial.barcodes, spatial.coords, n_umi)
    control_events = []
    control = RunControl(callback=control_events.append, max_rate=0)
    res = run_rctd(
        spatial, reference, RCTDConfig(mode="doublet", batch_size=16, sigma_override=0.6, cache_dir=cache_dir), control
    )
    assert res.proportions.shape == (60, 4)
    filt = np.zeros(60, dtype=bool)
    filt[[0, 7, 30]] = True
    assert np.isnan(res.proportions[filt]).all() and not np.isnan(res.proportions[~filt]).any()
    np.testing.assert_array_equal(res.fitted, ~filt)
    for key in ("rctd_spot_class", "rctd_first_type", "rctd_second_type"):
        col = res.obs[key]
        assert isinstance(col, pd.Categorical) and len(col) == 60
        assert (np.asarray(col)[filt] == "filtered").all() and "filtered" not in set(np.asarray(col)[~filt])
    assert np.isnan(res.obsm["rctd_weights"].to_numpy()[filt]).all()
    assert list(res.obsm["rctd_weights"].index) == list(spatial.barcodes)
    assert res.params["n_spots_fitted"] == 57 and res.params["sigma"] == 0.6
    # progress: every stage, and partial results that cover exactly the fitted spots
    stages = [e.stage for e in control_events]
    for st in ("reference", "genes", "platform effect", "sigma", "pixels"):
        assert st in stages
    partial = [e.partial for e in control_events if e.partial is not None]
    assert len(partial) == 4  # 57 spots in batches of 16
    covered = np.concatenate([p.spot_index for p in partial])
    np.testing.assert_array_equal(np.sort(covered), np.flatnonzero(~filt))


def test_cancel_between_batches(cache_dir):
    props = np.random.default_rng(0).dirichlet(np.ones(3), 40)
    spatial, reference = simulate(props, seed=6)
    ev = threading.Event()

    def cb(event):
        if event.partial is not None:
            ev.set()  # cancel after the first batch

    with pytest.raises(Cancelled):
        run_rctd(
            spatial,
            reference,
            RCTDConfig(mode="full", batch_size=10, sigma_override=0.5, cache_dir=cache_dir),
            RunControl(callback=cb, cancel_event=ev),
        )


def test_rare_types_dropped_or_refused(cache_dir):
    props = np.random.default_rng(1).dirichlet(np.ones(4), 30)
    spatial, reference = simulate(props, seed=7)
    keep = np.ones(len(reference.cell_types), dtype=bool)
    keep[np.flatnonzero(reference.cell_types == "type3")[10:]] = False  # type3 keeps 10 cells
    small = ReferenceInput(reference.counts[keep], reference.genes, reference.cell_types[keep], reference.n_umi[keep])
    with pytest.raises(ValueError, match=r"type3 \(10\)"):
        run_rctd(spatial, small, RCTDConfig(mode="full", strict=True, sigma_override=0.5, cache_dir=cache_dir))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = run_rctd(spatial, small, RCTDConfig(mode="full", sigma_override=0.5, cache_dir=cache_dir))
    assert any("type3" in str(x.message) for x in w)
    assert res.cell_types == ["type0", "type1", "type2"]
    assert res.params["dropped_cell_types"] == {"type3": 10}


def test_too_few_shared_genes_is_a_clear_error(cache_dir):
    props = np.random.default_rng(1).dirichlet(np.ones(3), 20)
    spatial, reference = simulate(props, seed=8)
    renamed = ReferenceInput(
        reference.counts,
        np.array([f"G{i}" for i in range(len(reference.genes))]),
        reference.cell_types,
        reference.n_umi,
    )
    with pytest.raises(ValueError, match="share no"):
        run_rctd(spatial, renamed, RCTDConfig(mode="full", sigma_override=0.5, cache_dir=cache_dir))
    genes = reference.genes.copy()
    genes[20:] = [f"X{i}" for i in range(len(genes) - 20)]
    partial = ReferenceInput(reference.counts, genes, reference.cell_types, reference.n_umi)
    with pytest.raises(ValueError, match=r"only \d+ genes are shared"):
        run_rctd(spatial, partial, RCTDConfig(mode="full", sigma_override=0.5, cache_dir=cache_dir))


def test_config_validation():
    assert validate_config(RCTDConfig()) == []
    bad = RCTDConfig(mode="quad", dtype="float16", umi_min=10, umi_max=5, n_fit=0, sigma_override=80)
    problems = validate_config(bad)
    assert len(problems) == 5
    with pytest.raises(ValueError, match="mode"):
        check_config(bad)
    d = RCTDConfig(class_df={"a": "b"}).to_dict()
    assert d["class_df"] == {"a": "b"} and d["mode"] == "doublet"


# ---------------------------------------------------------------------------------------------------
# fidelity to R spacexr on its Slide-seq cerebellum vignette
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cerebellum():
    spatial_path = DATA / "spacexr_slideseq_cerebellum_spatial.h5ad"
    ref_path = DATA / "spacexr_slideseq_cerebellum_reference.h5ad"
    if not (spatial_path.exists() and ref_path.exists()):
        pytest.skip(f"shared data not found under {DATA}")
    anndata = pytest.importorskip("anndata")
    s = anndata.read_h5ad(spatial_path)
    r = anndata.read_h5ad(ref_path)
    spatial = SpatialInput(
        sp.csr_matrix(s.X),
        np.asarray(s.var_names),
        np.asarray(s.obs_names),
        np.asarray(s.obsm["spatial"]),
        s.obs["nUMI"].to_numpy().astype(float),
    )
    # The R results shipped with the puck were computed with the reference's nUMI = column sums of its
    # counts (they match ours to 1e-10 that way; with the metadata nUMI they do not): build it the same way.
    ref_counts = sp.csr_matrix(r.X)
    reference = ReferenceInput(
        ref_counts,
        np.asarray(r.var_names),
        r.obs["cell_type"].astype(str).to_numpy(),
        np.asarray(ref_counts.sum(axis=1)).ravel().astype(float),
    )
    return s, spatial, reference


def test_cerebellum_doublet_matches_r(cerebellum, cache_dir):
    s, spatial, reference = cerebellum
    res = run_rctd(spatial, reference, RCTDConfig(mode="doublet", cache_dir=cache_dir))
    fit = s.obs["rctd_R_fitted"].to_numpy().astype(bool)
    np.testing.assert_array_equal(res.fitted, fit)
    assert res.params["sigma"] == pytest.approx(0.84)
    for col in ("spot_class", "first_type", "second_type"):
        ours = np.asarray(res.obs[f"rctd_{col}"]).astype(str)[fit]
        theirs = s.obs[f"rctd_R_{col}"].astype(str).to_numpy()[fit]
        assert (ours == theirs).mean() == 1.0, col
    r_w = s.obsm["rctd_R_weights"][res.cell_types].to_numpy()[fit]
    ours_w = res.obsm["rctd_weights"].to_numpy()[fit]
    assert (r_w.argmax(1) == ours_w.argmax(1)).all()
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(r_w, ours_w)]
    assert np.median(corr) >= 0.99
    assert np.abs(r_w - ours_w).max() < 1e-6
    for col in ("min_score", "singlet_score"):
        np.testing.assert_allclose(res.obs[f"rctd_{col}"][fit], s.obs[f"rctd_R_{col}"].to_numpy()[fit], atol=1e-6)


def test_cerebellum_full_mode_weights_match_r(cerebellum, cache_dir):
    s, spatial, reference = cerebellum
    res = run_rctd(spatial, reference, RCTDConfig(mode="full", cache_dir=cache_dir))
    fit = s.obs["rctd_R_fitted"].to_numpy().astype(bool)
    r_w = s.obsm["rctd_R_weights"][res.cell_types].to_numpy()[fit]
    np.testing.assert_allclose(res.obsm["rctd_weights"].to_numpy()[fit], r_w, atol=1e-6)
    np.testing.assert_allclose(res.proportions[fit], r_w / r_w.sum(1, keepdims=True), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# device-independent paths and robustness
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_doublets():
    rng = np.random.default_rng(21)
    props = np.zeros((40, 4))
    for i in range(40):
        a, b = rng.choice(4, 2, replace=False)
        props[i, a] = 1.0 if i % 2 else 0.6
        props[i, b] += 0.0 if i % 2 else 0.4
    return simulate(props, seed=9)


@pytest.mark.parametrize("mode", ["full", "doublet", "multi"])
def test_torch_path_matches_numba_path(small_doublets, cache_dir, monkeypatch, mode):
    """The pure-torch kernels (used on CUDA) give the same answers as the numba ones (used on CPU)."""
    from spatial_deconv_gui.engines.rctd import irwls

    spatial, reference = small_doublets
    cfg = RCTDConfig(mode=mode, sigma_override=0.6, cache_dir=cache_dir)
    fast = run_rctd(spatial, reference, cfg)
    monkeypatch.setattr(irwls, "_use_numba", lambda t: False)
    slow = run_rctd(spatial, reference, cfg)
    np.testing.assert_allclose(slow.proportions, fast.proportions, atol=1e-7)
    np.testing.assert_allclose(slow.obsm["rctd_weights"].to_numpy(), fast.obsm["rctd_weights"].to_numpy(), atol=1e-7)
    for key in fast.obs:
        a, b = np.asarray(fast.obs[key]), np.asarray(slow.obs[key])
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)


def test_out_of_memory_halves_the_batch(small_doublets, cache_dir, monkeypatch):
    import torch

    from spatial_deconv_gui.engines.rctd import chunks

    spatial, reference = small_doublets
    real = chunks.fit_full
    calls = []

    def flaky(P, y, *args, **kwargs):
        calls.append(y.shape[0])
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(P, y, *args, **kwargs)

    monkeypatch.setattr(chunks, "fit_full", flaky)
    cfg = RCTDConfig(mode="full", sigma_override=0.6, batch_size=32, cache_dir=cache_dir)
    with pytest.warns(RuntimeWarning, match="batch size 16"):
        res = run_rctd(spatial, reference, cfg)
    assert calls[:2] == [32, 16] and not np.isnan(res.proportions).any()
    assert res.params["batch_size"] == 16


def test_class_df_identity_equals_none_and_groups_classes(small_doublets, cache_dir):
    spatial, reference = small_doublets
    base = RCTDConfig(mode="doublet", sigma_override=0.6, cache_dir=cache_dir)
    plain = run_rctd(spatial, reference, base)
    ident = run_rctd(spatial, reference, RCTDConfig(**{**base.__dict__, "class_df": {t: t for t in plain.cell_types}}))
    np.testing.assert_array_equal(np.asarray(plain.obs["rctd_spot_class"]), np.asarray(ident.obs["rctd_spot_class"]))
    grouped = run_rctd(
        spatial,
        reference,
        RCTDConfig(**{**base.__dict__, "class_df": {"type0": "A", "type1": "A", "type2": "B", "type3": "C"}}),
    )
    # grouping can only make calls more confident: no spot becomes a reject because of it
    rejects_plain = np.asarray(plain.obs["rctd_spot_class"]) == "reject"
    rejects_grouped = np.asarray(grouped.obs["rctd_spot_class"]) == "reject"
    assert rejects_grouped.sum() <= rejects_plain.sum()
