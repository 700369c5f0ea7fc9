"""The deconvolution methods the api, CLI and GUI can offer, imported only when used (torch is slow to load)."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from ..io.errors import InputError


@dataclass(frozen=True)
class MethodInfo:
    name: str
    key: str
    description: str
    module: str
    runner: str
    config: str
    modes: tuple[str, ...] = ()
    # The options the GUI shows (the rest stay at their defaults), with their tooltips.
    gui_params: tuple[tuple[str, str], ...] = ()

    def load(self):
        mod = importlib.import_module(self.module)
        return getattr(mod, self.runner), getattr(mod, self.config)

    @property
    def installed(self) -> bool:
        return _importable(self.module, self.runner)


@functools.lru_cache(maxsize=None)
def _importable(module: str, attr: str) -> bool:
    # An engine whose optional dependency is missing is left out of the list rather than breaking it.
    try:
        return importlib.util.find_spec(module) is not None and hasattr(importlib.import_module(module), attr)
    except Exception:
        return False


_ALL = (
    MethodInfo("rctd", "rctd", "Robust Cell Type Decomposition (spacexr's algorithm): full, doublet, multi",
               "spatial_deconv_gui.engines.rctd", "run_rctd", "RCTDConfig", ("full", "doublet", "multi"),
               gui_params=(
                   ("umi_min", "Spots with fewer total UMI are not fitted (spacexr UMI_min, default 100)."),
                   ("cell_min", "Reference cell types with fewer cells are dropped (spacexr CELL_MIN_INSTANCE, 25)."),
                   ("confidence_threshold", "Doublet mode: score gap for a confident call (default 5)."),
                   ("doublet_threshold", "Doublet mode: score gap above which a spot is a doublet (default 20)."),
                   ("max_multi_types", "Multi mode: most cell types per spot (default 4)."),
                   ("dtype", "float64 matches spacexr exactly; float32 is faster on GPUs."),
                   ("batch_size", "Spots solved together; 0 picks a size from free memory."),
               )),
    MethodInfo("flash", "flash", "FlashDeconv's sketched, graph-regularised NNLS with spatial smoothing (fast, large slides)",
               "spatial_deconv_gui.engines.flash", "run_flash", "FlashConfig",
               gui_params=(
                   ("lambda_spatial", "Spatial smoothing strength: 'auto' (FlashDeconv's rule) or a number >= 0."),
                   ("rho_sparsity", "L1 penalty pushing small proportions to zero (fraction of the signature scale)."),
                   ("k_neighbors", "Neighbours per spot in the spatial kNN graph (default 6)."),
                   ("preprocess", "Transform of counts before fitting: log-CPM (default), Pearson residuals or raw."),
                   ("gene_weighting", "Leverage weighting: deterministic expected weights or a seeded CountSketch."),
               )),
    MethodInfo("c2l", "c2l", "cell2location's Bayesian model: cell abundances per spot (variational inference in torch)",
               "spatial_deconv_gui.engines.c2l", "run_c2l", "C2LConfig",
               gui_params=(
                   ("n_cells_per_location", "Expected cells per spot, from histology (cell2location's N_cells_per_location)."),
                   ("detection_alpha", "Detection prior: 20 lets sensitivity vary within a slide, 200 keeps it constant."),
                   ("max_epochs", "Spatial model epochs (cell2location default 30,000); the map streams as it trains."),
                   ("signatures", "Reference signatures: NB regression (the package's) or per-type means (quick)."),
                   ("reference_batch_col", "Reference obs column naming each cell's batch (sample, chemistry): the "
                                           "regression then fits per-batch detection and background. None: one batch."),
               )),
    MethodInfo("destvi", "destvi", "DestVI: cell-type proportions plus continuous cell states per spot (torch)",
               "spatial_deconv_gui.engines.destvi", "run_destvi", "DestVIConfig",
               gui_params=(
                   ("sc_epochs", "Epochs of the single-cell (CondSCVI) model."),
                   ("max_epochs", "Epochs of the spatial model."),
                   ("n_latent", "Size of the cell-state latent space gamma."),
                   ("seed", "Random seed. With few reference cells per type the proportions change with it (scvi-tools' "
                            "too): run two seeds and compare them in the Results dock."),
               )),
)


def available_methods() -> dict[str, MethodInfo]:
    return {m.name: m for m in _ALL if m.installed}


def get_method(name: str) -> MethodInfo:
    methods = available_methods()
    if name not in methods:
        raise InputError(f"unknown method {name!r}.", f"use one of: {', '.join(sorted(methods)) or '(none installed)'}.",
                         code="unknown_method")
    return methods[name]


def build_config(config_cls, params: dict[str, Any]):
    """A typed config from loose options (CLI flags, widget values), naming any option the method lacks."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise InputError(f"{config_cls.__name__} has no option(s) {unknown}.",
                         f"valid options: {', '.join(sorted(fields))}.", code="unknown_option")
    return config_cls(**params)
