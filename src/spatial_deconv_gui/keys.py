"""Every AnnData slot name the project reads or writes, in one place.

Results of a method with key ``<key>`` (``rctd``, ``flash``, ``c2l``, ``destvi``) live in slots named by the
functions below; the perturbation engine writes the ``PERTURB_*`` slots. Engines, io, the CLI and the GUI
spell none of these names themselves.
"""

from __future__ import annotations

# -- inputs ------------------------------------------------------------------------------------------------
SPATIAL = "spatial"  # obsm: coordinates (x, y[, z]) in the format's own frame
SPATIAL_LIBRARIES = "spatial"  # uns: scanpy's per-library images and scale factors
CELL_TYPE = "cell_type"  # reference obs: the default cell-type column
NUMI = "nUMI"  # obs: whole-transcriptome UMI per observation, when the file gives it

# -- the simulated truth shipped with the sample data --------------------------------------------------------
TRUE_PROPORTIONS = "true_proportions"  # obsm: cell fractions
TRUE_UMI_FRACTIONS = "true_umi_fractions"  # obsm: each type's expected share of the spot's counts
TRUE_DOMINANT_TYPE = "true_dominant_type"  # obs

# -- deconvolution results ---------------------------------------------------------------------------------
PROPORTIONS_SUFFIX = "_proportions"
LOWER_SUFFIX = "_q05"  # appended to a proportions slot: lower end of the nominal 90 % interval
UPPER_SUFFIX = "_q95"  # ... and its upper end
DOMINANT_SUFFIX = "_dominant_type"
SPOT_CLASS_SUFFIX = "_spot_class"
WEIGHTS_SUFFIX = "_weights"
COLORS_SUFFIX = "_colors"
CELL_TYPE_NAMES = "cell_type_names"  # uns: the result's cell types, in column order
CELL_TYPE_COLORS = "cell_type_colors"  # uns: one colour per cell type, aligned with CELL_TYPE_NAMES
DESTVI_MODEL = "destvi_model"  # uns: the DestVI model state a result carries for imputation
# entries of a run's uns (``run_info(key)``) for iteratively trained methods (cell2location, DestVI)
STOP_REASON = "stop_reason"  # "converged" (early stopping), "cap" (max epochs), "user" (stopped, answer kept)
EPOCHS_RUN = "epochs_run"  # spatial-model epochs actually trained
STOPPED_EARLY_BY_USER = "stopped_early_by_user"  # True when the user ended training and kept that answer

# -- a consensus of several results (``spatial-deconv consensus``): stored as a result of key CONSENSUS, so
# ``proportions(CONSENSUS)`` is obsm['consensus_proportions'] and ``run_info(CONSENSUS)`` its uns entry
CONSENSUS = "consensus"
CONSENSUS_AGREEMENT = "consensus_agreement"  # obs: 1 - mean pairwise total-variation distance, in [0, 1]
CONSENSUS_TYPE_AGREEMENT = "consensus_type_agreement"  # uns: a table, one row per cell type


def proportions(key: str) -> str:
    """obsm: spots x cell types, rows sum to 1, NaN rows for filtered spots."""
    return f"{key}{PROPORTIONS_SUFFIX}"


def proportions_lower(key: str) -> str:
    """obsm: lower end (5 % quantile) of each spot's nominal 90 % interval, same index and columns as
    :func:`proportions`; written by ``run --uncertainty``."""
    return f"{proportions(key)}{LOWER_SUFFIX}"


def proportions_upper(key: str) -> str:
    """obsm: upper end (95 % quantile) of the same interval."""
    return f"{proportions(key)}{UPPER_SUFFIX}"


def dominant_type(key: str) -> str:
    """obs: categorical, ``"filtered"`` for filtered spots."""
    return f"{key}{DOMINANT_SUFFIX}"


def spot_class(key: str) -> str:
    """obs: RCTD doublet mode's singlet / doublet_certain / doublet_uncertain / reject."""
    return f"{key}{SPOT_CLASS_SUFFIX}"


def weights(key: str) -> str:
    """obsm: a method's unnormalised weights."""
    return f"{key}{WEIGHTS_SUFFIX}"


def colors(column: str) -> str:
    """uns: scanpy's colours of a categorical obs column."""
    return f"{column}{COLORS_SUFFIX}"


def run_info(key: str) -> str:
    """uns: method, mode, parameters, cell types, version, device, runtime."""
    return key


# -- perturbation results ----------------------------------------------------------------------------------
PERTURB = "perturb"  # uns: genes, values, scope, steps, parameters, grid of the vector field, runtime
PERTURB_DELTA = "perturb_delta"  # layers: Δ expression per cell and gene
PERTURB_VECTORS = "perturb_vectors"  # obsm: transition vector per cell in the embedding
PERTURB_SIM = "perturb_sim"  # uns of the simulated GRN tissue: its truth and radii
