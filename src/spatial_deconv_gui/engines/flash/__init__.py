"""Sketched, graph-regularised NNLS deconvolution (FlashDeconv's method, Chen et al.), our own implementation.

Minimises ½‖Y − βX‖² + ½λ·Tr(βᵀLβ) + ρ‖β‖₁ over β ≥ 0 on selected, transformed, leverage-weighted genes,
with L the Laplacian of a kNN (or radius / grid) spot graph, by block coordinate descent in numba.

    from spatial_deconv_gui.engines.flash import FlashConfig, run_flash
    result = run_flash(spatial, reference, FlashConfig(lambda_spatial="auto"))

``fit_arrays`` is the array-level entry (counts, signatures, coordinates) used by the benchmarks.
"""

from .config import FlashConfig, validate_config
from .core import FlashFit, fit_arrays
from .engine import run_flash

__all__ = ["FlashConfig", "FlashFit", "fit_arrays", "run_flash", "validate_config"]
