"""The plugin's docks, one module each, every one a widget of the manifest (``Plugins > Spatial Deconvolution``).

Each dock is a thin view on the viewer's :class:`~spatial_deconv_gui.gui.session.Session`: it reads the session,
changes it, and listens to its signals; no dock calls another. A dock that needs others on screen (a finished run
wants its Results, Legend and Spot inspector) opens them by name with :func:`open_docks`, under the name the
Plugins menu gives them, so the menu toggles that dock instead of adding a second one.
"""

from __future__ import annotations

import importlib

PLUGIN = "spatial-deconv-gui"
DISPLAY_NAME = "Spatial Deconvolution"  # the manifest's display_name: the Plugins submenu's title

# display name (as in napari.yaml) -> (module in this package, class, dock area)
DOCKS: dict[str, tuple[str, str, str]] = {
    "Deconvolution": ("deconvolution", "DeconvolutionDock", "right"),
    "Results": ("results", "ResultsDock", "right"),
    "Legend": ("legend", "LegendDock", "left"),
    "Spot inspector": ("inspector", "InspectorDock", "right"),
    "Train perturbation model": ("train", "TrainDock", "right"),
    "Knockout": ("knockout", "KnockoutDock", "right"),
    "Knockout summary": ("summary", "SummaryDock", "right"),
    "Interaction lens": ("lens", "LensDock", "right"),
}
RESULT_DOCKS = ("Legend", "Results", "Spot inspector")


def dock_names(name: str) -> tuple[str, str]:
    """The names napari gives a dock of this plugin: opened from the Plugins menu (``"Results (Spatial
    Deconvolution)"``), and opened by ``add_plugin_dock_widget`` (``"Results (spatial-deconv-gui)"``)."""
    return f"{name} ({DISPLAY_NAME})", f"{name} ({PLUGIN})"


def dock_class(name: str):
    module, cls, _ = DOCKS[name]
    # imported on demand: the dock modules import this package (and Qt); the reader and samples need neither
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def find_dock(viewer, name: str):
    """The dock widget of that name in the viewer's window, however it was opened, or None."""
    docks = viewer.window.dock_widgets
    return next((docks[n] for n in dock_names(name) if n in docks), None)


def open_docks(viewer, names) -> list:
    """Open (or find) the named docks in their areas; returns their widgets."""
    widgets = []
    for name in names:
        widget = find_dock(viewer, name)
        if widget is None:
            widget = dock_class(name)(viewer)
            viewer.window.add_dock_widget(widget, name=dock_names(name)[0], area=DOCKS[name][2])
        widgets.append(widget)
    return widgets
