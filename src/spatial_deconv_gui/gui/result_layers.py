"""The layers of a deconvolution result and what the docks do with them: add a run's layers (a short step at a
time), hide types, switch the proportion map, paint an imputed expression, compare two results, save.

Every colour is computed as RGBA by :mod:`.views` or :mod:`..colors`, so what is drawn is what the engine returned.
The docks call these helpers and keep no layers of their own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import api, keys
from ..colors import FILTERED_LABEL, cell_type_palette, palette_from_uns, rgba_for_labels
from ..figures import result_figure
from ..io.slide import detect_format
from ..io.write import atomic_path, write_text_atomic
from .docks import RESULT_DOCKS, open_docks
from .layers import PLUGIN_KEY, add_spot_layer, napari_points, set_spot_colors, slide_coords_yx
from .session import ResultRecord, session_for
from .views import (
    AGREEMENT_CMAP,
    SPOT_CLASS_COLORS,
    UNCERTAIN_EDGE_RGBA,
    UNCERTAIN_EDGE_WIDTH,
    UNCERTAIN_RGBA,
    WIDTH_CMAP,
    WIDTH_MAX,
    colormap_rgba,
    compare_proportions,
    expression_rgba,
)


def add_result_steps(viewer, run, coords_xy: np.ndarray, size: float, name=None, source=None, raster=None):
    """A finished run's layers and docks, one short step per ``next`` (a GUI yields to its event loop between
    them); the result joins the session, and the docks showing results pick it up, at the last step."""
    session = session_for(viewer)
    result = run.result
    name = name or session.unique_result_name(f"{result.method} {result.mode or ''}".strip())
    types = [str(t) for t in result.cell_types]
    palette = cell_type_palette(
        types + [FILTERED_LABEL], palette_from_uns(types, run.adata.uns.get(keys.CELL_TYPE_COLORS))
    )
    rec = ResultRecord(
        name,
        result.key,
        run.adata,
        result,
        napari_points(coords_xy),
        size,
        palette,
        source or {},
        raster=raster,
        label=session.unique_result_label(str(result.key).lower()),
    )
    yield from _add_layers(viewer, rec)
    for dock in RESULT_DOCKS:  # one dock per step: building and laying out a dock is the longest single step
        yield
        open_docks(viewer, [dock])
    yield
    session.add_result(rec)
    return rec


def add_result(viewer, run, coords_xy: np.ndarray, size: float, name=None, source=None, raster=None) -> ResultRecord:
    """:func:`add_result_steps` in one go (scripts, tests, headless use)."""
    steps = add_result_steps(viewer, run, coords_xy, size, name, source, raster)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def add_result_of_slide(viewer, run, slide_layer, source=None):
    """A run's layers over the slide layer it was computed on (same spots, size and raster)."""
    meta = slide_layer.metadata.get(PLUGIN_KEY, {})
    coords_xy = slide_coords_yx(slide_layer)[:, ::-1]
    return add_result_steps(
        viewer, run, coords_xy, meta.get("spot_size", 1.0), source=source, raster=meta.get("raster")
    )


def _meta(rec: ResultRecord, kind: str) -> dict:
    return {PLUGIN_KEY: {"kind": kind, "run": rec.name, "key": rec.key, "spots": rec.spots_id}}


def layer_name(rec: ResultRecord, what: str) -> str:
    """A result layer's name: short enough for napari's layer list ("rctd · dominant", "rctd #2 · proportion");
    the dock and legend titles give the result's full name."""
    return f"{rec.label or rec.name} · {what}"


