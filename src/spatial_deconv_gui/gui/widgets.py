"""The Deconvolution dock widget: pick a slide and a reference, check them, run a method in a worker."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, ProgressBar, PushButton
from qtpy.QtCore import QObject, Signal

from ..engines.base import Cancelled
from ..engines.registry import available_methods
from .layers import PLUGIN_KEY, dominant_type_layer_data
from .notify import notify_error, notify_info

NO_METHOD = "(no method installed)"


def reference_obs_columns(path: str | Path) -> list[str]:
    """Obs column names of an .h5ad without loading its matrix."""
    import anndata as ad
    import h5py

    with h5py.File(path, "r") as f:
        obs = ad.io.read_elem(f["obs"])
    return [str(c) for c in obs.columns]


def guess_cell_type_column(columns: list[str]) -> str | None:
    for name in ("cell_type", "celltype", "cell_types", "CellType", "cell_type_original", "annotation", "cluster"):
        if name in columns:
            return name
    return columns[0] if columns else None


def device_choices() -> list[str]:
    import torch

    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class _Relay(QObject):
    """Carries engine progress from the worker thread to the GUI thread (queued signal)."""

    progressed = Signal(object)


class DeconvolutionWidget(Container):
    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._worker = None
        self._cancel_event: threading.Event | None = None
        self._started = 0.0
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)
        self.last_run = None

        self.slide = ComboBox(label="slide layer", choices=self._slide_layers, nullable=True,
                              tooltip="A Points layer opened from a spatial .h5ad (File > Open, or the sample).")
        self.reference = FileEdit(label="reference", mode="r", filter="*.h5ad",
                                  tooltip="Single-cell reference .h5ad with raw counts and a cell-type column.")
        # Choices are callables: napari calls reset_choices() on docked containers, which would restore
        # static lists to their initial (empty) values.
        self._ref_columns: list[str] = []
        self.cell_type_col = ComboBox(label="cell-type column", choices=lambda _w: self._ref_columns,
                                      tooltip="The reference obs column that holds the cell-type labels.")
        methods = sorted(available_methods()) or [NO_METHOD]
        self.method = ComboBox(label="method", choices=methods, value=methods[0])
        self.mode = ComboBox(label="mode", choices=lambda _w: self._modes(), tooltip="RCTD: full, doublet or multi.")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto",
                               tooltip="auto uses CUDA when torch sees a GPU.")
        self.validate_btn = PushButton(text="Check inputs")
        self.run_btn = PushButton(text="Run")
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1000, value=0)
        self.status = Label(label="status", value="pick a slide layer and a reference")
        self.problems = Label(label="", value="")
        self.extend([self.slide, self.reference, self.cell_type_col, self.method, self.mode, self.device,
                     self.validate_btn, self.run_btn, self.cancel_btn, self.progress, self.status, self.problems])

        self.slide.changed.connect(self._on_slide)
        self.reference.changed.connect(self._on_reference)
        self.method.changed.connect(lambda _: self.mode.reset_choices())
        self.validate_btn.clicked.connect(self.check_inputs)
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn.clicked.connect(self.cancel)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self.run_btn.enabled = NO_METHOD not in methods
        self._refresh_layers()

    # -- choices -------------------------------------------------------------------------------------
    def _slide_layers(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers
                if layer.metadata.get(PLUGIN_KEY, {}).get("kind") == "spatial"]

    def _modes(self):
        info = available_methods().get(self.method.value) if hasattr(self, "method") else None
        return list(info.modes) if info and info.modes else ["default"]

    def _refresh_layers(self, _event=None):
        self.slide.reset_choices()
        layers = [c for c in self.slide.choices if c is not None]
        if self.slide.value is None and layers:
            self.slide.value = layers[0]
        self._on_slide(self.slide.value)

    def _on_slide(self, layer):
        if layer is None:
            return
        ref = layer.metadata.get(PLUGIN_KEY, {}).get("reference_path")
        if ref and not self._reference_path():
            self.reference.value = ref

    def _reference_path(self) -> str | None:
        v = self.reference.value
        return str(v) if v and str(v) not in (".", "") and Path(v).is_file() else None

    def _on_reference(self, _value=None):
        path = self._reference_path()
        if not path:
            return
        try:
            cols = reference_obs_columns(path)
        except Exception as exc:
            self._ref_columns = []
            self.cell_type_col.reset_choices()
            self._show_problems([f"{Path(path).name}: not a readable .h5ad ({type(exc).__name__})."])
            return
        self._ref_columns = cols
        self.cell_type_col.reset_choices()
        guess = guess_cell_type_column(cols)
        if guess:
            self.cell_type_col.value = guess

    # -- checks --------------------------------------------------------------------------------------
    def _slide_path(self) -> str | None:
        layer = self.slide.value
        return layer.metadata.get(PLUGIN_KEY, {}).get("adata_path") if layer is not None else None

    def _show_problems(self, lines: list[str]):
        self.problems.value = "\n".join(lines)

    def check_inputs(self):
        """Validate on the GUI thread's behalf; returns the report (also shown in the widget)."""
        from ..io.validate import validate

        spatial, reference = self._slide_path(), self._reference_path()
        if not spatial or not reference:
            self._show_problems(["pick a slide layer opened from a file, and a reference .h5ad"])
            return None
        report = validate(spatial, reference, cell_type_col=self.cell_type_col.value or "cell_type")
        errors = [p for p in report.problems if p.severity == "error" and p.code != "small_cell_types"]
        warnings = [p for p in report.problems if p not in errors]
        self._show_problems([str(p) for p in errors] + [f"warning: {p}" for p in warnings])
        self.status.value = "inputs OK" if not errors else f"{len(errors)} problem(s): fix them to run"
        return report if not errors else None

    # -- running -------------------------------------------------------------------------------------
    def run(self):
        from napari.qt.threading import create_worker

        from .. import api

        if self._worker is not None:
            return
        report = self.check_inputs()
        if report is None:
            return
        spatial, reference = self._slide_path(), self._reference_path()
        params = {"mode": self.mode.value} if self.mode.value != "default" else {}
        self._cancel_event = threading.Event()
        relay = self._relay

        def job():
            import torch

            torch.set_num_threads(max(1, torch.get_num_threads() - 1))  # leave a core for the event loop
            return api.run_deconvolution(spatial, reference, self.method.value, params=params,
                                         cell_type_col=self.cell_type_col.value, device=self.device.value,
                                         progress=relay.progressed.emit, cancel_event=self._cancel_event,
                                         check=False)

        worker = create_worker(job, _start_thread=False)
        worker.returned.connect(self._on_done)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._started = time.monotonic()
        self._set_running(True)
        self.status.value = "starting"
        worker.start()

    def cancel(self):
        if self._cancel_event is not None:
            self._cancel_event.set()
            self.status.value = "cancelling after the current batch..."

    def _set_running(self, running: bool):
        self.run_btn.enabled = not running
        self.cancel_btn.enabled = running
        self.validate_btn.enabled = not running

    def _on_progress(self, event):
        self.progress.value = int(1000 * event.fraction)
        elapsed = time.monotonic() - self._started
        self.status.value = f"{event.stage}: {100 * event.fraction:.0f}% ({elapsed:.0f} s)" + (
            f" - {event.message}" if event.message else "")

    def _on_done(self, run):
        self.last_run = run
        layer = self.slide.value
        meta = layer.metadata.get(PLUGIN_KEY, {})
        coords = np.asarray(layer.data)[:, ::-1]
        data, kwargs, _ = dominant_type_layer_data(run.adata, run.result.key, coords, meta.get("spot_size", 1.0))
        kwargs["metadata"][PLUGIN_KEY]["adata"] = run.adata
        self.viewer.add_points(data, **kwargs)
        self.progress.value = 1000
        self.status.value = f"done in {run.result.runtime_s:.1f} s ({int(run.result.fitted.sum())} spots fitted)"
        notify_info(f"{run.result.method} finished: {int(run.result.fitted.sum())} spots")

    def _on_error(self, exc):
        if isinstance(exc, Cancelled):
            self.status.value = "cancelled: no result kept"
            self.progress.value = 0
            return
        self.status.value = "failed: see the notification"
        notify_error(exc, "Deconvolution")

    def _on_finished(self):
        self._worker = None
        self._set_running(False)
