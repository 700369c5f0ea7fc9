"""The Train dock's job in its child process: no Qt here, so the child starts without a GUI stack."""

from __future__ import annotations

from ..io.slide import read_slide_adata
from ..perturb_api import PerturbModel, perturbation_steps, train_model


def train_model_for_gui(spatial: dict, *args, **kwargs) -> PerturbModel:
    """:func:`train_model`, then one propagation step of a knockout of one gene in two cells, so that the
    knockout's numba kernels are compiled here (in the GUI's training process) and read from numba's disk cache
    by the GUI process, whose canvas would otherwise freeze while they compile at the first Run. (The vector
    field has no compiled kernels, so it is not run.)

    ``spatial`` is ``{"path", "slide_options", "extra_obs"}``: the slide is read here, not in the GUI process,
    and ``extra_obs`` (a deconvolution's dominant type as a cluster column) is added to its obs."""
    adata = read_slide_adata(spatial["path"], **spatial.get("slide_options", {}))
    for key, values in spatial.get("extra_obs", {}).items():
        adata.obs[key] = values
    model = train_model(adata, *args, **kwargs)
    if model.targets:
        for _ in perturbation_steps(
            model, [model.targets[0]], 0.0, cells=[0, min(1, model.expr.shape[0] - 1)], steps=1
        ):
            pass
    return model
