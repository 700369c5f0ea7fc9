"""DestVI engine: gamma separates two simulated sub-states of one cell type, proportions on the same slide,
imputation within a type, and the engine contract (outputs, streaming, cancellation, config checks)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from spatial_deconv_gui.engines.base import Cancelled, RunControl
from spatial_deconv_gui.engines.destvi import DestVIConfig, impute_expression, run_destvi, validate_config
from spatial_deconv_gui.io.inputs import ReferenceInput, SpatialInput


def simulate_substates(n_spots=200, n_genes=100, n_cells=60, seed=0, fold=4.0):
    """Types A, B, C; A has two sub-states (A1, A2) differing in 15 genes each, labelled only "A" in the
    reference. Spots left of x = 50 hold A1, right of it A2. Returns spatial, reference, proportions, state."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.8, 1.0, n_genes) + 0.05
    prof = {}
    for k, t in enumerate("ABC"):
        p = base * rng.lognormal(0, 0.3, n_genes)
        p[k * 15:(k + 1) * 15] *= 6
        prof[t] = p
    a1, a2 = prof["A"].copy(), prof["A"].copy()
    a1[50:65] *= fold
    a2[65:80] *= fold
    prof = {"A1": a1, "A2": a2, "B": prof["B"], "C": prof["C"]}
    prof = {k: v / v.sum() for k, v in prof.items()}

    def nb(mu, r=10.0):
        return rng.poisson(rng.gamma(r, mu / r))

    cells, labels = [], []
    for t in ("A1", "A2", "B", "C"):
        lib = rng.lognormal(np.log(1500), 0.3, n_cells)
        cells.append(nb(lib[:, None] * prof[t][None]))
        labels += [t[0]] * n_cells
    x_ref = np.vstack(cells)
    genes = np.array([f"g{i}" for i in range(n_genes)])
    ref = ReferenceInput(sp.csr_matrix(x_ref), genes, np.array(labels), x_ref.sum(1).astype(float))
    xy = rng.uniform(0, 100, (n_spots, 2))
    state = (xy[:, 0] > 50).astype(int)
    props = rng.dirichlet([2.0, 1.0, 1.0], n_spots)
    n = rng.poisson(8, n_spots) + 2
    mean = np.zeros((n_spots, n_genes))
    for i in range(n_spots):
        pa = prof["A1"] if state[i] == 0 else prof["A2"]
        mean[i] = n[i] * 300 * (props[i, 0] * pa + props[i, 1] * prof["B"] + props[i, 2] * prof["C"])
    x = nb(mean)
    spatial = SpatialInput(sp.csr_matrix(x), genes, np.array([f"s{i}" for i in range(n_spots)]), xy,
                           x.sum(1).astype(float))
    return spatial, ref, props, state


@pytest.fixture(scope="module")
def substates():
    return simulate_substates()


@pytest.fixture(scope="module")
def fitted(substates):
    s, r, _, _ = substates
    return run_destvi(s, r, DestVIConfig(sc_epochs=50, max_epochs=100, seed=0, n_threads=1))


def test_gamma_separates_two_substates_of_one_type(fitted, substates):
    _, _, props, state = substates
    g = fitted.obsm["destvi_gamma_A"].to_numpy()
    sel = props[:, 0] > 0.2
    gc = g[sel] - g[sel].mean(0)
    pc1 = gc @ np.linalg.svd(gc, full_matrices=False)[2][0]
    r = abs(np.corrcoef(pc1, state[sel])[0, 1])
    # the two halves of the slide as two groups along the first principal axis of gamma_A
    thr = np.median(pc1)
    acc = max(np.mean((pc1 > thr) == state[sel]), np.mean((pc1 <= thr) == state[sel]))
    print(f"gamma_A first PC vs sub-state: |r|={r:.3f}, split accuracy {acc:.3f} over {sel.sum()} spots")
    assert r >= 0.8 and acc >= 0.85


def test_imputation_within_type_follows_substate(fitted, substates):
    s, _, _, state = substates
    imp = impute_expression(fitted, "A", genes=["g55", "g70"])
    assert list(imp.columns) == ["g55", "g70"] and list(imp.index) == list(s.barcodes)
    # g55 marks A1 (left half), g70 marks A2 (right half): their within-A ratio follows the sub-state
    r = np.corrcoef(np.log(imp["g70"] / imp["g55"]), state)[0, 1]
    print(f"imputed A2/A1 marker log-ratio vs sub-state r={r:.3f}")
    assert r > 0.8
    sub = impute_expression(fitted, "B", spots=s.barcodes[:5])
    assert sub.shape == (5, len(fitted.uns["destvi_training"]["genes"]))
    assert np.allclose(impute_expression(fitted, "B").sum(1), 1.0, atol=1e-6)
    with pytest.raises(ValueError):
        impute_expression(fitted, "Z")


def test_proportions_on_simulated_slide(fitted, substates):
    _, _, props, _ = substates
    r = np.corrcoef(fitted.proportions.ravel(), props.ravel())[0, 1]
    print(f"DestVI proportions vs truth r={r:.3f}")
    assert r >= 0.85


