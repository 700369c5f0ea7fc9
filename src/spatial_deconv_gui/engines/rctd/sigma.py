"""Platform-effect normalisation (bulk fit) and estimation of the noise scale sigma_c."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .irwls import SharedDesign, solve_irwls
from .likelihood import LAM_EPSILON, SIGMA_GRID, LikelihoodTable, TorchTable

BULK_MIN_OBS = 10
SIGMA_START = 100  # hundredths
SIGMA_WINDOW = 8
SCALE_FACTORS = (0.8, 0.9, 1.0, 1.1, 1.2)
MAX_SIGMA_SAMPLES = 1_000_000


@dataclass
class BulkFit:
    proportions: np.ndarray  # (K,) bulk composition, not normalised
    profiles: np.ndarray  # (G_bulk, K) platform-normalised profiles on the bulk genes
    converged: bool


def fit_bulk(
    profiles_bulk: np.ndarray,
    bulk_counts: np.ndarray,
    total_umi: float,
    n_iter: int = 100,
    min_change: float = 1e-4,
    step: float = 0.3,
) -> BulkFit:
    """Fit the summed slide as one pixel, then rescale each gene so the fitted mixture matches the slide.

    The reference and slide differ by a per-gene capture efficiency (platform effect). Fitting the
    pseudo-bulk with a Gaussian loss on log counts gives the slide's overall composition; the ratio of
    the observed bulk to that mixture's prediction, gene by gene, is the platform effect.
    """
    use = bulk_counts >= BULK_MIN_OBS
    if use.sum() < 2:
        raise ValueError(f"RCTD: fewer than 2 platform-effect genes have >= {BULK_MIN_OBS} counts on the slide")
    P = torch.as_tensor(profiles_bulk[use] * total_umi, dtype=torch.float64)
    y = torch.as_tensor(bulk_counts[use], dtype=torch.float64)[None, :]
    u = torch.ones(1, dtype=torch.float64)
    # the bulk pixel's own scale is folded into P; its IRWLS floor still uses the slide's total UMI
    design = _BulkDesign(P, y, u, total_umi)
    res = solve_irwls(design, 1, n_iter=n_iter, min_change=min_change, step=step)
    props = res.weights[0].numpy()
    mix = profiles_bulk @ (props / props.sum())
    target = bulk_counts / total_umi
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(mix > 0, target / mix, 1.0)
    return BulkFit(props, profiles_bulk * factor[:, None], bool(res.converged[0]))


class _BulkDesign(SharedDesign):
    def __init__(self, P, y, u, total_umi):
        super().__init__(P, y, u, None)
        self.total_umi = total_umi

    def derivatives(self, w, idx):
        y = self.y[idx]
        pred = (torch.clamp(w, min=0.0) @ self.P.T).abs()
        pred = torch.clamp(pred, min=max(1e-4, self.total_umi * 1e-7))
        # derivatives of -(log pred - log y)^2: spacexr's Gaussian-on-log loss for the pseudo-bulk
        r = torch.log(pred) - torch.log(y)
        d1 = -2.0 * r / pred
        d2 = -2.0 * (1.0 - r) / (pred * pred)
        grad = d1 @ self.P
        htri = (-d2) @ self.PP
        hess = torch.empty((w.shape[0], self.k, self.k), dtype=w.dtype)
        hess[:, self.iu, self.ju] = htri
        hess[:, self.ju, self.iu] = htri
        return grad, hess


def score_sigmas(pred: torch.Tensor, y: torch.Tensor, tables: list[TorchTable]) -> np.ndarray:
    """For each table: the best (over the 0.8..1.2 rescalings of the prediction) total -log-likelihood.

    Rescaling lets each sigma be judged at its own best overall expression level, so sigma is not
    inflated to absorb a small systematic bias of the prediction.

    The spline is a cubic in ``a = lam - knot`` on each (count, interval) cell, so the total over many
    observations only needs the per-cell sums of 1, a, a^2, a^3. Those are computed once per rescaling and
    then reused for every candidate sigma (17 per epoch), instead of re-evaluating the spline everywhere.
    """
    pred = np.maximum(pred.reshape(-1).double().cpu().numpy(), 1e-4)
    y = y.reshape(-1).double().cpu().numpy()
    scores = np.full(len(tables), np.inf)
    for f in SCALE_FACTORS:
        cells, moments = _cell_moments(tables[0], y, pred * f)
        for i, t in enumerate(tables):
            scores[i] = min(scores[i], _score_from_moments(t, cells, moments))
    return scores


def _cell_moments(table: TorchTable, y: np.ndarray, lam: np.ndarray):
    lam = np.clip(lam, LAM_EPSILON, table.x_max - LAM_EPSILON)
    m = table.mtab_np[np.floor(np.sqrt(lam / 1e-6)).astype(np.int64)]
    a = lam - table.x_np[m]
    key = np.minimum(y, table.k_cap).astype(np.int64) * table.n_int + m
    cells, inv = np.unique(key, return_inverse=True)
    a2 = a * a
    moments = np.stack(
        [
            np.bincount(inv, minlength=len(cells)).astype(np.float64),
            np.bincount(inv, a, len(cells)),
            np.bincount(inv, a2, len(cells)),
            np.bincount(inv, a2 * a, len(cells)),
        ]
    )
    return cells, moments


def _score_from_moments(table: TorchTable, cells: np.ndarray, mom: np.ndarray) -> float:
    # the spline is c0 + c1 a + c2 a^2 + c3 a^3 on each cell
    c = table.coef_at(cells)
    return -float(np.einsum("ij,ji->", c, mom))


def estimate_sigma(
    profiles: np.ndarray,
    counts: np.ndarray,
    numi: np.ndarray,
    get_tables: Callable[[list[int]], list[LikelihoodTable]],
    n_epoch: int = 8,
    n_iter: int = 50,
    min_change: float = 1e-3,
    step: float = 0.3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    progress: Callable[[float, str], None] | None = None,
    check_cancel: Callable[[], None] | None = None,
) -> tuple[int, list[int]]:
    """spacexr's alternating search: fit weights at the current sigma, then pick the sigma in a +-8 grid
    window that best explains those fits; repeat until sigma stops moving (at most ``n_epoch`` times).

    ``counts`` (pixels x genes) and ``numi`` are the already-sampled fitting pixels; ``profiles`` is genes x
    types on the same genes. Returns sigma in hundredths and the path of sigmas visited.
    """
    dev = torch.device(device)
    P = torch.as_tensor(profiles, dtype=dtype, device=dev)
    y = torch.as_tensor(counts, dtype=dtype, device=dev)
    u = torch.as_tensor(numi, dtype=dtype, device=dev)
    sigma = SIGMA_START
    path = [sigma]
    rng = np.random.default_rng(seed)
    n_total = y.numel()
    sample = None
    if n_total > MAX_SIGMA_SAMPLES:
        sample = torch.as_tensor(rng.choice(n_total, MAX_SIGMA_SAMPLES, replace=False), device=dev)
    # successive windows overlap almost entirely: convert each sigma's table once per run
    converted: dict[tuple[int, torch.dtype], TorchTable] = {}

    def torch_tables(sigmas: list[int], dt: torch.dtype) -> list[TorchTable]:
        missing = [s for s in sigmas if (s, dt) not in converted]
        for s, t in zip(missing, get_tables(missing) if missing else []):
            converted[(s, dt)] = t.to_torch(dev, dt)
        return [converted[(s, dt)] for s in sigmas]

    for epoch in range(n_epoch):
        if check_cancel is not None:
            check_cancel()
        table = torch_tables([sigma], dtype)[0]
        design = SharedDesign(P, y, u, table)
        res = solve_irwls(design, y.shape[0], n_iter=n_iter, min_change=min_change, step=step, dtype=dtype, device=dev)
        pred = (res.weights @ P.T) * u[:, None]
        pos = SIGMA_GRID.index(sigma)
        window = list(SIGMA_GRID[max(0, pos - SIGMA_WINDOW) : pos + SIGMA_WINDOW + 1])
        tables = torch_tables(window, torch.float64)
        flat_pred, flat_y = pred.reshape(-1).double(), y.reshape(-1).double()
        if sample is not None:
            flat_pred, flat_y = flat_pred[sample], flat_y[sample]
        scores = score_sigmas(flat_pred, flat_y, tables)
        new_sigma = window[int(np.argmin(scores))]
        if progress is not None:
            progress((epoch + 1) / n_epoch, f"epoch {epoch + 1}: sigma {new_sigma / 100:.2f}")
        path.append(new_sigma)
        if new_sigma == sigma:
            break
        sigma = new_sigma
    return sigma, path
