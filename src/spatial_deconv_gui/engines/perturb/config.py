"""Settings of the perturbation engine: training (:class:`TrainConfig`) and a knockout run
(:class:`PerturbRunConfig`).

Kept free of torch and numpy so the command line can build its flags from them without loading the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ... import keys
from ..options import DEVICE_CHOICES, DEVICE_CHOICES_HELP


@dataclass
class TrainConfig:
    """The settings of one training run; a model folder resumes only with the same settings."""

    radius: float | None = field(
        default=None,
        metadata={
            "help": (
                "secreted signalling radius in coordinate units: ligands reach neighbours with weight exp(-d²/2r²) "
                "(default: 5x the median nearest-neighbour distance)"
            )
        },
    )
    contact_radius: float | None = field(
        default=None, metadata={"help": "radius of contact-dependent (Cell-Cell Contact) pairs (default: radius / 4)"}
    )
    scale_factor: float = field(default=1.0, metadata={"help": "s in the received ligand r_iL = s/N Σ_j k_ij x_jL"})
    l1_reg: float = field(default=0.05, metadata={"help": "lasso penalty on each coefficient"})
    group_reg: float = field(
        default=0.05, metadata={"help": "group-lasso penalty on each modulator group (TFs, LR pairs, TF-ligand pairs)"}
    )
    scale_reg: Literal["inverse_group_size", "group_size", "none"] = field(
        default="inverse_group_size",
        metadata={
            "help": "how the group penalty scales with group size: divided by √size, multiplied by √size, or not at all"
        },
    )
    standardize: bool = field(
        default=True, metadata={"help": "penalise unit-variance features (coefficients are stored unscaled)"}
    )
    r2_threshold: float = field(
        default=0.15,
        metadata={"help": "cluster models with a lower R² are zeroed (the gene then does not respond in that cluster)"},
    )
    receptor_thresh: float = field(
        default=0.01,
        metadata={"help": "LR pairs are used only when the receptor's highest cluster mean expression exceeds this"},
    )
    max_ligands: int | None = field(
        default=None,
        metadata={
            "help": (
                "keep only the ligands of highest mean expression (SpaceTravLR's screen; default: every ligand): "
                "bounds the design of each gene on slides measured genome-wide"
            )
        },
    )
    min_expressed_fraction: float = field(
        default=0.0,
        metadata={
            "help": (
                "a modulator is left out of a cluster's model when its term (TF expression; received ligand x "
                "receptor; received ligand x TF) is non-zero in fewer than this fraction of the cluster's cells (0: "
                "only terms that are zero throughout, which cannot enter a model anyway)"
            )
        },
    )
    tf_ligand_cutoff: float = field(
        default=0.01, metadata={"help": "ligand -> TF table: pairs with a lower weight are left out"}
    )
    min_cells: int = field(default=10, metadata={"help": "clusters with fewer cells get no model for the gene"})
    max_iter: int = field(default=2000, metadata={"help": "most iterations of each sparse group lasso fit"})
    tol: float = field(
        default=1e-06,
        metadata={"help": "the lasso stops when its largest coefficient change falls below tol x max(|coef|, 1)"},
    )
    ligand_mode: Literal["auto", "exact", "grid"] = field(
        default="auto",
        metadata={
            "help": (
                "received ligands: exact pairwise sums, a grid approximation (large slides), or auto (grid from 20,000 "
                "cells)"
            )
        },
    )
    radius_rule: Literal["pair", "ligand"] = field(
        default="pair",
        metadata={
            "help": (
                "pair: each ligand-receptor pair at its own secreted / contact radius; ligand: SpaceTravLR's rule, the "
                "ligand's first pair decides"
            )
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "help": DEVICE_CHOICES_HELP
            + " for the received ligands and the per-cell network of --mode full / hybrid (the lasso runs on the CPU, "
            "in numba)",
            "choices": DEVICE_CHOICES,
        },
    )
    problems_per_batch: int = field(
        default=512,
        metadata={"help": "lasso problems (cluster x target) solved together; more is faster and uses more memory"},
    )
    mode: Literal["seed", "full", "hybrid"] = field(
        default="seed",
        metadata={
            "help": (
                "seed: one coefficient set per cluster (the group lasso); full: SpaceTravLR's per-cell coefficients, "
                "the lasso seeds refined in each cell by a small CNN on its neighbourhood; hybrid: per-cell only "
                "for the targets where it predicts held-out cells better than the seed (see hybrid_min_gain)"
            )
        },
    )
    epochs: int = field(default=300, metadata={"help": "full / hybrid: training passes of the per-cell network"})
    learning_rate: float = field(default=0.01, metadata={"help": "full / hybrid: Adam's learning rate"})
    percell_l2: float = field(
        default=0.001,
        metadata={"help": "full / hybrid: L2 penalty pulling each cell's coefficients towards its cluster's seed"},
    )
    holdout_fraction: float = field(
        default=0.2,
        metadata={
            "help": (
                "full / hybrid: share of each cluster's cells held out of training (seed and network) to score "
                "both; 0 trains on every cell (full only)"
            )
        },
    )
    hybrid_min_gain: float = field(
        default=0.1,
        metadata={
            "help": (
                "hybrid: a target keeps per-cell coefficients when they cut its held-out squared error by at least "
                "this share of the seed's, 1 - SSE_cnn / SSE_seed"
            )
        },
    )
    seed: int = field(default=0, metadata={"help": "full / hybrid: random seed of the held-out split and the network"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PerturbRunConfig:
    """The settings of one knockout / overexpression run: propagation, then the transition vector field."""

    steps: int = field(default=4, metadata={"help": "propagation steps through the GRN and the tissue"})
    ligand_mode: Literal["auto", "exact", "grid"] = field(
        default="exact",
        metadata={
            "help": (
                "received ligands: exact pairwise sums, a grid approximation (large slides), or auto (grid from 20,000 "
                "cells)"
            )
        },
    )
    embedding: str = field(
        default=keys.SPATIAL,
        metadata={"help": "where the vector field is drawn: 'spatial' or an obsm key such as X_umap"},
    )
    k: int = field(
        default=30,
        metadata={"help": "neighbours of each cell on the embedding that its transition probabilities spread over"},
    )
    temperature: float = field(
        default=0.05, metadata={"help": "softmax temperature of the transition probabilities: lower sharpens them"}
    )
    null: Literal["uniform", "permuted"] = field(
        default="uniform",
        metadata={
            "help": (
                "null transition subtracted from each cell's: uniform over its neighbours, or from the shift with its "
                "genes shuffled"
            )
        },
    )
    n_grid: int = field(default=40, metadata={"help": "arrows per side of the grid the vector field is smoothed on"})
    device: str = field(default="auto", metadata={"help": DEVICE_CHOICES_HELP, "choices": DEVICE_CHOICES})
