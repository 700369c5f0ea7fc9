"""Configuration of the DestVI engine: scvi-tools' defaults (CondSCVI, DestVI.from_rna_model, DestVI.train)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..options import DEVICE_HELP


@dataclass(frozen=True)
class DestVIConfig:
    # single-cell model (CondSCVI)
    n_latent: int = field(default=5, metadata={"help": "size of the cell-state latent space gamma"})
    n_hidden: int = field(default=128, metadata={"help": "units per hidden layer"})
    n_layers: int = field(default=2, metadata={"help": "hidden layers of encoders and decoder"})
    dropout_rate: float = field(default=0.05, metadata={"help": "dropout of the single-cell model"})
    sc_epochs: int = field(default=300, metadata={"help": "single-cell model (CondSCVI) epochs"})
    sc_lr: float = field(default=0.001, metadata={"help": "single-cell model learning rate"})
    sc_batch_size: int = field(default=128, metadata={"help": "cells per single-cell training step"})
    sc_kl_warmup_epochs: int = field(
        default=400, metadata={"help": "epochs over which the single-cell KL weight rises to 1"}
    )
    vamp_prior_p: int = field(
        default=15, metadata={"help": "components per cell type in the empirical prior over gamma"}
    )
    # spatial model (DestVI)
    max_epochs: int = field(
        default=2000,
        metadata={"help": "spatial model (DestVI) epochs, the cap (with early_stop training usually ends sooner)"},
    )
    lr: float = field(default=0.003, metadata={"help": "spatial model learning rate"})
    lr_anneal_epochs: int = field(
        default=0,
        metadata={
            "help": (
                "a final phase of this many spatial epochs in which the learning rate falls linearly to "
                "lr_anneal_to x lr: the last epochs of max_epochs, or with early_stop the epochs after the rule "
                "fires (the rule may then fire only up to max_epochs minus this); 0: a constant rate"
            )
        },
    )
    lr_anneal_to: float = field(
        default=0.1,
        metadata={"help": "the learning rate at the end of the lr_anneal_epochs phase, as a share of lr"},
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
        default=0.02,
        metadata={
            "help": (
                "early stop: converged when, over convergence_window epochs, 95% of spots changed less than this "
                "share of their cells' types, or no more than the answer jitters between consecutive blocks of 5 "
                "checks (x noise_ratio); 3 checks in a row, not before kl_warmup_epochs + 3 windows"
            )
        },
    )
    convergence_window: int = field(
        default=200,
        metadata={"help": "early stop: epochs between the two answers compared (checked every tenth of it)"},
    )
    noise_ratio: float = field(
        default=1.1,
        metadata={"help": "early stop: the change over the window may be this multiple of the block-to-block jitter"},
    )
    decoder_precision: Literal["float32", "bfloat16", "auto"] = field(
        default="auto",
        metadata={
            "help": (
                "spatial model on the CPU: the number format of the frozen decoder's matrix products. bfloat16 "
                "rounds their operands to 8 significant bits and accumulates in float32 (layer norm, softmax, the "
                "likelihood and everything trained stay float32): the products run 6-9x faster, an epoch 1.0-1.3x, "
                "where the CPU multiplies bfloat16 in hardware (AMX, AVX512-BF16). auto: bfloat16 on such CPUs, "
                "else float32; GPU runs use float32"
            )
        },
    )
    average_epochs: int = field(
        default=200,
        metadata={
            "help": (
                "the answer is the mean of the proportions at the checks (every convergence_window / 10 epochs) of "
                "the last this many epochs (at most a quarter of the epochs run), the final epoch included, with or "
                "without early stopping: minibatch training keeps a single epoch's answer jittering; 0: the final "
                "epoch's answer alone"
            )
        },
    )
    batch_size: int = field(default=128, metadata={"help": "spots per spatial training step"})
    kl_warmup_epochs: int = field(
        default=200, metadata={"help": "epochs over which the spatial prior weight rises to 1"}
    )
    prior_mode: Literal["mog", "normal"] = field(
        default="mog",
        metadata={"help": "mog: 3 states per type mixed by the encoder (scvi-tools default); normal: one state"},
    )
    n_states_per_label: int = field(default=3, metadata={"help": "states per cell type in mog mode"})
    augmentation: bool = field(default=True, metadata={"help": "train on simulated spots too (scvi-tools default)"})
    n_samples_augmentation: int = field(default=2, metadata={"help": "simulated spot variants per real spot"})
    eps_v: float = field(default=2e-3, metadata={"help": "floor added to abundances during training"})
    dropout_amortization: float = field(default=0.03, metadata={"help": "dropout of the gamma encoder"})
    ct_sparsity_weight: float = field(
        default=2.0, metadata={"help": "weight of the entropy penalty on per-spot proportions"}
    )
    weighting_augmentation: float = field(
        default=100.0, metadata={"help": "weight of the proportion loss on simulated spots"}
    )
    eta_reg: float = field(default=1.0, metadata={"help": "penalty on the dummy noise type"})
    beta_reg: float = field(default=1.0, metadata={"help": "N(0, 1) prior weight on the gene correction beta"})
    reconst_weight: float = field(default=3.0, metadata={"help": "weight of the reconstruction term"})
    # uncertainty
    uncertainty: bool = field(
        default=False,
        metadata={
            "help": (
                "also write a nominal 90% interval per spot and type (obsm destvi_proportions_q05 / _q95): count "
                "vectors drawn from the fitted model at each spot, passed through the trained encoder; with seeds > 1 "
                "the draws of every seed pooled"
            )
        },
    )
    interval_samples: int = field(
        default=100, metadata={"help": "count vectors drawn per spot (and per seed) for the uncertainty intervals"}
    )
    interval_min_share: float = field(
        default=0.01,
        metadata={
            "help": (
                "intervals: in a draw, a type's share below this counts as absent (the encoder never gives exact "
                "zeros; 0 keeps every draw as drawn, and an absent type's interval never reaches 0)"
            )
        },
    )
    seeds: int = field(
        default=1,
        metadata={
            "help": (
                "train this many models (seeds seed, seed+1, ...): the proportions are their mean and the interval "
                "holds the spread across seeds; gamma and the imputation model are the first seed's"
            )
        },
    )
    # execution
    report_every: int = field(default=100, metadata={"help": "stream the current proportions every this many epochs"})
    seed: int = field(
        default=0,
        metadata={
            "help": (
                "random seed; with few reference cells per type the proportions change with it (scvi-tools' too): run "
                "two seeds and compare them in the Results dock"
            )
        },
    )
    n_threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads for this run (default: leave torch's setting)"}
    )
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_config(config: DestVIConfig) -> list[str]:
    problems: list[str] = []
    for name in (
        "n_latent",
        "n_hidden",
        "n_layers",
        "sc_epochs",
        "sc_batch_size",
        "max_epochs",
        "batch_size",
        "n_states_per_label",
        "report_every",
    ):
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"{name} must be a positive integer, got {v!r}")
    for name in ("sc_kl_warmup_epochs", "kl_warmup_epochs", "vamp_prior_p", "average_epochs", "lr_anneal_epochs"):
        v = getattr(config, name)
        if not isinstance(v, int) or v < 0:
            problems.append(f"{name} must be an integer >= 0, got {v!r}")
    if not isinstance(config.seeds, int) or isinstance(config.seeds, bool) or config.seeds < 1:
        problems.append(f"seeds must be a positive integer (the number of models trained), got {config.seeds!r}")
    if not isinstance(config.interval_samples, int) or isinstance(config.interval_samples, bool):
        problems.append(f"interval_samples must be an integer >= 20, got {config.interval_samples!r}")
    elif config.interval_samples < 20:
        problems.append(
            f"interval_samples must be >= 20 (5 % / 95 % quantiles need draws), got {config.interval_samples}"
        )
    if not 0 <= float(config.interval_min_share) < 0.5:
        problems.append(f"interval_min_share must be in [0, 0.5), got {config.interval_min_share!r}")
    if config.vamp_prior_p < 1:
        problems.append("vamp_prior_p must be >= 1 (the empirical prior is required)")
    for name in ("sc_lr", "lr"):
        if not float(getattr(config, name)) > 0:
            problems.append(f"{name} must be > 0, got {getattr(config, name)!r}")
    anneal = config.lr_anneal_epochs
    if isinstance(anneal, int) and isinstance(config.max_epochs, int) and anneal > config.max_epochs:
        problems.append(f"lr_anneal_epochs ({anneal}) must not exceed max_epochs ({config.max_epochs})")
    if not 0 <= float(config.lr_anneal_to) <= 1:
        problems.append(f"lr_anneal_to must be in [0, 1] (a share of lr), got {config.lr_anneal_to!r}")
    for name in ("dropout_rate", "dropout_amortization"):
        if not (0 <= float(getattr(config, name)) < 1):
            problems.append(f"{name} must be in [0, 1), got {getattr(config, name)!r}")
    if config.decoder_precision not in ("float32", "bfloat16", "auto"):
        problems.append(f"decoder_precision must be float32, bfloat16 or auto, got {config.decoder_precision!r}")
    if config.prior_mode not in ("mog", "normal"):
        problems.append(f"prior_mode must be 'mog' or 'normal', got {config.prior_mode!r}")
    if not 0 < float(config.convergence_tol) < 1:
        problems.append(f"convergence_tol must be in (0, 1), got {config.convergence_tol!r}")
    if not float(config.noise_ratio) > 0:
        problems.append(f"noise_ratio must be > 0, got {config.noise_ratio!r}")
    if not isinstance(config.convergence_window, int) or config.convergence_window < 50:
        problems.append(f"convergence_window must be an integer >= 50, got {config.convergence_window!r}")
    if config.augmentation and config.n_samples_augmentation < 1:
        problems.append("n_samples_augmentation must be >= 1 when augmentation is on")
    if config.n_threads is not None and (not isinstance(config.n_threads, int) or config.n_threads < 1):
        problems.append(f"n_threads must be None or a positive integer, got {config.n_threads!r}")
    dev = str(config.device)
    if dev not in ("auto", "cpu", "cuda") and not dev.startswith("cuda:"):
        problems.append(f"device must be auto, cpu or cuda[:n], got {config.device!r}")
    return problems


def convergence_rule(config: DestVIConfig):
    """The early-stopping rule of the spatial model, or None when ``early_stop`` is off.

    Minibatch noise keeps the answer jittering, so each side of the comparison is the mean of 5 checks, and a
    change no larger than ``noise_ratio`` times the block-to-block jitter counts as settled; the rule waits for the
    prior weight's warm-up (``kl_warmup_epochs``) to end, since the objective moves until then, and three windows
    more (on the hippocampus pair a run stopped at epoch 500 with 400 as the floor, answer r 0.95 vs the
    2,000-epoch one against a noise floor of 0.98).
    """
    from ..convergence import ConvergenceRule

    if not config.early_stop:
        return None
    window = int(config.convergence_window) // 10 * 10
    return ConvergenceRule(
        tol=float(config.convergence_tol),
        window=window,
        check_every=window // 10,
        # the jitter test can pass by chance while the answer still drifts slowly after the warm-up: wait 3 windows
        min_epochs=int(config.kl_warmup_epochs) + 3 * window,
        smooth=5,
        noise_ratio=float(config.noise_ratio),
    )


def check_every(config: DestVIConfig) -> int:
    """Epochs between two checks of the answer (early stopping and the averaged answer)."""
    return max(1, int(config.convergence_window) // 10)


def check_config(config: DestVIConfig) -> None:
    problems = validate_config(config)
    if problems:
        from ...io.errors import InputError

        raise InputError(
            "invalid DestVI configuration: " + "; ".join(problems) + ".",
            "change those options (a field name_like_this is the flag --name-like-this); "
            "`spatial-deconv run SLIDE REF --method destvi --help` lists every option with its default.",
            code="bad_option",
        )
