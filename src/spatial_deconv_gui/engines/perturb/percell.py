"""Per-cell coefficients (``TrainConfig.mode`` 'full' / 'hybrid'): SpaceTravLR's idea of refining the cluster
lasso per cell from the cell's spatial neighbourhood, written from the algorithm.

The cluster lasso gives the seed ``b_k`` (cluster k, one coefficient per modulator). Every cell i gets its own

    beta_i = b_k(i) * (1 + z_i . W_t)          (elementwise over the target's modulators)

where ``z_i`` (D values) describes the cell's neighbourhood and ``W_t`` (D x modulators) is learnt per target.
A modulator the lasso left out of a cluster stays out in each of its cells (SpaceTravLR anchors its network's
output to the lasso coefficients the same way, by a product), and ``W_t = 0`` is the seed itself: training starts
at the seed and moves away from it only as far as the data ask, against an L2 penalty on ``W``.

``z_i = [CNN(neighbourhood image of cell i) | one-hot of its cluster | 1]``. The image is a G x G grid over the
square of half-width ``radius`` (the model's secreted radius) centred on the cell, one channel per cluster, each
pixel counting the cells of that cluster in it (the density of each cell type around the cell, as SpaceTravLR's
spatial maps). The CNN (two 3x3 convolutions, a pooling, a global mean, tanh) is shared by the targets of one
training batch and trained with their heads (multi-task), unlike SpaceTravLR's one CNN per target and cluster:
a CNN per target would cost N x targets image passes per epoch, out of reach on a whole-transcriptome slide on
two cores. ``z`` is stored per batch (``pc_z``) and ``W`` per (target, modulator) (``pc_w``), so the per-cell
coefficients take (targets x modulators + cells) x D numbers, not cells x targets x modulators; knockouts and the
lens evaluate ``beta_i`` from them.

Training: full-batch Adam over ``epochs`` on the training cells (all minus a per-cluster held-out share), loss the
mean squared error of each target's prediction ``intercept_k + sum_m beta_i,m x_i,m`` divided by the target's
variance (targets weigh alike), plus ``percell_l2 * sum W^2 / targets``; the per-cluster intercepts are learnt too.
Only the cells of clusters where the target has a (non-gated) model enter its loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

IMAGE_GRID = 9  # pixels per side of the neighbourhood image: ~2 pixels per radius/4 (the contact scale)
TRUNK_FEATURES = 4  # z's CNN part: few, so that a target's head (D x modulators) stays small next to ~50 cells


def neighbourhood_images(coords: np.ndarray, cell_cluster: np.ndarray, n_clusters: int, radius: float) -> np.ndarray:
    """(N, clusters, G, G) float32: cells of each cluster per pixel of the square of half-width ``radius``
    around each cell (the cell itself included), divided by the mean count of an image (so ~1 per pixel-sum)."""
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)[:, :2]
    n = coords.shape[0]
    G = IMAGE_GRID
    out = np.zeros((n, n_clusters, G, G), dtype=np.float32)
    if n == 0 or radius <= 0:
        return out
    tree = cKDTree(coords)
    lists = tree.query_ball_point(coords, radius, p=np.inf)
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    src = np.repeat(np.arange(n), lengths)
    nb = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if lengths.sum() else np.zeros(0, np.int64)
    d = (coords[nb] - coords[src] + radius) / (2 * radius) * G
    px = np.clip(np.floor(d).astype(np.int64), 0, G - 1)
    keep = cell_cluster[nb] >= 0
    np.add.at(out, (src[keep], cell_cluster[nb[keep]], px[keep, 1], px[keep, 0]), 1.0)
    out /= max(float(lengths.mean()), 1.0) / (G * G) * n_clusters
    return out


@dataclass
class PerCellFit:
    z: np.ndarray  # (N, D) each cell's neighbourhood features
    w: np.ndarray  # (K, D) one head row per (target, modulator) pair
    intercept: np.ndarray  # (C, T) learnt per-cluster intercepts
    r2_seed: np.ndarray  # (T,) held-out R² of the seed (NaN without held-out cells)
    r2_full: np.ndarray  # (T,) held-out R² of the per-cell coefficients
    epochs: int


def heldout_r2(y: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per column: 1 - SSE / SST over the rows where ``mask`` (rows x columns) holds, SST about those rows' mean;
    NaN for a column with fewer than 2 such rows or no variance."""
    m = mask.astype(np.float64)
    cnt = m.sum(axis=0)
    mean = (y * m).sum(axis=0) / np.maximum(cnt, 1)
    sst = (((y - mean) ** 2) * m).sum(axis=0)
    sse = (((y - pred) ** 2) * m).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - sse / sst
    return np.where((cnt >= 2) & (sst > 0), r2, np.nan)


