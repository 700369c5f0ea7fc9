"""Expression within a cell type, the Results dock's panel for DestVI results: pick a gene (with search) and a
cell type, Paint; DestVI's imputation runs a chunk of spots at a time in a worker."""

from __future__ import annotations

from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton

from ... import api
from ..colorbar import add_colorbar, draw_colorbar
from ..jobs import JobRunner
from ..notify import status_label
from ..result_layers import destvi_state, show_expression
from ..session import ResultRecord, session_for
from ..views import COLORMAPS


class ImputePanel(Container):
    """Shown while the selected result is a DestVI run."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.rec: ResultRecord | None = None
        self.title = Label(label="", value="<b>Expression within a cell type</b>")
        self.search = LineEdit(label="search genes", tooltip="Type to filter the gene list.")
        self.gene = ComboBox(
            label="gene",
            choices=self._genes,
            tooltip="A gene of the DestVI model (genes shared by the slide and the reference).",
        )
        self.cell_type = ComboBox(
            label="within type",
            choices=self._types,
            tooltip="The cell type whose expression of the gene is imputed at every spot.",
        )
        self.cmap = ComboBox(label="colormap", choices=COLORMAPS, value="viridis")
        self.paint_btn = PushButton(text="Paint")
        self.paint_btn.tooltip = (
            "Colour the tissue by DestVI's imputed expression of the gene in a cell of that "
            "type at each spot (fraction of the cell's counts), from the spot's cell state."
        )
        self.status = status_label(label="")
        self.extend([self.title, self.search, self.gene, self.cell_type, self.cmap, self.paint_btn, self.status])
        self.colorbar_fig, self.colorbar = add_colorbar(self, hidden=True)  # until an expression is painted
        self.jobs = JobRunner("Expression within a cell type", status=self.status)
        self.jobs.busy_changed.connect(lambda busy: setattr(self.paint_btn, "enabled", not busy))
        self.search.changed.connect(lambda _v: self.gene.reset_choices())
        self.cmap.changed.connect(self._recolour)
        self.paint_btn.clicked.connect(self.paint)
        self.native.setVisible(False)

    def _state(self) -> dict | None:
        return destvi_state(self.rec) if self.rec is not None else None

    def _genes(self, _w=None):
        st = self._state()
        if st is None:
            return []
        q = (self.search.value or "").strip().lower() if hasattr(self, "search") else ""
        return [g for g in map(str, st["genes"]) if q in g.lower()]

    def _types(self, _w=None):
        st = self._state()
        return [str(t) for t in st["cell_types"]] if st is not None else []

    @property
    def available(self) -> bool:
        """True when the selected result is a DestVI run (the control is shown)."""
        return self._state() is not None

    @property
    def busy(self) -> bool:
        return self.jobs.busy

    def set_run(self, rec: ResultRecord | None):
        self.rec = rec
        self.gene.reset_choices()
        self.cell_type.reset_choices()
        self.native.setVisible(self.available)
        layer = rec.layers.get("expression") if rec is not None else None
        self.status.value = "" if layer is None else f"shown: {layer.metadata['gene']} in {layer.metadata['cell_type']}"

    def paint(self):
        if self.jobs.busy:
            return
        state, gene, cell_type = self._state(), self.gene.value, self.cell_type.value
        if state is None:
            self.status.value = "pick a DestVI result"
            return
        if not gene:
            self.status.value = f"no gene matches {self.search.value!r}: clear or change the search"
            return
        if not cell_type:
            self.status.value = "pick a cell type"
            return
        rec = self.rec
        stage = f"imputing {gene} in {cell_type}"

        def work(control):
            steps = api.destvi_imputation_steps(state, cell_type, gene)
            while True:
                control.check_cancel()
                try:
                    control.report(stage, next(steps))
                except StopIteration as stop:
                    return api.in_slide_order(state, rec.adata.obs_names, stop.value)

        self.jobs.start(work, lambda values: self._show(rec, gene, cell_type, values), message=f"{stage}...")

    def _show(self, rec: ResultRecord, gene: str, cell_type: str, values):
        layer = show_expression(self.viewer, rec, gene, cell_type, values, self.cmap.value)
        meta = layer.metadata
        draw_colorbar(
            self.colorbar_fig,
            self.colorbar,
            f"{gene} in {cell_type} (fraction of a cell's counts)",
            meta["colormap"],
            meta["vmin"],
            meta["vmax"],
        )
        self.status.value = f"shown: {gene} in {cell_type}, 0 to {meta['vmax']:.3g}"

    def _recolour(self, _v=None):
        layer = self.rec.layers.get("expression") if self.rec is not None else None
        if layer is None or layer not in self.viewer.layers:
            return
        m = layer.metadata
        self._show(self.rec, m["gene"], m["cell_type"], m["values"])
