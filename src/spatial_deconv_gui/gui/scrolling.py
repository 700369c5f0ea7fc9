"""Docks whose controls scroll, so a column of docks never makes the window taller than the screen.

napari stacks the docks of one side in a column, and Qt will not shrink a dock below its controls' minimum height:
with Deconvolution, Results and Spot inspector on the right, the window's minimum height was 1764 px (the sample
demo under Xvfb), taller than most screens, which pushed the bottom dock off-screen. A scrolling dock's minimum is
a few rows; its controls scroll inside it when the column is short.
"""

from __future__ import annotations

from magicgui.widgets import Container
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication, QFrame, QScrollArea, QWidget

MIN_SHOWN = 160  # px: the least a scrolling dock keeps on screen (about six rows of controls)
SCREEN_SHARE = 0.22  # ... and up to this share of the screen's height, when its controls need that much


class ScrollingDock(Container):
    """A dock (a magicgui Container, as napari docks it) holding one scroll area with ``self.body`` in it: put the
    controls in ``self.body``. ``self.native`` stays the widget napari docks (what DockLinks watches)."""

    def __init__(self):
        super().__init__(labels=False)
        self.margins = (0, 0, 0, 0)
        self.body = Container(labels=True)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(self.body.native)
        self.scroll.setMinimumHeight(MIN_SHOWN)
        self.native.layout().addWidget(self.scroll)

    def fit_to_controls(self):
        """Call once the controls are in: the scroll area keeps their full width (it scrolls only vertically), and
        shows as many of them as fit in a quarter of the screen without scrolling. napari gives the docks above the
        last of a column their minimum height, so this minimum is the height they get."""
        # a nested container's new rows reach its parent's size hints only after Qt's next layout pass: ask now
        for widget in self.body.native.findChildren(QWidget):
            if widget.layout() is not None:
                widget.layout().activate()
                widget.updateGeometry()
        self.body.native.layout().activate()
        bar = self.scroll.verticalScrollBar().sizeHint().width()
        hint = self.body.native.minimumSizeHint()
        self.scroll.setMinimumWidth(hint.width() + bar)
        screen = QApplication.primaryScreen()
        share = int(SCREEN_SHARE * screen.availableGeometry().height()) if screen is not None else MIN_SHOWN
        self.scroll.setMinimumHeight(max(MIN_SHOWN, min(hint.height(), share)))

    def reset_choices(self, *args):
        # napari calls this on layer changes; the body is no magicgui child of the dock, so pass it on
        super().reset_choices(*args)
        self.body.reset_choices(*args)
