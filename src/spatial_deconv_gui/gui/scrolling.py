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


class VerticalScroll(QScrollArea):
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
    controls in ``self.body``. ``self.native`` stays the widget napari docks (what DockLinks watches).

    :meth:`pin` puts controls in ``self.footer``, under the scroll area and outside it: always on screen however
    the body is scrolled (the Deconvolution dock's Run / Cancel / Stop and its progress; on a 1000-px screen Run
    was below the fold of the scrolled controls)."""

    def __init__(self):
        super().__init__(labels=False)
        self.margins = (0, 0, 0, 0)
        self.body = Container(labels=True)
        self.scroll = VerticalScroll(self.body.native)
        self.native.layout().addWidget(self.scroll)
        self.footer = Container(labels=False)
        self.footer.margins = (4, 2, 4, 4)
        self.footer.native.setVisible(False)  # takes no room until something is pinned
        self.native.layout().addWidget(self.footer.native)

    def pin(self, *widgets):
        """Put ``widgets`` (magicgui widgets, or lists of them: one row each) in the footer, in this order."""
        for widget in widgets:
            if isinstance(widget, (list, tuple)):
                row = Container(layout="horizontal", labels=False, widgets=list(widget))
                row.margins = (0, 0, 0, 0)
                widget = row
            self.footer.append(widget)
        self.footer.native.setVisible(True)

    def reset_choices(self, *args):
        # napari calls this on layer changes; the body and footer are no magicgui children of the dock: pass it on
        super().reset_choices(*args)
        self.body.reset_choices(*args)
        self.footer.reset_choices(*args)
