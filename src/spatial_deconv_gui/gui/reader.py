"""npe2 reader: a slide (an .h5ad, a Space Ranger / Visium HD / Xenium folder, a SpatialData .zarr) opens as its
tissue image(s) with the spots above them; a single-cell reference is refused with a clear message."""

from __future__ import annotations

from pathlib import Path

import napari
from qtpy.QtWidgets import QInputDialog

from .. import keys
from ..io.errors import InputError
from ..io.slide import detect_format, read_slide
from ..io.validate import check_drawable
from .layers import slide_layer_data
from .notify import notify_info


def get_reader(path):
    paths = path if isinstance(path, list) else [path]
    if not paths or any(detect_format(p) is None for p in paths):
        return None
    return read_spatial


def show_scale_bar():
    """napari's scale bar, in the layers' units; readers get no viewer, so this reaches for the current one."""
    viewer = napari.current_viewer()
    if viewer is not None:
        overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)  # napari >= 0.9; before: viewer.scale_bar
        bar = getattr(overlays, "scale_bar", None) or viewer.scale_bar
        bar.visible = True


def choose_table(path: Path, names: list[str]) -> str | None:
    """Ask which table of a SpatialData store to open (None when the user cancels)."""
    name, ok = QInputDialog.getItem(
        None, "Open SpatialData", f"{path.name} holds several tables; open which?", names, 0, False
    )
    return str(name) if ok else None


def _table_names(path: Path) -> list[str]:
    tables = path / "tables"
    return sorted(p.name for p in tables.iterdir() if p.is_dir()) if tables.is_dir() else []


def _read_one(path: Path):
    options: dict = {"boundaries": True}
    try:
        slide = read_slide(path, **options)
    except InputError as exc:
        if exc.code != "several_tables":
            raise
        table = choose_table(path, _table_names(path))
        if table is None:
            raise
        options["table"] = table
        slide = read_slide(path, **options)
    return slide, {k: v for k, v in options.items() if k == "table"}


def read_spatial(path):
    paths = path if isinstance(path, list) else [path]
    layers = []
    for p in paths:
        slide, read_options = _read_one(Path(p).resolve())
        if keys.SPATIAL in slide.adata.obsm:  # without coordinates slide_layer_data says what the file is instead
            check_drawable(slide.adata, slide.adata.obsm[keys.SPATIAL], Path(p).name)
        for notice in slide.notices:
            notify_info(f"{Path(p).name}: {notice}")
        layers.extend(slide_layer_data(slide, read_options=read_options))
    show_scale_bar()
    return layers
