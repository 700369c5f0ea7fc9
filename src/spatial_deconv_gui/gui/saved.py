"""Results saved in a slide file, put back in the session when the slide is opened again: a saved result opened
from disk gets its layers, Results and Legend docks as a fresh run does (``Plugins > Results`` or ``Legend``)."""

from __future__ import annotations

from pathlib import Path

import h5py

from .. import api, keys
from ..io.slide import detect_format
from .jobs import JobRunner
from .layers import PLUGIN_KEY, slide_coords_yx
from .result_layers import add_result_steps
from .session import session_for


def may_hold_results(path) -> bool:
    """Whether a slide file can hold saved results, told without reading its matrix: an .h5ad with a proportions
    slot in obsm and its run's record in uns, or a SpatialData store (instrument folders never do)."""
    if str(path).endswith(".h5ad"):
        try:
            with h5py.File(path, "r") as f:
                uns = f.get("uns", {})
                for slot in f.get("obsm", {}).keys():
                    info = uns.get(keys.run_info(slot.removesuffix(keys.PROPORTIONS_SUFFIX)))
                    if slot.endswith(keys.PROPORTIONS_SUFFIX) and isinstance(info, h5py.Group) and "method" in info:
                        return True
                return False
        except OSError:
            return False
    return Path(path).exists() and detect_format(path) == "spatialdata"


def slides_not_yet_read(viewer) -> list:
    """Slide layers opened from a file whose saved results have not been looked for yet."""
    session = session_for(viewer)
    return [
        layer
        for _, layer in session.slides()
        if layer.metadata.get(PLUGIN_KEY, {}).get("adata_path") and id(layer) not in session.saved_results_read
    ]


def read_saved_results(layers) -> list[tuple[object, list]]:
    """(slide layer, the results its file holds) for each layer that holds any: file reads, for a worker."""
    out = []
    for layer in layers:
        meta = layer.metadata[PLUGIN_KEY]
        runs = api.saved_results(meta["adata_path"], meta.get("read_options", {}))
        if runs:
            out.append((layer, runs))
    return out


def add_saved_results_steps(viewer, found):
    """Layers and session entries for what :func:`read_saved_results` found, a short step at a time."""
    session = session_for(viewer)
    for layer, runs in found:
        meta = layer.metadata.get(PLUGIN_KEY, {})
        for run in runs:
            name = f"{layer.name}: {run.result.method}" + (f" {run.result.mode}" if run.result.mode else "")
            source = {"inputs": (meta["adata_path"],), "slide_options": meta.get("read_options", {})}
            yield from add_result_steps(
                viewer,
                run,
                slide_coords_yx(layer)[:, ::-1],
                meta.get("spot_size", 1.0),
                name=name if name not in session.results else None,
                source=source,
                raster=meta.get("raster"),
            )


def adopt_saved_results(viewer) -> JobRunner | None:
    """Look for saved results in the slides on the canvas, in a worker; returns the runner (None: nothing to do)."""
    session = session_for(viewer)
    runner = session.jobs.get("saved results")
    if runner is None:
        runner = session.jobs["saved results"] = JobRunner("Open saved results")
    layers = slides_not_yet_read(viewer)
    if not layers or runner.busy:
        return None
    session.saved_results_read.update(id(layer) for layer in layers)
    layers = [layer for layer in layers if may_hold_results(layer.metadata[PLUGIN_KEY]["adata_path"])]
    if not layers:
        return None
    runner.start(lambda _control: read_saved_results(layers), lambda found: add_saved_results_steps(viewer, found))
    return runner
