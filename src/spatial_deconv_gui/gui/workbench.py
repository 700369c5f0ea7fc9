"""Result layers and the docks that explore them: legend, proportion map, spot inspector, compare, save, and
for DestVI results the expression of a chosen gene within a chosen cell type.

One :class:`Workbench` per viewer keeps the runs; the docks are thin views over it, and every colour is
computed as RGBA by :mod:`.views` or :mod:`..colors` so what is drawn is what the engine returned.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QLabel, QListWidget, QListWidgetItem, QVBoxLayout, QWidget

from .. import keys
from ..api import destvi_imputed_expression
from ..colors import FILTERED_LABEL, cell_type_palette, palette_from_uns, rgba_for_labels
from .colorbar import add_colorbar, draw_colorbar
from .layers import PLUGIN_KEY, add_spot_layer, napari_points, set_spot_colors
from .notify import status_label
from .session import session_for
from .views import SPOT_CLASS_COLORS, colormap_rgba, compare_proportions, expression_rgba, nearest_spot

COLORMAPS = ("viridis", "magma", "inferno", "plasma", "cividis", "Reds", "Blues", "Greens")
IMPUTE_CHUNK_VALUES = 4_000_000  # spots x states x genes per imputation step (~32 MB of float64)


@dataclass
class RunRecord:
    name: str
    key: str
    adata: object
    result: object
    coords_yx: np.ndarray
    size: float
    palette: dict[str, str]
    source: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)
    hidden: set = field(default_factory=set)
    raster: object = None

    @functools.cached_property
    def tree(self):
        from scipy.spatial import cKDTree

        return cKDTree(self.coords_yx[:, -2:])

    @property
    def proportions(self) -> pd.DataFrame:
        return self.adata.obsm[keys.proportions(self.key)]

    @property
    def cell_types(self) -> list[str]:
        return list(self.proportions.columns)

    @property
    def dominant(self) -> np.ndarray:
        return self.adata.obs[keys.dominant_type(self.key)].astype(str).to_numpy()


def destvi_state(rec: RunRecord) -> dict | None:
    """The DestVI model state a run carries for imputation (``uns['destvi_model']``), or None for other methods."""
    for holder in (getattr(rec.result, "uns", None), getattr(rec.adata, "uns", None)):
        if holder is not None and "destvi_model" in holder:
            return holder["destvi_model"]
    return None


def impute_gene_steps(state: dict, cell_type: str, gene: str, chunk: int | None = None):
    """DestVI's imputed expression of ``gene`` within ``cell_type`` at every spot, a chunk of spots at a time.

    A generator for a worker: yields the fraction of spots done after each chunk and returns the values
    (one per spot, fractions of a cell's library, as :func:`spatial_deconv_gui.api.destvi_imputed_expression`).
    """
    n_spots = len(state["barcodes"])
    n_states = int(np.asarray(state["mode_weights"]).shape[1])
    if chunk is None:
        chunk = max(256, IMPUTE_CHUNK_VALUES // max(1, n_states * len(state["genes"])))
    out = np.empty(n_spots, dtype=np.float64)
    for start in range(0, n_spots, chunk):
        idx = np.arange(start, min(n_spots, start + chunk))
        out[idx] = destvi_imputed_expression(state, cell_type, genes=[gene], spots=idx).to_numpy()[:, 0]
        yield float(idx[-1] + 1) / n_spots
    return out


def workbench_for(viewer) -> Workbench:
    session = session_for(viewer)
    if session.workbench is None:
        session.workbench = Workbench(session.viewer)
    return session.workbench


class Workbench:
    def __init__(self, viewer):
        self.viewer = viewer
        self.runs: dict[str, RunRecord] = {}
        self.comparison = None
        self.results = ResultsWidget(self)
        self.legend = LegendWidget(self)
        self.inspector = InspectorWidget(self)
        self._docked = False
        self._last_hover = None
        viewer.mouse_drag_callbacks.append(self._on_click)
        viewer.mouse_move_callbacks.append(self._on_hover)

    # -- docks ---------------------------------------------------------------------------------------
    def ensure_docks(self):
        if self._docked:
            return
        win = self.viewer.window
        win.add_dock_widget(self.legend, name="Legend", area="left")
        win.add_dock_widget(self.results.native, name="Results", area="right")
        win.add_dock_widget(self.inspector, name="Spot inspector", area="right")
        self._docked = True

    # -- runs ----------------------------------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        n = 1
        while f"{base} #{n}" in self.runs:
            n += 1
        return f"{base} #{n}"

    def add_run(
        self, run, coords_xy: np.ndarray, size: float, name: str | None = None, source: dict | None = None, raster=None
    ) -> RunRecord:
        """Add a finished run's layers and docks in one go (scripts, headless use)."""
        steps = self.add_run_steps(run, coords_xy, size, name, source, raster)
        for _ in steps:
            pass
        return self.runs[self._last_added]

    def add_run_steps(
        self, run, coords_xy: np.ndarray, size: float, name: str | None = None, source: dict | None = None, raster=None
    ):
        """The same work as :meth:`add_run` cut into short steps, so a GUI can yield to the event loop between them."""
        result = run.result
        name = name or self.unique_name(f"{result.method} {result.mode or ''}".strip())
        types = [str(t) for t in result.cell_types]
        palette = cell_type_palette(
            types + [FILTERED_LABEL], palette_from_uns(types, run.adata.uns.get("cell_type_colors"))
        )
        rec = RunRecord(
            name, result.key, run.adata, result, napari_points(coords_xy), size, palette, source or {}, raster=raster
        )
        self.runs[name] = rec
        self._last_added = name
        yield from self._add_layers(rec)
        yield
        self.ensure_docks()
        yield
        self.results.refresh(select=name)
        yield
        self.legend.show_run(rec)

    def _meta(self, rec: RunRecord, kind: str) -> dict:
        return {PLUGIN_KEY: {"kind": kind, "run": rec.name, "key": rec.key}}

    def _add_layers(self, rec: RunRecord):
        props = rec.proportions
        feats = None
        if rec.raster is None:  # image layers carry no per-spot table; the inspector reads the AnnData
            feats = pd.concat([pd.DataFrame({"dominant_type": rec.dominant}), props.reset_index(drop=True)], axis=1)
        first = rec.cell_types[0]
        common = dict(size=rec.size, raster=rec.raster)
        rec.layers["proportions"] = add_spot_layer(
            self.viewer,
            rec.coords_yx,
            rgba=colormap_rgba(props[first].to_numpy()),
            name=f"{rec.name}: proportion",
            metadata={**self._meta(rec, "proportions"), "cell_type": first, "colormap": "viridis"},
            features=feats,
            visible=False,
            **common,
        )
        yield
        cls_col = keys.spot_class(rec.key)
        if cls_col in rec.adata.obs:
            classes = rec.adata.obs[cls_col].astype(str).to_numpy()
            rec.layers["spot_class"] = add_spot_layer(
                self.viewer,
                rec.coords_yx,
                rgba=rgba_for_labels(classes, SPOT_CLASS_COLORS),
                name=f"{rec.name}: spot class",
                metadata={**self._meta(rec, "spot_class"), "palette": SPOT_CLASS_COLORS},
                features=None if feats is None else pd.DataFrame({"spot_class": classes}),
                visible=False,
                **common,
            )
            yield
        rec.layers["dominant"] = add_spot_layer(
            self.viewer,
            rec.coords_yx,
            rgba=rgba_for_labels(rec.dominant, rec.palette),
            name=f"{rec.name}: dominant type",
            metadata={**self._meta(rec, "dominant_type"), "palette": rec.palette},
            features=feats,
            **common,
        )
        self.viewer.layers.selection.active = rec.layers["dominant"]

    def set_hidden(self, rec: RunRecord, hidden: set[str]):
        rec.hidden = set(hidden)
        set_spot_colors(rec.layers["dominant"], rgba_for_labels(rec.dominant, rec.palette, rec.hidden))

    def show_proportion(self, rec: RunRecord, cell_type: str, cmap: str = "viridis"):
        layer = rec.layers["proportions"]
        set_spot_colors(layer, colormap_rgba(rec.proportions[cell_type].to_numpy(), cmap))
        layer.metadata.update(cell_type=cell_type, colormap=cmap)
        layer.name = f"{rec.name}: proportion"

    # -- expression within a cell type (DestVI) ----------------------------------------------------------
    def impute_values(self, rec: RunRecord, gene: str, cell_type: str) -> np.ndarray:
        """Imputed expression of ``gene`` within ``cell_type`` per spot, computed here (scripts, tests)."""
        state = destvi_state(rec)
        if state is None:
            raise ValueError(
                f"{rec.name!r} is a {rec.result.method} result; expression within a cell type needs a DestVI result."
            )
        steps = impute_gene_steps(state, cell_type, gene)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return self.to_slide_order(rec, stop.value)

    @staticmethod
    def to_slide_order(rec: RunRecord, values: np.ndarray) -> np.ndarray:
        """Values in the model's spot order (its barcodes) put in the slide's order; NaN where the model has none."""
        state = destvi_state(rec)
        barcodes = np.asarray(state["barcodes"]).astype(str)
        obs = np.asarray(rec.adata.obs_names).astype(str)
        if np.array_equal(barcodes, obs):
            return np.asarray(values, dtype=np.float64)
        return pd.Series(np.asarray(values, dtype=np.float64), index=barcodes).reindex(obs).to_numpy()

    def show_expression(self, rec: RunRecord, gene: str, cell_type: str, values: np.ndarray, cmap: str = "viridis"):
        """Colour one layer per run by ``values`` (imputed expression of ``gene`` within ``cell_type``)."""
        values = np.asarray(values, dtype=np.float64)
        rgba, vmin, vmax = expression_rgba(values, cmap)
        name = f"{rec.name}: {gene} in {cell_type}"
        meta = {
            **self._meta(rec, "imputed_expression"),
            "gene": gene,
            "cell_type": cell_type,
            "values": values,
            "vmin": vmin,
            "vmax": vmax,
            "colormap": cmap,
        }
        layer = rec.layers.get("expression")
        if layer is not None and layer in self.viewer.layers:
            set_spot_colors(layer, rgba)
            if rec.raster is None:
                layer.features = pd.DataFrame({"expression": values})  # a whole new table (napari 0.9)
            layer.metadata.update(meta)
            layer.name = name
            layer.visible = True
        else:
            layer = add_spot_layer(
                self.viewer,
                rec.coords_yx,
                rec.size,
                rgba,
                name,
                metadata=meta,
                raster=rec.raster,
                features=None if rec.raster is not None else pd.DataFrame({"expression": values}),
            )
            rec.layers["expression"] = layer
        self.viewer.layers.selection.active = layer
        return layer

    # -- compare -------------------------------------------------------------------------------------
    def compare(self, name_a: str, name_b: str, cmap: str = "magma"):
        a, b = self.runs[name_a], self.runs[name_b]
        if a.adata.n_obs != b.adata.n_obs or not np.array_equal(a.coords_yx, b.coords_yx):
            raise ValueError(f"{name_a!r} and {name_b!r} are on different slides; compare runs on one slide.")
        cmp = compare_proportions(a.proportions.to_numpy(), a.cell_types, b.proportions.to_numpy(), b.cell_types)
        rgba = colormap_rgba(cmp.js, cmap, 0.0, 1.0)
        feats = pd.DataFrame(
            {
                "same_dominant_type": cmp.same_dominant,
                "js_distance": cmp.js,
                f"dominant ({name_a})": a.dominant,
                f"dominant ({name_b})": b.dominant,
            }
        )
        name = f"compare: {name_a} vs {name_b}"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        layer = add_spot_layer(
            self.viewer,
            a.coords_yx,
            a.size,
            rgba,
            name,
            raster=a.raster,
            features=None if a.raster is not None else feats,
            metadata={
                PLUGIN_KEY: {"kind": "comparison"},
                "summary": cmp.summary(),
                "colormap": cmap,
                "js_distance": cmp.js,
            },
        )
        self.comparison = (layer, cmp)
        return layer, cmp

    # -- inspector -----------------------------------------------------------------------------------
    def active_run(self) -> RunRecord | None:
        layer = self.viewer.layers.selection.active
        if layer is not None:
            name = layer.metadata.get(PLUGIN_KEY, {}).get("run")
            if name in self.runs:
                return self.runs[name]
        return self.runs.get(self.results.run.value) if self.runs else None

    def inspect_at(self, position) -> int | None:
        rec = self.active_run()
        if rec is None:
            return None
        idx = nearest_spot(rec.tree, position, max_dist=rec.size * 0.6)
        if idx is not None:
            self.inspector.show_spot(rec, idx)
        return idx

    def _on_click(self, viewer, event):
        if event.type == "mouse_press" and self.runs:
            self.inspect_at(event.position)

    def _on_hover(self, viewer, event):
        if not self.runs or not self.inspector.follow_hover:
            return
        rec = self.active_run()
        if rec is None:
            return
        idx = nearest_spot(rec.tree, event.position, max_dist=rec.size * 0.6)
        if idx is not None and (rec.name, idx) != self._last_hover:
            self._last_hover = (rec.name, idx)
            self.inspector.show_spot(rec, idx)

    # -- save ----------------------------------------------------------------------------------------
    def save_h5ad(self, rec: RunRecord, path) -> Path:
        """An .h5ad, or for a slide opened from a SpatialData .zarr and a ``.zarr`` path, a new SpatialData store
        with the slide's elements and the result as its table."""
        from .. import api

        inputs = tuple(rec.source.get("inputs", ()))
        return api.save_result(
            rec.adata,
            path,
            protect=inputs,
            source=inputs[0] if inputs else None,
            table=rec.source.get("slide_options", {}).get("table"),
        )

    def result_suffix(self, rec: RunRecord) -> str:
        """The save format that keeps the result where the user's data lives: .zarr for a SpatialData slide."""
        from ..io.slide import detect_format

        inputs = rec.source.get("inputs", ())
        return ".zarr" if inputs and detect_format(inputs[0]) == "spatialdata" else ".h5ad"

    def export_csv(self, rec: RunRecord, path) -> Path:
        from ..io.write import write_text_atomic

        return write_text_atomic(rec.proportions.to_csv(), path)

    def save_figure(self, path) -> Path:
        """The whole window (canvas, legend, docks) when OpenGL renders, else a matplotlib map with legend."""
        from ..io.write import atomic_path

        try:
            with atomic_path(path, ".png") as tmp:
                self.viewer.screenshot(str(tmp), canvas_only=False, flash=False)
        except Exception:  # no OpenGL context (offscreen Qt): draw the map with matplotlib instead
            from ..figures import result_figure

            rec = self.active_run()
            return result_figure(rec.adata, rec.key, path)
        return Path(path)


class LegendWidget(QWidget):
    """Categorical legend for the dominant-type layer; unticking a type hides its spots."""

    def __init__(self, workbench: Workbench):
        super().__init__()
        self.workbench = workbench
        self.run: RunRecord | None = None
        self.title = QLabel("no result yet")
        self.list = QListWidget()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.title)
        lay.addWidget(self.list)
        self.list.itemChanged.connect(self._on_item)
        self.list.setMinimumHeight(150)

    def show_run(self, rec: RunRecord):
        self.run = rec
        self.title.setText(f"{rec.name}: dominant type")
        self.list.blockSignals(True)
        self.list.clear()
        counts = pd.Series(rec.dominant).value_counts()
        for t in rec.cell_types + ([FILTERED_LABEL] if FILTERED_LABEL in counts else []):
            pix = QPixmap(14, 14)
            pix.fill(QColor.fromRgbF(*to_rgba(rec.palette[t])))
            item = QListWidgetItem(QIcon(pix), f"{t} ({int(counts.get(t, 0))})")
            item.setData(Qt.ItemDataRole.UserRole, t)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Unchecked if t in rec.hidden else Qt.CheckState.Checked)
            self.list.addItem(item)
        self.list.blockSignals(False)

    def labels(self) -> list[str]:
        return [self.list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.list.count())]

    def set_visible(self, cell_type: str, visible: bool):
        for i in range(self.list.count()):
            item = self.list.item(i)
            if item.data(Qt.ItemDataRole.UserRole) == cell_type:
                item.setCheckState(Qt.CheckState.Checked if visible else Qt.CheckState.Unchecked)

    def _on_item(self, _item):
        if self.run is None:
            return
        hidden = {
            self.list.item(i).data(Qt.ItemDataRole.UserRole)
            for i in range(self.list.count())
            if self.list.item(i).checkState() != Qt.CheckState.Checked
        }
        self.workbench.set_hidden(self.run, hidden)


