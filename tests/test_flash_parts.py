"""Building blocks of the flash engine: graphs, gene weights, the streaming projection, gene selection."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import scipy.sparse as sp

from spatial_deconv_gui.engines import graphs
from spatial_deconv_gui.engines.flash import FlashConfig
from spatial_deconv_gui.engines.flash import _kernels as K
from spatial_deconv_gui.engines.flash.genes import hvg_from_moments, leverage_scores, reference_markers
from spatial_deconv_gui.engines.flash.representation import amplitudes, countsketch, expected_weights, sketch_matrix


def _hex(n_side=12):
    ii, jj = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    return np.column_stack([(jj + 0.5 * (ii % 2)).ravel(), (ii * np.sqrt(3) / 2).ravel()])


def test_knn_graph_symmetric_no_self_loops_3d():
    rng = np.random.default_rng(0)
    for dim in (2, 3):
        c = rng.normal(size=(300, dim))
        a = graphs.knn_graph(c, k=6)
        assert (a != a.T).nnz == 0
        assert a.diagonal().sum() == 0
        assert set(np.unique(a.data)) == {1.0}
        deg = np.diff(a.indptr)
        assert deg.min() >= 6
        # the 6 nearest are always neighbours
        d = np.linalg.norm(c[:, None] - c[None], axis=2)
        np.fill_diagonal(d, np.inf)
        nn = np.argsort(d, axis=1, kind="stable")[:, :6]
        assert all(a[i, j] == 1 for i in range(0, 300, 17) for j in nn[i])


def test_knn_ties_broken_by_index_and_grid_graph():
    sq = np.array([[x, y] for x in range(10) for y in range(10)], dtype=float)
    a = graphs.knn_graph(sq, k=6)
    b = graphs.knn_graph(sq[::-1].copy(), k=6)
    # interior spot: 4 at distance 1, then the two lowest-index of the 4 diagonal ones
    i = 55
    out = graphs.knn_indices(sq, 6)[i]
    assert sorted(out[:4]) == [45, 54, 56, 65] and list(out[4:]) == [44, 46]
    assert a.nnz == b.nnz
    h = graphs.grid_graph(_hex() * 100.0)
    deg = np.diff(h.indptr)
    assert deg.max() == 6 and np.median(deg) == 6
    r = graphs.radius_graph(sq, 1.0)
    assert np.diff(r.indptr)[i] == 4


def test_dirichlet_energy_matches_laplacian():
    rng = np.random.default_rng(1)
    c = rng.uniform(size=(80, 2))
    a = graphs.knn_graph(c, 5)
    v = rng.uniform(size=(80, 3))
    L = graphs.laplacian(a)
    assert np.isclose(graphs.dirichlet_energy(v, a), np.trace(v.T @ (L @ v)))
    rows, cols = a.nonzero()
    assert np.isclose(graphs.dirichlet_energy(v, a), 0.5 * ((v[rows] - v[cols]) ** 2).sum())


def test_expected_weights_are_the_mean_of_random_sketch_weights():
    rng = np.random.default_rng(2)
    g, d = 60, 8
    lev = rng.gamma(0.5, size=g)
    w = expected_weights(lev, g, d)
    draws = []
    for s in range(3000):
        b, v = countsketch(lev, g, d, s)
        draws.append(np.abs(v) / np.sqrt(g / d))
    mc = np.mean(draws, axis=0)
    se = np.std(draws, axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(w - mc) < 5 * se + 1e-6)
    a = amplitudes(lev, g)
    assert np.allclose(expected_weights(lev, g, 1), a / np.linalg.norm(a))


def test_projection_matches_dense_algebra():
    rng = np.random.default_rng(3)
    Y = sp.random(50, 30, density=0.3, random_state=4, data_rvs=lambda n: rng.integers(1, 20, n)).tocsr()
    Y.data = Y.data.astype(np.int32)
    X = rng.uniform(size=(4, 20))
    colmap = np.r_[np.arange(20), -np.ones(10, dtype=int)].astype(np.int64)
    rows = np.arange(50, dtype=np.int64)
    Yd = Y.toarray()[:, :20].astype(float)
    lib = Yd.sum(axis=1)
    lib[lib == 0] = 1
    Yt = np.log1p(Yd * (1e4 / lib)[:, None])
    w = rng.uniform(0.5, 1.5, size=20)
    B = np.ascontiguousarray((X * w).T)
    H, yty = K.project(
        Y.indptr, Y.indices, Y.data, colmap, rows, 0, lib, np.ones(20), w, B, np.zeros(1, np.int64), np.zeros(1), 0
    )
    np.testing.assert_allclose(H, (Yt * w) @ B, rtol=1e-12)
    np.testing.assert_allclose(yty, ((Yt * w) ** 2).sum(axis=1), rtol=1e-12)
    bucket, value = countsketch(None, 20, 7, 0)
    om = sketch_matrix(bucket, value, 7).toarray()
    Xs = X @ om
    Bc = np.ascontiguousarray(value[:, None] * Xs.T[bucket])
    H2, yty2 = K.project(
        Y.indptr, Y.indices, Y.data, colmap, rows, 2, lib, np.ones(20), np.ones(20), Bc, bucket, value, 7
    )
    np.testing.assert_allclose(H2, (Yd @ om) @ Xs.T, rtol=1e-10)
    np.testing.assert_allclose(yty2, ((Yd @ om) ** 2).sum(axis=1), rtol=1e-10)


def test_gene_selection_rules():
    X = np.array([[10.0, 1, 1, 5, 0], [1, 10, 1, 5, 0], [1, 1, 10, 5, 1]])
    assert list(reference_markers(X, 1)) == [0, 1, 2]
    lev = leverage_scores(X)
    assert np.isclose(lev.sum(), 1.0, atol=1e-5) and lev[3] < 1e-8
    mean = np.linspace(0.1, 2, 100)
    var = np.ones(100)
    var[[7, 42, 80]] = 5.0
    assert set([7, 42, 80]) <= set(hvg_from_moments(mean, var, 3))


def test_config_fields_are_cli_scalars():
    hints = typing.get_type_hints(FlashConfig)
    ok = (int, float, str, bool)
    for f in dataclasses.fields(FlashConfig):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if typing.get_origin(t) is typing.Literal:
            continue
        assert t in ok or (args and args[0] in ok), f.name
    assert FlashConfig().device == "auto" and FlashConfig().lambda_value() is None
    assert FlashConfig(lambda_spatial="0.5").lambda_value() == 0.5


def test_locality_orders_are_permutations():
    rng = np.random.default_rng(5)
    for dim in (1, 2, 3):
        c = rng.uniform(size=(500, dim))
        for kind in ("strips", "morton"):
            p = graphs.locality_order(c, kind)
            assert np.array_equal(np.sort(p), np.arange(500))
    grid = np.array([[x, y] for y in range(20) for x in range(20)], dtype=float)[::-1]
    p = graphs.locality_order(grid, "strips")
    assert np.array_equal(grid[p][:20, 1], np.zeros(20)) and np.array_equal(grid[p][:20, 0], np.arange(20))
