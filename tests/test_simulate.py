"""The simulator and the shipped sample: deterministic, known truth, spatially structured domains."""

from __future__ import annotations

import anndata as ad
import numpy as np
from scipy.spatial import cKDTree

from spatial_deconv_gui.sample_data import SAMPLE_REFERENCE, SAMPLE_SPATIAL, build_sample
from spatial_deconv_gui.simulate import simulate_dataset


def test_deterministic_given_seed():
    a, ra = simulate_dataset(n_spots=200, n_genes=50, n_types=3, cells_per_type=10, seed=11)
    b, rb = simulate_dataset(n_spots=200, n_genes=50, n_types=3, cells_per_type=10, seed=11)
    c, _ = simulate_dataset(n_spots=200, n_genes=50, n_types=3, cells_per_type=10, seed=12)
    assert (a.X != b.X).nnz == 0 and (ra.X != rb.X).nnz == 0
    assert (a.X != c.X).nnz > 0


def test_truth_and_structure(small_pair):
    spatial, reference = small_pair
    truth = spatial.obsm["true_proportions"].to_numpy()
    np.testing.assert_allclose(truth.sum(axis=1), 1.0)
    assert (truth >= 0).all()
    # neighbouring spots share composition far more than random pairs: the domains are spatial
    coords = spatial.obsm["spatial"]
    _, nn = cKDTree(coords).query(coords, k=2)
    neighbour = np.mean([np.corrcoef(truth[i], truth[j])[0, 1] for i, j in nn])
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, spatial.n_obs, size=(spatial.n_obs, 2))
    random = np.nanmean([np.corrcoef(truth[i], truth[j])[0, 1] for i, j in pairs])
    assert neighbour > 0.6 and neighbour > random + 0.3
    # Visium-like spacing: 100 um between neighbours on the hex grid
    assert np.allclose(np.linalg.norm(coords[nn[:, 0]] - coords[nn[:, 1]], axis=1), 100.0)
    assert np.issubdtype(spatial.X.dtype, np.integer)
    assert reference.obs["cell_type"].value_counts().min() == 30


def test_umi_fractions_weigh_cells_by_their_size(small_pair):
    spatial, _ = small_pair
    cells = spatial.obsm["true_proportions"].to_numpy()
    umi = spatial.obsm["true_umi_fractions"].to_numpy()
    np.testing.assert_allclose(umi.sum(axis=1), 1.0)
    np.testing.assert_array_equal(umi > 0, cells > 0)  # the same types, weighted by the cells' UMI
    # cell sizes are lognormal (sd 0.3 on the log scale): the two truths differ by a few points, not more
    diff = np.abs(umi - cells)[(cells > 0) & (cells < 1)]
    assert 0.01 < diff.mean() < 0.1
    single = cells.max(axis=1) == 1
    np.testing.assert_allclose(umi[single], cells[single])


def test_shipped_sample_equals_a_fresh_build():
    spatial, reference = build_sample()
    shipped_s, shipped_r = ad.read_h5ad(SAMPLE_SPATIAL), ad.read_h5ad(SAMPLE_REFERENCE)
    assert (shipped_s.X != spatial.X).nnz == 0 and (shipped_r.X != reference.X).nnz == 0
    np.testing.assert_array_equal(shipped_s.obsm["spatial"], spatial.obsm["spatial"])
    np.testing.assert_allclose(
        shipped_s.obsm["true_proportions"].to_numpy(), spatial.obsm["true_proportions"].to_numpy()
    )
    assert list(shipped_r.uns["cell_type_colors"]) == list(reference.uns["cell_type_colors"])
