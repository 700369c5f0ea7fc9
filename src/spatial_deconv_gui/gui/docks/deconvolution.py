"""The Deconvolution dock: pick a slide and a reference, check them, run a method; finished batches colour the
slide as they stream in, and the finished run becomes result layers in the session. One click also runs several
chosen methods one after the other and combines them into a consensus (each with intervals where it gives them)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
)
from matplotlib.colors import to_rgba

from ... import api, keys
from ...colors import cell_type_palette
from ..jobs import JobRunner, leave_a_core
from ..layers import PLUGIN_KEY, refresh_slide_picker, set_spot_colors, show_slide_alone, spot_colors
from ..lifetime import DockLinks
from ..notify import notify_info, status_label
from ..result_layers import add_consensus_steps, add_result_of_slide
from ..scrolling import ScrollingDock
from ..session import session_for
from ..views import PENDING_RGBA

NO_METHOD = "(no method installed)"


def reference_obs_columns(path: str | Path) -> list[str]:
    """Obs column names of an .h5ad without loading its matrix."""
    with h5py.File(path, "r") as f:
        obs = ad.io.read_elem(f["obs"])
    return [str(c) for c in obs.columns]


def guess_cell_type_column(columns: list[str]) -> str | None:
    for name in ("cell_type", "celltype", "cell_types", "CellType", "cell_type_original", "annotation", "cluster"):
        if name in columns:
            return name
    return columns[0] if columns else None


def device_choices() -> list[str]:
    return ["auto", "cpu"] + (["cuda"] if api.resolve_device("auto") == "cuda" else [])


def _validate(spatial, reference, cell_type_col, slide_options=None):
    return api.validate_files(spatial, reference, cell_type_col=cell_type_col, slide_options=slide_options)


class DeconvolutionDock(ScrollingDock):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.last_run = None
        self.slide = ComboBox(
            label="slide layer",
            choices=lambda _w: self.session.slides(),
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
        methods = list(api.available_methods()) or [NO_METHOD]  # registry order: the first is the default
        self.method = ComboBox(label="method", choices=methods, value=methods[0])
        self.mode = ComboBox(label="mode", choices=lambda _w: self._modes(), tooltip="RCTD: full, doublet or multi.")
        self.device = ComboBox(
            label="device", choices=device_choices(), value="auto", tooltip="auto uses CUDA when torch sees a GPU."
        )
        self.scheduler = LineEdit(
            label="Dask scheduler",
            value="",
            tooltip="RCTD: where its per-spot fits run. Empty: in napari's process. 'local': worker processes on "
            "this machine (one per core). An address such as tcp://10.0.0.5:8786: a running Dask cluster whose "
            "workers have this plugin at the same version. The answer is the same.",
        )
        self.uncertainty = CheckBox(
            text="per-spot 90% intervals",
            value=False,
            tooltip="Also write each spot's nominal 90% interval per cell type (obsm <key>_proportions_q05 / _q95): "
            "RCTD from the curvature of its likelihood, FlashDeconv by a gene bootstrap, cell2location from draws "
            "of its posterior, DestVI from count draws through its encoder (and the spread across seeds).",
        )
        real_methods = [m for m in methods if m != NO_METHOD]
        self.consensus_methods = Select(
            label="consensus of",
            choices=real_methods,
            value=[],
            tooltip="Methods run one after the other (the shown method with the options below, the others with "
            "their defaults; intervals where a method gives them), then combined into a consensus.",
        )
        self.consensus_btn = PushButton(text="Run these -> consensus", enabled=bool(real_methods))
        self.params_box = Container(labels=True, layout="vertical")
        self.params_box.margins = (0, 0, 0, 0)
        self.validate_btn = PushButton(text="Check inputs")
        self.run_btn = PushButton(text="Run")
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.stop_btn = PushButton(
            text="Stop now, keep the answer",
            enabled=False,
            tooltip="cell2location / DestVI: end training at the next check and keep the proportions it has then "
            "(the result's uns records stop_reason 'user').",
        )
        self.progress = ProgressBar(min=0, max=1000, value=0)
        self.status = status_label("pick a slide layer and a reference")
        self.problems = status_label("", label="", hide_empty=True)
        self.body.extend(
            [
                self.slide,
                self.reference,
                self.cell_type_col,
                self.method,
                self.mode,
                self.device,
                self.scheduler,
                self.uncertainty,
                self.params_box,
                self.validate_btn,
                self.consensus_methods,
                self.consensus_btn,
                self.problems,
            ]
        )
        # pinned under the scrolled controls: starting, stopping and following a run never needs scrolling
        self.pin([self.run_btn, self.cancel_btn, self.stop_btn], self.progress, self.status)
        self.links = links = DockLinks(self.native, napari_viewer)  # undone when the dock closes
        self.jobs = links.runner(JobRunner("Deconvolution", status=self.status, progress=self.progress))
        self.checks = links.runner(JobRunner("Check inputs", status=self.status))
        links.on_close(self._end_stream)  # a run cancelled by the closing dock gives the slide its colours back
        self.jobs.busy_changed.connect(self._set_running)
        self.slide.changed.connect(self._on_slide)
        self.reference.changed.connect(self._on_reference)
        self.method.changed.connect(self._on_method)
        self.validate_btn.clicked.connect(self.check_inputs_in_background)
        self.run_btn.clicked.connect(self.run)
        self.consensus_btn.clicked.connect(self.run_consensus)
        self.cancel_btn.clicked.connect(self.cancel)
        self.stop_btn.clicked.connect(self.stop_and_keep)
        links.connect(self.session.slides_changed, self._refresh_layers)
        self.run_btn.enabled = NO_METHOD not in methods
        self._stream = None  # (slide layer, its own colours, palette) while a run streams onto it
        self._on_method()
        self._refresh_layers()

    # -- choices -------------------------------------------------------------------------------------
    def _modes(self):
        info = api.available_methods().get(self.method.value) if hasattr(self, "method") else None
        return list(info.modes) if info and info.modes else ["default"]

    def _on_method(self, _value=None):
        """Rebuild the parameter widgets from the method's typed config: defaults and tooltips included."""
        self.mode.reset_choices()
        self.params_box.clear()
        info = api.available_methods().get(self.method.value)
        if info is None:
            return
        self.scheduler.enabled = self.method.value in api.SCHEDULER_METHODS
        self.uncertainty.enabled = self.method.value in api.methods_with_intervals()
        if not self.uncertainty.enabled:
            self.uncertainty.value = False
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

    def _refresh_layers(self):
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
        self.session.set_reference(path)
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
    def _slide_meta(self) -> dict:
        layer = self.slide.value
        return layer.metadata.get(PLUGIN_KEY, {}) if layer is not None else {}

    def _show_problems(self, lines: list[str]):
        self.problems.value = "\n".join(lines)

    def _input_paths(self):
        spatial, reference = self._slide_meta().get("adata_path"), self._reference_path()
        if not spatial or not reference:
            self._show_problems(["pick a slide layer opened from a file, and a reference .h5ad"])
            return None
        options = dict(self._slide_meta().get("read_options", {}))
        return spatial, reference, self.cell_type_col.value or "cell_type", options

    def check_inputs(self):
        """Validate now and show the outcome; returns the report when the inputs can be used, else None."""
        paths = self._input_paths()
        return self._show_report(_validate(*paths)) if paths else None

    def check_inputs_in_background(self):
        """The button's version: file reads happen in a worker, the outcome lands in the widget."""
        paths = self._input_paths()
        if paths:
            self.checks.start(lambda _control: _validate(*paths), self._show_report, message="checking inputs...")

    def _show_report(self, report):
        errors = [p for p in report.problems if p.severity == "error" and p.code != "small_cell_types"]
        warnings = [p for p in report.problems if p not in errors]
        self._show_problems([str(p) for p in errors] + [f"warning: {p}" for p in warnings])
        self.status.value = "inputs OK" if not errors else f"{len(errors)} problem(s): fix them to run"
        return report if not errors else None

    # -- running -------------------------------------------------------------------------------------
    def run(self):
        """Start a run in a worker; validation happens there too, so the GUI never waits on file reads."""
        if self.jobs.busy:
            return
        paths = self._input_paths()
        if not paths:
            return
        self._show_problems([])
        spatial, reference, cell_type_col, slide_options = paths
        params, method, device = self.method_params(), self.method.value, self.device.value
        uncertainty = bool(self.uncertainty.value and self.uncertainty.enabled)
        scheduler = (self.scheduler.value.strip() or None) if self.scheduler.enabled else None
        slide = self.slide.value
        source = {"inputs": (spatial, reference), "slide_options": slide_options}

        def work(control):
            leave_a_core()
            return api.run_deconvolution(
                spatial,
                reference,
                method,
                params=params,
                cell_type_col=cell_type_col,
                device=device,
                progress=lambda ev: control.report(ev.stage, ev.fraction, ev.message, ev.partial),
                cancel_event=control.cancel_event,
                stop_event=control.stop_event,
                uncertainty=uncertainty,
                check=True,
                slide_options=slide_options,
                scheduler=scheduler,
            )

        # Finished batches are painted onto the slide layer itself: recolouring an existing layer costs
        # milliseconds, while adding a layer (and its first draw) would stall the GUI mid-run.
        saved = spot_colors(slide).copy()
        self._stream = (slide, saved, None)
        set_spot_colors(slide, np.tile(PENDING_RGBA, (len(saved), 1)))
        show_slide_alone(self.viewer, slide)  # an earlier result's layers on these spots would hide the stream
        self.jobs.start(
            work,
            lambda run: self.show_run(run, slide, source),
            on_partials=self._paint_partials,
            on_cancelled=self._on_cancelled,
            on_error=self._on_error,
            cancelled_message="cancelled: no result kept",
            message="checking inputs",
        )

    def run_consensus(self):
        """Run the methods chosen in ``consensus_methods`` one after the other on this slide, then their consensus;
        one job of the dock's runner (progress per method, Cancel between and within runs)."""
        if self.jobs.busy:
            return
        methods = list(self.consensus_methods.value or [])
        if len(methods) < 2:
            self._show_problems(["pick two or more methods for a consensus"])
            return
        paths = self._input_paths()
        if not paths:
            return
        self._show_problems([])
        spatial, reference, cell_type_col, slide_options = paths
        shown, shown_params, device = self.method.value, self.method_params(), self.device.value
        with_intervals = set(api.methods_with_intervals())
        slide = self.slide.value
        source = {"inputs": (spatial, reference), "slide_options": slide_options}

        def work(control):
            leave_a_core()
            runs = []
            for i, method in enumerate(methods):
                control.check_cancel()
                step = f"{method} ({i + 1}/{len(methods)})"
                runs.append(
                    api.run_deconvolution(
                        spatial,
                        reference,
                        method,
                        params=shown_params if method == shown else {},
                        cell_type_col=cell_type_col,
                        device=device,
                        progress=lambda ev, step=step: control.report(f"{step} {ev.stage}", ev.fraction, ev.message),
                        cancel_event=control.cancel_event,
                        uncertainty=method in with_intervals,
                        check=True,
                        slide_options=slide_options,
                    )
                )
            control.check_cancel()
            control.report("consensus", 0.0)
            names = [run.result.key for run in runs]
            combined = api.consensus([r.adata for r in runs], key=[r.result.key for r in runs], names=names)
            return runs, combined

        self.jobs.start(
            work,
            lambda outcome: self.show_consensus(*outcome, slide, source),
            on_error=self._on_error,
            cancelled_message="cancelled: no result kept",
            message=f"running {', '.join(methods)} for a consensus",
        )

    def show_consensus(self, runs, combined, slide, source: dict):
        """Each method's layers, then the consensus's over the first one's spots (steps for the runner)."""
        first = None
        for run in runs:
            rec = yield from add_result_of_slide(self.viewer, run, slide, source=source)
            first = first or rec
        yield from add_consensus_steps(self.viewer, combined, first)
        slide.visible = False
        self.last_run = combined
        self.progress.value = 1000
        median = float(np.nanmedian(combined.adata.obs[keys.CONSENSUS_AGREEMENT].to_numpy(dtype=float)))
        self.status.value = (
            f"consensus of {', '.join(combined.result.params['inputs'])} "
            f"({api.weighting_phrase(combined.result.params['weighting'])}): median agreement {median:.3f}"
            + "".join(f"\nnote: {n}" for n in dict.fromkeys(n for r in (*runs, combined) for n in r.notices))
        )

    def cancel(self):
        if self.jobs.busy:
            self.jobs.cancel()
            self.status.value = "cancelling after the current batch..."

    def stop_and_keep(self):
        if self.jobs.busy and self.jobs.control is not None:
            self.jobs.control.request_stop()
            self.status.value = "stopping at the next check: the answer so far is kept..."

    @property
    def busy(self) -> bool:
        """True while a run computes or its layers are still being added."""
        return self.jobs.busy

    def _set_running(self, running: bool):
        self.run_btn.enabled = not running
        self.consensus_btn.enabled = not running
        self.cancel_btn.enabled = running
        self.stop_btn.enabled = running and api.trains_iteratively(self.method.value)
        self.validate_btn.enabled = not running

    def _paint_partials(self, batches):
        """Colour the spots whose batch finished by their dominant type (the runner calls this ~5 times a second)."""
        if self._stream is None:
            return
        layer, saved, palette = self._stream
        if palette is None:
            palette = cell_type_palette(list(batches[0].cell_types))
            self._stream = (layer, saved, palette)
        lookup = {n: to_rgba(c) for n, c in palette.items()}
        index, colours = [], []
        for part in batches:
            props = np.asarray(part.proportions)
            ok = ~np.isnan(props).any(axis=1)
            names = np.asarray(part.cell_types)[np.argmax(np.nan_to_num(props), axis=1)]
            index.append(np.asarray(part.spot_index)[ok])
            colours.append(np.array([lookup[n] for n in names[ok]], dtype=np.float32).reshape(-1, 4))
        set_spot_colors(layer, np.concatenate(colours), np.concatenate(index))

    def _end_stream(self):
        """Give the slide layer back its own colours."""
        if self._stream is not None:
            layer, saved, _ = self._stream
            if layer in self.viewer.layers:
                set_spot_colors(layer, saved)
        self._stream = None

    def show_run(self, run, slide, source: dict):
        """The run's layers over ``slide``, one short step per event-loop turn (a generator for the runner)."""
        self._end_stream()
        yield from add_result_of_slide(self.viewer, run, slide, source=source)
        slide.visible = False  # the dominant-type layer covers the same spots: drawing the slide is wasted time
        self.last_run = run
        self.progress.value = 1000
        fitted = int(run.result.fitted.sum())
        notices = list(getattr(run, "notices", []))
        self.status.value = f"done in {run.result.runtime_s:.1f} s ({fitted} spots fitted)" + "".join(
            f"\nnote: {n}" for n in notices
        )
        notify_info(f"{run.result.method} finished: {fitted} spots" + "".join(f"\n{n}" for n in notices))

    def _on_cancelled(self):
        self._end_stream()

    def _on_error(self, exc):
        self._end_stream()
        if isinstance(exc, api.InputError):
            self._show_problems([line.strip() for line in str(exc).splitlines() if line.strip()])
