"""In-silico knockouts in napari: train a spatial GRN model, knock genes out, watch the shift spread.

Thin widgets over :mod:`spatial_deconv_gui.perturb_api`; training and propagation run in workers and stream
their progress (per gene, per step) back; every colour and arrow drawn is the engine's numbers.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
)
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QObject, QTimer, Signal

from .. import keys
from ..api import Cancelled, RunControl
from ..isolated import run_isolated
from .colorbar import add_colorbar, draw_colorbar
from .layers import PLUGIN_KEY, refresh_slide_picker, slide_layer_choices
from .notify import notify_error, notify_info, status_label
from .session import session_for
from .views import colormap_rgba

SPECIES = ("mouse", "human", "other")
STREAM_INTERVAL_MS = 200


# -- remembered prior files ------------------------------------------------------------------------------
def _settings_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("spatial-deconv-gui")) / "perturb_priors.json"


def remembered_priors(species: str) -> dict[str, str]:
    try:
        return json.loads(_settings_path().read_text()).get(species, {})
    except (OSError, ValueError):
        return {}


def remember_priors(species: str, files: dict[str, str]):
    from ..io.write import write_text_atomic

    path = _settings_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[species] = {k: v for k, v in files.items() if v}
    write_text_atomic(json.dumps(data, indent=2), path)


def _file(value) -> str | None:
    return str(value) if value and str(value) not in (".", "") and Path(str(value)).is_file() else None


def slide_adata(layer):
    """The AnnData behind a slide layer, read from its file or folder."""
    from ..io.slide import read_slide_adata

    meta = layer.metadata.get(PLUGIN_KEY, {})
    path = meta.get("adata_path")
    if not path:
        raise ValueError(f"layer {layer.name!r} was not opened from a file")
    return read_slide_adata(path, **meta.get("read_options", {}))


def diverging_rgba(values: np.ndarray, vmax: float | None = None) -> tuple[np.ndarray, float]:
    """Blue (down) - white - red (up), symmetric around 0."""
    v = np.asarray(values, dtype=float)
    # the 99th percentile, so a few extreme cells (the perturbed ones) do not wash out the rest
    vmax = float(vmax if vmax is not None else (np.nanpercentile(np.abs(v), 99) if v.size else 0.0)) or 1.0
    return colormap_rgba(v, "RdBu_r", -vmax, vmax), vmax


def grid_vectors_yx(points_xy: np.ndarray, vectors_xy: np.ndarray, length: float = 1.0) -> np.ndarray:
    """napari Vectors data (N, 2, 2): position and direction in (y, x), NaN grid cells left out."""
    vectors_xy = np.asarray(vectors_xy, dtype=float)
    norm = np.linalg.norm(np.nan_to_num(vectors_xy), axis=1)
    # arrows a millionth of the longest are invisible; leaving them out keeps the layer light
    ok = np.isfinite(vectors_xy).all(axis=1) & (norm > 1e-6 * (norm.max() if norm.size else 0.0))
    pos = np.asarray(points_xy)[ok][:, ::-1]
    vec = np.asarray(vectors_xy)[ok][:, ::-1] * length
    return np.stack([pos, vec], axis=1)


class _Relay(QObject):
    progressed = Signal(object)
    stepped = Signal(object)


# -- the shared state: one per viewer ----------------------------------------------------------------------
@dataclass
class Perturbation:
    name: str
    adata: object  # AnnData copy with layers['perturb_delta'], obsm vectors, uns['perturb']
    genes: list
    layers: dict = field(default_factory=dict)

    def delta(self, gene: str) -> np.ndarray:
        col = list(self.adata.var_names).index(gene)
        return np.asarray(self.adata.layers[keys.PERTURB_DELTA][:, col].todense()).ravel()

    @cached_property
    def moved(self) -> pd.Series:
        """Mean |Δ| per gene over all cells, largest first (computed once: the run never changes)."""
        d = self.adata.layers[keys.PERTURB_DELTA]
        mean_abs = np.asarray(abs(d).mean(axis=0)).ravel()
        return pd.Series(mean_abs, index=list(self.adata.var_names)).sort_values(ascending=False)


class PerturbState:
    def __init__(self, viewer):
        self.viewer = viewer
        self.model = None
        self.slide_layer = None
        self.runs: dict[str, Perturbation] = {}

    @property
    def world_per_coord(self) -> float:
        meta = self.slide_layer.metadata.get(PLUGIN_KEY, {}) if self.slide_layer is not None else {}
        return float(meta.get("world_per_coord", 1.0))

    def cells_yx(self) -> np.ndarray:
        """The model's cells in the slide's world frame (napari order), where the slide and its image lie."""
        return np.asarray(self.model.coords, dtype=float)[:, :2][:, ::-1] * self.world_per_coord


def perturb_state(viewer) -> PerturbState:
    session = session_for(viewer)
    if session.perturb is None:
        session.perturb = PerturbState(session.viewer)
    return session.perturb


# -- Train -----------------------------------------------------------------------------------------------
class TrainWidget(Container):
    """Train (or load) the spatial GRN model of a slide."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.state = perturb_state(napari_viewer)
        self._worker = None
        self._cancel = None
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)
        self._obs_columns: list[str] = []
        self._layers: list[str] = []
        self.train_options: dict = {}  # further TrainConfig fields, for scripting (e.g. l1_reg)
        self.slide = ComboBox(label="slide layer", choices=self._slides, nullable=True)
        self.expression = ComboBox(
            label="expression",
            choices=lambda _w: self._layers,
            tooltip="Smoothed (imputed) expression works best; else log-normalised counts.",
        )
        self.cluster_col = ComboBox(
            label="cluster column",
            choices=lambda _w: self._obs_columns,
            tooltip="One model per cluster: a cell-type annotation or a deconvolution's dominant type.",
        )
        self.species = ComboBox(
            label="species", choices=SPECIES, value="mouse", tooltip="Prior files are remembered per species."
        )
        self.grn = FileEdit(
            label="TF → target prior",
            mode="r",
            filter="*.csv *.tsv *.parquet",
            tooltip="Table with tf/source/regulator and target columns (DoRothEA, CellOracle...).",
        )
        self.lr = FileEdit(
            label="ligand–receptor prior",
            mode="r",
            filter="*.csv *.tsv *.parquet",
            tooltip="ligand/receptor table (CellChat, LIANA...); complexes as A_B.",
        )
        self.radius = FloatSpinBox(
            label="radius (µm)",
            value=0.0,
            min=0.0,
            max=1e5,
            step=10.0,
            tooltip="Secreted ligands reach neighbours with weight exp(-d²/2r²): most signal "
            "comes from within ~2r. 0 = five times the median cell spacing.",
        )
        self.contact = FloatSpinBox(
            label="contact distance (µm)",
            value=0.0,
            min=0.0,
            max=1e5,
            step=5.0,
            tooltip="Contact-dependent pairs (Cell-Cell Contact) act only between cells this close. 0 = radius / 4.",
        )
        self.model_dir = FileEdit(
            label="model folder",
            mode="d",
            tooltip="Where the model is written; training resumes here, skipping finished genes.",
        )
        self.train_btn = PushButton(text="Train")
        self.load_btn = PushButton(text="Load model")
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1000, value=0)
        self.status = status_label("pick a slide, priors and a model folder")
        self.extend(
            [
                self.slide,
                self.expression,
                self.cluster_col,
                self.species,
                self.grn,
                self.lr,
                self.radius,
                self.contact,
                self.model_dir,
                self.train_btn,
                self.load_btn,
                self.cancel_btn,
                self.progress,
                self.status,
            ]
        )
        self.slide.changed.connect(self._on_slide)
        self.species.changed.connect(self._on_species)
        self.train_btn.clicked.connect(self.train)
        self.load_btn.clicked.connect(self.load)
        self.cancel_btn.clicked.connect(self.cancel)
        napari_viewer.layers.events.inserted.connect(self._refresh)
        napari_viewer.layers.events.removed.connect(self._refresh)
        self._on_species()
        self._refresh()

    def _slides(self, _w=None):
        return slide_layer_choices(self.viewer)

    def _refresh(self, _e=None):
        self._on_slide(refresh_slide_picker(self.slide))

    def _on_slide(self, layer):
        if layer is None:
            return
        import anndata as ad
        import h5py

        meta = layer.metadata.get(PLUGIN_KEY, {})
        path = meta.get("adata_path")
        if path and str(path).endswith(".h5ad"):  # only obs and layer names: no need to read the counts
            with h5py.File(path, "r") as f:
                obs = ad.io.read_elem(f["obs"])
                self._layers = ["X"] + (list(f["layers"].keys()) if "layers" in f else [])
        elif path:
            adata = slide_adata(layer)
            obs, self._layers = adata.obs, ["X"] + list(adata.layers.keys())
        if path:
            self._obs_columns = [c for c in obs.columns if not pd.api.types.is_float_dtype(obs[c])]
        from .workbench import workbench_for

        # a deconvolution's dominant type can serve as the cluster column
        for name, rec in workbench_for(self.viewer).runs.items():
            if rec.adata.n_obs == meta.get("n_spots"):
                self._obs_columns.append(f"{keys.dominant_type(rec.key)} ({name})")
        self.expression.reset_choices()
        self.cluster_col.reset_choices()
        for guess in ("cluster", "cell_type", "celltype", "leiden", "louvain"):
            if guess in self._obs_columns:
                self.cluster_col.value = guess
                break
        preferred = [lay for lay in ("imputed_count", "imputed", "lognorm", "log1p") if lay in self._layers]
        if preferred:
            self.expression.value = preferred[0]
        for key, widget in (("grn_path", self.grn), ("lr_path", self.lr)):
            if meta.get(key):
                widget.value = meta[key]
        for key, widget in (("radius", self.radius), ("contact_radius", self.contact)):
            if meta.get(key):
                widget.value = float(meta[key])

    def _on_species(self, _v=None):
        files = remembered_priors(self.species.value)
        if files.get("grn") and not _file(self.grn.value):
            self.grn.value = files["grn"]
        if files.get("lr") and not _file(self.lr.value):
            self.lr.value = files["lr"]

    def _training_inputs(self):
        layer = self.slide.value
        if layer is None:
            raise ValueError("pick a slide layer")
        grn, lr = _file(self.grn.value), _file(self.lr.value)
        if not grn:
            raise ValueError("pick a TF → target prior file")
        out = str(self.model_dir.value) if str(self.model_dir.value) not in ("", ".") else None
        if not out:
            raise ValueError("pick a model folder")
        adata = slide_adata(layer)
        col = self.cluster_col.value
        if col and " (" in col:  # a deconvolution result's dominant type
            from .workbench import workbench_for

            key, run = col.split(" (", 1)
            rec = workbench_for(self.viewer).runs[run.rstrip(")")]
            adata.obs[key] = rec.adata.obs[key].astype(str).to_numpy()
            col = key
        params = dict(self.train_options)
        if self.radius.value > 0:
            params["radius"] = float(self.radius.value)
        if self.contact.value > 0:
            params["contact_radius"] = float(self.contact.value)
        layer_name = None if self.expression.value in (None, "X") else self.expression.value
        return adata, grn, lr, col, out, layer_name, params

    def train(self):
        from napari.qt.threading import create_worker

        if self._worker is not None:
            return
        try:
            adata, grn, lr, col, out, layer_name, params = self._training_inputs()
        except Exception as exc:
            self.status.value = str(exc)
            notify_error(exc, "Train")
            return
        remember_priors(self.species.value, {"grn": grn, "lr": lr or ""})
        self._cancel = threading.Event()
        control = RunControl(self._relay.progressed.emit, self._cancel)

        def job():
            # a child process, so no numba compile or GIL-holding step of training can freeze the canvas
            kwargs = dict(spatial=adata, grn=grn, lr=lr, cluster_col=col, out=out, layer=layer_name, **params)
            return run_isolated(
                "spatial_deconv_gui.gui.warmup:train_model_for_gui",
                kwargs,
                control,
                threads=max(1, (os.cpu_count() or 2) - 1),
            )

        self._worker = create_worker(
            job,
            _start_thread=False,
            _connect={"returned": self._on_model, "errored": self._on_error, "finished": self._on_finished},
        )
        self.state.slide_layer = self.slide.value
        self.train_btn.enabled, self.cancel_btn.enabled = False, True
        self.status.value = "training..."
        self._worker.start()

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def load(self):
        from .. import perturb_api

        out = str(self.model_dir.value)
        try:
            model = perturb_api.load_model(out)
        except Exception as exc:
            notify_error(exc, "Load model")
            return
        self.state.slide_layer = self.slide.value
        self._on_model(model)

    def cancel(self):
        if self._cancel is not None:
            self._cancel.set()
            self.status.value = "cancelling after the current batch of genes..."

    def _on_progress(self, event):
        self.progress.value = int(1000 * event.fraction)
        self.status.value = f"{event.stage}: {100 * event.fraction:.0f}%" + (
            f" - {event.message}" if event.message else ""
        )

    def _on_model(self, model):
        self.state.model = model
        self.progress.value = 1000
        self.status.value = f"ready: {len(model.targets)} targets, {len(model.cluster_names)} clusters"
        notify_info(f"perturbation model ready ({len(model.targets)} targets)")
        session_for(self.viewer).model_changed.emit(model)

    def _on_error(self, exc):
        if isinstance(exc, Cancelled):
            self.status.value = "cancelled: finished genes are kept; Train again to resume"
            return
        self.status.value = "failed: see the notification"
        notify_error(exc, "Train")

    def _on_finished(self):
        self._worker = None
        self.train_btn.enabled, self.cancel_btn.enabled = True, False


