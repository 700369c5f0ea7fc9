"""The layers of a knockout run and the numbers they show: the Δ map (diverging colours), the vector field (on
the engine's grid or a regridded one), the difference of two runs, the summary chart, saving.

Every colour and arrow drawn is the engine's numbers; the docks call these helpers and keep no layers of their own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .. import keys
from ..io.slide import read_slide_adata
from ..io.write import atomic_path, write_h5ad_atomic
from .layers import PLUGIN_KEY
from .session import Perturbation, Session
from .views import colormap_rgba

VECTOR_COLOR = "#39ff14"


def slide_adata(layer):
    """The AnnData behind a slide layer, read from its file or folder."""
    meta = layer.metadata.get(PLUGIN_KEY, {})
    path = meta.get("adata_path")
    if not path:
        raise ValueError(f"layer {layer.name!r} was not opened from a file")
    return read_slide_adata(path, **meta.get("read_options", {}))


def diverging_rgba(values: np.ndarray, vmax: float | None = None) -> tuple[np.ndarray, float]:
    """Blue (down) - white - red (up), symmetric around 0."""
    v = np.asarray(values, dtype=float)
    # the 99th percentile, so a few extreme cells (the perturbed ones) do not wash out the rest
    vmax = float(vmax if vmax is not None else (np.nanpercentile(np.abs(v), 99) if v.size else 0.0)) or 1.0
    return colormap_rgba(v, "RdBu_r", -vmax, vmax), vmax


def grid_vectors_yx(points_xy: np.ndarray, vectors_xy: np.ndarray, length: float = 1.0) -> np.ndarray:
    """napari Vectors data (N, 2, 2): position and direction in (y, x), NaN grid cells left out."""
    vectors_xy = np.asarray(vectors_xy, dtype=float)
    norm = np.linalg.norm(np.nan_to_num(vectors_xy), axis=1)
    # arrows a millionth of the longest are invisible; leaving them out keeps the layer light
    ok = np.isfinite(vectors_xy).all(axis=1) & (norm > 1e-6 * (norm.max() if norm.size else 0.0))
    pos = np.asarray(points_xy)[ok][:, ::-1]
    vec = np.asarray(vectors_xy)[ok][:, ::-1] * length
    return np.stack([pos, vec], axis=1)


def cell_size(session: Session) -> float:
    meta = session.model_slide.metadata.get(PLUGIN_KEY, {}) if session.model_slide is not None else {}
    return meta.get("spot_size", 10.0)


def add_delta_layer(viewer, session: Session, name: str):
    """The points layer a knockout streams its steps onto, and which becomes the run's Δ map."""
    return viewer.add_points(
        session.cells_yx(),
        name=name,
        size=cell_size(session),
        border_width=0,
        metadata={PLUGIN_KEY: {"kind": "perturb_stream"}},
    )


def add_vectors_layer(viewer, run: Perturbation):
    run.layers["vectors"] = viewer.add_vectors(
        np.zeros((0, 2, 2)),
        name=f"{run.name}: vector field",
        edge_width=2.5,
        edge_color=VECTOR_COLOR,
        metadata={PLUGIN_KEY: {"kind": "perturb_vectors"}},
    )
    return run.layers["vectors"]


def colour_delta(run: Perturbation, gene: str) -> float:
    """Colour the run's Δ layer by the shift of ``gene``; returns the colour range's half-width."""
    rgba, vmax = diverging_rgba(run.delta(gene))
    layer = run.layers["delta"]
    layer.face_color = rgba
    layer.name = f"{run.name}: Δ"
    layer.metadata["gene"] = gene
    return vmax


