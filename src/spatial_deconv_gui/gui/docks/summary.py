"""The Knockout summary dock: the genes the selected knockout moved most (bar chart) and the mean shift per
cluster; it follows the session's selected knockout run."""

from __future__ import annotations

import pandas as pd
from magicgui.widgets import Container, Label
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QTimer

from ..lifetime import DockLinks
from ..perturb_layers import draw_summary, summary_numbers
from ..session import Perturbation, session_for


class SummaryDock(Container):
    def __init__(self, napari_viewer):
        super().__init__(labels=False)
        self.session = session_for(napari_viewer)
        self.figure = Figure(figsize=(3.4, 3.0), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.native.layout().addWidget(self.canvas)
        self.table = Label(value="")
        self.append(self.table)
        self.top: pd.Series | None = None
        self.per_cluster: pd.Series | None = None
        self.links = DockLinks(self.native, napari_viewer)  # undone when the dock closes
        self.links.connect(self.session.perturbation_selected, self._on_selected)
        if self.session.perturbation() is not None:
            self._on_selected(self.session.selected_perturbation)

    def _on_selected(self, name: str):
        # drawn in the next event-loop turn: the knockout's layers redraw first, the chart after
        QTimer.singleShot(0, lambda: self._draw(name))

    def _draw(self, name: str):
        run = self.session.perturbation(name)
        if run is not None and self.session.model is not None:
            self.show_run(run)

    def show_run(self, run: Perturbation):
        self.top, self.per_cluster = summary_numbers(run, self.session.model.clusters)
        draw_summary(self.figure, run, self.top)
        self.canvas.draw_idle()
        self.table.value = "mean |Δ| per cell, by cluster:\n" + "\n".join(
            f"  {k}: {v:.3g}" for k, v in self.per_cluster.items()
        )
