"""Configuration of the RCTD engine.

Parameter names follow spacexr's ``create.RCTD`` / ``run.RCTD`` arguments (lower-cased), with the same
defaults, so that results can be compared with R runs one to one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

Mode = Literal["full", "doublet", "multi"]

MODES: tuple[str, ...] = ("full", "doublet", "multi")
DTYPES: tuple[str, ...] = ("float64", "float32")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RCTDConfig:
    """All knobs of one RCTD run.

    ``sigma_override`` is sigma_c in natural units (spacexr prints ``sigma/100``, e.g. 0.84); when set the
    sigma search is skipped. ``class_df`` maps cell type -> class name (doublet mode confidence is then
    judged per class, as spacexr's ``class_df``). ``batch_size=None`` (or 0) picks a size from free memory.
    """

    mode: Mode = "doublet"
    # gene selection (platform-effect genes, then regression genes)
    gene_cutoff: float = 0.000125
    fc_cutoff: float = 0.5
    gene_cutoff_reg: float = 0.0002
    fc_cutoff_reg: float = 0.75
    min_obs: int = 3
    # pixel filters
    umi_min: float = 100
    umi_max: float = 2e7
    counts_min: float = 10
    umi_min_sigma: float = 300
    # reference
    cell_min: int = 25
    n_max_cells: int = 10000
    ref_umi_min: float = 100
    strict: bool = False
    # sigma estimation
    n_fit: int = 1000
    n_epoch: int = 8
    sigma_override: float | None = None
    # doublet / multi
    max_multi_types: int = 4
    confidence_threshold: float = 5.0
    doublet_threshold: float = 20.0
    class_df: Mapping[str, str] | None = None
    # solver
    n_iter: int = 50
    n_iter_score: int = 25
    n_iter_bulk: int = 100
    min_change: float = 0.001
    min_change_bulk: float = 0.0001
    step_size: float = 0.3
    k_val: int = 1000
    # execution
    dtype: Literal["float64", "float32"] = "float64"
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    batch_size: int | None = None
    seed: int = 0
    table_cache: bool = True
    cache_dir: str | None = None
    n_threads: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_df"] = None if self.class_df is None else dict(self.class_df)
        d["extra"] = dict(self.extra)
        return d


def validate_config(config: RCTDConfig) -> list[str]:
    """Return a list of human-readable problems with ``config`` (empty when it is usable)."""
    problems: list[str] = []
    if config.mode not in MODES:
        problems.append(f"mode must be one of {MODES}, got {config.mode!r}")
    if config.dtype not in DTYPES:
        problems.append(f"dtype must be one of {DTYPES}, got {config.dtype!r}")
    if config.device not in DEVICES and not str(config.device).startswith("cuda:"):
        problems.append(f"device must be one of {DEVICES} or 'cuda:N', got {config.device!r}")
    for name in ("gene_cutoff", "gene_cutoff_reg", "fc_cutoff", "fc_cutoff_reg", "confidence_threshold",
                 "doublet_threshold", "umi_min", "counts_min", "umi_min_sigma", "ref_umi_min"):
        if getattr(config, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(config, name)!r}")
    if config.umi_max <= config.umi_min:
        problems.append(f"umi_max ({config.umi_max}) must exceed umi_min ({config.umi_min})")
    for name in ("cell_min", "n_max_cells", "n_fit", "n_epoch", "max_multi_types", "n_iter", "n_iter_score",
                 "n_iter_bulk", "k_val"):
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"{name} must be a positive integer, got {v!r}")
    if config.min_obs < 0:
        problems.append(f"min_obs must be >= 0, got {config.min_obs!r}")
    if not (0 < config.step_size <= 1):
        problems.append(f"step_size must be in (0, 1], got {config.step_size!r}")
    if config.min_change <= 0 or config.min_change_bulk <= 0:
        problems.append("min_change and min_change_bulk must be > 0")
    if config.sigma_override is not None and not (0 < float(config.sigma_override) <= 5):
        problems.append(
            f"sigma_override is sigma_c in natural units (e.g. 0.84), expected in (0, 5], got {config.sigma_override!r}")
    if config.batch_size is not None and (not isinstance(config.batch_size, int) or config.batch_size < 0):
        problems.append(f"batch_size must be None/0 (automatic) or a positive integer, got {config.batch_size!r}")
    if config.n_threads is not None and config.n_threads < 1:
        problems.append(f"n_threads must be None or >= 1, got {config.n_threads!r}")
    if config.class_df is not None and not isinstance(config.class_df, Mapping):
        problems.append("class_df must be a mapping cell type -> class")
    return problems


def check_config(config: RCTDConfig) -> None:
    """Raise ``ValueError`` listing every problem found by :func:`validate_config`."""
    problems = validate_config(config)
    if problems:
        raise ValueError("invalid RCTD configuration: " + "; ".join(problems))
