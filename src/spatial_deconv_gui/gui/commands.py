"""Commands the manifest puts in napari's menus (the layer list's context menu)."""

from __future__ import annotations

from napari.layers import Layer
from napari.viewer import Viewer

from .docks import open_docks


def deconvolve_layer(viewer: Viewer, layer: Layer | None = None) -> None:
    """Open (or find) the Deconvolution dock with its slide picker set to ``layer`` (napari injects the
    viewer and the active layer from their type hints)."""
    [dock] = open_docks(viewer, ["Deconvolution"])
    dock.slide.reset_choices()
    if layer is not None and any(choice is layer for choice in dock.slide.choices):
        dock.slide.value = layer
