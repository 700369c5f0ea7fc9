"""The Legend dock: the cell types, colours and spot counts of the dominant-type layer the user sees (the topmost
visible one); unticking a type hides its spots on that layer. With no dominant-type layer visible it lists nothing
(a legend of a hidden layer describes nothing on the canvas)."""

from __future__ import annotations

import pandas as pd
from matplotlib.colors import to_rgba
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QLabel, QListWidget, QListWidgetItem, QVBoxLayout, QWidget

from ...colors import FILTERED_LABEL
from ..layers import PLUGIN_KEY
from ..lifetime import DockLinks
from ..result_layers import set_hidden
from ..saved import adopt_saved_results
from ..session import ResultRecord, session_for

NOTHING_SHOWN = "no dominant-type layer shown"


class LegendDock(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.session = session_for(napari_viewer)
        self.run: ResultRecord | None = None
        self.viewer = napari_viewer
        self.title = QLabel(NOTHING_SHOWN)
        self.title.setWordWrap(True)
        self.list = QListWidget()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.title)
        lay.addWidget(self.list)
        self.list.itemChanged.connect(self._on_item)
        self.list.setMinimumHeight(150)
        self.links = DockLinks(self, napari_viewer)  # undone when the dock closes
        # a dominant-type layer is added before its result joins the session: look again when it has
        self.links.connect(self.session.result_added, self.follow_the_canvas)
        self.links.connect(self.session.result_removed, self.follow_the_canvas)
        self.links.connect(napari_viewer.layers.events, self._on_layers_event)
        self.follow_the_canvas()
        adopt_saved_results(napari_viewer)

    def _on_layers_event(self, event):
        # the layer list re-emits every event of every layer: only these change which layer is on top and shown
        if event.type in ("visible", "inserted", "removed", "moved", "reordered"):
            self.follow_the_canvas()

    def top_dominant_layer(self):
        """The topmost visible dominant-type layer whose result is in the session, or None."""
        for layer in list(self.viewer.layers)[::-1]:
            meta = layer.metadata.get(PLUGIN_KEY, {})
            if layer.visible and meta.get("kind") == "dominant_type" and meta.get("run") in self.session.results:
                return layer
        return None

    def follow_the_canvas(self, *_):
        layer = self.top_dominant_layer()
        rec = None if layer is None else self.session.results[layer.metadata[PLUGIN_KEY]["run"]]
        if rec is None:
            self.run = None
            self.title.setText(NOTHING_SHOWN)
            self.list.clear()
            self.list.setVisible(False)
        elif rec is not self.run:
            self.show_run(rec)

    def show_run(self, rec: ResultRecord):
        self.run = rec
        self.title.setText(f"{rec.name}: dominant type")
        self.list.setVisible(True)
        self.list.blockSignals(True)
        self.list.clear()
        counts = pd.Series(rec.dominant).value_counts()
        for t in rec.cell_types + ([FILTERED_LABEL] if FILTERED_LABEL in counts else []):
            pix = QPixmap(14, 14)
            pix.fill(QColor.fromRgbF(*to_rgba(rec.palette[t])))
            item = QListWidgetItem(QIcon(pix), f"{t} ({int(counts.get(t, 0))})")
            item.setData(Qt.ItemDataRole.UserRole, t)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Unchecked if t in rec.hidden else Qt.CheckState.Checked)
            self.list.addItem(item)
        self.list.blockSignals(False)

    def labels(self) -> list[str]:
        return [self.list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.list.count())]

    def set_visible(self, cell_type: str, visible: bool):
        for i in range(self.list.count()):
            item = self.list.item(i)
            if item.data(Qt.ItemDataRole.UserRole) == cell_type:
                item.setCheckState(Qt.CheckState.Checked if visible else Qt.CheckState.Unchecked)

    def _on_item(self, _item):
        if self.run is None:
            return
        hidden = {
            self.list.item(i).data(Qt.ItemDataRole.UserRole)
            for i in range(self.list.count())
            if self.list.item(i).checkState() != Qt.CheckState.Checked
        }
        set_hidden(self.run, hidden)
