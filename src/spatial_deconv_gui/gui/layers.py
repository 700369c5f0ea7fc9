"""Pure functions that turn AnnData into napari layer data (no Qt here, so they are tested directly)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .. import keys
from ..colors import cell_type_palette, palette_from_uns, rgba_for_labels
from ..io.errors import InputError
from ..io.read import find_coordinates
from ..io.slide import MICRON, Slide, SlideImage
from .raster import POINTS_LIMIT, choose_pitch, make_raster, paint, read_colours

PLUGIN_KEY = "spatial_deconv_gui"
# Spots and results over a tissue image let the stain show through; on a bare canvas they are opaque.
OVERLAY_OPACITY = 0.75
SHAPES_LIMIT = 20_000
PINT_UNITS = {MICRON: "micrometer"}


def napari_points(coords: np.ndarray) -> np.ndarray:
    """napari's axis order is (row, col) = (y, x); spatial files store (x, y[, z])."""
    coords = np.asarray(coords, dtype=float)
    return coords[:, ::-1].copy()


def spot_size(coords: np.ndarray, sample: int = 20000, seed: int = 0) -> float:
    """Median nearest-neighbour distance: spots then touch without overlapping, on any platform's scale."""
    coords = np.asarray(coords, dtype=float)
    n = coords.shape[0]
    if n < 2:
        return 1.0
    tree = cKDTree(coords)
    query = coords if n <= sample else coords[np.random.default_rng(seed).choice(n, sample, replace=False)]
    dist, _ = tree.query(query, k=2)
    d = dist[:, 1]
    d = d[d > 0]
    return float(np.median(d)) if d.size else 1.0


