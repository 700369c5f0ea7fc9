"""The Interaction lens dock: click a cell (or hover, with *follow the mouse*) and pick a gene; the dock lists the
cell's top modulators of the gene with their β, the canvas draws a segment from every neighbour that sends one of
its supported ligands (coloured by support sqrt(L·R)) and dims the other cells. *Who responds* maps the first-step
Δ of the targets a ligand knockout reaches.

The model comes from the session (the Train dock puts it there); the numbers from ``perturb_api``'s
``interaction_lens`` (a millisecond per cell: computed on the GUI thread) and ``who_responds`` (a kernel sum over
the slide: run through the dock's :class:`~spatial_deconv_gui.gui.jobs.JobRunner`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from magicgui.widgets import CheckBox, ComboBox, Container, ProgressBar, PushButton, SpinBox, Table
from scipy.spatial import cKDTree

from ..colorbar import add_colorbar, draw_colorbar
from ..jobs import JobRunner
from ..lens_layers import SUPPORT_CMAP, clear_lens, draw_lens, draw_who_responds, support_range
from ..lifetime import DockLinks
from ..notify import notify_error, status_label
from ..perturb_layers import cell_size
from ..session import session_for
from ..views import nearest_spot

ALL_RESPONDERS = "all responders (Σ|Δ|)"
# modulator names tell the kind: TF, L$R (ligand-receptor), L#TF (TF-ligand)
TABLE_COLUMNS = ("modulator", "β", "β·x", "senders", "max √(L·R)")
DRAWING_LAYERS = ("Shapes", "Labels")  # a click there draws; it does not pick a cell


class LensDock(Container):
    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session = session = session_for(napari_viewer)
        self.index = None  # perturb_api.lens_index of the session's model
        self.tree = None  # the model's cells on the canvas, to find the one under the mouse
        self.lens = None  # the CellLens drawn
        self.response = None  # the last WhoResponds
        self.hovered: int | None = None
        self.gene_max: dict = {}  # each gene's largest (filtered) expression: the support colour range
        self._support_bar = None  # the range the support colorbar shows
        self.gene = ComboBox(
            label="gene", choices=lambda _w: self._targets(), tooltip="The target gene whose modulators are listed."
        )
        self.top = SpinBox(label="top modulators", value=10, min=1, max=500)
        self.follow_hover = CheckBox(
            label="follow the mouse",
            value=False,
            tooltip="Show the lens of the cell under the mouse; off the tissue it returns to the clicked cell.",
        )
        self.status = status_label("train or load a model, then click a cell")
        self.table = Table(value=pd.DataFrame(columns=list(TABLE_COLUMNS)), label="modulators")
        self.table.min_height = 220
        self.table.native.verticalHeader().setVisible(False)
        self.table.tooltip = (
            "β: the coefficient (of the cell's cluster); β·x: the term it adds to the gene's predicted expression; "
            "senders: neighbours within the pair's radius expressing the ligand; max √(L·R): their largest support."
        )
        self.ligand = ComboBox(
            label="knock out ligand",
            choices=lambda _w: self._ligands(),
            tooltip="Who responds: the first propagation step of this ligand's knockout in every cell.",
        )
        self.respond_btn = PushButton(text="Who responds")
        self.responder = ComboBox(
            label="map of",
            choices=lambda _w: self._responders(),
            tooltip="A responding target's first-step Δ, or Σ|Δ| over all of them.",
        )
        self.progress = ProgressBar(label="progress", min=0, max=1000, value=0)
        self.extend(
            [
                self.gene,
                self.top,
                self.follow_hover,
                self.status,
                self.table,
                self.ligand,
                self.respond_btn,
                self.responder,
                self.progress,
            ]
        )
        self.colorbar_fig, self.colorbar = add_colorbar(self)  # the senders' support
        self.response_fig, self.response_bar = add_colorbar(self)  # the who-responds map
        self.links = links = DockLinks(self.native, napari_viewer)  # undone when the dock closes
        self.jobs = links.runner(JobRunner("Interaction lens", status=self.status, progress=self.progress))
        self.jobs.busy_changed.connect(lambda busy: setattr(self.respond_btn, "enabled", not busy))
        self.gene.changed.connect(lambda _v: self.refresh())
        self.top.changed.connect(lambda _v: self.refresh())
        self.follow_hover.changed.connect(self._on_follow)
        self.respond_btn.clicked.connect(self.run_who_responds)
        self.responder.changed.connect(lambda _v: self._draw_response())
        links.connect(session.model_changed, self.on_model)
        links.connect(session.cell_picked, self._on_cell_picked)
        links.mouse(drag=self._on_click, move=self._on_hover)
        if session.model is not None:
            self.on_model(session.model)

    # -- choices -------------------------------------------------------------------------------------
    def _targets(self):
        return list(self.session.model.targets) if self.session.model is not None else []

    def _ligands(self):
        return list(self.session.model.ligands) if self.session.model is not None else []

    def _responders(self):
        if self.response is None:
            return [ALL_RESPONDERS]
        return [ALL_RESPONDERS] + list(self.response.targets["target"])

    def on_model(self, model):
        # perturb_api is imported here, once a model exists (the Train dock has imported it by then)
        from ... import perturb_api

        self.index = perturb_api.lens_index(model)
        self.tree = cKDTree(self.session.cells_yx())
        self.gene_max = dict(zip(model.genes, np.maximum(np.asarray(model.expr).max(axis=0), 0.0).tolist()))
        self._support_bar = None
        self.lens = self.response = None
        self.hovered = None
        clear_lens(self.viewer)
        self.gene.reset_choices()
        self.ligand.reset_choices()
        self.responder.reset_choices()
        # the β listed are the clicked cell's own in a per-cell model, its cluster's in a seed model
        beta = "each cell's own β" if model.percell is not None else "β of the cell's cluster"
        self.status.value = f"model ({model.mode} mode, {beta}): {len(model.targets)} targets; click a cell"
        self.refresh()

    # -- the mouse picks a cell ------------------------------------------------------------------------
    def cell_at(self, position) -> int | None:
        if self.tree is None:
            return None
        return nearest_spot(self.tree, position, max_dist=0.6 * cell_size(self.session))

    def pick_at(self, position) -> int | None:
        """Pick the model's cell at a canvas position (napari order); returns it, or None off the tissue."""
        cell = self.cell_at(position)
        if cell is not None:
            self.session.pick_cell(cell)
        return cell

    def _on_cell_picked(self, _cell: int):
        self.refresh()

    def _on_click(self, _viewer, event):
        if event.type != "mouse_press" or self.session.model is None:
            return
        active = self.viewer.layers.selection.active
        if active is not None and type(active).__name__ in DRAWING_LAYERS:
            return
        self.pick_at(event.position)

    def _on_hover(self, _viewer, event):
        if not self.follow_hover.value or self.session.model is None:
            return
        cell = self.cell_at(event.position)
        if cell != self.hovered:
            self.hovered = cell
            self.refresh()

    def _on_follow(self, follow: bool):
        if not follow:  # back to the clicked cell at once, not at the next mouse move
            self.hovered = None
            self.refresh()

    # -- the lens ------------------------------------------------------------------------------------
    def shown_cell(self) -> int | None:
        """The cell under the mouse (when following it), else the clicked one."""
        if self.follow_hover.value and self.hovered is not None:
            return self.hovered
        return self.session.cell

    def refresh(self):
        """Recompute and draw the lens of the shown cell and gene (a millisecond: no worker needed)."""
        from ... import perturb_api

        cell, gene = self.shown_cell(), self.gene.value
        if self.index is None or cell is None or gene is None:
            return
        try:
            self.lens = perturb_api.interaction_lens(
                self.session.model, cell, gene, top=int(self.top.value), index=self.index
            )
        except Exception as exc:
            self.status.value = str(exc)
            notify_error(exc, "Interaction lens")
            return
        self._show_table()
        vmax = support_range(self.lens, self.gene_max)
        draw_lens(self.viewer, self.session, self.lens, vmax)
        if vmax != self._support_bar:  # a colorbar costs ~50 ms to draw: only when its range changes
            self._support_bar = vmax
            draw_colorbar(self.colorbar_fig, self.colorbar, "support √(L·R) of the senders", SUPPORT_CMAP, 0.0, vmax)
        lens = self.lens
        name = self.session.model.obs_names[cell]
        self.status.value = (
            f"{name} ({lens.cluster}): {len(lens.modulators)} modulators of {gene}, "
            f"{lens.senders['sender'].nunique()} sending cells"
        )

    def _show_table(self):
        rows = []
        most = self.lens.senders.groupby("modulator")["support"].max().to_dict()
        for r in self.lens.modulators.itertuples():
            sends = r.modulator in most
            rows.append(
                [
                    r.modulator,
                    f"{r.beta:.4g}",
                    f"{r.term:.4g}",
                    str(r.n_senders) if sends else "",
                    f"{most[r.modulator]:.3g}" if sends else "",
                ]
            )
        self.table.value = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
        self.table.native.resizeColumnsToContents()

    def table_rows(self) -> list[list]:
        return [list(row) for row in self.table.data.to_list()]

    # -- who responds --------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.jobs.busy

    def run_who_responds(self):
        from ... import perturb_api

        model, ligand, index = self.session.model, self.ligand.value, self.index
        if model is None or ligand is None or self.jobs.busy:
            return

        def work(control):
            control.report("who responds", 0.0, ligand)
            return perturb_api.who_responds(model, ligand, 0.0, index=index)

        self.jobs.start(work, self._on_response, message=f"who responds to a knockout of {ligand}...")

    def _on_response(self, response):
        self.response = response
        with self.responder.changed.blocked():
            self.responder.reset_choices()
            top = list(response.targets["target"][:1])
            self.responder.value = top[0] if top else ALL_RESPONDERS
        self._draw_response()
        n = len(response.targets)
        self.status.value = f"KO {response.ligand}: {n} responding targets" + (
            f", most {response.targets['target'].iloc[0]}" if n else " (no target uses it)"
        )

    def _draw_response(self):
        if self.response is None:
            return
        choice = self.responder.value
        gene = None if choice in (None, ALL_RESPONDERS) else choice
        _, label, cmap, lo, hi = draw_who_responds(self.viewer, self.session, self.response, gene)
        draw_colorbar(self.response_fig, self.response_bar, label, cmap, lo, hi)

    def responder_values(self) -> np.ndarray | None:
        layer = self.viewer.layers["who responds"] if "who responds" in self.viewer.layers else None
        return None if layer is None else np.asarray(layer.metadata["values"])