def draw_vectors(session: Session, run: Perturbation, per_cell: bool, n_grid: int, length: float):
    """The run's arrows per cell or on an ``n_grid`` grid, scaled so the longest grid arrow spans about one grid
    cell, times ``length``."""
    pts = session.cells_yx()[:, ::-1]
    cell_vec = np.asarray(run.adata.obsm[keys.PERTURB_VECTORS])
    if per_cell:
        data_pts, data_vec = pts, cell_vec
        n_side = np.sqrt(len(pts))
    else:
        uns = run.adata.uns[keys.PERTURB]
        if int(n_grid) == int(uns["parameters"].get("n_grid", -1)):
            data_pts = np.asarray(uns["grid_points"]) * session.world_per_coord
            data_vec = np.asarray(uns["grid_vectors"])
        else:
            from .. import perturb_api  # pulls in torch: only when a grid other than the engine's is asked for

            data_pts, data_vec = perturb_api.regrid_vectors(pts, cell_vec, int(n_grid))
        n_side = n_grid
    span = np.ptp(pts, axis=0).max() / max(n_side, 1)
    lengths = np.linalg.norm(np.nan_to_num(data_vec), axis=1)
    norm = np.percentile(lengths[lengths > 0], 95) if (lengths > 0).any() else 0.0
    scale = (span / norm if norm and np.isfinite(norm) else 1.0) * float(length)
    run.layers["vectors"].data = grid_vectors_yx(data_pts, data_vec, scale)
    run.layers["vectors"].metadata["scale"] = scale


def show_difference(viewer, session: Session, run: Perturbation, other: Perturbation, gene: str):
    """A layer of Δ(run) − Δ(other) for ``gene``; returns it and its colour range's half-width."""
    diff = run.delta(gene) - other.delta(gene)
    rgba, vmax = diverging_rgba(diff)
    name = f"{run.name} − {other.name}: Δ {gene}"
    if name in viewer.layers:
        viewer.layers.remove(name)
    layer = viewer.add_points(
        session.cells_yx(),
        name=name,
        size=run.layers["delta"].size,
        border_width=0,
        face_color=rgba,
        metadata={PLUGIN_KEY: {"kind": "perturb_difference"}, "values": diff},
    )
    return layer, vmax


def summary_numbers(run: Perturbation, clusters) -> tuple[pd.Series, pd.Series]:
    """The ten genes that moved most (their mean signed Δ, largest |Δ| first) and the mean |Δ| per cell by cluster."""
    top = run.moved.head(10)
    d = run.adata.layers[keys.PERTURB_DELTA]
    mean = np.asarray(d.mean(axis=0)).ravel()
    signs = pd.Series(mean, index=list(run.adata.var_names))[top.index]
    per_cell = np.asarray(abs(d).sum(axis=1)).ravel()
    per_cluster = pd.Series(per_cell).groupby(np.asarray(clusters)).mean().sort_values(ascending=False)
    return signs, per_cluster


def draw_summary(figure: Figure, run: Perturbation, signs: pd.Series):
    figure.clear()
    ax = figure.add_subplot(111)
    values = signs.to_numpy()[::-1]
    ax.barh(list(signs.index)[::-1], values, color=["#d6604d" if v > 0 else "#4393c3" for v in values])
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("mean Δ expression")
    ax.set_title(run.name, fontsize=9)
    ax.tick_params(labelsize=8)


def save_perturbation(viewer, session: Session, run: Perturbation, path) -> tuple[Path, Path]:
    """The perturbed AnnData as .h5ad and a picture beside it: the window, or the summary chart without OpenGL."""
    path = Path(path)
    out = write_h5ad_atomic(run.adata, path.with_suffix(".h5ad"))
    png = path.with_suffix(".png")
    try:
        with atomic_path(png, ".png") as tmp:
            viewer.screenshot(str(tmp), canvas_only=False, flash=False)
    except Exception:  # no OpenGL context (offscreen Qt): the summary chart instead
        figure = Figure(figsize=(3.4, 3.0), tight_layout=True)
        draw_summary(figure, run, summary_numbers(run, session.model.clusters)[0])
        with atomic_path(png, ".png") as tmp:
            figure.savefig(tmp, dpi=120)
    return out, png