def test_result_contract(fitted, substates):
    s, r, _, _ = substates
    assert fitted.key == "destvi" and fitted.cell_types == ["A", "B", "C"]
    assert fitted.proportions.shape == (s.n_spots, 3)
    np.testing.assert_allclose(fitted.proportions.sum(1), 1.0, rtol=1e-9)
    for t in fitted.cell_types:
        assert fitted.obsm[f"destvi_gamma_{t}"].shape == (s.n_spots, 5)
    dummy = fitted.obsm["destvi_dummy_fraction"].to_numpy()
    assert ((dummy >= 0) & (dummy <= 1)).all()
    tr = fitted.uns["destvi_training"]
    assert len(tr["loss"]) == 100 and len(tr["sc_loss"]) == 50 and np.isfinite(tr["loss"]).all()
    assert tr["loss"][-10:].mean() < tr["loss"][:3].mean()


def test_streams_cancels_and_checks_config(substates):
    s, r, _, _ = substates
    events = []
    ctl = RunControl(events.append, max_rate=0)
    run_destvi(s, r, DestVIConfig(sc_epochs=2, max_epochs=4, report_every=2, vamp_prior_p=3, n_threads=1), ctl)
    partial = [e for e in events if e.partial is not None]
    assert len(partial) == 1 and partial[0].partial.proportions.shape == (s.n_spots, 3)

    def cancel(ev):
        if ev.stage == "spatial":
            ctl2.cancel()

    ctl2 = RunControl(cancel, max_rate=0)
    with pytest.raises(Cancelled):
        run_destvi(s, r, DestVIConfig(sc_epochs=1, max_epochs=50, vamp_prior_p=3, n_threads=1), ctl2)
    assert validate_config(DestVIConfig()) == []
    assert len(validate_config(DestVIConfig(max_epochs=0, prior_mode="x", lr=-1))) == 3
    with pytest.raises(ValueError, match="genes shared"):
        other = ReferenceInput(r.counts, np.array([f"x{i}" for i in range(len(r.genes))]), r.cell_types, r.n_umi)
        run_destvi(s, other, DestVIConfig(max_epochs=1))


def test_result_round_trips_through_h5ad_and_imputes(fitted, substates, tmp_path):
    import anndata as ad
    import pandas as pd

    from spatial_deconv_gui.io.write import attach_result, write_h5ad_atomic

    s, _, _, _ = substates
    adata = ad.AnnData(s.counts, obs=pd.DataFrame(index=s.barcodes), var=pd.DataFrame(index=s.genes))
    adata.obsm["spatial"] = s.coords
    out = attach_result(adata, fitted)
    assert "destvi_proportions" in out.obsm and "destvi_gamma_B" in out.obsm
    back = ad.read_h5ad(write_h5ad_atomic(out, tmp_path / "destvi.h5ad"))
    a = impute_expression(back, "A", genes=["g55", "g70"], spots=s.barcodes[:7])
    b = impute_expression(fitted, "A", genes=["g55", "g70"], spots=np.arange(7))
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6)


def test_fused_pieces_match_plain_torch():
    import torch

    from spatial_deconv_gui.engines.bayes import nb_log_prob
    from spatial_deconv_gui.engines.destvi.model import (CondVAE, SpatialDeconv, _mixture_lp, _PxMix, nb_sum,
                                                         relu_dropout)

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # mixture prior as a quadratic form == Normal log densities
    g = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    mean, scale = torch.randn(5, 7, 6, dtype=torch.float64), torch.rand(5, 7, 6, dtype=torch.float64) + 0.2
    ref = torch.distributions.Normal(mean, scale).log_prob(g.unsqueeze(-2)).sum(-1)
    torch.testing.assert_close(_mixture_lp(g, mean, scale), ref)
    # NB sum with its hand-written backward == autograd of the elementwise formula
    x = torch.poisson(torch.rand(3, 5, 8) * 5).double()
    mu = (torch.rand(3, 5, 8, dtype=torch.float64) * 3 + 0.01).requires_grad_()
    th = (torch.rand(8, dtype=torch.float64) + 0.3).requires_grad_()
    a, b = nb_sum(x, mu, th), (nb_log_prob(x, mu, th) + torch.lgamma(x + 1)).sum()
    torch.testing.assert_close(a, b)
    for u, w in zip(torch.autograd.grad(a, (mu, th)), torch.autograd.grad(b, (mu, th))):
        torch.testing.assert_close(u, w)
    # output layer + softmax + mixture node
    h = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 4, dtype=torch.float64)
    bias = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    wk = torch.rand(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, b, w: _PxMix.apply(h, W, b, w), (h, bias, wk))
    # dropout keeps 1 - p of the positive units, rescaled
    y = relu_dropout(torch.randn(2000, 500), 0.05, True)
    assert abs(float((y > 0).float().mean()) - 0.95 * 0.5) < 0.005
    # the label-broadcast decoder == the generic one with the one-hot gathered per row
    sc = CondVAE(30, 4)
    model = SpatialDeconv(sc, (rng.normal(size=(4, 15, 5)), np.ones((4, 15, 5)), np.full((4, 15), 1 / 15)))
    model.eval()
    gam = torch.randn(2, 7, 4, 5)
    lab = torch.arange(4).expand(2, 7, 4)
    hid = model.decoder(torch.cat([gam, model.batch_embedding.expand(2, 7, 4, 5)], -1), lab)
    old = torch.softmax(model.px_decoder(hid) + model.per_ct_bias[lab] + model.beta, -1)
    torch.testing.assert_close(model.type_scales(gam), old, rtol=1e-5, atol=1e-6)