# -- Knockout --------------------------------------------------------------------------------------------
SCOPES = ("all cells", "inside shapes", "selected points", "cluster")


class KnockoutWidget(Container):
    """Knock out or overexpress genes in a scope of cells and draw the shift it causes."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.state = perturb_state(napari_viewer)
        session = session_for(napari_viewer)
        session.knockout_docks.add(self)
        session.model_changed.connect(self.on_model)
        self._worker = None
        self._finishing = False
        self._cancel = None
        self._pending = None
        self._relay = _Relay()
        self._relay.stepped.connect(self._on_step)
        self._relay.progressed.connect(self._on_progress)
        self._timer = QTimer()
        self._timer.setInterval(STREAM_INTERVAL_MS)
        self._timer.timeout.connect(self._flush)
        self._gene_items: list[str] = []
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
        # results
        self.showing = ComboBox(
            label="perturbation",
            choices=lambda _w: list(self.state.runs),
            tooltip="Each run keeps its own group of layers (Δ map, vector field); the one "
            "picked here is shown and drives the controls below.",
        )
        self.show_gene = ComboBox(label="Δ of gene", choices=lambda _w: self._model_genes())
        self.arrow_length = FloatSlider(label="arrow length", value=1.0, min=0.1, max=10.0)
        self.arrow_density = SpinBox(
            label="arrow grid", value=40, min=5, max=200, tooltip="Arrows per side of the smoothing grid."
        )
        self.per_cell = CheckBox(label="per-cell arrows", value=False)
        self.compare_with = ComboBox(label="difference with", choices=lambda _w: list(self.state.runs), nullable=True)
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
        self.summary = SummaryWidget()
        self.search.changed.connect(lambda _v: self.genes.reset_choices())
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn.clicked.connect(self.cancel)
        self.showing.changed.connect(self._show_run)
        self.show_gene.changed.connect(self._recolour)
        self.arrow_length.changed.connect(self._redraw_vectors)
        self.arrow_density.changed.connect(self._redraw_vectors)
        self.per_cell.changed.connect(self._redraw_vectors)
        self.compare_with.changed.connect(self._difference)
        self.save_btn.clicked.connect(self._ask_save)
        napari_viewer.layers.events.inserted.connect(lambda _e: self.shapes.reset_choices())
        napari_viewer.layers.events.removed.connect(lambda _e: self.shapes.reset_choices())
        self.current: Perturbation | None = None
        self._summary_docked = False
        if self.state.model is not None:
            self.on_model(self.state.model)

    # choices
    def _model_genes(self):
        return list(self.state.model.genes) if self.state.model is not None else []

    def _filtered_genes(self):
        model = self.state.model
        if model is None:
            return []
        q = (self.search.value or "").strip().lower() if hasattr(self, "search") else ""
        trained = set(model.targets)
        return [(f"{g} (model)" if g in trained else g, g) for g in model.genes if q in g.lower()]

    def _clusters(self):
        return list(self.state.model.cluster_names) if self.state.model is not None else []

    def _shapes_layers(self, _w=None):
        return [(layer.name, layer) for layer in self.viewer.layers if type(layer).__name__ == "Shapes"]

    def on_model(self, model):
        self.genes.reset_choices()
        self.cluster.reset_choices()
        self.show_gene.reset_choices()
        self.status.value = f"model: {len(model.genes)} genes ({len(model.targets)} with models)"

    # scope
    def selected_cells(self) -> np.ndarray | None:
        """Indices of the cells the perturbation applies to (None = all)."""
        model, layer = self.state.model, self.state.slide_layer
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
        from matplotlib.path import Path as MplPath

        yx = self.state.cells_yx()
        inside = np.zeros(len(yx), dtype=bool)
        for poly in shapes.data:
            inside |= MplPath(np.asarray(poly)[:, -2:]).contains_points(yx)
        if not inside.any():
            raise ValueError("no cell lies inside the drawn shapes")
        return np.flatnonzero(inside)

    # run
    def run(self):
        from napari.qt.threading import create_worker

        from .. import perturb_api

        if self._worker is not None:
            return
        model = self.state.model
        try:
            if model is None:
                raise ValueError("train or load a model first")
            genes = list(self.genes.value)
            if not genes:
                raise ValueError("pick at least one gene")
            cells = self.selected_cells()
        except Exception as exc:
            self.status.value = str(exc)
            notify_error(exc, "Knockout")
            return
        adata = slide_adata(self.state.slide_layer) if self.state.slide_layer is not None else None
        if adata is not None and adata.n_obs != model.expr.shape[0]:
            adata = None
        value, steps = float(self.value.value), int(self.steps.value)
        self._cancel = threading.Event()
        control = RunControl(self._relay.progressed.emit, self._cancel)
        relay = self._relay

        def job():
            return perturb_api.run_perturbation(
                model, genes, value, cells=cells, steps=steps, adata=adata, on_step=relay.stepped.emit, control=control
            )

        self._run_genes = genes
        self._delta_layer("knockout (running)")  # created now, so streaming only recolours it
        self._worker = create_worker(
            job,
            _start_thread=False,
            _connect={"returned": self._on_done, "errored": self._on_error, "finished": self._on_finished},
        )
        self.run_btn.enabled, self.cancel_btn.enabled = False, True
        self.status.value = "propagating..."
        self._timer.start()
        self._worker.start()

    @property
    def busy(self) -> bool:
        return self._worker is not None or self._finishing

    def cancel(self):
        if self._cancel is not None:
            self._cancel.set()

    def _on_progress(self, event):
        self.progress.value = int(1000 * event.fraction)

    def _on_step(self, step):
        self._pending = step

    def _flush(self):
        """Stream the latest propagation step onto the Δ layer (at most ~5 redraws a second)."""
        step, self._pending = self._pending, None
        if step is None:
            return
        gene = self.show_gene.value or self._model_genes()[0]
        col = list(self.state.model.genes).index(gene)
        layer = self._delta_layer(f"knockout (step {step.step}/{step.n_steps})")
        rgba, vmax = diverging_rgba(step.delta[:, col])
        layer.face_color = rgba
        self.status.value = f"step {step.step} of {step.n_steps}"

    def _delta_layer(self, name: str):
        layer = getattr(self, "_stream_layer", None)
        if layer is None or layer not in self.viewer.layers:
            coords = self.state.cells_yx()
            size = (
                self.state.slide_layer.metadata.get(PLUGIN_KEY, {}).get("spot_size", 10.0)
                if self.state.slide_layer is not None
                else 10.0
            )
            layer = self.viewer.add_points(
                coords, name=name, size=size, border_width=0, metadata={PLUGIN_KEY: {"kind": "perturb_stream"}}
            )
            self._stream_layer = layer
        layer.name = name
        return layer

    def _on_done(self, adata):
        self._timer.stop()
        genes = self._run_genes
        base = f"KO {'+'.join(genes)}" if float(self.value.value) == 0 else f"OE {'+'.join(genes)}"
        n = 1
        while f"{base} #{n}" in self.state.runs:
            n += 1
        run = Perturbation(f"{base} #{n}", adata, genes)
        # the layer that streamed the steps becomes the run's Δ layer; the vector field and the summary follow in
        # later event-loop turns, so no single turn holds the canvas for all of it
        delta = self._delta_layer(f"{run.name}: Δ")
        delta.metadata[PLUGIN_KEY] = {"kind": "perturb_delta", "run": run.name}
        run.layers["delta"] = delta
        self._stream_layer = None
        self._finishing = True
        QTimer.singleShot(0, lambda: self._add_vectors_layer(run))

    def _add_vectors_layer(self, run: Perturbation):
        run.layers["vectors"] = self.viewer.add_vectors(
            np.zeros((0, 2, 2)),
            name=f"{run.name}: vector field",
            edge_width=2.5,
            edge_color="#39ff14",
            metadata={PLUGIN_KEY: {"kind": "perturb_vectors"}},
        )
        QTimer.singleShot(0, lambda: self._show_finished_run(run))

    def _show_finished_run(self, run: Perturbation):
        try:
            self._register_run(run)
        except Exception:
            self._finishing = False
            raise
        QTimer.singleShot(0, self._dock_summary)

    def _dock_summary(self):
        try:
            if not self._summary_docked:
                self.viewer.window.add_dock_widget(self.summary, name="Knockout summary", area="right")
                self._summary_docked = True
        finally:
            self._finishing = False

    def _register_run(self, run: Perturbation):
        genes, adata = run.genes, run.adata
        self.state.runs[run.name] = run  # only now: adding layers makes napari refresh the run picker
        moved = run.moved
        target = next((g for g in moved.index if g not in genes), moved.index[0])
        with self.show_gene.changed.blocked():  # _show_run below colours the new run by this gene, once
            self.show_gene.value = target
        self.compare_with.reset_choices()
        self.showing.reset_choices()
        self.showing.value = run.name  # -> _show_run: colours, arrows; the summary in the next turn
        self.progress.value = 1000
        took = float(adata.uns["perturb"]["runtime_s"])
        self.status.value = f"{run.name}: done in " + (f"{took:.1f} s" if took >= 0.1 else "under 0.1 s")

    def _show_run(self, name):
        run = self.state.runs.get(name) if name else None
        if run is None or run is self.current:
            return
        self.current = run
        for other in self.state.runs.values():
            for layer in other.layers.values():
                if layer in self.viewer.layers:
                    layer.visible = other is run
        self._recolour()
        self._redraw_vectors()
        QTimer.singleShot(0, lambda: self.summary.show(run, self.moved_genes(run), self.state.model))

    def moved_genes(self, run: Perturbation) -> pd.Series:
        return run.moved

    def _recolour(self, _v=None):
        run, gene = self.current, self.show_gene.value
        if run is None or gene is None or gene not in run.adata.var_names:
            return
        rgba, vmax = diverging_rgba(run.delta(gene))
        run.layers["delta"].face_color = rgba
        run.layers["delta"].name = f"{run.name}: Δ"
        run.layers["delta"].metadata["gene"] = gene
        self._draw_colorbar(f"Δ {gene}", vmax)

    def _draw_colorbar(self, label: str, vmax: float):
        draw_colorbar(self.colorbar_fig, self.colorbar, label, "RdBu_r", -vmax, vmax)

    def _redraw_vectors(self, _v=None):
        run = self.current
        if run is None:
            return
        pts = self.state.cells_yx()[:, ::-1]
        cell_vec = np.asarray(run.adata.obsm[keys.PERTURB_VECTORS])
        # arrows scaled so the longest grid arrow spans about one grid cell, times the length slider
        if self.per_cell.value:
            data_pts, data_vec = pts, cell_vec
            n_side = np.sqrt(len(pts))
        else:
            uns = run.adata.uns["perturb"]
            if int(self.arrow_density.value) == int(uns["parameters"].get("n_grid", -1)):
                data_pts = np.asarray(uns["grid_points"]) * self.state.world_per_coord
                data_vec = np.asarray(uns["grid_vectors"])
            else:
                from ..perturb_api import regrid_vectors  # perturb_api pulls in torch: not on opening the dock

                data_pts, data_vec = regrid_vectors(pts, cell_vec, int(self.arrow_density.value))
            n_side = self.arrow_density.value
        span = np.ptp(pts, axis=0).max() / max(n_side, 1)
        lengths = np.linalg.norm(np.nan_to_num(data_vec), axis=1)
        norm = np.percentile(lengths[lengths > 0], 95) if (lengths > 0).any() else 0.0
        scale = span / norm if norm and np.isfinite(norm) else 1.0
        run.layers["vectors"].data = grid_vectors_yx(data_pts, data_vec, scale * float(self.arrow_length.value))
        run.layers["vectors"].metadata["scale"] = scale * float(self.arrow_length.value)

    def _difference(self, other_name):
        run = self.current
        if run is None or not other_name or other_name == run.name:
            return
        other = self.state.runs[other_name]
        gene = self.show_gene.value
        diff = run.delta(gene) - other.delta(gene)
        rgba, vmax = diverging_rgba(diff)
        name = f"{run.name} − {other.name}: Δ {gene}"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        coords = self.state.cells_yx()
        self.viewer.add_points(
            coords,
            name=name,
            size=run.layers["delta"].size,
            border_width=0,
            face_color=rgba,
            metadata={PLUGIN_KEY: {"kind": "perturb_difference"}, "values": diff},
        )
        self._draw_colorbar(f"difference of Δ {gene}", vmax)

    def save(self, path) -> tuple[Path, Path]:
        from ..io.write import atomic_path, write_h5ad_atomic

        path = Path(path)
        out = write_h5ad_atomic(self.current.adata, path.with_suffix(".h5ad"))
        png = path.with_suffix(".png")
        try:
            with atomic_path(png, ".png") as tmp:
                self.viewer.screenshot(str(tmp), canvas_only=False, flash=False)
        except Exception:
            with atomic_path(png, ".png") as tmp:
                self.summary.figure.savefig(tmp, dpi=120)
        return out, png

    def _ask_save(self):
        from qtpy.QtWidgets import QFileDialog

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

    def _on_error(self, exc):
        self._timer.stop()
        stream = getattr(self, "_stream_layer", None)
        if stream is not None and stream in self.viewer.layers:
            self.viewer.layers.remove(stream)
        self._stream_layer = None
        if isinstance(exc, Cancelled):
            self.status.value = "cancelled"
            return
        self.status.value = "failed: see the notification"
        notify_error(exc, "Knockout")

    def _on_finished(self):
        self._worker = None
        self.run_btn.enabled, self.cancel_btn.enabled = True, False


class SummaryWidget(Container):
    """The genes that moved most (bar chart) and the mean shift per cluster."""

    def __init__(self):
        super().__init__(labels=False)
        self.figure = Figure(figsize=(3.4, 3.0), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.native.layout().addWidget(self.canvas)
        self.table = Label(value="")
        self.append(self.table)
        self.top: pd.Series | None = None
        self.per_cluster: pd.Series | None = None

    def show(self, run: Perturbation, moved: pd.Series, model):
        top = moved.head(10)
        mean = np.asarray(run.adata.layers[keys.PERTURB_DELTA].mean(axis=0)).ravel()
        signs = pd.Series(mean, index=list(run.adata.var_names))[top.index]
        self.top = signs
        self.figure.clear()
        ax = self.figure.add_subplot(111)
        ax.barh(
            list(top.index)[::-1],
            signs.to_numpy()[::-1],
            color=["#d6604d" if v > 0 else "#4393c3" for v in signs.to_numpy()[::-1]],
        )
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("mean Δ expression")
        ax.set_title(run.name, fontsize=9)
        ax.tick_params(labelsize=8)
        self.canvas.draw_idle()
        d = run.adata.layers[keys.PERTURB_DELTA]
        per_cell = np.asarray(abs(d).sum(axis=1)).ravel()
        self.per_cluster = pd.Series(per_cell).groupby(np.asarray(model.clusters)).mean().sort_values(ascending=False)
        self.table.value = "mean |Δ| per cell, by cluster:\n" + "\n".join(
            f"  {k}: {v:.3g}" for k, v in self.per_cluster.items()
        )
