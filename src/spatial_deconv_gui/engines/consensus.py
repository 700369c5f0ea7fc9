"""A consensus of several deconvolution results on one slide, and how much the methods agree.

Inputs are aligned arrays: one ``(spots, types)`` proportions table per method, same spots and types in the same
order, NaN rows for spots a method did not fit; optionally each method's nominal 90 % interval (lower, upper).

Combination. Per spot and type the consensus is a weighted mean of the methods' proportions, then each row is
renormalised to sum to 1. With intervals from every method the weights are inverse variances: a nominal 90 %
interval of a roughly normal estimate is 2 x 1.645 standard deviations wide, so ``w = 1 / width**2`` (the constant
cancels), the minimum-variance unbiased combination of independent estimates of one quantity. Widths are floored
at :data:`MIN_WIDTH`: the intervals carry the noise of the counts, not a method's bias or its reference's errors
(benchmarks/RESULTS.md, *Per-spot intervals*), and RCTD's doublet mode gives [0, 0] to every type outside its
pair; without the floor such a method would outvote all others on that type outright. Without intervals from
every method the weights are equal (a mean of the methods): weighting some by intervals and guessing the others'
would make the guess decide.

Agreement. Per spot: 1 − the mean total-variation distance between every pair of methods that fitted it,
``TV(p, q) = ½ Σ_t |p_t − q_t|`` (the largest difference in the share of any set of types; 0 = same composition,
1 = no type in common), so agreement lies in [0, 1], 1 when all methods give the same composition; NaN when fewer
than two methods fitted the spot. Per type, over the spots every method fitted: 1 − the mean absolute difference
of that type's proportion between pairs of methods, and the mean Pearson correlation across spots between pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

# narrowest interval taken at face value (see the module docstring): ±0.01 around the estimate
MIN_WIDTH = 0.02
WEIGHTINGS = ("auto", "intervals", "equal")


@dataclass
class Consensus:
    proportions: np.ndarray  # spots x types, rows sum to 1; NaN rows where no method fitted the spot
    agreement: np.ndarray  # per spot, in [0, 1]; NaN where fewer than two methods fitted it
    type_agreement: pd.DataFrame  # one row per type
    weighting: str  # "intervals" or "equal"
    n_methods: np.ndarray  # per spot: how many methods fitted it


def weights_from_intervals(lower: np.ndarray, upper: np.ndarray, min_width: float = MIN_WIDTH) -> np.ndarray:
    """Inverse-variance weights (up to a constant) from nominal 90 % intervals: ``1 / max(width, min_width)**2``."""
    width = np.maximum(np.asarray(upper, float) - np.asarray(lower, float), min_width)
    return 1.0 / width**2


def combine(
    proportions: list[np.ndarray],
    lower: list[np.ndarray | None] | None = None,
    upper: list[np.ndarray | None] | None = None,
    weighting: str = "auto",
    min_width: float = MIN_WIDTH,
) -> tuple[np.ndarray, str]:
    """The consensus proportions and the weighting used (``"intervals"`` or ``"equal"``).

    ``weighting``: ``"auto"`` uses intervals when every method has them, ``"intervals"`` insists on them,
    ``"equal"`` ignores them. A method that did not fit a spot (NaN row) has no say there.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, not {weighting!r}")
    props = np.stack([np.asarray(p, float) for p in proportions])  # methods x spots x types
    n = len(proportions)
    lower = list(lower) if lower is not None else [None] * n
    upper = list(upper) if upper is not None else [None] * n
    have = all(lo is not None and hi is not None for lo, hi in zip(lower, upper))
    if weighting == "intervals" and not have:
        raise ValueError("weighting 'intervals' needs every result's interval")
    used = "intervals" if have and weighting != "equal" else "equal"
    fitted = ~np.isnan(props).any(axis=2)  # methods x spots
    if used == "intervals":
        w = np.stack([weights_from_intervals(lo, hi, min_width) for lo, hi in zip(lower, upper)])
        w = np.where(np.isfinite(w), w, 0.0)
    else:
        w = np.ones_like(props)
    w = w * fitted[:, :, None]
    total = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(w * np.nan_to_num(props), axis=0) / total
        out = mean / mean.sum(axis=1, keepdims=True)
    out[~fitted.any(axis=0)] = np.nan
    return out, used


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise total-variation distance ½ Σ |p − q| (in [0, 1] for compositions); NaN where either row is."""
    return 0.5 * np.abs(np.asarray(p, float) - np.asarray(q, float)).sum(axis=1)


def spot_agreement(proportions: list[np.ndarray]) -> np.ndarray:
    """1 − the mean pairwise total-variation distance per spot, over the pairs of methods that both fitted it."""
    props = [np.asarray(p, float) for p in proportions]
    total = np.zeros(props[0].shape[0])
    pairs = np.zeros(props[0].shape[0])
    for a, b in combinations(props, 2):
        d = total_variation(a, b)
        ok = np.isfinite(d)
        total[ok] += d[ok]
        pairs[ok] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        agreement = 1.0 - total / pairs
    agreement[pairs == 0] = np.nan
    return np.clip(agreement, 0.0, 1.0)


def type_agreement(proportions: list[np.ndarray], cell_types: list[str], consensus: np.ndarray) -> pd.DataFrame:
    """Per type, over the spots every method fitted: 1 − mean |difference| between pairs of methods, the mean
    pairwise Pearson correlation across spots (NaN for a type a method gives one constant value), and the mean
    consensus proportion."""
    props = [np.asarray(p, float) for p in proportions]
    every = np.all([~np.isnan(p).any(axis=1) for p in props], axis=0)
    diffs, corrs = [], []
    for a, b in combinations(props, 2):
        a, b = a[every], b[every]
        diffs.append(np.abs(a - b).mean(axis=0) if every.any() else np.full(len(cell_types), np.nan))
        corrs.append([_pearson(a[:, t], b[:, t]) for t in range(len(cell_types))])
    with np.errstate(invalid="ignore"):
        mean_corr = np.nanmean(np.asarray(corrs, float), axis=0) if np.isfinite(corrs).any() else np.nan
    return pd.DataFrame(
        {
            "agreement": 1.0 - np.mean(diffs, axis=0),
            "mean_abs_difference": np.mean(diffs, axis=0),
            "mean_correlation": mean_corr,
            "mean_consensus_proportion": np.nanmean(consensus, axis=0),
        },
        index=pd.Index([str(t) for t in cell_types], name="cell_type"),
    )


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def consensus(
    proportions: list[np.ndarray],
    cell_types: list[str],
    lower: list[np.ndarray | None] | None = None,
    upper: list[np.ndarray | None] | None = None,
    weighting: str = "auto",
    min_width: float = MIN_WIDTH,
) -> Consensus:
    """Combine two or more aligned results (see the module docstring)."""
    if len(proportions) < 2:
        raise ValueError("a consensus needs two or more results")
    combined, used = combine(proportions, lower, upper, weighting, min_width)
    n_methods = np.sum([~np.isnan(np.asarray(p, float)).any(axis=1) for p in proportions], axis=0)
    return Consensus(
        proportions=combined,
        agreement=spot_agreement(proportions),
        type_agreement=type_agreement(proportions, cell_types, combined),
        weighting=used,
        n_methods=n_methods,
    )