def _add_layers(viewer, rec: ResultRecord):
    props = rec.proportions
    feats = None
    if rec.raster is None:  # image layers carry no per-spot table; the inspector reads the AnnData
        feats = pd.concat([pd.DataFrame({"dominant_type": rec.dominant}), props.reset_index(drop=True)], axis=1)
    first = rec.cell_types[0]
    common = dict(size=rec.size, raster=rec.raster)
    threshold = session_for(viewer).width_threshold
    rec.layers["proportions"] = add_spot_layer(
        viewer,
        rec.coords_yx,
        rgba=proportion_rgba(rec, first, "viridis", threshold),
        name=layer_name(rec, "proportion"),
        metadata={**_meta(rec, "proportions"), "cell_type": first, "colormap": "viridis"},
        features=feats,
        visible=False,
        **common,
    )
    ring_spots(rec.layers["proportions"], uncertain_spots(rec, first, threshold))
    yield
    if rec.interval_widths is not None:
        widths = rec.interval_widths[first].to_numpy()
        rec.layers["interval_width"] = add_spot_layer(
            viewer,
            rec.coords_yx,
            rgba=colormap_rgba(widths, WIDTH_CMAP, 0.0, WIDTH_MAX),
            name=layer_name(rec, "interval width"),
            metadata={**_meta(rec, "interval_width"), "cell_type": first, "values": widths, "colormap": WIDTH_CMAP},
            features=None if feats is None else pd.DataFrame({"interval_width": widths}),
            visible=False,
            **common,
        )
        yield
    if rec.agreement is not None:
        rec.layers["agreement"] = add_spot_layer(
            viewer,
            rec.coords_yx,
            rgba=colormap_rgba(rec.agreement, AGREEMENT_CMAP, 0.0, 1.0),
            name=layer_name(rec, "agreement"),
            metadata={**_meta(rec, "agreement"), "values": rec.agreement, "colormap": AGREEMENT_CMAP},
            features=None if feats is None else pd.DataFrame({"agreement": rec.agreement}),
            visible=False,
            **common,
        )
        yield
    cls_col = keys.spot_class(rec.key)
    if cls_col in rec.adata.obs:
        classes = rec.adata.obs[cls_col].astype(str).to_numpy()
        rec.layers["spot_class"] = add_spot_layer(
            viewer,
            rec.coords_yx,
            rgba=rgba_for_labels(classes, SPOT_CLASS_COLORS),
            name=layer_name(rec, "spot class"),
            metadata={**_meta(rec, "spot_class"), "palette": SPOT_CLASS_COLORS},
            features=None if feats is None else pd.DataFrame({"spot_class": classes}),
            visible=False,
            **common,
        )
        yield
    rec.layers["dominant"] = add_spot_layer(
        viewer,
        rec.coords_yx,
        rgba=rgba_for_labels(rec.dominant, rec.palette),
        name=layer_name(rec, "dominant"),
        metadata={**_meta(rec, "dominant_type"), "palette": rec.palette},
        features=feats,
        **common,
    )
    viewer.layers.selection.active = rec.layers["dominant"]


def set_hidden(rec: ResultRecord, hidden: set[str]):
    """Hide the spots whose dominant type is in ``hidden`` (fully transparent), show the others."""
    rec.hidden = set(hidden)
    set_spot_colors(rec.layers["dominant"], rgba_for_labels(rec.dominant, rec.palette, rec.hidden))


def uncertain_spots(rec: ResultRecord, cell_type: str, threshold: float | None) -> np.ndarray:
    """Spots whose 90 % interval for ``cell_type`` is wider than ``threshold`` (none without an interval)."""
    if threshold is None or rec.interval_widths is None:
        return np.zeros(len(rec.proportions), dtype=bool)
    return np.nan_to_num(rec.interval_widths[cell_type].to_numpy(), nan=0.0) > threshold


def no_interval_reason(rec: ResultRecord) -> str | None:
    """Why the width threshold leaves ``rec`` alone (it has no 90 % interval), or None when it has one."""
    if rec.interval is not None:
        return None
    if rec.key == keys.CONSENSUS:
        params = rec.adata.uns.get(keys.run_info(rec.key), {}).get("parameters", {})
        because = str(params.get("no_interval_because", "")) or "it was combined without intervals"
        return f"{rec.name} has no interval, so greying skips it: {because}."
    return f"{rec.name} has no interval, so greying skips it: run it with per-spot 90% intervals."


def proportion_rgba(rec: ResultRecord, cell_type: str, cmap: str, threshold: float | None) -> np.ndarray:
    """The proportion map's colours, spots with an interval wider than ``threshold`` greyed out."""
    rgba = colormap_rgba(rec.proportions[cell_type].to_numpy(), cmap)
    rgba[uncertain_spots(rec, cell_type, threshold)] = UNCERTAIN_RGBA
    return rgba


