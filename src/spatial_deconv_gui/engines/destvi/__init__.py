"""DestVI (Lopez et al. 2022) in our own torch: the conditional single-cell VAE, its empirical prior, and the
amortised spatial model with per-spot, per-type latent gamma and a dummy noise type.

    from spatial_deconv_gui.engines.destvi import DestVIConfig, run_destvi, impute_expression
    result = run_destvi(spatial, reference, DestVIConfig())
    expr = impute_expression(result, "Astrocyte", genes=["Gfap"])   # spots x genes, within that type
"""

from .config import DestVIConfig, check_config, validate_config
from .engine import impute_expression, run_destvi, shared_genes

__all__ = ["DestVIConfig", "run_destvi", "impute_expression", "check_config", "validate_config", "shared_genes"]
