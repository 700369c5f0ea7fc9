"""One :class:`Session` per napari viewer: the state every dock of the plugin reads and listens to.

The session hangs off the viewer as an attribute (not in a module-level table keyed by viewer), so it lives
exactly as long as its viewer and a second viewer in the same process gets a session of its own. It holds the
slides (the viewer's slide layers), the reference, the deconvolution results, the perturbation model and its
knockout runs, and the selection (which result, which run, which spot); each change is a signal. Docks never call
each other: a dock changes the session, and the docks that show that part of it, connected to its signals,
update themselves.

A result or a knockout run lives as long as one of its layers is in the viewer: when the user deletes the last of
them, the session forgets it (``result_removed`` / ``perturbation_removed``), so its AnnData is freed and a long
session's memory stays flat however many runs come and go.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from psygnal import Signal
from scipy.spatial import cKDTree

from .. import keys
from .layers import PLUGIN_KEY, show_alone, slide_layer_choices, spots_id

_ATTRIBUTE = "_spatial_deconv_session"


def real_viewer(viewer):
    """The viewer behind napari's PublicOnlyProxy, which refuses private attributes such as the session's."""
    while hasattr(type(viewer), "__wrapped__") or type(viewer).__name__ == "PublicOnlyProxy":
        inner = getattr(viewer, "__wrapped__", None)
        if inner is None or inner is viewer:
            break
        viewer = inner
    return viewer


@dataclass
class ResultRecord:
    """A deconvolution result on the canvas: the run's AnnData and result, its spots and its layers."""

    name: str
    key: str
    adata: object
    result: object
    coords_yx: np.ndarray
    size: float
    palette: dict[str, str]
    source: dict = field(default_factory=dict)  # the input paths and read options, for saving next to them
    layers: dict = field(default_factory=dict)
    hidden: set = field(default_factory=set)
    raster: object = None
    label: str = ""  # short and unique in the session ("rctd", "rctd #2"): what its layer names start with

    @functools.cached_property
    def tree(self) -> cKDTree:
        return cKDTree(self.coords_yx[:, -2:])

    @functools.cached_property
    def spots_id(self) -> str:
        """The same for every result on the same spots (one slide): its layers' ``spots`` in their metadata."""
        return spots_id(self.coords_yx)

    @property
    def proportions(self) -> pd.DataFrame:
        return self.adata.obsm[keys.proportions(self.key)]

    @property
    def cell_types(self) -> list[str]:
        return list(self.proportions.columns)

    @property
    def dominant(self) -> np.ndarray:
        return self.adata.obs[keys.dominant_type(self.key)].astype(str).to_numpy()

    @property
    def interval(self) -> tuple[pd.DataFrame, pd.DataFrame] | None:
        """The run's nominal 90 % interval (lower, upper), columns as the proportions; None without one."""
        lower, upper = keys.proportions_lower(self.key), keys.proportions_upper(self.key)
        if lower not in self.adata.obsm or upper not in self.adata.obsm:
            return None
        return self.adata.obsm[lower][self.cell_types], self.adata.obsm[upper][self.cell_types]

    @functools.cached_property
    def interval_widths(self) -> pd.DataFrame | None:
        """Upper minus lower end of each spot's interval per type (NaN for filtered spots); None without one."""
        interval = self.interval
        return None if interval is None else interval[1] - interval[0]

    @property
    def agreement(self) -> np.ndarray | None:
        """A consensus's per-spot agreement between its methods; None for other results."""
        column = keys.CONSENSUS_AGREEMENT
        return self.adata.obs[column].to_numpy(dtype=float) if column in self.adata.obs else None


@dataclass
class Perturbation:
    """A knockout run: the perturbed AnnData (Δ layer, vectors, ``uns['perturb']``) and its layers."""

    name: str
    adata: object
    genes: list
    layers: dict = field(default_factory=dict)

    def delta(self, gene: str) -> np.ndarray:
        col = list(self.adata.var_names).index(gene)
        return np.asarray(self.adata.layers[keys.PERTURB_DELTA][:, col].todense()).ravel()

    @functools.cached_property
    def moved(self) -> pd.Series:
        """Mean |Δ| per gene over all cells, largest first (computed once: the run never changes)."""
        d = self.adata.layers[keys.PERTURB_DELTA]
        mean_abs = np.asarray(abs(d).mean(axis=0)).ravel()
        return pd.Series(mean_abs, index=list(self.adata.var_names)).sort_values(ascending=False)


