"""Colours and comparisons for result layers, as plain numpy (the widgets only assign them)."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.colors import to_rgba
from scipy.spatial import cKDTree

from ..colors import FILTERED_COLOR

SPOT_CLASS_COLORS = {
    "singlet": "#2ca02c",
    "doublet_certain": "#1f77b4",
    "doublet_uncertain": "#ff7f0e",
    "reject": "#d62728",
    "filtered": FILTERED_COLOR,
}
COLORMAPS = ("viridis", "magma", "inferno", "plasma", "cividis", "Reds", "Blues", "Greens")
PENDING_RGBA = np.array([0.35, 0.35, 0.35, 0.6], dtype=np.float32)
# A spot whose interval is wider than the threshold: a light grey (against a dark canvas) ringed in near-black
# (against a light H&E), apart from filtered spots' solid mid grey. The ring is drawn on Points layers; raster
# layers (past the points limit) have the face alone. The old faint light grey vanished on a light H&E.
UNCERTAIN_RGBA = np.array([0.72, 0.72, 0.72, 0.9], dtype=np.float32)
UNCERTAIN_EDGE_RGBA = np.array([0.08, 0.08, 0.08, 1.0], dtype=np.float32)
UNCERTAIN_EDGE_WIDTH = 0.18  # of the spot's diameter (napari's relative border width)
WIDTH_CMAP, WIDTH_MAX = "magma", 0.5  # interval-width layers: 0 to 0.5 (wider is clipped: too wide to use anyway)
AGREEMENT_CMAP = "RdYlGn"  # red: the methods disagree, green: they agree


def colormap_rgba(values: np.ndarray, cmap: str = "viridis", vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """RGBA per value through a matplotlib colormap; NaN (filtered spots) drawn grey."""
    values = np.asarray(values, dtype=float)
    norm = np.clip((values - vmin) / (vmax - vmin if vmax > vmin else 1.0), 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](np.nan_to_num(norm)).astype(np.float32)
    rgba[np.isnan(values)] = to_rgba(FILTERED_COLOR)
    return rgba


def expression_range(values: np.ndarray) -> tuple[float, float]:
    """Colour range of a non-negative expression map: 0 to its largest finite value (1 when all are 0 or NaN)."""
    v = np.asarray(values, dtype=float)
    top = float(np.nanmax(v)) if np.isfinite(v).any() else 0.0
    return 0.0, (top if top > 0 else 1.0)


def expression_rgba(values: np.ndarray, cmap: str = "viridis") -> tuple[np.ndarray, float, float]:
    """RGBA per spot for an expression map, with the (vmin, vmax) its colorbar shows."""
    vmin, vmax = expression_range(values)
    return colormap_rgba(values, cmap, vmin, vmax), vmin, vmax


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon distance (base 2, in [0, 1]); NaN where either row is NaN."""
    p = np.asarray(p, dtype=float)
    q = np.asarray(q, dtype=float)
    p = p / p.sum(axis=1, keepdims=True)
    q = q / q.sum(axis=1, keepdims=True)
    m = 0.5 * (p + q)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(a > 0, a * np.log2(a / b), 0.0)
        return t.sum(axis=1)

    d = np.sqrt(np.clip(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0, 1.0))
    d[np.isnan(p).any(axis=1) | np.isnan(q).any(axis=1)] = np.nan
    return d


@dataclass
class Comparison:
    cell_types: list[str]
    same_dominant: np.ndarray  # bool per spot (False where either is filtered)
    js: np.ndarray  # per spot, NaN where either is filtered
    both_fitted: np.ndarray

    @property
    def agreement(self) -> float:
        n = int(self.both_fitted.sum())
        return float(self.same_dominant[self.both_fitted].mean()) if n else float("nan")

    def summary(self) -> dict:
        js = self.js[self.both_fitted]
        return {
            "spots_compared": int(self.both_fitted.sum()),
            "dominant_type_agreement": round(self.agreement, 4),
            "median_js_distance": round(float(np.median(js)), 4) if js.size else float("nan"),
            "mean_js_distance": round(float(np.mean(js)), 4) if js.size else float("nan"),
        }


def compare_proportions(a: np.ndarray, types_a: list[str], b: np.ndarray, types_b: list[str]) -> Comparison:
    """Per-spot agreement of two results over the union of their cell types (missing types count as 0)."""
    types = list(dict.fromkeys(list(types_a) + list(types_b)))

    def expand(p, names):
        out = np.zeros((p.shape[0], len(types)))
        idx = [types.index(t) for t in names]
        out[:, idx] = p
        out[np.isnan(p).any(axis=1)] = np.nan
        return out

    pa, pb = expand(np.asarray(a, float), types_a), expand(np.asarray(b, float), types_b)
    both = ~(np.isnan(pa).any(axis=1) | np.isnan(pb).any(axis=1))
    same = np.zeros(pa.shape[0], dtype=bool)
    same[both] = np.argmax(pa[both], axis=1) == np.argmax(pb[both], axis=1)
    return Comparison(types, same, js_distance(pa, pb), both)


def nearest_spot(tree: cKDTree, position, max_dist: float) -> int | None:
    """Index of the spot under a canvas position (napari order), or None when the click misses the tissue."""
    d, i = tree.query(np.asarray(position)[-2:])
    return int(i) if d <= max_dist else None
