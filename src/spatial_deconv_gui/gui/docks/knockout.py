"""The Knockout dock: knock out or overexpress genes in a scope of cells (all, a lasso, a selection, a cluster)
and draw the shift it causes; each run keeps its Δ map and vector field, and two runs can be differenced.

Propagation runs in a worker and streams its steps onto the Δ layer; the model comes from the session (the Train
dock puts it there)."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    FloatSpinBox,
    LineEdit,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
)
from matplotlib.path import Path as MplPath
from qtpy.QtWidgets import QFileDialog

from ... import keys
from ..colorbar import add_colorbar, draw_colorbar
from ..jobs import JobRunner
from ..layers import PLUGIN_KEY
from ..lifetime import DockLinks
from ..notify import notify_error, notify_info, status_label
from ..perturb_layers import (
    add_delta_layer,
    add_vectors_layer,
    colour_delta,
    diverging_rgba,
    draw_vectors,
    save_perturbation,
    show_difference,
    slide_adata,
)
from ..session import Perturbation, session_for
from . import open_docks

SCOPES = ("all cells", "inside shapes", "selected points", "cluster")


class KnockoutDock(Container):
    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session = session = session_for(napari_viewer)
        self.current: Perturbation | None = None
        self._stream_layer = None
        self.search = LineEdit(label="search genes", tooltip="Type to filter the gene list.")
        self.genes = Select(
            label="genes",
            choices=lambda _w: self._filtered_genes(),
            allow_multiple=True,
            tooltip="Genes to perturb; '(model)' marks genes with a trained model of their own.",
        )
        self.value = FloatSpinBox(
            label="set to",
            value=0.0,
            min=0.0,
            max=1e6,
            step=0.5,
            tooltip="0 knocks the genes out; a positive value overexpresses them.",
        )
        self.scope = ComboBox(label="cells", choices=SCOPES, value="all cells")
        self.shapes = ComboBox(
            label="shapes layer",
            choices=self._shapes_layers,
            nullable=True,
            tooltip="Cells inside any shape of this layer (draw one with the lasso).",
        )
        self.cluster = ComboBox(label="cluster", choices=lambda _w: self._clusters(), nullable=True)
        self.steps = SpinBox(label="propagation steps", value=4, min=1, max=20)
        self.run_btn = PushButton(text="Run knockout")
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1000, value=0)
        self.status = status_label("train or load a model first")
        self.usage_lines: list[str] = []  # what the last run's genes can move, from the model (gene_usage)
        # results
        self.showing = ComboBox(
            label="perturbation",
            choices=lambda _w: list(session.perturbations),
            tooltip="Each run keeps its own group of layers (Δ map, vector field); the one "
            "picked here is shown and drives the controls below.",
        )
        self.show_gene = ComboBox(label="Δ of gene", choices=lambda _w: self._model_genes())
        self.arrow_length = FloatSlider(label="arrow length", value=1.0, min=0.1, max=10.0)
        self.arrow_density = SpinBox(
            label="arrow grid", value=40, min=5, max=200, tooltip="Arrows per side of the smoothing grid."
        )
        self.per_cell = CheckBox(label="per-cell arrows", value=False)
        self.compare_with = ComboBox(
            label="difference with", choices=lambda _w: list(session.perturbations), nullable=True
        )
        self.save_btn = PushButton(text="Save perturbed data (.h5ad) + PNG...")
        self.extend(
            [
                self.search,
                self.genes,
                self.value,
                self.scope,
                self.shapes,
                self.cluster,
                self.steps,
                self.run_btn,
                self.cancel_btn,
                self.progress,
                self.status,
                self.showing,
                self.show_gene,
                self.arrow_length,
                self.arrow_density,
                self.per_cell,
                self.compare_with,
                self.save_btn,
            ]
        )
        self.colorbar_fig, self.colorbar = add_colorbar(self)
        self.links = links = DockLinks(self.native, napari_viewer)  # undone when the dock closes
        self.jobs = links.runner(JobRunner("Knockout", status=self.status, progress=self.progress))
        self.jobs.busy_changed.connect(self._set_running)
        self.search.changed.connect(lambda _v: self.genes.reset_choices())
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn.clicked.connect(self.jobs.cancel)
        self.showing.changed.connect(session.select_perturbation)
        self.show_gene.changed.connect(self._recolour)
        self.arrow_length.changed.connect(self._redraw_vectors)
        self.arrow_density.changed.connect(self._redraw_vectors)
        self.per_cell.changed.connect(self._redraw_vectors)
        self.compare_with.changed.connect(self._difference)
        self.save_btn.clicked.connect(self._ask_save)
        links.connect(napari_viewer.layers.events.inserted, self._on_layers)
        links.connect(napari_viewer.layers.events.removed, self._on_layers)
        links.connect(session.model_changed, self.on_model)
        links.connect(session.perturbation_added, self._on_added)
        links.connect(session.perturbation_selected, self._show_run)
        links.connect(session.perturbation_removed, self._on_removed)
        if session.model is not None:
            self.on_model(session.model)

    # -- choices -------------------------------------------------------------------------------------
    def _model_genes(self):
        return list(self.session.model.genes) if self.session.model is not None else []

    def _filtered_genes(self):
        model = self.session.model
        if model is None:
            return []
        q = (self.search.value or "").strip().lower() if hasattr(self, "search") else ""
        trained = set(model.targets)
        return [(f"{g} (model)" if g in trained else g, g) for g in model.genes if q in g.lower()]

    def _clusters(self):
        return list(self.session.model.cluster_names) if self.session.model is not None else []

    def _shapes_layers(self, _w=None):
        return [(layer.name, layer) for layer in self.viewer.layers if type(layer).__name__ == "Shapes"]

    def _on_layers(self, _event=None):
        self.shapes.reset_choices()

    def on_model(self, model):
        self.genes.reset_choices()
        self.cluster.reset_choices()
        self.show_gene.reset_choices()
        self.status.value = f"model: {len(model.genes)} genes ({len(model.targets)} with models)"

    def selected_cells(self) -> np.ndarray | None:
        """Indices of the cells the perturbation applies to (None = all)."""
        model, layer = self.session.model, self.session.model_slide
        scope = self.scope.value
        if scope == "all cells":
            return None
        if scope == "cluster":
            if self.cluster.value is None:
                raise ValueError("pick a cluster")
            return np.flatnonzero(np.asarray(model.clusters) == self.cluster.value)
        if scope == "selected points":
            if layer is None or not getattr(layer, "selected_data", None):
                raise ValueError("select points on the slide layer first (the select tool of the Points layer)")
            return np.array(sorted(layer.selected_data), dtype=np.int64)
        shapes = self.shapes.value
        if shapes is None or len(shapes.data) == 0:
            raise ValueError("draw a shape (lasso or polygon) on a Shapes layer first")
        yx = self.session.cells_yx()
        inside = np.zeros(len(yx), dtype=bool)
        for poly in shapes.data:
            inside |= MplPath(np.asarray(poly)[:, -2:]).contains_points(yx)
        if not inside.any():
            raise ValueError("no cell lies inside the drawn shapes")
        return np.flatnonzero(inside)

    # -- running -------------------------------------------------------------------------------------
    def run(self):
        from ... import perturb_api  # pulls in torch: imported at the first Run, not when the dock opens

        if self.jobs.busy:
            return
        model = self.session.model
        try:
            if model is None:
                raise ValueError("train or load a model first")
            genes = list(self.genes.value)
            if not genes:
                raise ValueError("pick at least one gene")
            cells = self.selected_cells()
            usage = perturb_api.gene_usage(model, genes)  # said before the run, so a silent map is no surprise
        except Exception as exc:
            self.status.value = str(exc)
            notify_error(exc, "Knockout")
            return
        slide = self.session.model_slide
        value, steps = float(self.value.value), int(self.steps.value)
        notices = perturb_api.usage_notices(model, usage=usage)
        self.usage_lines = [perturb_api.usage_header(model), *notices]
        if (usage["n_targets"] == 0).any():
            notify_info("Knockout: " + " ".join(notices))

        def work(control):
            def stream(step):
                control.report("propagating", step.step / step.n_steps, partial=step)

            # the slide's AnnData (its obs and coordinates go into the run's AnnData) is read here, in the
            # worker: reading a file on the GUI thread would freeze the canvas for as long
            adata = slide_adata(slide) if slide is not None else None
            if adata is not None and adata.n_obs != model.expr.shape[0]:
                adata = None

            return perturb_api.run_perturbation(
                model, genes, value, cells=cells, steps=steps, adata=adata, on_step=stream, control=control
            )

        self.start_stream()
        self.jobs.start(
            work,
            lambda result: self.add_run_steps(result, genes, value),
            on_partials=self._paint_step,
            on_cancelled=self._drop_stream_layer,
            on_error=lambda _exc: self._drop_stream_layer(),
            message="\n".join(["propagating...", *self.usage_lines]),
        )

    @property
    def busy(self) -> bool:
        return self.jobs.busy

    def cancel(self):
        self.jobs.cancel()

    def _set_running(self, running: bool):
        self.run_btn.enabled, self.cancel_btn.enabled = not running, running

    def _paint_step(self, steps):
        """Colour the Δ layer by the latest propagation step (the runner calls this ~5 times a second)."""
        step = steps[-1]
        gene = self.show_gene.value or self._model_genes()[0]
        col = list(self.session.model.genes).index(gene)
        layer = self._stream_layer
        if layer is None or layer not in self.viewer.layers:
            return
        layer.name = f"knockout (step {step.step}/{step.n_steps})"
        layer.face_color = diverging_rgba(step.delta[:, col])[0]

    def start_stream(self):
        """The Δ layer the steps stream onto, made before the run starts so that streaming only recolours it."""
        self._stream_layer = add_delta_layer(self.viewer, self.session, "knockout (running)")

    def _drop_stream_layer(self):
        if self._stream_layer is not None and self._stream_layer in self.viewer.layers:
            self.viewer.layers.remove(self._stream_layer)
        self._stream_layer = None

    def add_run_steps(self, adata, genes: list, value: float):
        """The finished run's layers, one per event-loop turn, so no single turn holds the canvas for all of it."""
        base = f"KO {'+'.join(genes)}" if value == 0 else f"OE {'+'.join(genes)}"
        run = Perturbation(self.session.unique_perturbation_name(base), adata, genes)
        # the layer that streamed the steps becomes the run's Δ layer
        delta = self._stream_layer
        if delta is None or delta not in self.viewer.layers:  # the user deleted it while the run streamed
            delta = add_delta_layer(self.viewer, self.session, "knockout")
        delta.name = f"{run.name}: Δ"
        delta.metadata[PLUGIN_KEY] = {"kind": "perturb_delta", "run": run.name}
        run.layers["delta"] = delta
        self._stream_layer = None
        yield
        add_vectors_layer(self.viewer, run)
        yield
        moved = run.moved
        target = next((g for g in moved.index if g not in genes), moved.index[0])
        with self.show_gene.changed.blocked():  # _show_run below colours the new run by this gene, once
            self.show_gene.value = target
        self.session.add_perturbation(run)  # only now: adding layers makes napari refresh the run picker
        self.showing.value = run.name  # -> the session selects it -> _show_run: colours, arrows
        self.progress.value = 1000
        took = float(adata.uns[keys.PERTURB]["runtime_s"])
        self.status.value = "\n".join(
            [f"{run.name}: done in " + (f"{took:.1f} s" if took >= 0.1 else "under 0.1 s"), *self.usage_lines]
        )
        yield
        open_docks(self.viewer, ["Knockout summary"])

    # -- showing -------------------------------------------------------------------------------------
    def _on_added(self, _name: str):
        self.compare_with.reset_choices()
        self.showing.reset_choices()

    def _on_removed(self, name: str):
        if self.current is not None and self.current.name == name:
            self.current = None
        self.compare_with.reset_choices()
        self.showing.reset_choices()

    def _show_run(self, name: str):
        run = self.session.perturbation(name)
        if run is None or run is self.current:
            return
        self.current = run
        if self.showing.value != name:
            self.showing.value = name
        for other in self.session.perturbations.values():
            for layer in other.layers.values():
                if layer in self.viewer.layers:
                    layer.visible = other is run
        self._recolour()
        self._redraw_vectors()

    def _recolour(self, _v=None):
        run, gene = self.current, self.show_gene.value
        if run is None or gene is None or gene not in run.adata.var_names:
            return
        self._draw_colorbar(f"Δ {gene}", colour_delta(run, gene))

    def _draw_colorbar(self, label: str, vmax: float):
        draw_colorbar(self.colorbar_fig, self.colorbar, label, "RdBu_r", -vmax, vmax)

    def _redraw_vectors(self, _v=None):
        if self.current is not None:
            draw_vectors(
                self.session,
                self.current,
                self.per_cell.value,
                int(self.arrow_density.value),
                float(self.arrow_length.value),
            )

    def _difference(self, other_name):
        run = self.current
        if run is None or not other_name or other_name == run.name:
            return
        gene = self.show_gene.value
        _, vmax = show_difference(self.viewer, self.session, run, self.session.perturbations[other_name], gene)
        self._draw_colorbar(f"difference of Δ {gene}", vmax)

    # -- saving --------------------------------------------------------------------------------------
    def save(self, path):
        return save_perturbation(self.viewer, self.session, self.current, path)

    def _ask_save(self):
        if self.current is None:
            return
        path, _ = QFileDialog.getSaveFileName(
            self.native, "Save", self.current.name.replace(" ", "_").replace("#", ""), "*.h5ad"
        )
        if path:
            try:
                out, png = self.save(path)
                notify_info(f"saved {out} and {png}")
            except Exception as exc:
                notify_error(exc, "Save")