def categorical_palettes(adata: ad.AnnData) -> dict[str, dict[str, str]]:
    """Per categorical obs column: the user's colours from ``uns['<col>_colors']`` else our fixed palette."""
    out = {}
    for col in adata.obs.columns:
        s = adata.obs[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            cats = list(map(str, s.cat.categories))
            out[col] = cell_type_palette(cats, palette_from_uns(cats, adata.uns.get(keys.colors(col))))
    return out


def features_table(adata: ad.AnnData) -> pd.DataFrame:
    feats = adata.obs.reset_index(drop=True).copy()
    for col in feats.columns:
        if feats[col].dtype == object:
            feats[col] = feats[col].astype(str)
    return feats


def default_colouring(adata: ad.AnnData, palettes: dict[str, dict[str, str]]) -> tuple[str | None, np.ndarray]:
    """Colour by the first categorical column that has user colours, else by log total counts."""
    for col, pal in palettes.items():
        if keys.colors(col) in adata.uns:
            return col, rgba_for_labels(adata.obs[col].astype(str).to_numpy(), pal)
    x = adata.X
    totals = np.asarray(x.sum(axis=1)).ravel() if x is not None else np.ones(adata.n_obs)
    v = np.log1p(np.clip(totals, 0, None))
    lo, hi = np.percentile(v, [1, 99]) if v.size else (0, 1)
    norm = np.clip((v - lo) / (hi - lo + 1e-12), 0, 1)
    return None, matplotlib.colormaps["viridis"](norm).astype(np.float32)


def layer_units(slide: Slide | None) -> dict:
    unit = PINT_UNITS.get(slide.unit) if slide is not None else None
    return {"units": (unit, unit)} if unit else {}


def image_layer_data(image: SlideImage, slide: Slide, slide_name: str) -> tuple:
    """A napari layer-data tuple for a tissue image, in the slide's world frame."""
    kwargs = image.layer_kwargs()
    data = kwargs.pop("data")
    if image.channel_axis is None:
        kwargs["name"] = f"{slide_name}: {image.name}"
    kwargs.update(layer_units(slide), metadata={PLUGIN_KEY: {"kind": "tissue_image", "slide": slide_name}})
    return data, kwargs, "image"


def boundaries_layer_data(slide: Slide, slide_name: str) -> tuple | None:
    """Cell outlines as a hidden Shapes layer (tick it to see them); None past what a Shapes layer draws smoothly."""
    outlines = [b for b in (slide.boundaries or []) if len(b) >= 3]
    if not outlines:
        return None
    if len(outlines) > SHAPES_LIMIT:
        slide.notices.append(
            f"{len(outlines):,} cell outlines are more than a Shapes layer draws smoothly "
            f"({SHAPES_LIMIT:,}); the cells are shown as disks."
        )
        return None
    kwargs = {
        "name": f"{slide_name}: cell boundaries",
        "shape_type": "polygon",
        "edge_color": "#ffffff",
        "face_color": "transparent",
        "edge_width": 0.3,
        "visible": False,
        **layer_units(slide),
        "metadata": {PLUGIN_KEY: {"kind": "cell_boundaries", "slide": slide_name}},
    }
    return outlines, kwargs, "shapes"


def slide_layer_data(
    slide: Slide, name: str | None = None, coord_key: str | None = None, read_options: dict | None = None
) -> list[tuple]:
    """Layer-data tuples for a slide: its tissue images first (drawn beneath), then cell outlines, then the spots."""
    layer_name = name or (Path(slide.path).stem if slide.path else "slide")
    layers = [image_layer_data(im, slide, layer_name) for im in slide.images]
    outlines = boundaries_layer_data(slide, layer_name)
    if outlines is not None:
        layers.append(outlines)
    layers.append(
        spatial_layer_data(
            slide.adata, path=slide.path, name=layer_name, coord_key=coord_key, slide=slide, read_options=read_options
        )
    )
    return layers


def spatial_layer_data(
    adata: ad.AnnData,
    path: str | Path | None = None,
    name: str | None = None,
    coord_key: str | None = None,
    slide: Slide | None = None,
    read_options: dict | None = None,
) -> tuple[np.ndarray, dict, str]:
    """A napari layer-data tuple ``(data, kwargs, "points")`` for a slide; refuses references."""
    found = find_coordinates(adata, coord_key)
    if found is None:
        looks_ref = any(c in adata.obs for c in ("cell_type", "celltype", "cell_types", "CellType", "cluster"))
        label = Path(path).name if path else "this file"
        if looks_ref:
            raise InputError(
                f"{label} has no spot coordinates and has cell-type labels: it is a single-cell reference, "
                "not a slide.",
                "open a spatial file here, and pick this file as the reference in the Deconvolution widget.",
                code="reference_not_slide",
            )
        raise InputError(
            f"{label} has no spot coordinates (obsm 'spatial', 'X_spatial', 'spatial_loc' or obs x/y).",
            "store coordinates in obsm['spatial'].",
            code="missing_coordinates",
        )
    coords, source = found
    world = float(slide.world_per_coord) if slide is not None else 1.0
    coords = coords * world
    palettes = categorical_palettes(adata)
    colour_col, rgba = default_colouring(adata, palettes)
    size = float(slide.spot_diameter) if slide is not None and slide.spot_diameter else spot_size(coords)
    meta = {
        "kind": "spatial",
        "adata_path": str(path) if path else None,
        "coord_source": source,
        "n_spots": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "palettes": palettes,
        "colour_column": colour_col,
        "spot_size": size,
        "world_per_coord": world,
        "unit": slide.unit if slide is not None else "",
        "format": slide.format if slide is not None else "h5ad",
        "has_image": bool(slide is not None and slide.images),
        "read_options": dict(read_options or {}),
        "notices": list(slide.notices) if slide is not None else [],
    }
    layer_name = name or (Path(path).stem if path else "slide")
    extra = layer_units(slide)
    if meta["has_image"]:
        extra["opacity"] = OVERLAY_OPACITY
    if adata.n_obs > POINTS_LIMIT:
        yx = napari_points(coords)[:, -2:]
        raster = make_raster(yx, choose_pitch(yx, size), spacing=size)
        meta.update(raster=raster, coords_yx=napari_points(coords), features=features_table(adata))
        kwargs = {"name": layer_name, "rgb": True, "metadata": {PLUGIN_KEY: meta}, **raster.layer_kwargs, **extra}
        return paint(raster, rgba), kwargs, "image"
    kwargs = {
        "name": layer_name,
        "features": features_table(adata),
        "size": size,
        "face_color": rgba,
        "border_width": 0,
        "metadata": {PLUGIN_KEY: meta},
        **extra,
    }
    return napari_points(coords), kwargs, "points"


def slide_coords_yx(layer) -> np.ndarray:
    """Spot positions (napari order) of a slide layer, drawn as points or as a raster image."""
    meta = layer.metadata.get(PLUGIN_KEY, {})
    return np.asarray(meta["coords_yx"]) if "coords_yx" in meta else np.asarray(layer.data)


def overlay_kwargs(viewer) -> dict:
    """Opacity and units for a layer drawn over a slide: see-through when a tissue image lies beneath."""
    kwargs = {}
    for layer in viewer.layers:
        if layer.metadata.get(PLUGIN_KEY, {}).get("kind") == "tissue_image":
            kwargs["opacity"] = OVERLAY_OPACITY
            if getattr(layer, "units", None) is not None:
                kwargs["units"] = tuple(layer.units)[-2:]
            break
    return kwargs


def add_spot_layer(
    viewer,
    coords_yx: np.ndarray,
    size: float,
    rgba: np.ndarray,
    name: str,
    metadata: dict,
    raster=None,
    features=None,
    visible: bool = True,
):
    """A layer with one colour per spot: Points normally, an RGBA image past the points limit."""
    over = overlay_kwargs(viewer)
    if raster is not None:
        return viewer.add_image(
            paint(raster, rgba),
            name=name,
            rgb=True,
            visible=visible,
            metadata={**metadata, "raster": raster},
            **raster.layer_kwargs,
            **over,
        )
    return viewer.add_points(
        coords_yx,
        name=name,
        size=size,
        border_width=0,
        face_color=rgba,
        features=features,
        visible=visible,
        metadata=metadata,
        **over,
    )


def spot_colors(layer) -> np.ndarray:
    raster = layer.metadata.get("raster") or layer.metadata.get(PLUGIN_KEY, {}).get("raster")
    if raster is None:
        return np.asarray(layer.face_color)
    return read_colours(raster, layer.data)


def set_spot_colors(layer, rgba: np.ndarray, index: np.ndarray | None = None):
    """Recolour all spots (or ``index``) of a layer made by :func:`add_spot_layer` or the reader."""
    raster = layer.metadata.get("raster") or layer.metadata.get(PLUGIN_KEY, {}).get("raster")
    if raster is None:
        if index is None:
            layer.face_color = rgba
        else:
            colours = np.asarray(layer.face_color).copy()
            colours[index] = rgba
            layer.face_color = colours
        return
    layer.data = paint(raster, rgba, np.asarray(layer.data).copy(), index)


# Layers that colour a slide's spots by a result. Over one slide they are drawn translucent on the same spots, so a
# visible one covers (and tints) every other: the user sees one at a time, the one last shown.
RESULT_LAYER_KINDS = frozenset(
    {"dominant_type", "proportions", "interval_width", "agreement", "spot_class", "imputed_expression", "comparison"}
)


def spots_id(coords_yx: np.ndarray) -> str:
    """A fingerprint of a set of spot positions: equal for the results of one slide, told apart for others."""
    coords = np.ascontiguousarray(coords_yx, dtype=np.float64)
    return hashlib.blake2b(coords.tobytes(), digest_size=8).hexdigest() + f":{len(coords)}"


def hide_results_on(viewer, spots: str, keep=None) -> list:
    """Hide the visible result layers on the spots ``spots`` (a :func:`spots_id`), except ``keep``; the slides,
    their images and other slides' layers stay as they are. Returns the layers hidden."""
    hidden = []
    for other in viewer.layers:
        meta = other.metadata.get(PLUGIN_KEY, {})
        if (
            other is not keep
            and other.visible
            and meta.get("kind") in RESULT_LAYER_KINDS
            and meta.get("spots") == spots
        ):
            other.visible = False
            hidden.append(other)
    return hidden


def show_alone(viewer, layer) -> list:
    """When ``layer`` is a result layer of a slide, hide the slide's other visible result layers (a radio group
    per slide). Returns the layers hidden."""
    meta = layer.metadata.get(PLUGIN_KEY, {})
    if meta.get("kind") not in RESULT_LAYER_KINDS or meta.get("spots") is None:
        return []
    return hide_results_on(viewer, meta["spots"], keep=layer)


def show_slide_alone(viewer, slide) -> list:
    """Show a slide layer and hide the visible result layers on its spots (a run about to stream its colours onto
    the slide would be drawn under them). Returns the layers hidden."""
    hidden = hide_results_on(viewer, spots_id(slide_coords_yx(slide)))
    slide.visible = True
    return hidden


def slide_layer_choices(viewer) -> list[tuple[str, object]]:
    """(name, layer) of every slide opened through this plugin, for layer pickers."""
    return [
        (layer.name, layer) for layer in viewer.layers if layer.metadata.get(PLUGIN_KEY, {}).get("kind") == "spatial"
    ]


def refresh_slide_picker(combo) -> object | None:
    """Re-read a slide picker's choices and select the first slide when none is selected; returns the value."""
    combo.reset_choices()
    layers = [c for c in combo.choices if c is not None]
    if combo.value is None and layers:
        combo.value = layers[0]
    return combo.value
