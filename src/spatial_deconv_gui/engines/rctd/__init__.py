"""RCTD (Robust Cell Type Decomposition, Cable et al. 2022) implemented from the published algorithm.

from spatial_deconv_gui.engines.rctd import RCTDConfig, run_rctd
result = run_rctd(spatial, reference, RCTDConfig(mode="doublet"))
"""

from .config import RCTDConfig, check_config, validate_config
from .engine import run_rctd

__all__ = ["RCTDConfig", "run_rctd", "validate_config", "check_config"]