def ring_spots(layer, ringed: np.ndarray):
    """Ring the ``ringed`` spots of a Points layer (the greyed ones) in :data:`UNCERTAIN_EDGE_RGBA`, the others
    not at all; raster layers have no rings."""
    if layer.metadata.get("raster") is not None or not hasattr(layer, "border_width"):
        return
    ringed = np.asarray(ringed, dtype=bool)
    if not ringed.any() and not np.any(layer.border_width):
        return  # nothing ringed before or now: leave the layer alone (no redraw)
    colours = np.zeros((len(ringed), 4), dtype=np.float32)
    colours[ringed] = UNCERTAIN_EDGE_RGBA
    layer.border_color = colours
    layer.border_width = np.where(ringed, UNCERTAIN_EDGE_WIDTH, 0.0)


def show_proportion(rec: ResultRecord, cell_type: str, cmap: str = "viridis", threshold: float | None = None):
    """Colour the proportion layer by ``cell_type``, and the interval-width layer (if any) by the same type."""
    layer = rec.layers["proportions"]
    set_spot_colors(layer, proportion_rgba(rec, cell_type, cmap, threshold))
    ring_spots(layer, uncertain_spots(rec, cell_type, threshold))
    layer.metadata.update(cell_type=cell_type, colormap=cmap, width_threshold=threshold)
    width_layer = rec.layers.get("interval_width")
    if width_layer is not None and rec.interval_widths is not None:
        widths = rec.interval_widths[cell_type].to_numpy()
        set_spot_colors(width_layer, colormap_rgba(widths, WIDTH_CMAP, 0.0, WIDTH_MAX))
        if rec.raster is None:
            width_layer.features = pd.DataFrame({"interval_width": widths})
        width_layer.metadata.update(cell_type=cell_type, values=widths)


def grey_uncertain_spots(viewer, threshold: float | None):
    """Apply the width threshold to every result's proportion layer, each showing the type it shows."""
    for rec in session_for(viewer).results.values():
        layer = rec.layers.get("proportions")
        if layer is None or layer not in viewer.layers:
            continue
        show_proportion(rec, layer.metadata["cell_type"], layer.metadata["colormap"], threshold)


# -- a consensus of results --------------------------------------------------------------------------------
def consensus_of(records: list[ResultRecord], align_types: bool = False):
    """The consensus of results on one slide (``api.consensus``), named by their result names."""
    return api.consensus(
        [r.adata for r in records],
        key=[r.key for r in records],
        names=[r.name for r in records],
        align_types=align_types,
    )


def add_consensus_steps(viewer, run, over: ResultRecord, name: str | None = None):
    """A consensus's layers over the spots of ``over`` (one of the results it combines)."""
    session = session_for(viewer)
    name = name or session.unique_result_name("consensus")
    return add_result_steps(
        viewer, run, over.coords_yx[:, ::-1], over.size, name=name, source=dict(over.source), raster=over.raster
    )


# -- expression within a cell type (DestVI) --------------------------------------------------------------
def destvi_state(rec: ResultRecord) -> dict | None:
    """The DestVI model state a result carries for imputation, or None for other methods."""
    return api.destvi_state(rec.result, rec.adata)


def impute_values(rec: ResultRecord, gene: str, cell_type: str) -> np.ndarray:
    """Imputed expression of ``gene`` within ``cell_type`` per spot of the slide, computed here (scripts, tests)."""
    state = destvi_state(rec)
    if state is None:
        raise ValueError(
            f"{rec.name!r} is a {rec.result.method} result; expression within a cell type needs a DestVI result."
        )
    steps = api.destvi_imputation_steps(state, cell_type, gene)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return api.in_slide_order(state, rec.adata.obs_names, stop.value)


