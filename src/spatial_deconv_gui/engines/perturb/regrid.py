"""Per-cell transition vectors averaged on a coarser lattice: the arrow density the Knockout dock shows."""

from __future__ import annotations

import numpy as np

MIN_CELLS_PER_ARROW = 3  # a grid arrow needs a few cells behind it


def regrid(points_xy: np.ndarray, cell_vectors: np.ndarray, n_grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Average per-cell vectors over an n_grid x n_grid lattice; returns the kept cells' centres and means."""
    pts = np.asarray(points_xy, dtype=float)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    step = (hi - lo) / max(n_grid, 1)
    ij = np.clip(((pts - lo) / np.where(step > 0, step, 1)).astype(int), 0, n_grid - 1)
    flat = ij[:, 0] * n_grid + ij[:, 1]
    counts = np.bincount(flat, minlength=n_grid * n_grid)
    sums = np.stack([np.bincount(flat, weights=cell_vectors[:, d], minlength=n_grid * n_grid) for d in (0, 1)], 1)
    keep = counts >= MIN_CELLS_PER_ARROW
    gi, gj = np.divmod(np.arange(n_grid * n_grid), n_grid)
    centres = lo + (np.stack([gi, gj], 1) + 0.5) * step
    return centres[keep], sums[keep] / counts[keep, None]
