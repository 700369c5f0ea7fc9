"""The Legend dock: the selected result's cell types with their colours and spot counts; unticking a type hides
its spots on the dominant-type layer."""

from __future__ import annotations

import pandas as pd
from matplotlib.colors import to_rgba
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QLabel, QListWidget, QListWidgetItem, QVBoxLayout, QWidget

from ...colors import FILTERED_LABEL
from ..lifetime import DockLinks
from ..result_layers import set_hidden
from ..saved import adopt_saved_results
from ..session import ResultRecord, session_for


class LegendDock(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.session = session_for(napari_viewer)
        self.run: ResultRecord | None = None
        self.title = QLabel("no result yet")
        self.list = QListWidget()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.title)
        lay.addWidget(self.list)
        self.list.itemChanged.connect(self._on_item)
        self.list.setMinimumHeight(150)
        self.links = DockLinks(self, napari_viewer)  # undone when the dock closes
        self.links.connect(self.session.result_selected, self._on_selected)
        self.links.connect(self.session.result_removed, self._on_removed)
        if self.session.result() is not None:
            self.show_run(self.session.result())
        adopt_saved_results(napari_viewer)

    def _on_selected(self, name: str):
        rec = self.session.result(name)
        if rec is not None:
            self.show_run(rec)

    def _on_removed(self, name: str):
        if self.run is not None and self.run.name == name:
            self.run = None
            self.title.setText("no result yet")
            self.list.clear()

    def show_run(self, rec: ResultRecord):
        self.run = rec
        self.title.setText(f"{rec.name}: dominant type")
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