class InspectorWidget(QWidget):
    """Composition of one spot as a bar chart, with the method's scores."""

    def __init__(self, workbench: Workbench):
        super().__init__()
        self.workbench = workbench
        self.follow_hover = True
        self.current: tuple[str, int] | None = None
        self.figure = Figure(figsize=(3.2, 2.4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(170)
        self.text = QLabel("click or hover a spot")
        self.text.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.canvas)
        lay.addWidget(self.text)
        self.shown: dict[str, float] = {}

    def show_spot(self, rec: RunRecord, idx: int):
        self.current = (rec.name, idx)
        row = rec.proportions.iloc[idx]
        barcode = str(rec.adata.obs_names[idx])
        self.figure.clear()
        ax = self.figure.add_subplot(111)
        if row.isna().any():
            self.shown = {}
            ax.text(0.5, 0.5, "filtered: not fitted", ha="center", va="center")
            ax.set_axis_off()
        else:
            nz = row[row > 1e-3].sort_values()
            self.shown = {str(k): float(v) for k, v in nz.items()}
            ax.barh(list(nz.index), nz.to_numpy(), color=[rec.palette[t] for t in nz.index])
            ax.set_xlim(0, 1)
            ax.set_xlabel("proportion")
            ax.tick_params(labelsize=8)
        ax.set_title(barcode, fontsize=9)
        self.canvas.draw_idle()
        obs = rec.adata.obs.iloc[idx]
        score_columns = [c for c in obs.index if c.startswith(f"{rec.key}_") and c != keys.dominant_type(rec.key)]
        score_columns += [c for c in (keys.NUMI,) if c in obs.index]
        parts = [f"<b>{barcode}</b> ({rec.name})", f"dominant: {rec.dominant[idx]}"]
        parts += [f"{k.removeprefix(rec.key + '_')}: {_fmt(obs[k])}" for k in score_columns]
        self.text.setText("<br>".join(parts))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)


