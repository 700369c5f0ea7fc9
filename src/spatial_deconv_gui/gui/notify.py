"""What the user is told: errors as napari notifications (never a silent dead worker), progress in status lines."""

from __future__ import annotations

import logging

from magicgui.widgets import Label
from napari.utils import notifications
from qtpy.QtWidgets import QSizePolicy

from ..io.errors import InputError

log = logging.getLogger("spatial_deconv_gui")


def user_message(exc: BaseException) -> str:
    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return f"Out of memory: {exc}. Try a smaller batch size, float32, or the CPU."
    return f"{type(exc).__name__}: {exc}"


def notify_error(exc: BaseException, context: str = ""):
    msg = user_message(exc)
    log.error("%s%s", f"{context}: " if context else "", msg, exc_info=not isinstance(exc, InputError))
    notifications.show_error(f"{context}: {msg}" if context else msg)


def notify_info(msg: str):
    notifications.show_info(msg)


class _LineHiddenWhileEmpty(Label):
    """A label that takes no room (its row hidden) while it says nothing."""

    @property
    def value(self):
        return Label.value.fget(self)

    @value.setter
    def value(self, text):
        Label.value.fset(self, text)
        self.visible = bool(text)


def status_label(value: str = "", label: str = "status", hide_empty: bool = False):
    """A status line that wraps instead of widening its dock: a wider dock resizes the canvas, which then redraws
    in full, and doing that at a progress message was the longest pause of the event loop while training.
    ``hide_empty``: its row is hidden while it is empty (a blank row between controls reads as a missing one)."""
    widget = (_LineHiddenWhileEmpty if hide_empty else Label)(label=label, value=value)
    if hide_empty:
        widget.visible = bool(value)
    widget.native.setWordWrap(True)
    widget.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    return widget