def show_expression(viewer, rec: ResultRecord, gene: str, cell_type: str, values: np.ndarray, cmap="viridis"):
    """Colour one layer per result by ``values`` (imputed expression of ``gene`` within ``cell_type``)."""
    values = np.asarray(values, dtype=np.float64)
    rgba, vmin, vmax = expression_rgba(values, cmap)
    name = layer_name(rec, f"{gene} in {cell_type}")
    meta = {
        **_meta(rec, "imputed_expression"),
        "gene": gene,
        "cell_type": cell_type,
        "values": values,
        "vmin": vmin,
        "vmax": vmax,
        "colormap": cmap,
    }
    layer = rec.layers.get("expression")
    if layer is not None and layer in viewer.layers:
        set_spot_colors(layer, rgba)
        if rec.raster is None:
            layer.features = pd.DataFrame({"expression": values})  # a whole new table (napari 0.9)
        layer.metadata.update(meta)
        layer.name = name
        layer.visible = True
    else:
        layer = add_spot_layer(
            viewer,
            rec.coords_yx,
            rec.size,
            rgba,
            name,
            metadata=meta,
            raster=rec.raster,
            features=None if rec.raster is not None else pd.DataFrame({"expression": values}),
        )
        rec.layers["expression"] = layer
    viewer.layers.selection.active = layer
    return layer


# -- compare -----------------------------------------------------------------------------------------------
def compare_results(viewer, a: ResultRecord, b: ResultRecord, cmap: str = "magma"):
    """A layer of the Jensen-Shannon distance between two results' compositions per spot, and the comparison."""
    if a.adata.n_obs != b.adata.n_obs or not np.array_equal(a.coords_yx, b.coords_yx):
        raise ValueError(f"{a.name!r} and {b.name!r} are on different slides; compare runs on one slide.")
    cmp = compare_proportions(a.proportions.to_numpy(), a.cell_types, b.proportions.to_numpy(), b.cell_types)
    rgba = colormap_rgba(cmp.js, cmap, 0.0, 1.0)
    feats = pd.DataFrame(
        {
            "same_dominant_type": cmp.same_dominant,
            "js_distance": cmp.js,
            f"dominant ({a.name})": a.dominant,
            f"dominant ({b.name})": b.dominant,
        }
    )
    name = f"compare · {a.label or a.name} vs {b.label or b.name}"
    if name in viewer.layers:
        viewer.layers.remove(name)
    layer = add_spot_layer(
        viewer,
        a.coords_yx,
        a.size,
        rgba,
        name,
        raster=a.raster,
        features=None if a.raster is not None else feats,
        metadata={
            PLUGIN_KEY: {"kind": "comparison", "spots": a.spots_id},
            "summary": cmp.summary(),
            "colormap": cmap,
            "js_distance": cmp.js,
        },
    )
    session_for(viewer).comparison = (layer, cmp)
    return layer, cmp


# -- save --------------------------------------------------------------------------------------------------
def save_result(rec: ResultRecord, path) -> Path:
    """An .h5ad, or for a slide opened from a SpatialData .zarr and a ``.zarr`` path, a new SpatialData store
    with the slide's elements and the result as its table."""
    inputs = tuple(rec.source.get("inputs", ()))
    return api.save_result(
        rec.adata,
        path,
        protect=inputs,
        source=inputs[0] if inputs else None,
        table=rec.source.get("slide_options", {}).get("table"),
    )


def result_suffix(rec: ResultRecord) -> str:
    """The save format that keeps the result where the user's data lives: .zarr for a SpatialData slide."""
    inputs = rec.source.get("inputs", ())
    return ".zarr" if inputs and detect_format(inputs[0]) == "spatialdata" else ".h5ad"


def export_csv(rec: ResultRecord, path) -> Path:
    return write_text_atomic(rec.proportions.to_csv(), path)


def save_figure(viewer, rec: ResultRecord | None, path) -> Path:
    """The whole window (canvas, legend, docks) when OpenGL renders, else a matplotlib map with legend."""
    try:
        with atomic_path(path, ".png") as tmp:
            viewer.screenshot(str(tmp), canvas_only=False, flash=False)
    except Exception:  # no OpenGL context (offscreen Qt): draw the map with matplotlib instead
        return result_figure(rec.adata, rec.key, path)
    return Path(path)
