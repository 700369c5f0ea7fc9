"""The layers of the interaction lens: segments from each sending neighbour to the lens's cell, coloured by
support sqrt(L·R); a veil that dims every cell but the lens's cell and its senders; the *who responds* map.

Every segment and colour is the API's numbers (``perturb_api.interaction_lens`` / ``who_responds``); the Lens dock
calls these helpers and keeps no drawing code of its own.
"""

from __future__ import annotations

import numpy as np

from .layers import PLUGIN_KEY
from .perturb_layers import cell_size, diverging_rgba
from .session import Session
from .views import colormap_rgba

SUPPORT_CMAP = "plasma"
DIM_RGBA = np.array([0.0, 0.0, 0.0, 0.7], dtype=np.float32)  # over the cells the lens is not about
CLEAR_RGBA = np.zeros(4, dtype=np.float32)
FOCUS_BORDER = np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)
FOCUS_BORDER_WIDTH = 0.25  # of the point's size
SEGMENTS, VEIL, RESPONDS = "lens: senders", "lens: dim", "who responds"


def lens_segments(session: Session, lens) -> tuple[np.ndarray, np.ndarray]:
    """napari Vectors data (S, 2, 2) from each sender (position, y-x in the slide's world frame) to the lens's
    cell (direction), one per row of ``lens.senders``, and the support of each."""
    yx = session.cells_yx()
    senders = lens.senders
    if len(senders) == 0:
        return np.zeros((0, 2, 2)), np.zeros(0)
    start = yx[senders["sender"].to_numpy(np.int64)]
    direction = yx[lens.cell][None, :] - start
    return np.stack([start, direction], axis=1), senders["support"].to_numpy(float)


def support_range(lens, gene_max: dict) -> float:
    """The top of the support colour range: the largest support any sender could give the lens's ligand terms,
    sqrt(max L · max partner) over the slide, so colours compare from cell to cell (and the colorbar rarely
    needs redrawing while the mouse moves)."""
    terms = lens.modulators[lens.modulators.kind != "tf"]
    top = max((np.sqrt(gene_max[a] * gene_max[b]) for a, b in zip(terms.ligand, terms.partner)), default=0.0)
    return float(top) if top > 0 else 1.0


def veil_colours(n_cells: int, lens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Face colours (the cell and its senders clear, every other cell dimmed), border colours and widths (only
    the cell outlined: a border on the others would let the colours beneath show as rings)."""
    face = np.tile(DIM_RGBA, (n_cells, 1))
    face[lens.senders["sender"].to_numpy(np.int64)] = CLEAR_RGBA
    face[lens.cell] = CLEAR_RGBA
    border = np.zeros((n_cells, 4), dtype=np.float32)
    border[lens.cell] = FOCUS_BORDER
    width = np.zeros(n_cells)
    width[lens.cell] = FOCUS_BORDER_WIDTH
    return face, border, width


def _layer(viewer, name: str):
    return viewer.layers[name] if name in viewer.layers else None


def draw_lens(viewer, session: Session, lens, vmax: float) -> tuple[object, object]:
    """Draw (or redraw) the senders' segments, coloured by support from 0 to ``vmax``, and the veil for ``lens``;
    returns both layers."""
    data, support = lens_segments(session, lens)
    colours = colormap_rgba(support, SUPPORT_CMAP, 0.0, vmax) if support.size else np.zeros((0, 4))
    yx = session.cells_yx()
    face, border, width = veil_colours(len(yx), lens)
    veil = _layer(viewer, VEIL)
    if veil is None:
        veil = viewer.add_points(
            yx,
            name=VEIL,
            size=cell_size(session),
            face_color=face,
            border_color=border,
            border_width=width,
            metadata={PLUGIN_KEY: {"kind": "lens_veil"}},
        )
    else:
        veil.face_color = face
        veil.border_color = border
        veil.border_width = width
    veil.metadata["cell"] = lens.cell
    segments = _layer(viewer, SEGMENTS)
    if segments is None:
        segments = viewer.add_vectors(
            data,
            name=SEGMENTS,
            edge_width=max(cell_size(session) * 0.12, 0.5),
            vector_style="arrow",
            metadata={PLUGIN_KEY: {"kind": "lens_segments"}},
        )
    else:
        segments.data = data
    if len(data):
        segments.edge_color = colours
    segments.metadata.update(cell=lens.cell, gene=lens.target, support=support, vmax=vmax)
    return segments, veil


def clear_lens(viewer):
    for name in (SEGMENTS, VEIL):
        layer = _layer(viewer, name)
        if layer is not None:
            viewer.layers.remove(layer)


def draw_who_responds(viewer, session: Session, response, gene: str | None) -> tuple[object, str, str, float, float]:
    """Colour a map of the cells by the first-step Δ of ``gene`` (diverging), or by Σ|Δ| over every responding
    target when ``gene`` is None; returns the layer and its colorbar's label, colormap and range."""
    if gene is None:
        values = response.total_abs()
        top = float(np.percentile(values, 99)) if values.size and values.max() > 0 else 1.0
        rgba = colormap_rgba(values, "magma", 0.0, top or 1.0)
        label, cmap, lo, hi = f"Σ|Δ| of {response.ligand}'s responders (step 1)", "magma", 0.0, top or 1.0
    else:
        values = response.of(gene)
        rgba, vmax = diverging_rgba(values)
        label, cmap, lo, hi = f"Δ {gene} after KO {response.ligand} (step 1)", "RdBu_r", -vmax, vmax
    layer = _layer(viewer, RESPONDS)
    if layer is None:
        layer = viewer.add_points(
            session.cells_yx(),
            name=RESPONDS,
            size=cell_size(session),
            border_width=0,
            face_color=rgba,
            metadata={PLUGIN_KEY: {"kind": "lens_who_responds"}},
        )
        segments = _layer(viewer, SEGMENTS)
        if segments is not None:  # over the veil (the map reads undimmed), under the senders' arrows
            viewer.layers.move(viewer.layers.index(layer), viewer.layers.index(segments))
    else:
        layer.face_color = rgba
    layer.metadata.update(ligand=response.ligand, gene=gene, values=values)
    return layer, label, cmap, lo, hi
