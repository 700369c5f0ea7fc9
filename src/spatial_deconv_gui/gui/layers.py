"""Pure functions that turn AnnData into napari layer data (no Qt here, so they are tested directly)."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ..colors import cell_type_palette, palette_from_uns, rgba_for_labels
from ..io.errors import InputError
from ..io.read import find_coordinates

PLUGIN_KEY = "spatial_deconv_gui"


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
            out[col] = cell_type_palette(cats, palette_from_uns(cats, adata.uns.get(f"{col}_colors")))
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
        if f"{col}_colors" in adata.uns:
            return col, rgba_for_labels(adata.obs[col].astype(str).to_numpy(), pal)
    import matplotlib

    x = adata.X
    totals = np.asarray(x.sum(axis=1)).ravel() if x is not None else np.ones(adata.n_obs)
    v = np.log1p(np.clip(totals, 0, None))
    lo, hi = np.percentile(v, [1, 99]) if v.size else (0, 1)
    norm = np.clip((v - lo) / (hi - lo + 1e-12), 0, 1)
    return None, matplotlib.colormaps["viridis"](norm).astype(np.float32)


def spatial_layer_data(adata: ad.AnnData, path: str | Path | None = None, name: str | None = None,
                       coord_key: str | None = None) -> tuple[np.ndarray, dict, str]:
    """A napari layer-data tuple ``(data, kwargs, "points")`` for a slide; refuses references."""
    found = find_coordinates(adata, coord_key)
    if found is None:
        looks_ref = any(c in adata.obs for c in ("cell_type", "celltype", "cell_types", "CellType", "cluster"))
        label = Path(path).name if path else "this file"
        if looks_ref:
            raise InputError(f"{label} has no spot coordinates and has cell-type labels: it is a single-cell reference, "
                             "not a slide.", "open a spatial file here, and pick this file as the reference in the "
                             "Deconvolution widget.", code="reference_not_slide")
        raise InputError(f"{label} has no spot coordinates (obsm 'spatial', 'X_spatial', 'spatial_loc' or obs x/y).",
                         "store coordinates in obsm['spatial'].", code="missing_coordinates")
    coords, source = found
    palettes = categorical_palettes(adata)
    colour_col, rgba = default_colouring(adata, palettes)
    size = spot_size(coords)
    kwargs = {
        "name": name or (Path(path).stem if path else "slide"),
        "features": features_table(adata),
        "size": size,
        "face_color": rgba,
        "border_width": 0,
        "metadata": {
            PLUGIN_KEY: {
                "kind": "spatial",
                "adata_path": str(path) if path else None,
                "coord_source": source,
                "n_spots": int(adata.n_obs),
                "n_genes": int(adata.n_vars),
                "palettes": palettes,
                "colour_column": colour_col,
                "spot_size": size,
            },
        },
    }
    return napari_points(coords), kwargs, "points"
