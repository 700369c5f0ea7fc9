"""Configuration of the RCTD engine.

Parameter names follow spacexr's ``create.RCTD`` / ``run.RCTD`` arguments (lower-cased), with the same
defaults, so that results can be compared with R runs one to one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..options import DEVICE_HELP

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

    mode: Mode = field(
        default="doublet",
        metadata={
            "help": (
                "full: any mix of all types per spot; doublet: one or two types (spacexr's default, spot classes); "
                "multi: up to max_multi_types types"
            )
        },
    )
    # gene selection (platform-effect genes, then regression genes)
    gene_cutoff: float = field(
        default=0.000125,
        metadata={
            "help": "platform-effect genes: minimum mean normalised expression in the marked type (spacexr gene_cutoff)"
        },
    )
    fc_cutoff: float = field(
        default=0.5,
        metadata={
            "help": "platform-effect genes: minimum natural-log fold change against the other types (spacexr fc_cutoff)"
        },
    )
    gene_cutoff_reg: float = field(
        default=0.0002,
        metadata={
            "help": "regression genes: minimum mean normalised expression in the marked type (spacexr gene_cutoff_reg)"
        },
    )
    fc_cutoff_reg: float = field(
        default=0.75,
        metadata={
            "help": "regression genes: minimum natural-log fold change against the other types (spacexr fc_cutoff_reg)"
        },
    )
    min_obs: int = field(
        default=3, metadata={"help": "genes seen fewer times on the kept spots are not used (spacexr MIN_OBS)"}
    )
    # pixel filters
    umi_min: float = field(
        default=100, metadata={"help": "spots with fewer total UMI are not fitted (spacexr UMI_min)"}
    )
    umi_max: float = field(default=2e7, metadata={"help": "spots with more total UMI are not fitted (spacexr UMI_max)"})
    counts_min: float = field(
        default=10,
        metadata={"help": "spots with fewer counts on the selected genes are not fitted (spacexr counts_MIN)"},
    )
    umi_min_sigma: float = field(
        default=300,
        metadata={"help": "only spots with more total UMI are sampled to estimate sigma (spacexr UMI_min_sigma)"},
    )
    # reference
    cell_min: int = field(
        default=25,
        metadata={
            "help": (
                "reference cell types with fewer cells are dropped, or refused with strict (spacexr CELL_MIN_INSTANCE)"
            )
        },
    )
    n_max_cells: int = field(
        default=10000, metadata={"help": "most reference cells sampled per cell type (spacexr n_max_cells)"}
    )
    ref_umi_min: float = field(
        default=100,
        metadata={
            "help": (
                "reference cells with fewer total UMI are left out of the profiles (spacexr UMI_min of the reference)"
            )
        },
    )
    strict: bool = field(
        default=False, metadata={"help": "refuse a reference with cell types under cell_min instead of dropping them"}
    )
    # sigma estimation
    n_fit: int = field(
        default=1000, metadata={"help": "spots sampled to estimate sigma, the platform noise (spacexr N_fit)"}
    )
    n_epoch: int = field(default=8, metadata={"help": "rounds of the sigma search (spacexr N_epoch)"})
    sigma_override: float | None = field(
        default=None,
        metadata={
            "help": "sigma_c in natural units (spacexr prints sigma/100, e.g. 0.84): skip the sigma search and use it"
        },
    )
    # doublet / multi
    max_multi_types: int = field(
        default=4, metadata={"help": "multi mode: most cell types per spot (spacexr MAX_MULTI_TYPES)"}
    )
    confidence_threshold: float = field(
        default=5.0,
        metadata={
            "help": (
                "doublet and multi modes: a chosen type is confident when no other type comes within this "
                "log-likelihood of replacing it (spacexr CONFIDENCE_THRESHOLD)"
            )
        },
    )
    doublet_threshold: float = field(
        default=20.0,
        metadata={
            "help": (
                "log-likelihood gain needed for one more type: a pair over the best single type (doublet mode), each "
                "added type (multi mode) (spacexr DOUBLET_THRESHOLD)"
            )
        },
    )
    class_df: Mapping[str, str] | None = field(
        default=None,
        metadata={
            "help": "cell type -> class: doublet confidence is judged per class (spacexr class_df); Python API only"
        },
    )
    # solver
    n_iter: int = field(default=50, metadata={"help": "most IRWLS iterations per spot fit"})
    n_iter_score: int = field(
        default=25,
        metadata={"help": "most IRWLS iterations when scoring candidate type subsets in doublet and multi modes"},
    )
    n_iter_bulk: int = field(default=100, metadata={"help": "most iterations of the bulk (platform-effect) fit"})
    min_change: float = field(default=0.001, metadata={"help": "IRWLS stops when the weights change less than this"})
    min_change_bulk: float = field(
        default=0.0001, metadata={"help": "the bulk fit stops when its weights change less than this"}
    )
    step_size: float = field(default=0.3, metadata={"help": "IRWLS step length in (0, 1]"})
    k_val: int = field(
        default=1000,
        metadata={
            "help": "counts above this are clipped to it; the likelihood tables cover counts up to it (spacexr K_val)"
        },
    )
    # uncertainty
    uncertainty: bool = field(
        default=False,
        metadata={
            "help": (
                "also write a nominal 90% interval per spot and type (obsm rctd_proportions_q05 / _q95) from the "
                "curvature of the likelihood at the fitted weights; full and doublet modes"
            )
        },
    )
    interval_draws: int = field(
        default=400,
        metadata={"help": "draws from the likelihood's Gaussian approximation per spot for the interval"},
    )
    # execution
    dtype: Literal["float64", "float32"] = field(
        default="float64", metadata={"help": "float64 matches spacexr exactly; float32 is faster on GPUs"}
    )
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    batch_size: int | None = field(
        default=None, metadata={"help": "spots solved together; 0 or none picks a size from free memory"}
    )
    chunk_spots: int | None = field(
        default=None,
        metadata={
            "help": "read the slide from disk this many spots at a time (.h5ad or AnnData .zarr), so a slide larger "
            "than memory runs with one chunk of counts in memory; none reads the whole slide first"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the reference and sigma-fit sampling"})
    table_cache: bool = field(
        default=True, metadata={"help": "keep the likelihood tables on disk and reuse them on later runs"}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "folder of the likelihood-table cache (default: the user cache folder)"}
    )
    n_threads: int | None = field(
        default=None, metadata={"help": "numba / torch CPU threads for this run (default: all)"}
    )
    extra: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "further engine settings for experiments, recorded with the run; Python API only"},
    )

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
    for name in (
        "gene_cutoff",
        "gene_cutoff_reg",
        "fc_cutoff",
        "fc_cutoff_reg",
        "confidence_threshold",
        "doublet_threshold",
        "umi_min",
        "counts_min",
        "umi_min_sigma",
        "ref_umi_min",
    ):
        if getattr(config, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(config, name)!r}")
    if config.umi_max <= config.umi_min:
        problems.append(f"umi_max ({config.umi_max}) must exceed umi_min ({config.umi_min})")
    for name in (
        "cell_min",
        "n_max_cells",
        "n_fit",
        "n_epoch",
        "max_multi_types",
        "n_iter",
        "n_iter_score",
        "n_iter_bulk",
        "k_val",
        "interval_draws",
    ):
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
            f"sigma_override is sigma_c in natural units (e.g. 0.84), expected in (0, 5], got {config.sigma_override!r}"
        )
    if config.batch_size is not None and (not isinstance(config.batch_size, int) or config.batch_size < 0):
        problems.append(f"batch_size must be None/0 (automatic) or a positive integer, got {config.batch_size!r}")
    if config.chunk_spots is not None and (not isinstance(config.chunk_spots, int) or config.chunk_spots < 1):
        problems.append(f"chunk_spots must be None or a positive integer, got {config.chunk_spots!r}")
    if config.n_threads is not None and config.n_threads < 1:
        problems.append(f"n_threads must be None or >= 1, got {config.n_threads!r}")
    if config.uncertainty and config.mode == "multi":
        problems.append("uncertainty (intervals) is computed in full and doublet modes, not multi: pass --mode full")
    if config.class_df is not None and not isinstance(config.class_df, Mapping):
        problems.append("class_df must be a mapping cell type -> class")
    return problems


def check_config(config: RCTDConfig) -> None:
    """Raise ``ValueError`` listing every problem found by :func:`validate_config`."""
    problems = validate_config(config)
    if problems:
        raise ValueError("invalid RCTD configuration: " + "; ".join(problems))
