"""Cell-type colours: honour the user's palette, else a fixed high-contrast one, always as RGBA arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# matplotlib.colors is imported where a colour is parsed, not here: importing it pulls in matplotlib (~0.3 s of
# every CLI start-up), and a run whose slide carries no colours never parses one.

# Distinct on white and on napari's dark canvas; ordered so neighbours in the list differ most.
HIGH_CONTRAST = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#393b79",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#9edae5",
    "#dbdb8d",
    "#637939",
    "#e7ba52",
    "#843c39",
    "#d6616b",
    "#7b4173",
    "#a55194",
    "#3182bd",
    "#e6550d",
    "#31a354",
    "#756bb1",
    "#636363",
    "#fd8d3c",
    "#74c476",
    "#9e9ac8",
)
FILTERED_COLOR = "#808080"
FILTERED_LABEL = "filtered"


def palette_from_uns(categories: Sequence[str], colors: Sequence[str] | None) -> dict[str, str]:
    """Map categories to colours stored scanpy-style (``uns['<col>_colors']`` aligned with categories)."""
    if colors is None:
        return {}
    colors = list(colors)
    if len(colors) < len(categories):
        return {}
    from matplotlib.colors import to_hex

    out = {}
    for name, col in zip(categories, colors):
        try:
            out[str(name)] = to_hex(col, keep_alpha=False)
        except ValueError:
            continue
    return out


def cell_type_palette(names: Sequence[str], known: Mapping[str, str] | None = None) -> dict[str, str]:
    """Colour per name: ``known`` wins; the rest take the fixed palette in order, skipping used colours."""
    known = dict(known or {})
    used = {c.lower() for c in known.values()}
    free = (c for c in HIGH_CONTRAST if c.lower() not in used)
    out: dict[str, str] = {}
    for i, name in enumerate(names):
        if name in known:
            out[name] = known[name]
        elif name == FILTERED_LABEL:
            out[name] = FILTERED_COLOR
        else:
            nxt = next(free, None)
            if nxt is None:  # more types than palette entries: fall back to an evenly spaced hue wheel
                import colorsys

                from matplotlib.colors import to_hex

                nxt = to_hex(colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.9))
            out[name] = nxt
    return out


def rgba_for_labels(labels: Sequence[str], palette: Mapping[str, str], hidden: set[str] | None = None) -> np.ndarray:
    """n x 4 float RGBA for each label; hidden labels become fully transparent."""
    from matplotlib.colors import to_rgba

    labels = np.asarray(labels, dtype=object)
    uniq, inv = np.unique(labels.astype(str), return_inverse=True)
    table = np.array([to_rgba(palette.get(u, FILTERED_COLOR)) for u in uniq], dtype=np.float32).reshape(-1, 4)
    if hidden:
        for j, u in enumerate(uniq):
            if u in hidden:
                table[j, 3] = 0.0
    return table[inv.ravel()]
