"""The layer context-menu entry "Deconvolve this slide" opens the Deconvolution dock set to that layer."""

from __future__ import annotations

from npe2 import PluginManifest

from spatial_deconv_gui.gui.commands import deconvolve_layer
from spatial_deconv_gui.gui.docks import find_dock
from spatial_deconv_gui.gui.layers import PLUGIN_KEY

PLUGIN = "spatial-deconv-gui"
COMMAND = "spatial-deconv-gui.deconvolve_layer"


def _slide_layer(viewer):
    return next(layer for layer in viewer.layers if type(layer).__name__ == "Points" and PLUGIN_KEY in layer.metadata)


def test_the_manifest_puts_the_command_in_the_layer_context_menu():
    manifest = PluginManifest.from_distribution(PLUGIN)
    titles = {c.id: c.title for c in manifest.contributions.commands}
    assert titles[COMMAND] == "Deconvolve this slide"
    assert COMMAND in [item.command for item in manifest.contributions.menus["napari/layers/context"]]


def test_deconvolve_this_slide_opens_the_dock_on_that_layer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "simulated_slide")
    slide = _slide_layer(viewer)
    _, dock = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    dock.slide.value = None
    deconvolve_layer(viewer, slide)
    assert dock.slide.value is slide


def test_the_menu_command_runs_through_napari_with_the_active_layer(make_napari_viewer):
    from napari._app_model import get_app_model

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "simulated_slide")
    slide = _slide_layer(viewer)
    viewer.layers.selection.active = slide
    get_app_model().commands.execute_command(COMMAND).result()
    dock = find_dock(viewer, "Deconvolution")
    assert dock is not None and dock.slide.value is slide
