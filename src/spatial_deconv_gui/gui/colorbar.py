"""The titled horizontal colorbar under a dock's controls (matplotlib on a Qt canvas), for every dock that
colours the tissue by a value."""

from __future__ import annotations

import matplotlib
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.colorbar import ColorbarBase
from matplotlib.colors import Normalize
from matplotlib.figure import Figure


def add_colorbar(container, hidden: bool = False) -> tuple[Figure, FigureCanvasQTAgg]:
    """An empty colorbar figure and its canvas, appended to a magicgui container's layout; ``hidden``: it takes no
    room until :func:`draw_colorbar` draws something (an empty canvas is a blank white box)."""
    figure = Figure(figsize=(3.2, 0.6))
    canvas = FigureCanvasQTAgg(figure)
    canvas.setMinimumHeight(72)  # room for the title above the bar
    container.native.layout().addWidget(canvas)
    canvas.setVisible(not hidden)
    return figure, canvas


def draw_colorbar(
    figure: Figure,
    canvas: FigureCanvasQTAgg,
    label: str,
    cmap: str,
    vmin: float = 0.0,
    vmax: float = 1.0,
    extend: str = "neither",
) -> ColorbarBase:
    """Draw (and show) the colorbar; ``extend="max"`` marks values above ``vmax`` drawn in its colour."""
    figure.clear()
    ax = figure.add_axes([0.05, 0.42, 0.9, 0.22])
    bar = ColorbarBase(
        ax, cmap=matplotlib.colormaps[cmap], norm=Normalize(vmin, vmax), orientation="horizontal", extend=extend
    )
    ax.set_title(label, fontsize=8)
    ax.tick_params(labelsize=7)
    canvas.setVisible(True)
    canvas.draw_idle()
    return bar


def hide_colorbar(figure: Figure, canvas: FigureCanvasQTAgg) -> None:
    """Nothing to show: clear the figure and give its room back."""
    figure.clear()
    canvas.setVisible(False)
