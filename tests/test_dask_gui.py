"""The Deconvolution dock's Dask scheduler field: RCTD's spots run on the cluster it names, results stream onto
the slide as before, and the answer is the in-process one."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("distributed")

from spatial_deconv_gui import api  # noqa: E402

PLUGIN = "spatial-deconv-gui"


@pytest.mark.slow
def test_the_dock_runs_rctd_on_the_scheduler_it_names(make_napari_viewer, qtbot):
    from distributed import LocalCluster

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "simulated_slide")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    widget.method.value = "flash"
    assert not widget.scheduler.enabled  # one-process methods do not offer it
    widget.method.value = "rctd"
    widget.mode.value = "doublet"
    widget.params_box.batch_size.value = 250
    assert widget.scheduler.enabled
    partials = []
    widget.jobs.progressed.connect(lambda e: e.partial is not None and partials.append(e.partial))
    with LocalCluster(n_workers=2, processes=False, protocol="tcp", dashboard_address=None) as local:
        widget.scheduler.value = f"  {local.scheduler_address} "
        widget.run_btn.native.click()
        assert widget.busy, widget.problems.value
        qtbot.waitUntil(lambda: not widget.busy, timeout=600_000)
        assert widget.last_run is not None, widget.status.value
        assert "rctd-spots" in local.scheduler.task_prefixes  # the spots were fitted there
    run = widget.last_run
    spatial, reference, cell_type_col, options = widget._input_paths()
    expected = api.run_deconvolution(
        spatial, reference, "rctd", params=widget.method_params(), cell_type_col=cell_type_col, slide_options=options
    )
    np.testing.assert_allclose(run.result.proportions, expected.result.proportions, atol=1e-8, rtol=0)
    fitted = int(run.result.fitted.sum())
    assert len(partials) == int(np.ceil(fitted / 250)) >= 2  # one streamed batch per chunk
    assert sum(p.spot_index.size for p in partials) == fitted