class Session:
    """The plugin's shared state for one viewer."""

    slides_changed = Signal()  # a slide layer was added or removed
    reference_changed = Signal(str)  # the reference .h5ad picked for deconvolution
    result_added = Signal(str)  # a deconvolution result's name, once its layers are on the canvas
    result_selected = Signal(str)  # the result the docks show (legend, proportion map, imputation)
    spot_picked = Signal(str, int)  # a result's name and the spot under the mouse
    model_changed = Signal(object)  # a perturbation model was trained or loaded
    perturbation_added = Signal(str)  # a knockout run's name, once its layers are on the canvas
    perturbation_selected = Signal(str)  # the knockout run shown (its layers visible, its summary drawn)
    cell_picked = Signal(int)  # a cell of the perturbation model, clicked on the canvas
    width_threshold_changed = Signal(object)  # grey out spots whose 90% interval is wider (None: none greyed)
    result_removed = Signal(str)  # a result whose last layer was deleted: the session no longer holds it
    perturbation_removed = Signal(str)  # likewise for a knockout run

    def __init__(self, viewer):
        self.viewer = viewer
        self.reference: str | None = None
        self.results: dict[str, ResultRecord] = {}
        self.selected_result: str | None = None
        self.comparison = None  # (layer, views.Comparison) of the last comparison
        self.spot: tuple[str, int] | None = None
        self.model = None
        self.model_slide = None  # the slide layer the model was trained on: its cells' world frame
        self.perturbations: dict[str, Perturbation] = {}
        self.selected_perturbation: str | None = None
        self.cell: int | None = None  # the model's cell last clicked
        self.saved_results_read: set = set()  # ids of slide layers already searched for saved results
        self.jobs: dict = {}  # JobRunners of the session's own background work, by what they do
        self.width_threshold: float | None = None
        layers = getattr(viewer, "layers", None)
        if layers is not None:
            layers.events.inserted.connect(self._on_layers)
            layers.events.removed.connect(self._on_removed)
            layers.events.connect(self._on_layer_shown)

    # -- slides and the reference --------------------------------------------------------------------
    def _on_layers(self, event=None):
        if getattr(event, "value", None) is None or PLUGIN_KEY in getattr(event.value, "metadata", {}):
            self.slides_changed.emit()

    def _on_removed(self, event=None):
        self._on_layers(event)
        present = {id(layer) for layer in self.viewer.layers}
        if self.comparison is not None and id(self.comparison[0]) not in present:
            self.comparison = None
        for name in [n for n, rec in self.results.items() if _all_gone(rec.layers, present)]:
            self.forget_result(name)
        for name in [n for n, run in self.perturbations.items() if _all_gone(run.layers, present)]:
            self.forget_perturbation(name)

    def _on_layer_shown(self, event):
        # the layer list re-emits every event of every layer: act on a result layer shown or added visible
        if event.type == "visible":
            layer = event.sources[0] if event.sources else None
        elif event.type == "inserted":
            layer = event.value
        else:
            return
        if layer is not None and getattr(layer, "visible", False):
            show_alone(self.viewer, layer)

    def slides(self) -> list[tuple[str, object]]:
        """(name, layer) of every slide layer on the canvas."""
        return slide_layer_choices(self.viewer)

    def set_reference(self, path: str):
        if path != self.reference:
            self.reference = path
            self.reference_changed.emit(path)

    # -- deconvolution results -----------------------------------------------------------------------
    def unique_result_name(self, base: str) -> str:
        return _unique_name(base, self.results)

    def unique_result_label(self, base: str) -> str:
        """``base`` when no result has that label yet, else ``base #2``, ``base #3``, ...: short layer names."""
        taken = {rec.label for rec in self.results.values()}
        if base not in taken:
            return base
        n = 2
        while f"{base} #{n}" in taken:
            n += 1
        return f"{base} #{n}"

    def add_result(self, record: ResultRecord):
        self.results[record.name] = record
        self.result_added.emit(record.name)
        self.select_result(record.name)

    def select_result(self, name: str | None):
        if name in self.results and name != self.selected_result:
            self.selected_result = name
            self.result_selected.emit(name)

    def result(self, name: str | None = None) -> ResultRecord | None:
        return self.results.get(name if name is not None else self.selected_result)

    def active_result(self) -> ResultRecord | None:
        """The result of the selected layer, else the one the docks show."""
        layer = self.viewer.layers.selection.active
        if layer is not None:
            name = layer.metadata.get(PLUGIN_KEY, {}).get("run")
            if name in self.results:
                return self.results[name]
        return self.result()

    def set_width_threshold(self, threshold: float | None):
        """Spots whose interval for the shown type is wider than ``threshold`` are greyed out on every proportion
        layer; None (or 1, no interval is wider) greys none."""
        threshold = None if threshold is None or threshold >= 1.0 else float(threshold)
        if threshold != self.width_threshold:
            self.width_threshold = threshold
            self.width_threshold_changed.emit(threshold)

    def forget_result(self, name: str):
        """Drop a result (its layers are gone), and whatever pointed at it."""
        if self.results.pop(name, None) is None:
            return
        if self.selected_result == name:
            self.selected_result = next(reversed(self.results), None)
        if self.spot is not None and self.spot[0] == name:
            self.spot = None
        self.result_removed.emit(name)
        if self.selected_result is not None:
            self.result_selected.emit(self.selected_result)

    def pick_spot(self, name: str, index: int):
        self.spot = (name, index)
        self.spot_picked.emit(name, index)

    # -- perturbation ---------------------------------------------------------------------------------
    def set_model(self, model, slide_layer=None):
        self.model = model
        self.cell = None  # a cell index of the previous model means nothing for this one
        if slide_layer is not None:
            self.model_slide = slide_layer
        self.model_changed.emit(model)

    @property
    def world_per_coord(self) -> float:
        meta = self.model_slide.metadata.get(PLUGIN_KEY, {}) if self.model_slide is not None else {}
        return float(meta.get("world_per_coord", 1.0))

    def cells_yx(self) -> np.ndarray:
        """The model's cells in the slide's world frame (napari order), where the slide and its image lie."""
        return np.asarray(self.model.coords, dtype=float)[:, :2][:, ::-1] * self.world_per_coord

    def pick_cell(self, index: int):
        self.cell = int(index)
        self.cell_picked.emit(int(index))

    def unique_perturbation_name(self, base: str) -> str:
        return _unique_name(base, self.perturbations)

    def add_perturbation(self, run: Perturbation):
        self.perturbations[run.name] = run
        self.perturbation_added.emit(run.name)

    def select_perturbation(self, name: str | None):
        if name in self.perturbations and name != self.selected_perturbation:
            self.selected_perturbation = name
            self.perturbation_selected.emit(name)

    def forget_perturbation(self, name: str):
        """Drop a knockout run (its layers are gone)."""
        if self.perturbations.pop(name, None) is None:
            return
        if self.selected_perturbation == name:
            self.selected_perturbation = None
        self.perturbation_removed.emit(name)

    def perturbation(self, name: str | None = None) -> Perturbation | None:
        return self.perturbations.get(name if name is not None else self.selected_perturbation)


def session_for(viewer) -> Session:
    viewer = real_viewer(viewer)
    session = getattr(viewer, _ATTRIBUTE, None)
    if session is None:
        session = Session(viewer)
        setattr(viewer, _ATTRIBUTE, session)
    return session


def _all_gone(layers: dict, present: set) -> bool:
    """True when a record had layers and none of them is in the viewer any more."""
    return bool(layers) and not any(id(layer) in present for layer in layers.values())


def _unique_name(base: str, taken) -> str:
    """``base #n`` with the smallest n not yet in ``taken``."""
    n = 1
    while f"{base} #{n}" in taken:
        n += 1
    return f"{base} #{n}"
