"""One :class:`Session` per napari viewer: the state every dock of the plugin reads and listens to.

The session hangs off the viewer as an attribute (not in a module-level table keyed by viewer), so it lives
exactly as long as its viewer and a second viewer in the same process gets a session of its own.
"""

from __future__ import annotations

import weakref

from psygnal import Signal

_ATTRIBUTE = "_spatial_deconv_session"


def real_viewer(viewer):
    """The viewer behind napari's PublicOnlyProxy, which refuses private attributes such as the session's."""
    while hasattr(type(viewer), "__wrapped__") or type(viewer).__name__ == "PublicOnlyProxy":
        inner = getattr(viewer, "__wrapped__", None)
        if inner is None or inner is viewer:
            break
        viewer = inner
    return viewer


class Session:
    """The plugin's shared state for one viewer: deconvolution results, the perturbation model and its runs.

    Docks do not call each other: a dock that changes the state emits one of these signals and the others,
    connected to it, update themselves.
    """

    model_changed = Signal(object)  # a perturbation model was trained or loaded
    result_added = Signal(str)  # a deconvolution run's name, once its layers are on the canvas
    perturbation_added = Signal(str)  # a knockout run's name, once its layers are on the canvas

    def __init__(self, viewer):
        self.viewer = viewer
        self.workbench = None  # the deconvolution results (gui.workbench.Workbench), made on first use
        self.perturb = None  # the perturbation model and its runs (gui.perturb.PerturbState)
        self.knockout_docks: weakref.WeakSet = weakref.WeakSet()


def session_for(viewer) -> Session:
    viewer = real_viewer(viewer)
    session = getattr(viewer, _ATTRIBUTE, None)
    if session is None:
        session = Session(viewer)
        setattr(viewer, _ATTRIBUTE, session)
    return session