def heldout_gain(r2_seed: np.ndarray, r2_cnn: np.ndarray) -> np.ndarray:
    """The share of the seed's held-out squared error that the per-cell coefficients remove,
    1 - SSE_cnn / SSE_seed = (R²cnn - R²seed) / (1 - R²seed) (both R² over the same cells); NaN where either is
    NaN or the seed is exact. Hybrid mode keeps per-cell coefficients where it reaches ``hybrid_min_gain``."""
    r2_seed = np.asarray(r2_seed, dtype=np.float64)
    r2_cnn = np.asarray(r2_cnn, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = (r2_cnn - r2_seed) / (1.0 - r2_seed)
    return np.where(np.isfinite(g), g, np.nan)


def fit_percell(
    images: np.ndarray,
    cell_cluster: np.ndarray,
    A: np.ndarray,
    pair_target: np.ndarray,
    Y: np.ndarray,
    intercept: np.ndarray,
    modelled: np.ndarray,
    train: np.ndarray,
    holdout: np.ndarray,
    epochs: int,
    learning_rate: float,
    l2: float,
    seed: int,
    device="cpu",
) -> PerCellFit:
    """Train the per-cell refinement of one batch of targets.

    ``images`` (N, C, G, G) from :func:`neighbourhood_images`; ``cell_cluster`` (N,) cluster index (-1: none);
    ``A`` (N, K) for each (target, modulator) pair of the batch (``pair_target`` (K,) its target), each cell's
    modulator value times the seed of its cluster (zero where the cluster's seed is); ``Y`` (N, T) the targets;
    ``intercept`` (C, T) the seed's; ``modelled`` (T, C) whether the target has a non-gated model in the cluster;
    ``train`` / ``holdout`` (N,) the split. Returns :class:`PerCellFit`.
    """
    import torch

    from ..devices import torch_device

    dev = torch_device(device)
    N, K = A.shape
    T = Y.shape[1]
    C = intercept.shape[0]
    cc = np.where(cell_cluster >= 0, cell_cluster, 0)
    onehot = np.zeros((N, C), dtype=np.float32)
    onehot[np.flatnonzero(cell_cluster >= 0), cell_cluster[cell_cluster >= 0]] = 1.0
    cell_mod = modelled[:, cc].T & (cell_cluster >= 0)[:, None]  # (N, T)
    w_train = (cell_mod & train[:, None]).astype(np.float64)
    cnt = w_train.sum(axis=0)
    mean = (Y * w_train).sum(axis=0) / np.maximum(cnt, 1)
    var = ((Y - mean) ** 2 * w_train).sum(axis=0) / np.maximum(cnt, 1)
    weight = np.where((cnt > 0) & (var > 0), 1.0 / np.maximum(cnt, 1) / np.where(var > 0, var, 1.0), 0.0)

    f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32), device=dev)  # noqa: E731
    img_t, A_t, Y_t = f32(images), f32(A), f32(Y)
    onehot_t, ones_t = f32(onehot), torch.ones((N, 1), device=dev)
    cc_t = torch.as_tensor(cc, device=dev)
    lossw_t = f32(w_train * weight[None, :])
    n_img = images.shape[1]
    # The CNN's initialisation draws from its own generator: torch's global one is shared by every thread of the
    # process, and two batches trained at once (Dask worker threads) would interleave their draws.
    init = torch.Generator().manual_seed(int(seed))
    conv1 = _seeded_conv(n_img, 8, init).to(dev)
    conv2 = _seeded_conv(8, TRUNK_FEATURES, init).to(dev)
    D = TRUNK_FEATURES + C + 1
    W = torch.zeros((D, K), device=dev, requires_grad=True)
    b = torch.tensor(np.asarray(intercept, dtype=np.float32), device=dev, requires_grad=True)
    pt_t = torch.as_tensor(np.asarray(pair_target, dtype=np.int64), device=dev)
    base = torch.zeros((N, T), device=dev).index_add_(1, pt_t, A_t)  # the seed's prediction without intercept

    def features():
        h = torch.relu(conv1(img_t))
        h = torch.nn.functional.avg_pool2d(h, 2, ceil_mode=True)
        h = torch.tanh(conv2(h).mean(dim=(2, 3)))
        return torch.cat([h, onehot_t, ones_t], dim=1)

    def predict(z):
        corr = torch.zeros((N, T), device=dev).index_add_(1, pt_t, (z @ W) * A_t)
        return b[cc_t] + base + corr

    params = [W, b, *conv1.parameters(), *conv2.parameters()]
    opt = torch.optim.Adam(params, lr=float(learning_rate))
    for _ in range(int(epochs)):
        opt.zero_grad()
        z = features()
        loss = ((predict(z) - Y_t) ** 2 * lossw_t).sum() + float(l2) * (W * W).sum() / max(T, 1)
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = features()
        pred_full = predict(z).double().cpu().numpy()
        z_np = z.double().cpu().numpy()
    pred_seed = np.zeros((N, T))
    np.add.at(pred_seed.T, np.asarray(pair_target, dtype=np.int64), np.asarray(A, dtype=np.float64).T)
    pred_seed += np.asarray(intercept, dtype=np.float64)[cc].reshape(N, T)
    ho = cell_mod & holdout[:, None]
    return PerCellFit(
        z=z_np,
        w=W.detach().double().cpu().numpy().T,
        intercept=b.detach().double().cpu().numpy(),
        r2_seed=heldout_r2(Y, pred_seed, ho),
        r2_full=heldout_r2(Y, pred_full, ho),
        epochs=int(epochs),
    )


