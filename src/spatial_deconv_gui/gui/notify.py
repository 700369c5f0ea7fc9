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


def status_label(value: str = "", label: str = "status"):
    """A status line that wraps instead of widening its dock: a wider dock resizes the canvas, which then redraws
    in full, and doing that at a progress message was the longest pause of the event loop while training."""
    widget = Label(label=label, value=value)
    widget.native.setWordWrap(True)
    widget.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    return widget
