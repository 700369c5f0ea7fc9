"""The Results dock: pick a result, colour its proportion layer by one cell type, grey out spots whose 90% interval
is wider than a threshold (on every result's proportion layer), compare two results, combine two or more into a
consensus, save; for DestVI results, paint a gene's expression within a cell type (the imputation panel)."""

from __future__ import annotations

from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, PushButton, Select
from qtpy.QtWidgets import QFileDialog

from ... import api, keys
from ..colorbar import add_colorbar, draw_colorbar, hide_colorbar
from ..jobs import JobRunner
from ..layers import PLUGIN_KEY
from ..lifetime import DockLinks
from ..notify import notify_error, notify_info, status_label
from ..result_layers import (
    add_consensus_steps,
    compare_results,
    consensus_of,
    export_csv,
    grey_uncertain_spots,
    no_interval_reason,
    result_suffix,
    save_figure,
    save_result,
    show_proportion,
)
from ..saved import adopt_saved_results
from ..scrolling import ScrollingDock
from ..session import session_for
from ..views import AGREEMENT_CMAP, COLORMAPS, WIDTH_CMAP, WIDTH_MAX
from .imputation import ImputePanel


class ResultsDock(ScrollingDock):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session = session_for(napari_viewer)
        self.run = ComboBox(label="result", choices=lambda _w: list(session.results))
        self.cell_type = ComboBox(
            label="proportion of", choices=self._types, tooltip="Colour the proportion layer by this cell type."
        )
        self.cmap = ComboBox(label="colormap", choices=COLORMAPS, value="viridis")
        self.width_threshold = FloatSpinBox(
            label="grey out interval >",
            value=1.0,
            min=0.0,
            max=1.0,
            step=0.05,
            tooltip="Grey out, on every proportion layer, the spots whose 90% interval for the shown type is wider "
            "than this (results run with intervals only); 1 greys none.",
        )
        # why the threshold leaves the selected result alone (it has no interval): shown while greying is on
        self.interval_note = status_label("", label="", hide_empty=True)
        self.run_b = ComboBox(label="compare with", choices=lambda _w: list(session.results))
        self.compare_btn = PushButton(text="Compare")
        self.summary = status_label("", label="", hide_empty=True)
        self.combine = Select(
            label="consensus of",
            choices=lambda _w: list(session.results),
            tooltip="Two or more results of one slide: their consensus (interval-weighted when every one has "
            "intervals) and the methods' agreement per spot.",
        )
        self.align_types = CheckBox(text="use the shared cell types", value=False)
        self.consensus_btn = PushButton(text="Consensus of the selected")
        self.consensus_status = status_label("", hide_empty=True)
        self.save_btn = PushButton(text="Save result (.h5ad / .zarr)...")
        self.csv_btn = PushButton(text="Export proportions (.csv)...")
        self.fig_btn = PushButton(text="Save figure (.png)...")
        self.body.extend(
            [
                self.run,
                self.cell_type,
                self.cmap,
                self.width_threshold,
                self.interval_note,
                self.run_b,
                self.compare_btn,
                self.summary,
                self.combine,
                self.align_types,
                self.consensus_btn,
                self.consensus_status,
                self.save_btn,
                self.csv_btn,
                self.fig_btn,
            ]
        )
        self.colorbar_fig, self.colorbar = add_colorbar(self.body, hidden=True)
        # the top visible interval-width or agreement layer's colorbar; hidden while none is visible
        self.second_fig, self.second_colorbar = add_colorbar(self.body, hidden=True)
        self.second_shown: str | None = None  # its title
        self.second_bar = None  # its matplotlib colorbar
        self._second_drawn: tuple | None = None  # (layer, title) drawn: redrawn only when that changes
        # the runner writes no status of its own: a refused consensus keeps its reason in the status line
        self.jobs = JobRunner("Consensus")
        self.impute = ImputePanel(napari_viewer)
        self.body.native.layout().addWidget(self.impute.native)
        self.run.changed.connect(self._on_run)
        self.cell_type.changed.connect(self._apply)
        self.cmap.changed.connect(self._apply)
        self.compare_btn.clicked.connect(self._on_compare)
        self.consensus_btn.clicked.connect(self.make_consensus)
        self.width_threshold.changed.connect(lambda v: session.set_width_threshold(v))
        self.save_btn.clicked.connect(self._save_result)
        self.csv_btn.clicked.connect(lambda: self._ask_and(".csv", export_csv))
        self.fig_btn.clicked.connect(lambda: self._ask_and(".png", lambda rec, p: save_figure(self.viewer, rec, p)))
        self.links = links = DockLinks(self.native, napari_viewer)  # undone when the dock closes
        links.runner(self.impute.jobs)
        links.runner(self.jobs)
        links.connect(session.width_threshold_changed, lambda t: grey_uncertain_spots(napari_viewer, t))
        links.connect(session.width_threshold_changed, self._say_why_not_greyed)
        links.connect(session.result_added, self._on_added)
        links.connect(session.result_selected, self._on_selected)
        links.connect(session.result_removed, self._on_removed)
        links.connect(napari_viewer.layers.events, self._on_layers_event)
        if session.results:
            self._on_added(session.selected_result or next(reversed(session.results)))
        adopt_saved_results(napari_viewer)

    def _types(self, _w=None):
        rec = self.session.result(self.run.value) if hasattr(self, "run") else None
        return rec.cell_types if rec else []

    def _on_added(self, name: str):
        self.run.reset_choices()
        self.run_b.reset_choices()
        self.combine.reset_choices()
        others = [n for n in self.session.results if n != name]
        if others and self.run_b.value in (None, name):  # compare the new result with the one before it
            self.run_b.value = others[-1]
        if self.run.value != name:
            self.run.value = name  # -> _on_run, once
        else:
            self._on_run()

    def _on_removed(self, _name: str):
        self.run.reset_choices()
        self.run_b.reset_choices()
        if self.session.result(self.run.value) is None:
            self.impute.set_run(None)

    def _on_selected(self, name: str):
        if self.run.value != name:
            self.run.value = name

    def _on_run(self, _v=None):
        self.cell_type.reset_choices()
        self._apply()
        rec = self.session.result(self.run.value)
        self.impute.set_run(rec)
        if rec is not None:
            self.session.select_result(rec.name)

    def _apply(self, _v=None):
        rec = self.session.result(self.run.value)
        if rec is None or self.cell_type.value is None:
            return
        show_proportion(rec, self.cell_type.value, self.cmap.value, self.session.width_threshold)
        draw_colorbar(self.colorbar_fig, self.colorbar, f"proportion of {self.cell_type.value}", self.cmap.value)
        self._say_why_not_greyed()
        self._update_second_colorbar()

    def _say_why_not_greyed(self, _threshold=None):
        rec = self.session.result(self.run.value)
        reason = no_interval_reason(rec) if rec is not None and self.session.width_threshold is not None else None
        self.interval_note.value = reason or ""

    def _on_layers_event(self, event):
        # the layer list re-emits every event of every layer: only these change which value layer is on top
        if event.type in ("visible", "inserted", "removed", "moved", "reordered"):
            self._update_second_colorbar()

    def _top_value_layer(self):
        """The topmost visible interval-width or agreement layer of a result (what the eye reads), or None."""
        for layer in list(self.viewer.layers)[::-1]:
            if layer.visible and layer.metadata.get(PLUGIN_KEY, {}).get("kind") in ("interval_width", "agreement"):
                return layer
        return None

    def _update_second_colorbar(self):
        layer = self._top_value_layer()
        if layer is None:
            if not self.second_colorbar.isHidden():
                hide_colorbar(self.second_fig, self.second_colorbar)
            self.second_shown = self.second_bar = self._second_drawn = None
            return
        meta = layer.metadata
        run = meta[PLUGIN_KEY]["run"]
        if meta[PLUGIN_KEY]["kind"] == "agreement":
            title = f"{run}: methods' agreement (1 - mean total-variation distance)"
            args = (AGREEMENT_CMAP, 0.0, 1.0, "neither")
        else:
            title = f"{run}: 90% interval width of {meta['cell_type']}"
            args = (WIDTH_CMAP, 0.0, WIDTH_MAX, "max")  # wider intervals are drawn in the top colour
        if self._second_drawn == (layer, title):
            return
        self.second_bar = draw_colorbar(self.second_fig, self.second_colorbar, title, *args)
        self.second_shown = title
        self._second_drawn = (layer, title)

    # -- consensus -------------------------------------------------------------------------------------------
    def make_consensus(self):
        """The consensus of the results picked in ``combine``, computed in a worker; its layers join the session."""
        names = list(self.combine.value or [])
        if len(names) < 2:
            self.consensus_status.value = "pick two or more results for a consensus"
            return
        records = [self.session.results[n] for n in names]
        align = bool(self.align_types.value)
        self.consensus_status.value = f"combining {len(records)} results..."
        self.jobs.start(
            lambda _control: consensus_of(records, align),
            lambda run: self._show_consensus(run, records[0]),
            on_error=self._consensus_failed,
        )

    def _consensus_failed(self, exc):
        self.consensus_status.value = str(exc)

    def _show_consensus(self, run, over):
        yield from add_consensus_steps(self.viewer, run, over)
        median = run.adata.obs[keys.CONSENSUS_AGREEMENT].median()
        self.consensus_status.value = (
            f"consensus of {', '.join(run.result.params['inputs'])} "
            f"({api.weighting_phrase(run.result.params['weighting'])}): median agreement {median:.3f}"
            + "".join(f"\nnote: {n}" for n in run.notices)
        )

    def _on_compare(self):
        a, b = self.run.value, self.run_b.value
        if not a or not b or a == b:
            self.summary.value = "pick two different results to compare"
            return
        try:
            _, cmp = compare_results(self.viewer, self.session.results[a], self.session.results[b])
        except Exception as exc:
            notify_error(exc, "Compare")
            return
        s = cmp.summary()
        self.summary.value = (
            f"{s['spots_compared']} spots: dominant type agrees on "
            f"{100 * s['dominant_type_agreement']:.1f}%; median JS distance {s['median_js_distance']:.3f}"
        )
        draw_colorbar(self.colorbar_fig, self.colorbar, "Jensen-Shannon distance", "magma")

    def _save_result(self):
        rec = self.session.result(self.run.value)
        if rec is not None:
            self._ask_and(result_suffix(rec), save_result)

    def _ask_and(self, suffix: str, action):
        rec = self.session.result(self.run.value)
        if rec is None:
            return
        path, _ = QFileDialog.getSaveFileName(
            self.native, "Save", f"{rec.name.replace(' ', '_').replace('#', '')}{suffix}", f"*{suffix}"
        )
        if not path:
            return
        try:
            out = action(rec, path)
            notify_info(f"saved {out}")
        except Exception as exc:
            notify_error(exc, "Save")