class ImputeWidget(Container):
    """Expression within a cell type (DestVI results): pick a gene (with search) and a cell type, Paint."""

    def __init__(self, workbench: Workbench):
        super().__init__(labels=True)
        self.workbench = workbench
        self.rec: RunRecord | None = None
        self._worker = None
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
        self.colorbar_fig, self.colorbar = add_colorbar(self)
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
        return self._worker is not None

    def set_run(self, rec: RunRecord | None):
        self.rec = rec
        self.gene.reset_choices()
        self.cell_type.reset_choices()
        self.native.setVisible(self.available)
        layer = rec.layers.get("expression") if rec is not None else None
        self.status.value = "" if layer is None else f"shown: {layer.metadata['gene']} in {layer.metadata['cell_type']}"

    def paint(self):
        from napari.qt.threading import create_worker

        if self._worker is not None:
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
        self.status.value = f"imputing {gene} in {cell_type}..."
        self.paint_btn.enabled = False

        def job():
            # superqt only warns about a RuntimeError (torch's errors) raised in a worker, and never reports it:
            # every failure comes back as a value instead, to become a notification here.
            try:
                values = yield from impute_gene_steps(state, cell_type, gene)
            except Exception as exc:
                return None, exc
            return values, None

        # Handlers go in at creation: without an "errored" handler there, superqt re-raises in the event loop.
        self._worker = create_worker(
            job,
            _start_thread=False,
            _connect={
                "yielded": lambda f: setattr(self.status, "value", f"imputing {gene} in {cell_type}: {100 * f:.0f}%"),
                "returned": functools.partial(self._on_returned, rec, gene, cell_type),
                "errored": self._on_error,
                "finished": self._on_finished,
            },
        )
        self._worker.start()

    def _on_returned(self, rec: RunRecord, gene: str, cell_type: str, out):
        values, exc = out
        if exc is not None:
            self._on_error(exc)
        else:
            self._on_values(rec, gene, cell_type, values)

    def _on_values(self, rec: RunRecord, gene: str, cell_type: str, values: np.ndarray, slide_order: bool = False):
        if not slide_order:
            values = self.workbench.to_slide_order(rec, values)
        layer = self.workbench.show_expression(rec, gene, cell_type, values, self.cmap.value)
        meta = layer.metadata
        self._draw_colorbar(
            f"{gene} in {cell_type} (fraction of a cell's counts)", meta["colormap"], meta["vmin"], meta["vmax"]
        )
        self.status.value = f"shown: {gene} in {cell_type}, 0 to {meta['vmax']:.3g}"

    def _recolour(self, _v=None):
        layer = self.rec.layers.get("expression") if self.rec is not None else None
        if layer is None or layer not in self.workbench.viewer.layers:
            return
        m = layer.metadata
        self._on_values(self.rec, m["gene"], m["cell_type"], m["values"], slide_order=True)

    def _on_error(self, exc):
        from .notify import notify_error

        self.status.value = "failed: see the notification"
        notify_error(exc, "Expression within a cell type")

    def _on_finished(self):
        self._worker = None
        self.paint_btn.enabled = True

    def _draw_colorbar(self, label: str, cmap: str, vmin: float, vmax: float):
        draw_colorbar(self.colorbar_fig, self.colorbar, label, cmap, vmin, vmax)


