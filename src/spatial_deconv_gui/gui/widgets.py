"""The Deconvolution dock widget: pick a slide and a reference, check them, run a method in a worker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from qtpy.QtCore import QObject, QTimer, Signal

from ..api import Cancelled, available_methods
from .layers import PLUGIN_KEY, refresh_slide_picker, set_spot_colors, slide_coords_yx, slide_layer_choices, spot_colors
from .notify import notify_error, notify_info, status_label
from .views import PENDING_RGBA

STREAM_INTERVAL_MS = 200  # at most ~5 canvas updates a second while a run streams

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

        self.slide = ComboBox(
            label="slide layer",
            choices=self._slide_layers,
            nullable=True,
            tooltip="A Points layer opened from a spatial .h5ad (File > Open, or the sample).",
        )
        self.reference = FileEdit(
            label="reference",
            mode="r",
            filter="*.h5ad",
            tooltip="Single-cell reference .h5ad with raw counts and a cell-type column.",
        )
        # Choices are callables: napari calls reset_choices() on docked containers, which would restore
        # static lists to their initial (empty) values.
        self._ref_columns: list[str] = []
        self.cell_type_col = ComboBox(
            label="cell-type column",
            choices=lambda _w: self._ref_columns,
            tooltip="The reference obs column that holds the cell-type labels.",
        )
        methods = list(available_methods()) or [NO_METHOD]  # registry order: the first is the default
        self.method = ComboBox(label="method", choices=methods, value=methods[0])
        self.mode = ComboBox(label="mode", choices=lambda _w: self._modes(), tooltip="RCTD: full, doublet or multi.")
        self.device = ComboBox(
            label="device", choices=device_choices(), value="auto", tooltip="auto uses CUDA when torch sees a GPU."
        )
        self.params_box = Container(labels=True, layout="vertical")
        self.params_box.margins = (0, 0, 0, 0)
        self.validate_btn = PushButton(text="Check inputs")
        self.run_btn = PushButton(text="Run")
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1000, value=0)
        self.status = status_label("pick a slide layer and a reference")
        self.problems = Label(label="", value="")
        self.extend(
            [
                self.slide,
                self.reference,
                self.cell_type_col,
                self.method,
                self.mode,
                self.device,
                self.params_box,
                self.validate_btn,
                self.run_btn,
                self.cancel_btn,
                self.progress,
                self.status,
                self.problems,
            ]
        )

        self.slide.changed.connect(self._on_slide)
        self.reference.changed.connect(self._on_reference)
        self.method.changed.connect(self._on_method)
        self.validate_btn.clicked.connect(self.check_inputs_in_background)
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn.clicked.connect(self.cancel)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self.run_btn.enabled = NO_METHOD not in methods
        self._stream_layer = None
        self._finishing = False
        self._pending: list = []
        self._stream_timer = QTimer()
        self._stream_timer.setInterval(STREAM_INTERVAL_MS)
        self._stream_timer.timeout.connect(self._flush_partials)
        self._on_method()
        self._refresh_layers()

    # -- choices -------------------------------------------------------------------------------------
    def _slide_layers(self, _widget=None):
        return slide_layer_choices(self.viewer)

    def _modes(self):
        info = available_methods().get(self.method.value) if hasattr(self, "method") else None
        return list(info.modes) if info and info.modes else ["default"]

    def _on_method(self, _value=None):
        """Rebuild the parameter widgets from the method's typed config: defaults and tooltips included."""
        import dataclasses
        import typing

        self.mode.reset_choices()
        self.params_box.clear()
        info = available_methods().get(self.method.value)
        if info is None:
            return
        _, config_cls = info.load()
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        hints = typing.get_type_hints(config_cls)
        for name, tip in info.gui_params:
            f = fields.get(name)
            if f is None:
                continue
            default = f.default
            hint = hints.get(name)
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if typing.get_origin(hint) is typing.Literal:
                w = ComboBox(name=name, choices=list(typing.get_args(hint)), value=default)
            elif hint is int or (args and args[0] is int):
                w = SpinBox(name=name, value=default or 0, min=0, max=10**9)
            elif hint is str or (args and args[0] is str):
                w = LineEdit(name=name, value=str(default))
            else:
                w = FloatSpinBox(name=name, value=float(default), min=0.0, max=1e12, step=1.0)
            w.label = name.replace("_", " ")
            w.tooltip = tip
            self.params_box.append(w)

    def method_params(self) -> dict:
        params = {"mode": self.mode.value} if self.mode.value != "default" else {}
        for w in self.params_box:
            value = w.value.strip() if isinstance(w.value, str) else w.value
            if w.name == "batch_size" and not value:
                continue  # 0 means automatic
            params[w.name] = value
        return params

    def _refresh_layers(self, _event=None):
        self._on_slide(refresh_slide_picker(self.slide))

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

    def _slide_options(self) -> dict:
        layer = self.slide.value
        return dict(layer.metadata.get(PLUGIN_KEY, {}).get("read_options", {})) if layer is not None else {}

    def _show_problems(self, lines: list[str]):
        self.problems.value = "\n".join(lines)

    def check_inputs(self):
        """Validate now and show the outcome; returns the report when the inputs can be used, else None."""
        paths = self._input_paths()
        return self._show_report(self._validate(*paths)) if paths else None

    def check_inputs_in_background(self):
        """The button's version: file reads happen in a worker, the outcome lands in the widget."""
        from napari.qt.threading import create_worker

        paths = self._input_paths()
        if not paths:
            return
        self.status.value = "checking inputs..."
        create_worker(
            self._validate,
            *paths,
            _connect={"returned": self._show_report, "errored": lambda exc: notify_error(exc, "Check inputs")},
        )

    def _input_paths(self):
        spatial, reference = self._slide_path(), self._reference_path()
        if not spatial or not reference:
            self._show_problems(["pick a slide layer opened from a file, and a reference .h5ad"])
            return None
        return spatial, reference, self.cell_type_col.value or "cell_type", self._slide_options()

    @staticmethod
    def _validate(spatial, reference, cell_type_col, slide_options=None):
        from ..io.validate import validate

        return validate(spatial, reference, cell_type_col=cell_type_col, slide_options=slide_options)

    def _show_report(self, report):
        errors = [p for p in report.problems if p.severity == "error" and p.code != "small_cell_types"]
        warnings = [p for p in report.problems if p not in errors]
        self._show_problems([str(p) for p in errors] + [f"warning: {p}" for p in warnings])
        self.status.value = "inputs OK" if not errors else f"{len(errors)} problem(s): fix them to run"
        return report if not errors else None

    # -- running -------------------------------------------------------------------------------------
    def run(self):
        """Start a run in a worker; validation happens there too, so the GUI never waits on file reads."""
        from napari.qt.threading import create_worker

        from .. import api

        if self._worker is not None:
            return
        spatial, reference = self._slide_path(), self._reference_path()
        if not spatial or not reference:
            self._show_problems(["pick a slide layer opened from a file, and a reference .h5ad"])
            return
        self._show_problems([])
        params = self.method_params()
        method, cell_type_col, device = self.method.value, self.cell_type_col.value, self.device.value
        slide_options = self._slide_options()
        self._cancel_event = threading.Event()
        self._run_inputs = (spatial, reference)
        self._run_slide_options = slide_options
        relay = self._relay

        def job():
            import numba
            import torch

            # Leave a core for the event loop: compute threads would otherwise starve it on small machines.
            torch.set_num_threads(max(1, torch.get_num_threads() - 1))
            numba.set_num_threads(max(1, numba.config.NUMBA_NUM_THREADS - 1))
            return api.run_deconvolution(
                spatial,
                reference,
                method,
                params=params,
                cell_type_col=cell_type_col,
                device=device,
                progress=relay.progressed.emit,
                cancel_event=self._cancel_event,
                check=True,
                slide_options=slide_options,
            )

        # Handlers go in at creation: without an "errored" handler there, superqt re-raises in the event loop.
        worker = create_worker(
            job,
            _start_thread=False,
            _connect={"returned": self._on_done, "errored": self._on_error, "finished": self._on_finished},
        )
        self._worker = worker
        self._started = time.monotonic()
        self._set_running(True)
        self.status.value = "checking inputs"
        # Finished batches are painted onto the slide layer itself: recolouring an existing layer costs
        # milliseconds, while adding a layer (and its first draw) would stall the GUI mid-run.
        slide = self.slide.value
        self._stream_layer = slide
        self._run_slide = slide
        self._stream_saved = spot_colors(slide).copy()
        set_spot_colors(slide, np.tile(PENDING_RGBA, (len(self._stream_saved), 1)))
        self._stream_palette = None
        self._stream_timer.start()
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
        elapsed = time.monotonic() - self._stage_started(event.stage)
        eta = (
            f", about {elapsed / event.fraction * (1 - event.fraction):.0f} s left" if 0.02 < event.fraction < 1 else ""
        )
        self.status.value = f"{event.stage}: {100 * event.fraction:.0f}%{eta}" + (
            f" - {event.message}" if event.message else ""
        )
        if event.partial is not None:
            self._pending.append(event.partial)

    def _stage_started(self, stage: str) -> float:
        if getattr(self, "_stage", None) != stage:
            self._stage, self._stage_t0 = stage, time.monotonic()
        return self._stage_t0

    def _flush_partials(self):
        """Colour the spots whose batch finished; runs on a timer so the canvas updates at most ~5 times/s."""
        if not self._pending:
            return
        from matplotlib.colors import to_rgba

        from ..colors import cell_type_palette

        batches, self._pending = self._pending, []
        if self._stream_layer is None:
            return
        if self._stream_palette is None:
            self._stream_palette = cell_type_palette(list(batches[0].cell_types))
        lookup = {n: to_rgba(c) for n, c in self._stream_palette.items()}
        index, colours = [], []
        for part in batches:
            props = np.asarray(part.proportions)
            ok = ~np.isnan(props).any(axis=1)
            dom = np.argmax(np.nan_to_num(props), axis=1)
            names = np.asarray(part.cell_types)[dom]
            index.append(np.asarray(part.spot_index)[ok])
            colours.append(np.array([lookup[n] for n in names[ok]], dtype=np.float32).reshape(-1, 4))
        set_spot_colors(self._stream_layer, np.concatenate(colours), np.concatenate(index))

    def _drop_stream_layer(self):
        """Give the slide layer back its own colours and name."""
        self._stream_timer.stop()
        self._pending = []
        if self._stream_layer is not None and self._stream_layer in self.viewer.layers:
            set_spot_colors(self._stream_layer, self._stream_saved)
        self._stream_layer = None

    def _on_done(self, run, staged: bool = True):
        """Turn the run into layers and docks; in the GUI, one short step per event-loop turn."""
        from .workbench import workbench_for

        self._drop_stream_layer()
        layer = self._run_slide
        meta = layer.metadata.get(PLUGIN_KEY, {})
        coords_xy = slide_coords_yx(layer)[:, ::-1]
        steps = workbench_for(self.viewer).add_run_steps(
            run,
            coords_xy,
            meta.get("spot_size", 1.0),
            source={
                "inputs": getattr(self, "_run_inputs", ()),
                "slide_options": getattr(self, "_run_slide_options", {}),
            },
            raster=meta.get("raster"),
        )

        def finish():
            # The dominant-type layer covers the same spots: drawing the slide beneath it is wasted time.
            layer.visible = False
            self._finishing = False
            self._set_running(self._worker is not None)
            self.last_run = run
            self.progress.value = 1000
            self.status.value = f"done in {run.result.runtime_s:.1f} s ({int(run.result.fitted.sum())} spots fitted)"
            notify_info(f"{run.result.method} finished: {int(run.result.fitted.sum())} spots")

        if not staged:
            for _ in steps:
                pass
            finish()
            return

        def step():
            try:
                next(steps)
            except StopIteration:
                finish()
                return
            QTimer.singleShot(0, step)

        self._finishing = True
        step()

    def _on_error(self, exc):
        from ..io.errors import InputError

        self._drop_stream_layer()
        if isinstance(exc, InputError):
            self._show_problems([line.strip() for line in str(exc).splitlines() if line.strip()])
        if isinstance(exc, Cancelled):
            self.status.value = "cancelled: no result kept"
            self.progress.value = 0
            return
        self.status.value = "failed: see the notification"
        notify_error(exc, "Deconvolution")

    def _on_finished(self):
        self._worker = None
        self._set_running(self._finishing)

    @property
    def busy(self) -> bool:
        """True while a run computes or its layers are still being added."""
        return self._worker is not None or self._finishing
