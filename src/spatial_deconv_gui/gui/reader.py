"""npe2 reader: a slide (an .h5ad, a Space Ranger / Visium HD / Xenium folder, a SpatialData .zarr) opens as its
tissue image(s) with the spots above them; a single-cell reference is refused with a clear message."""
from __future__ import annotations

from pathlib import Path

from ..io.slide import detect_format, read_slide
from .layers import slide_layer_data
from .notify import notify_info


def get_reader(path):
    paths = path if isinstance(path, list) else [path]
    if not paths or any(detect_format(p) is None for p in paths):
        return None
    return read_spatial


def show_scale_bar():
    """napari's scale bar, in the layers' units; readers get no viewer, so this reaches for the current one."""
    import napari

    viewer = napari.current_viewer()
    if viewer is not None:
        overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)  # napari >= 0.9; before: viewer.scale_bar
        bar = getattr(overlays, "scale_bar", None) or viewer.scale_bar
        bar.visible = True


def read_spatial(path):
    paths = path if isinstance(path, list) else [path]
    layers = []
    for p in paths:
        slide = read_slide(Path(p).resolve())
        for notice in slide.notices:
            notify_info(f"{Path(p).name}: {notice}")
        layers.extend(slide_layer_data(slide))
    show_scale_bar()
    return layers
