"""Configuration of the cell2location-model engine.

Names follow cell2location's arguments (lower-cased) with the package's defaults, so runs can be compared with
``cell2location.models.RegressionModel`` / ``Cell2location`` one to one, except the spatial model's schedule:
5x the learning rate for a fifth of the epochs (lr 0.01, 6,500 epochs, the last fifth annealed) reaches the
answer of the package's 30,000 epochs at lr 0.002 in a quarter of the time; ``lr=0.002, max_epochs=30000,
lr_anneal=0, early_stop=False`` is the package's schedule exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..options import DEVICE_HELP

SIGNATURES = ("regression", "means")


@dataclass(frozen=True)
class C2LConfig:
    """All knobs of one run.

    ``signatures="regression"`` learns reference signatures by NB regression (cell2location's RegressionModel);
    with ``reference_batch_col`` it models each batch's detection efficiency and additive background (the
    package's ``batch_key``; the labels reach :func:`run_c2l` as ``reference_batches``);
    ``"means"`` uses the per-type mean counts of the reference (the quick path). ``reference_epochs=0`` uses the
    package heuristic (min(20000 / n_cells * 1000, 1000)). The gene filter is cell2location's ``filter_genes``
    with the tutorial cutoffs, applied to the reference before intersecting genes with the slide.
    """

    # spatial model (Cell2location)
    n_cells_per_location: float = field(
        default=8.0, metadata={"help": "expected cells per spot, from histology (cell2location N_cells_per_location)"}
    )
    detection_alpha: float = field(
        default=20.0,
        metadata={
            "help": "prior strength of per-spot detection: 20 lets it vary within a slide, 200 keeps it near constant"
        },
    )
    n_groups: int = field(
        default=50, metadata={"help": "groups of co-located cell types in the abundance prior (cell2location n_groups)"}
    )
    max_epochs: int = field(
        default=6500,
        metadata={
            "help": (
                "spatial model epochs, the cap; 6500 at lr 0.01 with lr_anneal 0.2 gives the answer of cell2location's "
                "default 30000 epochs at lr 0.002 (the same lr x epochs; benchmarks/RESULTS.md); the map streams as "
                "it trains"
            )
        },
    )
    lr: float = field(
        default=0.01,
        metadata={"help": "Adam learning rate of the spatial model (cell2location's default: 0.002 for 30000 epochs)"},
    )
    lr_anneal: float = field(
        default=0.2,
        metadata={
            "help": (
                "share of the last epochs over which the learning rate falls linearly to a fifth (0: constant); "
                "a run that early_stop ends before then keeps the full rate"
            )
        },
    )
    early_stop: bool = field(
        default=True,
        metadata={
            "help": (
                "stop the spatial model once the proportions stop moving (max_epochs stays the cap); "
                "--no-early-stop trains exactly max_epochs"
            )
        },
    )
    convergence_tol: float = field(
        default=0.005,
        metadata={
            "help": (
                "early stop: converged when, over convergence_window epochs, 95% of spots changed less than this "
                "share of their cells' types (3 checks in a row)"
            )
        },
    )
    convergence_window: int = field(
        default=1000,
        metadata={"help": "early stop: epochs between the two answers compared (checked every tenth of it)"},
    )
    # reference signatures (RegressionModel)
    signatures: Literal["regression", "means"] = field(
        default="regression",
        metadata={"help": "regression: NB regression over the reference; means: per-type mean counts (quick)"},
    )
    reference_epochs: int = field(
        default=0, metadata={"help": "reference regression epochs; 0 = package heuristic min(20000/n_cells*1000, 1000)"}
    )
    reference_batch_size: int = field(
        default=2500, metadata={"help": "cells per reference regression step (cell2location default 2500)"}
    )
    reference_lr: float = field(default=0.002, metadata={"help": "Adam learning rate of the reference regression"})
    reference_batch_col: str | None = field(
        default=None,
        metadata={
            "help": (
                "reference obs column naming each cell's batch (sample, donor, technology): the regression then fits a "
                "detection efficiency and a background per batch (cell2location batch_key); empty or none: one batch"
            )
        },
    )
    # genes
    gene_filter: bool = field(
        default=True, metadata={"help": "cell2location's reference gene filter before intersecting genes"}
    )
    cell_count_cutoff: int = field(
        default=5, metadata={"help": "gene filter: genes in fewer cells are dropped unless frequent enough"}
    )
    cell_percentage_cutoff2: float = field(
        default=0.03, metadata={"help": "gene filter: genes in more than this fraction of cells are always kept"}
    )
    nonz_mean_cutoff: float = field(
        default=1.12, metadata={"help": "gene filter: minimum mean over non-zero cells for rarer genes"}
    )
    # uncertainty
    uncertainty: bool = field(
        default=False,
        metadata={
            "help": (
                "also write a nominal 90% interval per spot and type (obsm c2l_proportions_q05 / _q95) from draws "
                "of the fitted posterior of the abundances"
            )
        },
    )
    interval_samples: int = field(
        default=200, metadata={"help": "posterior draws per spot for the uncertainty intervals"}
    )
    interval_min_cells: float = field(
        default=0.5,
        metadata={
            "help": (
                "intervals: in a posterior draw, a type with fewer cells than this at a spot counts as absent there "
                "(cells come whole; 0 keeps every draw as drawn, and an absent type's interval never reaches 0)"
            )
        },
    )
    # execution
    report_every: int = field(default=500, metadata={"help": "stream the current abundance map every this many epochs"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    n_threads: int | None = field(
        default=None,
        metadata={
            "help": (
                "torch CPU threads for this run (default: one on the CPU, where a second only waits; "
                "torch's setting on a GPU)"
            )
        },
    )
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_config(config: C2LConfig) -> list[str]:
    problems: list[str] = []
    if config.signatures not in SIGNATURES:
        problems.append(f"signatures must be one of {SIGNATURES}, got {config.signatures!r}")
    for name in ("n_cells_per_location", "detection_alpha", "lr", "reference_lr", "nonz_mean_cutoff"):
        if not float(getattr(config, name)) > 0:
            problems.append(f"{name} must be > 0, got {getattr(config, name)!r}")
    if not 0 <= float(config.lr_anneal) <= 1:
        problems.append(f"lr_anneal must be in [0, 1], got {config.lr_anneal!r}")
    if not 0 < float(config.convergence_tol) < 1:
        problems.append(f"convergence_tol must be in (0, 1), got {config.convergence_tol!r}")
    if not isinstance(config.convergence_window, int) or config.convergence_window < 10:
        problems.append(f"convergence_window must be an integer >= 10, got {config.convergence_window!r}")
    for name in ("n_groups", "max_epochs", "reference_batch_size", "report_every"):
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(config.interval_samples, int) or isinstance(config.interval_samples, bool):
        problems.append(f"interval_samples must be an integer >= 20, got {config.interval_samples!r}")
    elif config.interval_samples < 20:
        problems.append(
            f"interval_samples must be >= 20 (5 % / 95 % quantiles need draws), got {config.interval_samples}"
        )
    min_cells, n_cells = float(config.interval_min_cells), float(config.n_cells_per_location)
    if not min_cells >= 0 or (n_cells > 0 and min_cells >= n_cells):
        problems.append(
            f"interval_min_cells must be >= 0 and below n_cells_per_location, got {config.interval_min_cells!r}"
        )
    if not isinstance(config.reference_epochs, int) or config.reference_epochs < 0:
        problems.append(f"reference_epochs must be >= 0 (0: package heuristic), got {config.reference_epochs!r}")
    if config.cell_count_cutoff < 0 or not (0 <= config.cell_percentage_cutoff2 <= 1):
        problems.append("cell_count_cutoff must be >= 0 and cell_percentage_cutoff2 in [0, 1]")
    if config.n_threads is not None and (not isinstance(config.n_threads, int) or config.n_threads < 1):
        problems.append(f"n_threads must be None or a positive integer, got {config.n_threads!r}")
    col = config.reference_batch_col
    if col is not None and not isinstance(col, str):
        problems.append(f"reference_batch_col must be an obs column name or None, got {col!r}")
    dev = str(config.device)
    if dev not in ("auto", "cpu", "cuda") and not dev.startswith("cuda:"):
        problems.append(f"device must be auto, cpu or cuda[:n], got {config.device!r}")
    return problems


def batch_column(config: C2LConfig) -> str | None:
    """The reference batch column, or None; "", "none" (any case) also mean none (a cleared GUI field)."""
    col = config.reference_batch_col
    if col is None or not str(col).strip() or str(col).strip().lower() == "none":
        return None
    return str(col).strip()


def convergence_rule(config: C2LConfig):
    """The early-stopping rule of the spatial model, or None when ``early_stop`` is off."""
    from ..convergence import ConvergenceRule

    if not config.early_stop:
        return None
    window = int(config.convergence_window) // 10 * 10
    return ConvergenceRule(tol=float(config.convergence_tol), window=window, check_every=window // 10)


def check_config(config: C2LConfig) -> None:
    problems = validate_config(config)
    if problems:
        from ...io.errors import InputError

        raise InputError(
            "invalid cell2location configuration: " + "; ".join(problems) + ".",
            "change those options (a field name_like_this is the flag --name-like-this); "
            "`spatial-deconv run SLIDE REF --method c2l --help` lists every option with its default.",
            code="bad_option",
        )
