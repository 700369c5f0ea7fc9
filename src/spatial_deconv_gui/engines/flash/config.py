"""Configuration of the flash engine (FlashDeconv's sketched, graph-regularised NNLS).

Names and defaults follow FlashDeconv 0.2.0 (``FlashDeconv(...)``/``tl.deconvolve``) so runs compare one to
one; ``seed`` is its ``random_state``. Fields are plain scalars so the CLI can generate flags from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..options import DEVICE_HELP

PREPROCESS = ("log_cpm", "pearson", "raw")
WEIGHTINGS = ("expected", "countsketch")
SPATIAL_METHODS = ("knn", "radius", "grid")


@dataclass(frozen=True)
class FlashConfig:
    sketch_dim: int = field(
        default=512,
        metadata={"help": "CountSketch buckets d (sets the expected gene weights, or the sketch dimension)"},
    )
    gene_weighting: Literal["expected", "countsketch"] = field(
        default="expected",
        metadata={
            "help": "leverage weighting of genes: deterministic expected sketch weights, or a seeded random CountSketch"
        },
    )
    lambda_spatial: str = field(
        default="auto", metadata={"help": "spatial smoothing strength: 'auto' (FlashDeconv's rule) or a number >= 0"}
    )
    rho_sparsity: float = field(
        default=0.01, metadata={"help": "L1 penalty pushing small proportions to zero, as a fraction of mean diag(XXᵀ)"}
    )
    n_hvg: int = field(default=2000, metadata={"help": "highly variable genes taken from the slide"})
    n_markers_per_type: int = field(default=50, metadata={"help": "marker genes per cell type from the reference"})
    preprocess: Literal["log_cpm", "pearson", "raw"] = field(
        default="log_cpm",
        metadata={"help": "transform of counts and signatures: log-CPM, Pearson residuals or raw counts"},
    )
    spatial_method: Literal["knn", "radius", "grid"] = field(default="knn", metadata={"help": "spatial graph"})
    k_neighbors: int = field(default=6, metadata={"help": "neighbours per spot for the kNN graph"})
    radius: float | None = field(default=None, metadata={"help": "radius for the radius graph (coordinate units)"})
    max_iter: int = field(default=1000, metadata={"help": "maximum BCD iterations"})
    tol: float = field(default=1e-4, metadata={"help": "stop when max |Δβ| / max |β| falls below this"})
    min_counts: int = field(default=0, metadata={"help": "spots with fewer counts (shared genes) are not fitted"})
    seed: int = field(default=0, metadata={"help": "seed of the random CountSketch"})
    objective_every: int = field(
        default=10, metadata={"help": "record the objective every N iterations (0: final value only)"}
    )
    uncertainty: bool = field(
        default=False,
        metadata={
            "help": (
                "also write a nominal 90% interval per spot and type (obsm flash_proportions_q05 / _q95) by a "
                "bootstrap over the genes (expected gene weighting)"
            )
        },
    )
    n_bootstrap: int = field(default=40, metadata={"help": "refits on resampled genes for the uncertainty intervals"})
    n_threads: int | None = field(default=None, metadata={"help": "numba threads (default: all)"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})

    def lambda_value(self) -> float | None:
        """None for 'auto', else the numeric λ."""
        v = self.lambda_spatial
        if isinstance(v, str):
            if v.strip().lower() == "auto":
                return None
            v = float(v)
        return float(v)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lambda_spatial"] = str(self.lambda_spatial)
        return d


def validate_config(config: FlashConfig) -> list[str]:
    """Human-readable problems with ``config`` (empty when usable)."""
    p: list[str] = []
    try:
        lam = config.lambda_value()
        if lam is not None and not (lam >= 0 and lam < float("inf")):
            p.append(f"lambda_spatial must be 'auto' or a finite number >= 0, got {config.lambda_spatial!r}")
    except (TypeError, ValueError):
        p.append(f"lambda_spatial must be 'auto' or a number, got {config.lambda_spatial!r}")
    if not isinstance(config.sketch_dim, int) or config.sketch_dim <= 0:
        p.append(f"sketch_dim must be a positive integer, got {config.sketch_dim!r}")
    if config.gene_weighting not in WEIGHTINGS:
        p.append(f"gene_weighting must be one of {WEIGHTINGS}, got {config.gene_weighting!r}")
    if config.preprocess not in PREPROCESS:
        p.append(f"preprocess must be one of {PREPROCESS}, got {config.preprocess!r}")
    if config.spatial_method not in SPATIAL_METHODS:
        p.append(f"spatial_method must be one of {SPATIAL_METHODS}, got {config.spatial_method!r}")
    if config.spatial_method == "radius" and (config.radius is None or not config.radius > 0):
        p.append("spatial_method 'radius' needs a positive radius")
    if config.rho_sparsity < 0:
        p.append(f"rho_sparsity must be >= 0, got {config.rho_sparsity}")
    for name in ("n_hvg", "n_markers_per_type", "k_neighbors", "max_iter", "min_counts", "objective_every"):
        if getattr(config, name) < 0:
            p.append(f"{name} must be >= 0, got {getattr(config, name)}")
    if not config.tol > 0:
        p.append(f"tol must be > 0, got {config.tol}")
    if config.uncertainty and config.n_bootstrap < 2:
        p.append(f"n_bootstrap must be >= 2 for intervals, got {config.n_bootstrap}")
    if config.uncertainty and config.gene_weighting != "expected":
        p.append("uncertainty (the gene bootstrap) needs gene_weighting 'expected': pass --gene-weighting expected")
    if config.n_threads is not None and config.n_threads < 1:
        p.append(f"n_threads must be >= 1, got {config.n_threads}")
    return p
