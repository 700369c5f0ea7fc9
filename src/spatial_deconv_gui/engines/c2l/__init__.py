"""cell2location's models (Kleshchevnikov et al. 2022) in our own torch: NB-regression reference signatures and
the hierarchical spatial model, fitted by full-batch mean-field variational inference.

    from spatial_deconv_gui.engines.c2l import C2LConfig, run_c2l
    result = run_c2l(spatial, reference, C2LConfig(n_cells_per_location=8, max_epochs=30000))
"""

from .config import C2LConfig, check_config, validate_config
from .engine import filter_genes, fit_reference_signatures, run_c2l, select_genes, type_means

__all__ = [
    "C2LConfig",
    "run_c2l",
    "check_config",
    "validate_config",
    "filter_genes",
    "fit_reference_signatures",
    "type_means",
    "select_genes",
]