def _seeded_conv(n_in: int, n_out: int, generator):
    """A 3 x 3 same-padding Conv2d initialised as torch's default (weight and bias uniform within
    1 / sqrt(fan in)) from ``generator``: the values torch's own initialisation gives after ``manual_seed``."""
    import torch

    conv = torch.nn.utils.skip_init(torch.nn.Conv2d, n_in, n_out, 3, padding=1)
    fan_in = n_in * 9
    # kaiming_uniform_(a=sqrt(5)) as torch computes it, so the bound is the same float to the last bit
    weight_bound = math.sqrt(3.0) * (math.sqrt(2.0 / (1 + math.sqrt(5) ** 2)) / math.sqrt(fan_in))
    with torch.no_grad():
        conv.weight.uniform_(-weight_bound, weight_bound, generator=generator)
        conv.bias.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)
    return conv


def holdout_split(clusters: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: the held-out cells, ``fraction`` of each cluster (rounded, at least one when the fraction is
    positive and the cluster has 2+ cells), drawn with ``seed``."""
    rng = np.random.default_rng(int(seed))
    out = np.zeros(len(clusters), dtype=bool)
    if fraction <= 0:
        return out
    for c in sorted(set(map(str, clusters))):
        idx = np.flatnonzero(clusters == c)
        k = int(round(fraction * idx.size))
        if idx.size >= 2:
            k = min(max(k, 1), idx.size - 1)
        else:
            k = 0
        out[rng.choice(idx, size=k, replace=False)] = True
    return out


def lasso_cells(clusters: np.ndarray, mode: str, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: the cells the cluster lasso is fitted on - every cell in seed mode; in full / hybrid mode all
    but the held-out ones (:func:`holdout_split`), which only score the seed and the network."""
    clusters = np.asarray(clusters).astype(str)
    if mode == "seed":
        return np.ones(clusters.size, dtype=bool)
    return ~holdout_split(clusters, fraction, seed)


@dataclass
class PerCellBeta:
    """The per-cell coefficients of a model, as corrections to its cluster coefficients.

    ``entries`` are the non-zero seed coefficients of the targets with per-cell coefficients, sorted by cluster
    (``cluster_ptr``): kind (0 TF, 1 LR, 2 TF-ligand), modulator row (gene column, or pair index), target column,
    seed value, z block and W row. Cell i of cluster k has, for entry e, ``beta = seed_e * (1 + z[block_e, i] .
    w[row_e])``; the correction is ``seed_e * z . w``.
    """

    z: np.ndarray  # (S, N, D) float64
    w: np.ndarray  # (R, D) float64
    cluster_ptr: np.ndarray  # (C + 1,) int64
    kind: np.ndarray  # (E,) int64
    row: np.ndarray  # (E,) int64
    target_col: np.ndarray  # (E,) int64
    seed: np.ndarray  # (E,) float64
    block: np.ndarray  # (E,) int64
    wrow: np.ndarray  # (E,) int64
    targets: list  # targets with per-cell coefficients

    def factor(self, e: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """(cells, entries) of z . w: the relative change of each entry's coefficient in each cell."""
        e = np.asarray(e, dtype=np.int64)
        cells = np.asarray(cells, dtype=np.int64)
        zc = self.z[self.block[e][None, :], cells[:, None]]  # (cells, entries, D)
        return np.einsum("ced,ed->ce", zc, self.w[self.wrow[e]])

    def cluster_moments(self, cell_cluster: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per entry, over the cells of its cluster (``cell_cluster``: each cell's cluster index): the mean and the
        standard deviation of the cell's coefficient, and the number of cells (what a knockout applies there).

        ``beta_i = seed (1 + z_i . w)`` is linear in ``z_i``: the mean is ``seed (1 + mean(z) . w)`` and the
        variance ``seed² wᵀ cov(z) w`` (population covariance over the cluster's cells), so no cells x entries
        array is formed. A cluster without cells gives the seed and a spread of 0."""
        cell_cluster = np.asarray(cell_cluster, dtype=np.int64)
        n_e = self.seed.size
        mean, sd = self.seed.copy(), np.zeros(n_e)
        n_cells = np.zeros(n_e, dtype=np.int64)
        for k in range(self.cluster_ptr.size - 1):
            e = np.arange(int(self.cluster_ptr[k]), int(self.cluster_ptr[k + 1]))
            cells = np.flatnonzero(cell_cluster == k)
            n_cells[e] = cells.size
            if e.size == 0 or cells.size == 0:
                continue
            zk = self.z[:, cells]  # (S, cells, D)
            zbar = zk.mean(axis=1)  # (S, D)
            zc = zk - zbar[:, None, :]
            cov = np.einsum("scd,sce->sde", zc, zc) / cells.size  # (S, D, D)
            w = self.w[self.wrow[e]]  # (entries, D)
            blk = self.block[e]
            mean[e] = self.seed[e] * (1.0 + np.einsum("ed,ed->e", zbar[blk], w))
            var = np.empty(e.size)
            for b in np.unique(blk):  # per block: no entries x D x D array (entries run to ~10^6 on a whole slide)
                sel = blk == b
                var[sel] = np.einsum("ed,df,ef->e", w[sel], cov[b], w[sel])
            sd[e] = np.abs(self.seed[e]) * np.sqrt(np.maximum(var, 0.0))
        return mean, sd, n_cells

    def entries_of(self, k: int, kind=None, row=None, target_col=None) -> np.ndarray:
        lo, hi = int(self.cluster_ptr[k]), int(self.cluster_ptr[k + 1])
        sel = np.arange(lo, hi)
        if kind is not None:
            sel = sel[self.kind[sel] == kind]
        if row is not None:
            sel = sel[self.row[sel] == row]
        if target_col is not None:
            sel = sel[self.target_col[sel] == target_col]
        return sel
