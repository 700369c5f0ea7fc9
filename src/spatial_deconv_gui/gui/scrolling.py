"""Docks whose controls scroll, so a column of docks never makes the window taller than the screen.

napari stacks the docks of one side in a column, and Qt will not shrink a dock below its controls' minimum height:
with Deconvolution, Results and Spot inspector on the right, the window's minimum height was 1764 px (the sample
demo under Xvfb), taller than most screens, which pushed the bottom dock off-screen. A scrolling dock's minimum is
a few rows; its controls scroll inside it when the column is short.
"""

from __future__ import annotations

from magicgui.widgets import Container
from qtpy.QtCore import QEvent, QSize, Qt
from qtpy.QtWidgets import QApplication, QFrame, QLabel, QScrollArea

MIN_SHOWN = 160  # px: the least a scrolling dock keeps on screen (about six rows of controls)
SCREEN_SHARE = 0.22  # ... and up to this share of the screen's height, when its controls need that much


class _VerticalScroll(QScrollArea):
    """Scrolls only vertically, so its minimum width is always its controls' (asked live: napari's stylesheet and a
    method's parameters change it after the dock is built), and its minimum height a share of the screen."""

    def __init__(self, body):
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setWidget(body)
        body.installEventFilter(self)

    def eventFilter(self, obj, event):  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.LayoutRequest:  # the controls' size hints changed: so did ours
            self._labels_fit_their_text()
            self.updateGeometry()
        return False

    def _labels_fit_their_text(self):
        # magicgui gives a container's labels one minimum width measured in the default font; napari's stylesheet
        # draws them larger, and squeezed to that width ("confidence threshold" lost its end). Widen each
        # container's labels together (the value column stays aligned) to what their text needs.
        need: dict = {}
        labels = [label for label in self.widget().findChildren(QLabel) if label.minimumWidth() > 0]
        for label in labels:
            rows = label.parentWidget().parentWidget() if label.parentWidget() is not None else None
            need[id(rows)] = max(need.get(id(rows), 0), label.minimumSizeHint().width())
        for label in labels:
            rows = label.parentWidget().parentWidget() if label.parentWidget() is not None else None
            if label.minimumWidth() < need[id(rows)]:
                label.setMinimumWidth(need[id(rows)])

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        inner = self.widget().minimumSizeHint()
        screen = self.screen() or QApplication.primaryScreen()
        share = int(SCREEN_SHARE * screen.availableGeometry().height()) if screen is not None else MIN_SHOWN
        width = inner.width() + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()
        return QSize(width, max(MIN_SHOWN, min(inner.height(), share)))


class ScrollingDock(Container):
    """A dock (a magicgui Container, as napari docks it) holding one scroll area with ``self.body`` in it: put the
    controls in ``self.body``. ``self.native`` stays the widget napari docks (what DockLinks watches)."""

    def __init__(self):
        super().__init__(labels=False)
        self.margins = (0, 0, 0, 0)
        self.body = Container(labels=True)
        self.scroll = _VerticalScroll(self.body.native)
        self.native.layout().addWidget(self.scroll)

    def reset_choices(self, *args):
        # napari calls this on layer changes; the body is no magicgui child of the dock, so pass it on
        super().reset_choices(*args)
        self.body.reset_choices(*args)
