"""The engines the api, CLI and GUI can offer: the deconvolution methods and the perturbation engine, each
imported only when used (torch is slow to load)."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from ..io.errors import InputError
from .options import field_help


@dataclass(frozen=True)
class MethodInfo:
    name: str
    key: str
    description: str
    module: str
    runner: str
    config: str
    modes: tuple[str, ...] = ()
    # The config fields the GUI shows (the rest stay at their defaults); their tooltips are the fields' help.
    gui_options: tuple[str, ...] = ()
    # "deconvolution": runner(spatial, reference, config, control) -> DeconvResult; "perturbation": runner trains
    # a model folder from a slide and priors under the same RunControl (knockouts then run from that folder).
    kind: str = "deconvolution"

    def load(self):
        mod = importlib.import_module(self.module)
        return getattr(mod, self.runner), getattr(mod, self.config)

    @property
    def gui_params(self) -> tuple[tuple[str, str], ...]:
        """(field name, tooltip) of each option the GUI shows, the tooltip being the config field's help."""
        _, config_cls = self.load()
        return tuple((name, _sentence(field_help(config_cls, name))) for name in self.gui_options)

    @property
    def installed(self) -> bool:
        return _importable(self.module, self.runner)


@functools.cache
def _importable(module: str, attr: str) -> bool:
    # An engine whose optional dependency is missing is left out of the list rather than breaking it.
    try:
        return importlib.util.find_spec(module) is not None and hasattr(importlib.import_module(module), attr)
    except Exception:
        return False


_ALL = (
    MethodInfo(
        "rctd",
        "rctd",
        "Robust Cell Type Decomposition (spacexr's algorithm): full, doublet, multi",
        "spatial_deconv_gui.engines.rctd",
        "run_rctd",
        "RCTDConfig",
        ("full", "doublet", "multi"),
        gui_options=(
            "umi_min",
            "cell_min",
            "confidence_threshold",
            "doublet_threshold",
            "max_multi_types",
            "dtype",
            "batch_size",
        ),
    ),
    MethodInfo(
        "flash",
        "flash",
        "FlashDeconv's sketched, graph-regularised NNLS with spatial smoothing (fast, large slides)",
        "spatial_deconv_gui.engines.flash",
        "run_flash",
        "FlashConfig",
        gui_options=("lambda_spatial", "rho_sparsity", "k_neighbors", "preprocess", "gene_weighting"),
    ),
    MethodInfo(
        "c2l",
        "c2l",
        "cell2location's Bayesian model: cell abundances per spot (variational inference in torch)",
        "spatial_deconv_gui.engines.c2l",
        "run_c2l",
        "C2LConfig",
        gui_options=("n_cells_per_location", "detection_alpha", "max_epochs", "signatures", "reference_batch_col"),
    ),
    MethodInfo(
        "destvi",
        "destvi",
        "DestVI: cell-type proportions plus continuous cell states per spot (torch)",
        "spatial_deconv_gui.engines.destvi",
        "run_destvi",
        "DestVIConfig",
        gui_options=("sc_epochs", "max_epochs", "n_latent", "seed", "seeds"),
    ),
    MethodInfo(
        "perturb",
        "perturb",
        "SpaceTravLR's spatial gene-regulatory network: per-cluster sparse group lasso on TFs and received "
        "ligands, then knockouts propagated through the tissue",
        "spatial_deconv_gui.engines.perturb.train",
        "train",
        "TrainConfig",
        kind="perturbation",
    ),
)


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".") if text else text


def available_methods(kind: str = "deconvolution") -> dict[str, MethodInfo]:
    return {m.name: m for m in _ALL if m.kind == kind and m.installed}


def get_method(name: str, kind: str = "deconvolution") -> MethodInfo:
    # Only the named engine is imported: checking every engine would import torch (RCTD, cell2location,
    # DestVI) for a flash run, ~1-2 s of its start-up. The full list is built only for the error message.
    for m in _ALL:
        if m.name == name and m.kind == kind and m.installed:
            return m
    methods = available_methods(kind)
    if name not in methods:
        raise InputError(
            f"unknown method {name!r}.",
            f"use one of: {', '.join(sorted(methods)) or '(none installed)'}.",
            code="unknown_method",
        )
    return methods[name]


def build_config(config_cls, params: dict[str, Any]):
    """A typed config from loose options (CLI flags, widget values), naming any option the method lacks."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise InputError(
            f"{config_cls.__name__} has no option(s) {unknown}.",
            f"valid options: {', '.join(sorted(fields))}.",
            code="unknown_option",
        )
    return config_cls(**params)
