"""Matplotlib pictures of results, for reports and for machines with no OpenGL (no Qt here)."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad

from . import keys
from .colors import FILTERED_LABEL, cell_type_palette, palette_from_uns
from .io.read import find_coordinates
from .io.write import atomic_path


def result_figure(adata: ad.AnnData, key: str, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Dominant-type map with a legend, beside the truth when the slide is simulated."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    coords = find_coordinates(adata)[0]
    col = keys.dominant_type(key)
    types = [str(t) for t in adata.obs[col].cat.categories if t != FILTERED_LABEL]
    pal = cell_type_palette(types + [FILTERED_LABEL], palette_from_uns(types, adata.uns.get(keys.CELL_TYPE_COLORS)))
    panels = [(col, f"{key}: dominant cell type")]
    if keys.TRUE_DOMINANT_TYPE in adata.obs:
        panels.append((keys.TRUE_DOMINANT_TYPE, "truth (simulated)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 1.8, 5.2), squeeze=False)
    size = max(2.0, 40000.0 / max(adata.n_obs, 1))
    for ax, (column, title) in zip(axes[0], panels):
        labels = adata.obs[column].astype(str).to_numpy()
        colors = [pal.get(lbl, "#808080") for lbl in labels]
        ax.scatter(coords[:, 0], coords[:, 1], c=colors, s=size, linewidths=0)
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.invert_yaxis()  # image convention, as napari draws it
        ax.set_xticks([])
        ax.set_yticks([])
    present = set(adata.obs[col].astype(str))
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=pal[t], label=t)
        for t in types + [FILTERED_LABEL]
        if t in present or t != FILTERED_LABEL
    ]
    fig.legend(handles=handles, loc="center right", frameon=False, title="cell type")
    fig.subplots_adjust(right=0.8)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
