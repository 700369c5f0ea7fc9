"""cell2location's per-spot intervals: draws from the fitted guide.

The guide is mean-field log-normal, so the posterior of the abundances w_sf (cells of type f at spot s) is
independent of every other site and of the other spots: log w_sf ~ N(loc_sf, scale_sf). Each draw of a spot's
row w_s· is turned into proportions and the 5 % / 95 % quantiles over ``n_samples`` draws per spot and type are
the nominal 90 % interval. The signatures (the reference regression's posterior means) are taken as known, so the
interval is conditional on them, as the package's own quantiles are.

Cells come whole: in a draw, a type with less than ``min_cells`` (default half a cell) at the spot has no cell
there, so its abundance counts as 0 before the row is normalised. A log-normal draw is never exactly 0, so
without this an absent type's interval could never reach its true proportion 0 (on a simulated slide 65 % of the
(spot, type) cells are absent and none was covered); the mass it frees goes to the types present in that draw.

The point estimate (E[w_sf] / Σ_f E[w_sf], the ratio of posterior means, as the engine has always reported it) is
not a quantile of the same draws, so where it falls outside them the interval is widened to hold it;
:func:`posterior_intervals` says in how many (spot, type) cells that happened.
"""

from __future__ import annotations

import numpy as np
import torch

from .model import SpatialModel

LEVEL_QUANTILES = (0.05, 0.95)
# draws x spots x types per chunk: bounds the memory of the draws to ~32 MB (float64) whatever the slide
CHUNK_ELEMENTS = 4_000_000


@torch.no_grad()
def abundance_draws(model: SpatialModel, n_samples: int, generator: torch.Generator, rows: slice) -> torch.Tensor:
    """``n_samples`` draws of the abundances of the spots ``rows`` from the guide: (samples, spots, types)."""
    site = model.guide.sites["w_sf"]
    shape = site.shape
    loc = model.guide.loc[site.start : site.start + site.size].view(shape)[rows].double()
    scale = torch.nn.functional.softplus(model.guide.raw_scale[site.start : site.start + site.size])
    scale = scale.view(shape)[rows].double()
    eps = torch.randn((n_samples, *loc.shape), generator=generator, device=loc.device, dtype=loc.dtype)
    return torch.exp(loc + scale * eps)


def whole_cell_proportions(abundances: torch.Tensor, min_cells: float) -> torch.Tensor:
    """Proportions of each draw's row, types below ``min_cells`` counted as absent; a row where every type is below
    it (a near-empty spot) keeps its abundances as drawn."""
    kept = torch.where(abundances < min_cells, torch.zeros_like(abundances), abundances)
    total = kept.sum(-1, keepdim=True)
    kept = torch.where(total > 0, kept, abundances)
    return kept / kept.sum(-1, keepdim=True)


def posterior_intervals(
    model: SpatialModel, point: np.ndarray, n_samples: int = 200, seed: int = 0, min_cells: float = 0.5
) -> tuple[np.ndarray, np.ndarray, int]:
    """(lower, upper, widened): the 5 % / 95 % quantiles of the proportions over ``n_samples`` guide draws per spot
    and type (:func:`whole_cell_proportions`), each widened to hold ``point`` where needed; ``widened`` counts the
    (spot, type) cells that were."""
    n_spots, n_types = point.shape
    device = model.guide.loc.device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    lower = np.empty((n_spots, n_types))
    upper = np.empty((n_spots, n_types))
    step = max(1, CHUNK_ELEMENTS // max(1, int(n_samples) * n_types))
    for start in range(0, n_spots, step):
        rows = slice(start, min(start + step, n_spots))
        props = whole_cell_proportions(abundance_draws(model, int(n_samples), generator, rows), float(min_cells))
        lower[rows], upper[rows] = np.quantile(props.cpu().numpy(), LEVEL_QUANTILES, axis=0)
    widened = int(((point < lower) | (point > upper)).sum())
    return np.minimum(lower, point), np.maximum(upper, point), widened
