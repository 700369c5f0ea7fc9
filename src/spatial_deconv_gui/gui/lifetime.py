"""What a dock hooks into outside itself, undone in one place when the dock closes.

A dock connects to the session's signals, the viewer's events and mouse callbacks, and runs jobs. Left behind
after the dock is closed, each of these keeps the dock (and whatever it shows) alive and reacting: a closed
Spot inspector would still redraw on every mouse move, a closed Train dock's child process would still train.
:class:`DockLinks` records each hook as it is made and undoes them all, once, when the dock closes: napari's
close button unparents the dock's widget (``remove_dock_widget``), and closing the viewer destroys it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from qtpy.QtCore import QEvent, QObject


class _ParentWatcher(QObject):
    """Calls ``on_orphaned`` when its widget loses its parent (napari's close button removes the dock so)."""

    def __init__(self, widget, links: DockLinks):
        super().__init__(widget)  # a child of the widget: lives exactly as long as it
        self._links = weakref.ref(links)

    def eventFilter(self, obj, event):  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.ParentChange and obj.parent() is None:
            _close_if_alive(self._links)
        return False


def _close_if_alive(links_ref: weakref.ref) -> None:
    # Weak, because the garbage collector may be tearing the links down (their attributes already cleared) when
    # Qt destroys the widget; a dead reference then means there is nothing left to undo.
    links = links_ref()
    if links is not None:
        links.close()


class DockLinks:
    """The hooks of one dock (``widget``: its native QWidget) into the viewer and the session."""

    def __init__(self, widget, viewer):
        self.viewer = viewer
        self.closed = False
        self._undo: list[Callable[[], None]] = []
        self._runners: list = []
        self._watcher = _ParentWatcher(widget, self)
        widget.installEventFilter(self._watcher)
        # the watcher cannot see the widget destroyed with the viewer's window; this can (and must not touch it)
        links_ref = weakref.ref(self)
        widget.destroyed.connect(lambda *_: _close_if_alive(links_ref))

    def connect(self, signal, slot):
        """``signal.connect(slot)`` (a psygnal signal, a napari event emitter or a Qt signal), undone on close."""
        signal.connect(slot)
        self._undo.append(lambda: signal.disconnect(slot))
        return slot

    def mouse(self, drag=None, move=None):
        """Add mouse callbacks to the viewer, removed on close."""
        for callbacks, callback in (
            (self.viewer.mouse_drag_callbacks, drag),
            (self.viewer.mouse_move_callbacks, move),
        ):
            if callback is not None:
                callbacks.append(callback)
                self._undo.append(lambda cbs=callbacks, cb=callback: cbs.remove(cb) if cb in cbs else None)

    def runner(self, runner):
        """A :class:`~spatial_deconv_gui.gui.jobs.JobRunner` of the dock: shut down on close."""
        self._runners.append(runner)
        return runner

    def on_close(self, callback: Callable[[], None]):
        self._undo.append(callback)

    def close(self):
        if getattr(self, "closed", True):  # closed, or half torn down by the garbage collector
            return
        self.closed = True
        for runner in self._runners:
            runner.shutdown()
        for undo in reversed(self._undo):
            try:
                undo()
            except (ValueError, RuntimeError, TypeError):  # already disconnected, or its Qt side already gone
                pass
        self._undo.clear()
