"""`spatial-deconv demo`: napari with the sample slide and the plugin's widgets; `--headless` writes files.

The CLI starts this module in a child process (``python -m spatial_deconv_gui.gui.demo``), so napari and torch
load only when the demo runs and the CLI never imports the GUI.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from .. import api, keys, perturb_api
from ..figures import result_figure
from ..io.errors import InputError
from ..io.slide import read_slide_adata
from ..io.write import atomic_path, write_h5ad_atomic, write_text_atomic
from ..sample_data import sample_paths
from .display import virtual_display
from .docks import find_dock
from .session import session_for

PLUGIN = "spatial-deconv-gui"


def _default_method(method: str | None) -> str | None:
    methods = api.available_methods()
    if method is not None:
        if method not in methods:
            raise InputError(f"unknown method {method!r}.", f"use one of: {', '.join(sorted(methods))}.")
        return method
    return "rctd" if "rctd" in methods else (sorted(methods)[0] if methods else None)


def build_viewer(show: bool):
    """A viewer with the sample slide loaded and the Deconvolution widget docked, set to the sample."""
    viewer = napari.Viewer(title="spatial-deconv-gui: sample slide", show=show)
    viewer.open_sample(PLUGIN, "simulated_slide")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deconvolution")
    viewer.window.resize(1500, 950)
    viewer.reset_view()
    return viewer, widget


def demo_params(method: str) -> dict:
    return {"mode": "doublet"} if method == "rctd" else {}


def _inspect_a_mixed_spot(viewer, run):
    """Show the inspector on the most mixed fitted spot, so the picture shows what it is for."""
    props = run.adata.obsm[keys.proportions(run.result.key)].to_numpy()
    purity = np.where(np.isnan(props).any(axis=1), np.inf, np.nanmax(props, axis=1))
    session = session_for(viewer)
    session.pick_spot(next(reversed(session.results)), int(np.argmin(purity)))


def _finish_now(steps):
    """Run a dock's finishing steps at once (the GUI runs them one per event-loop turn)."""
    for _ in steps:
        pass


def run_demo(headless_dir: str | None = None, method: str | None = None) -> int:
    method = _default_method(method)
    if headless_dir is None:
        viewer, widget = build_viewer(show=True)
        if method is not None:
            widget.method.value = method
            for k, v in demo_params(method).items():
                getattr(widget, k).value = v
            widget.run()
        napari.run()
        return 0
    return run_headless(Path(headless_dir), method)


def run_headless(outdir: Path, method: str | None) -> int:
    outdir.mkdir(parents=True, exist_ok=True)
    with virtual_display() as has_display:
        if not has_display:
            os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        return _headless_job(outdir, method, rendering=has_display)


def _headless_job(outdir: Path, method: str | None, rendering: bool) -> int:
    spatial_path, reference_path = sample_paths()
    viewer, widget = build_viewer(show=rendering)
    summary: dict = {"rendering": rendering, "outputs": []}
    try:
        if method is None:
            print("no deconvolution method is installed; showing the slide only", file=sys.stderr)
        else:
            t0 = time.perf_counter()
            run = api.run_deconvolution(spatial_path, reference_path, method, params=demo_params(method))
            widget.method.value = method
            for k, v in demo_params(method).items():
                getattr(widget, k).value = v
            _finish_now(widget.show_run(run, widget.slide.value, {"inputs": (spatial_path, reference_path)}))
            _inspect_a_mixed_spot(viewer, run)
            result_path = api.save_result(
                run.adata, outdir / f"sample_{method}.h5ad", protect=(spatial_path, reference_path)
            )
            fig_path = result_figure(run.adata, run.result.key, outdir / f"sample_{method}_map.png")
            summary.update(
                method=method,
                mode=run.result.mode,
                runtime_s=round(time.perf_counter() - t0, 2),
                n_spots=int(run.adata.n_obs),
                n_fitted=int(run.result.fitted.sum()),
            )
            summary["outputs"] += [str(result_path), str(fig_path)]
        app = QApplication.instance()
        for _ in range(5):
            app.processEvents()
        viewer.reset_view()
        if rendering:
            shot = outdir / "screenshot.png"
            with atomic_path(shot, ".png") as tmp:
                viewer.screenshot(str(tmp), canvas_only=False, flash=False)
            summary["outputs"].append(str(shot))
        else:
            print("no display and no Xvfb: skipped the window screenshot (the map PNG is written)", file=sys.stderr)
    finally:
        viewer.close()
    summary["knockout"] = _headless_knockout(outdir, rendering)
    summary["outputs"] += summary["knockout"].pop("outputs")
    write_text_atomic(json.dumps(summary, indent=2), outdir / "summary.json")
    print(json.dumps(summary, indent=2))
    return 0


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    """Run Qt's event loop until ``condition()`` holds (docks read slides in workers)."""
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
        QApplication.processEvents()
        time.sleep(0.01)


def _headless_knockout(outdir: Path, rendering: bool) -> dict:
    """Train the GRN model of the simulated tissue, knock out its upstream TF, save the data and a picture."""
    t0 = time.perf_counter()
    viewer = napari.Viewer(title="spatial-deconv-gui: knockout on the GRN sample", show=rendering)
    viewer.window.resize(1500, 950)
    viewer.open_sample(PLUGIN, "grn_tissue")
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train perturbation model")
    _, ko = viewer.window.add_plugin_dock_widget(PLUGIN, "Knockout")
    train.model_dir.value = str(outdir / "grn_model")
    _wait_for(lambda: train.ready, "the Train dock reading the slide's columns")
    spatial, grn, lr, col, out, layer_name, params = train._training_inputs()
    adata = read_slide_adata(spatial["path"], **spatial["slide_options"])  # as the dock's training process does
    model = perturb_api.train_model(adata, grn, lr, col, out, layer=layer_name, **params)
    train.set_model(model, train.slide.value)
    tf = str(adata.uns.get(keys.PERTURB_SIM, {}).get("upstream_tf", model.targets[0]))
    ko.genes.value = [tf]
    result = perturb_api.run_perturbation(model, [tf], 0.0, steps=int(ko.steps.value), adata=adata)
    ko.start_stream()
    _finish_now(ko.add_run_steps(result, [tf], 0.0))
    viewer.layers[0].visible = False  # the Δ map and arrows are the picture
    viewer.reset_view()
    app = QApplication.instance()
    for _ in range(5):
        app.processEvents()
    summary_dock = find_dock(viewer, "Knockout summary")
    h5 = outdir / "knockout_sample.h5ad"
    png = outdir / "knockout.png"
    write_h5ad_atomic(result, h5)
    with atomic_path(png, ".png") as tmp:
        if rendering:
            viewer.screenshot(str(tmp), canvas_only=False, flash=False)
        else:
            summary_dock.figure.savefig(tmp, dpi=120)
    viewer.close()
    return {"gene": tf, "runtime_s": round(time.perf_counter() - t0, 2), "outputs": [str(h5), str(png)]}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="spatial-deconv demo", description="napari with the bundled sample slide")
    parser.add_argument("--headless", metavar="OUTDIR", help="no window: run on the sample and write results and a PNG")
    parser.add_argument("--method", default=None, help="method the demo runs (default: the first available)")
    args = parser.parse_args(argv)
    try:
        return run_demo(headless_dir=args.headless, method=args.method)
    except (InputError, ValueError) as exc:  # as the CLI reports them: one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