class ResultsWidget(Container):
    """Pick a run, colour its proportion layer by one cell type, compare two runs, save; for DestVI runs, paint
    a gene's expression within a cell type."""

    def __init__(self, workbench: Workbench):
        super().__init__(labels=True)
        self.workbench = workbench
        self.run = ComboBox(label="result", choices=lambda _w: list(workbench.runs))
        self.cell_type = ComboBox(
            label="proportion of", choices=self._types, tooltip="Colour the proportion layer by this cell type."
        )
        self.cmap = ComboBox(label="colormap", choices=COLORMAPS, value="viridis")
        self.run_b = ComboBox(label="compare with", choices=lambda _w: list(workbench.runs))
        self.compare_btn = PushButton(text="Compare")
        self.summary = Label(label="", value="")
        self.save_btn = PushButton(text="Save result (.h5ad / .zarr)...")
        self.csv_btn = PushButton(text="Export proportions (.csv)...")
        self.fig_btn = PushButton(text="Save figure (.png)...")
        self.extend(
            [
                self.run,
                self.cell_type,
                self.cmap,
                self.run_b,
                self.compare_btn,
                self.summary,
                self.save_btn,
                self.csv_btn,
                self.fig_btn,
            ]
        )
        self.colorbar_fig, self.colorbar = add_colorbar(self)
        self.impute = ImputeWidget(workbench)
        self.native.layout().addWidget(self.impute.native)
        self.run.changed.connect(self._on_run)
        self.cell_type.changed.connect(self._apply)
        self.cmap.changed.connect(self._apply)
        self.compare_btn.clicked.connect(self._on_compare)
        self.save_btn.clicked.connect(self._save_result)
        self.csv_btn.clicked.connect(lambda: self._ask_and(".csv", self.workbench.export_csv))
        self.fig_btn.clicked.connect(lambda: self._ask_and(".png", lambda _r, p: self.workbench.save_figure(p)))

    def _types(self, _w=None):
        rec = self.workbench.runs.get(self.run.value) if hasattr(self, "run") else None
        return rec.cell_types if rec else []

    def refresh(self, select: str | None = None):
        self.run.reset_choices()
        self.run_b.reset_choices()
        if select:
            self.run.value = select
        self._on_run()

    def _on_run(self, _v=None):
        self.cell_type.reset_choices()
        self._apply()
        rec = self.workbench.runs.get(self.run.value)
        self.impute.set_run(rec)
        if rec is not None:
            self.workbench.legend.show_run(rec)

    def _apply(self, _v=None):
        rec = self.workbench.runs.get(self.run.value)
        if rec is None or self.cell_type.value is None:
            return
        self.workbench.show_proportion(rec, self.cell_type.value, self.cmap.value)
        self._draw_colorbar(f"proportion of {self.cell_type.value}", self.cmap.value)

    def _draw_colorbar(self, label: str, cmap: str):
        draw_colorbar(self.colorbar_fig, self.colorbar, label, cmap)

    def _on_compare(self):
        from .notify import notify_error

        a, b = self.run.value, self.run_b.value
        if not a or not b or a == b:
            self.summary.value = "pick two different results to compare"
            return
        try:
            _, cmp = self.workbench.compare(a, b)
        except Exception as exc:
            notify_error(exc, "Compare")
            return
        s = cmp.summary()
        self.summary.value = (
            f"{s['spots_compared']} spots: dominant type agrees on "
            f"{100 * s['dominant_type_agreement']:.1f}%; median JS distance {s['median_js_distance']:.3f}"
        )
        self._draw_colorbar("Jensen-Shannon distance", "magma")

    def _save_result(self):
        rec = self.workbench.runs.get(self.run.value)
        if rec is not None:
            self._ask_and(self.workbench.result_suffix(rec), self.workbench.save_h5ad)

    def _ask_and(self, suffix: str, action):
        from qtpy.QtWidgets import QFileDialog

        from .notify import notify_error, notify_info

        rec = self.workbench.runs.get(self.run.value)
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
