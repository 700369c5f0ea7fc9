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

Interval. With interval weights the consensus gets its own nominal 90 % interval (:func:`combined_interval`): the
inverse-variance mean's σ = (Σ w)^-½, widened by the Birge ratio √(χ² / (k − 1)) when the k methods disagree by more
than their intervals allow. Without the widening the interval would be narrower than every input's even where the
methods contradict each other, i.e. most confident exactly where the answer is least sure. Equal weights give no
interval: some input has none, and any guess of its width would decide the result's.

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
Z90 = 1.6448536269514722  # the normal's 95 % quantile: a nominal 90 % interval is ±Z90 standard deviations
WEIGHTINGS = ("auto", "intervals", "equal")


@dataclass
class Consensus:
    proportions: np.ndarray  # spots x types, rows sum to 1; NaN rows where no method fitted the spot
    agreement: np.ndarray  # per spot, in [0, 1]; NaN where fewer than two methods fitted it
    type_agreement: pd.DataFrame  # one row per type
    weighting: str  # "intervals" or "equal"
    n_methods: np.ndarray  # per spot: how many methods fitted it
    lower: np.ndarray | None = None  # the consensus's nominal 90 % interval; None without interval weights
    upper: np.ndarray | None = None


def weights_from_intervals(lower: np.ndarray, upper: np.ndarray, min_width: float = MIN_WIDTH) -> np.ndarray:
    """Inverse-variance weights (up to a constant) from nominal 90 % intervals: ``1 / max(width, min_width)**2``."""
    width = np.maximum(np.asarray(upper, float) - np.asarray(lower, float), min_width)
    return 1.0 / width**2


def _method_weights(props, lower, upper, weighting, min_width):
    """Per method, spot and type: the weight (0 where the method did not fit the spot) and the weighting used."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, not {weighting!r}")
    n = len(props)
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
    return w * fitted[:, :, None], used


def _weighted_mean(props: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per spot and type Σ w p / Σ w over the methods (before the rows are renormalised)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(w * np.nan_to_num(props), axis=0) / w.sum(axis=0)


def _fitted_by_none(props: np.ndarray) -> np.ndarray:
    """Per spot: no method fitted it (every method's row is NaN)."""
    return np.isnan(props).any(axis=2).all(axis=0)


def _renormalised(mean: np.ndarray, props: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        out = mean / mean.sum(axis=1, keepdims=True)
    out[_fitted_by_none(props)] = np.nan
    return out


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
    props = np.stack([np.asarray(p, float) for p in proportions])  # methods x spots x types
    w, used = _method_weights(props, lower, upper, weighting, min_width)
    return _renormalised(_weighted_mean(props, w), props), used


def combined_interval(
    proportions: list[np.ndarray],
    lower: list[np.ndarray],
    upper: list[np.ndarray],
    min_width: float = MIN_WIDTH,
    spread: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The nominal 90 % interval (lower, upper) of the interval-weighted consensus, per spot and type.

    Each method's σ is its interval width (floored at ``min_width``, as for the weights) / (2 × 1.645); the
    inverse-variance mean μ = Σ w p / Σ w has σ = (Σ w)^-½. With ``spread`` (the default) σ is multiplied by the
    Birge ratio √(χ² / (k − 1)) where it exceeds 1, χ² = Σ w (p − μ)² over the k methods that fitted the spot:
    methods that disagree by more than their own intervals allow widen the interval to about their spread (two
    methods: ±1.645 × half their distance) instead of narrowing it below each one's. The interval μ ± 1.645 σ is
    scaled by the row's renormalisation (as the point is), clipped to [0, 1] and stretched to hold the point.
    NaN where no method fitted the spot.
    """
    props = np.stack([np.asarray(p, float) for p in proportions])
    w, _ = _method_weights(props, lower, upper, "intervals", min_width)
    w = w * (2.0 * Z90) ** 2  # 1 / σ², σ = width / (2 × 1.645); the weights above are 1 / width²
    mean = _weighted_mean(props, w)
    total = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = 1.0 / np.sqrt(total)
        if spread:
            k = (w > 0).sum(axis=0)
            chi2 = np.nansum(w * (np.nan_to_num(props) - mean) ** 2, axis=0)
            birge = np.where(k > 1, chi2 / np.maximum(k - 1, 1), 1.0)
            sigma = sigma * np.sqrt(np.maximum(birge, 1.0))
        row = mean.sum(axis=1, keepdims=True)
        point = mean / row
        lo = np.clip((mean - Z90 * sigma) / row, 0.0, 1.0)
        hi = np.clip((mean + Z90 * sigma) / row, 0.0, 1.0)
    lo, hi = np.fmin(lo, point), np.fmax(hi, point)
    none = _fitted_by_none(props)
    lo[none], hi[none] = np.nan, np.nan
    return lo, hi


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
    interval = combined_interval(proportions, lower, upper, min_width) if used == "intervals" else (None, None)
    n_methods = np.sum([~np.isnan(np.asarray(p, float)).any(axis=1) for p in proportions], axis=0)
    return Consensus(
        proportions=combined,
        agreement=spot_agreement(proportions),
        type_agreement=type_agreement(proportions, cell_types, combined),
        weighting=used,
        n_methods=n_methods,
        lower=interval[0],
        upper=interval[1],
    )
