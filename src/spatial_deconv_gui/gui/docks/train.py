"""The Train dock: train (or load) the spatial GRN model of a slide; training runs in a child process, so no
compile or parsing step of it can freeze the canvas. The model goes into the session for the Knockout dock.

The GUI process never reads the slide's AnnData here: the obs columns and layer names that fill the form are read
by a worker thread when a slide is picked, and the training process reads the slide itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import h5py
import pandas as pd
import platformdirs
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, ProgressBar, PushButton, SpinBox

from ... import keys
from ...io.slide import read_slide_adata
from ...io.write import write_text_atomic
from ..jobs import JobRunner
from ..layers import PLUGIN_KEY, refresh_slide_picker
from ..lifetime import DockLinks
from ..notify import notify_error, notify_info, status_label
from ..session import session_for

SPECIES = ("mouse", "human", "other")
WARM_TRAINING = "spatial_deconv_gui.gui.warmup:train_model_for_gui"


# -- remembered prior files ------------------------------------------------------------------------------
def _settings_path() -> Path:
    return Path(platformdirs.user_config_dir("spatial-deconv-gui")) / "perturb_priors.json"


def remembered_priors(species: str) -> dict[str, str]:
    try:
        return json.loads(_settings_path().read_text()).get(species, {})
    except (OSError, ValueError):
        return {}


def remember_priors(species: str, files: dict[str, str]):
    path = _settings_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[species] = {k: v for k, v in files.items() if v}
    write_text_atomic(json.dumps(data, indent=2), path)


def slide_columns(path, read_options: dict) -> tuple[list[str], list[str]]:
    """A slide's obs columns that can name clusters (not floats) and its layer names; for an .h5ad only obs and the
    layer names are read, not the counts."""
    if str(path).endswith(".h5ad"):
        with h5py.File(path, "r") as f:
            obs = ad.io.read_elem(f["obs"])
            layers = list(f["layers"].keys()) if "layers" in f else []
    else:
        adata = read_slide_adata(path, **read_options)
        obs, layers = adata.obs, list(adata.layers.keys())
    return [c for c in obs.columns if not pd.api.types.is_float_dtype(obs[c])], layers


def _file(value) -> str | None:
    return str(value) if value and str(value) not in (".", "") and Path(str(value)).is_file() else None


class TrainDock(Container):
    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self._obs_columns: list[str] = []
        self._file_columns: list[str] = []  # the slide's own obs columns, read once per slide
        self._layers: list[str] = []
        self.train_options: dict = {}  # further TrainConfig fields, for scripting (e.g. l1_reg)
        self.slide = ComboBox(label="slide layer", choices=lambda _w: self.session.slides(), nullable=True)
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
        # (the API is imported only once a model exists: these say what TrainConfig's mode and epochs say)
        self.mode = ComboBox(
            label="coefficients",
            choices=("seed", "full", "hybrid"),
            value="seed",
            tooltip="seed: one coefficient set per cluster (the group lasso). full: SpaceTravLR's per-cell "
            "coefficients, the lasso seeds refined in each cell by a small CNN on its neighbourhood. hybrid: "
            "per-cell only for the genes where that predicts held-out cells better than the seed.",
        )
        self.epochs = SpinBox(
            label="epochs",
            value=300,
            min=1,
            max=100_000,
            step=50,
            enabled=False,
            tooltip="full / hybrid: training passes of the per-cell network.",
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
                self.mode,
                self.epochs,
                self.model_dir,
                self.train_btn,
                self.load_btn,
                self.cancel_btn,
                self.progress,
                self.status,
            ]
        )
        self.links = links = DockLinks(self.native, napari_viewer)  # undone when the dock closes
        self.jobs = links.runner(JobRunner("Train", status=self.status, progress=self.progress))
        self.reads = links.runner(JobRunner("Read the slide's columns", status=self.status))
        self._slide_read = None  # the slide layer whose columns were read last
        self.reads.busy_changed.connect(self._after_read)
        self.jobs.busy_changed.connect(self._set_running)
        self.slide.changed.connect(self._on_slide)
        self.species.changed.connect(self._on_species)
        self.mode.changed.connect(lambda v: setattr(self.epochs, "enabled", v != "seed"))
        self.train_btn.clicked.connect(self.train)
        self.load_btn.clicked.connect(self.load)
        self.cancel_btn.clicked.connect(self.cancel)
        links.connect(self.session.slides_changed, self._refresh)
        links.connect(self.session.result_added, self._refresh)
        links.connect(self.session.result_removed, self._refresh)
        self._on_species()
        self._refresh()

    def _refresh(self, _name=None):
        """Layers came or went: a newly picked slide fills the form (through ``slide.changed``); for the same
        slide only the cluster choices follow (a new result's dominant type), and the user's picks stay."""
        before = self.slide.value
        layer = refresh_slide_picker(self.slide)
        if layer is not None and layer is before:
            self._cluster_choices(layer)
            self.cluster_col.reset_choices()

    def _cluster_choices(self, layer):
        meta = layer.metadata.get(PLUGIN_KEY, {})
        # a deconvolution's dominant type can serve as the cluster column
        self._obs_columns = list(self._file_columns) + [
            f"{keys.dominant_type(rec.key)} ({name})"
            for name, rec in self.session.results.items()
            if rec.adata.n_obs == meta.get("n_spots")
        ]

    def _on_slide(self, layer):
        if layer is None:
            return
        meta = layer.metadata.get(PLUGIN_KEY, {})
        if not meta.get("adata_path"):
            self._fill_form(layer, None)
            return
        if self.reads.busy:  # picked while another slide's columns are read: _after_read reads this one next
            return
        self.reads.start(
            lambda _control: slide_columns(meta["adata_path"], meta.get("read_options", {})),
            lambda columns: self._fill_form(layer, columns),
            on_error=lambda _exc: setattr(self, "_slide_read", layer),  # reported by the runner; not read again
            message="reading the slide's columns...",
        )

    def _after_read(self, busy: bool):
        if not busy and self.slide.value is not None and self.slide.value is not self._slide_read:
            self._on_slide(self.slide.value)

    @property
    def ready(self) -> bool:
        """True once the picked slide's columns are in the form."""
        return not self.reads.busy and self._slide_read is self.slide.value

    def _fill_form(self, layer, columns: tuple[list[str], list[str]] | None):
        """The form for ``layer``, from its obs columns and layer names (read off the GUI thread)."""
        self._slide_read = layer
        if self.status.value == "reading the slide's columns...":
            self.status.value = "pick priors and a model folder"
        if layer is not self.slide.value:  # another slide was picked meanwhile: its own read fills the form
            return
        meta = layer.metadata.get(PLUGIN_KEY, {})
        if columns is not None:
            self._file_columns, layers = columns
            self._layers = ["X"] + layers
        self._cluster_choices(layer)
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
        meta = layer.metadata.get(PLUGIN_KEY, {})
        if not meta.get("adata_path"):
            raise ValueError(f"layer {layer.name!r} was not opened from a file")
        spatial = {"path": str(meta["adata_path"]), "slide_options": dict(meta.get("read_options", {}))}
        col = self.cluster_col.value
        if col and " (" in col:  # a deconvolution result's dominant type: a column the training process adds
            key, run = col.split(" (", 1)
            rec = self.session.results[run.rstrip(")")]
            spatial["extra_obs"] = {key: rec.adata.obs[key].astype(str).to_numpy()}
            col = key
        params = dict(self.train_options)
        if self.radius.value > 0:
            params["radius"] = float(self.radius.value)
        if self.contact.value > 0:
            params["contact_radius"] = float(self.contact.value)
        if self.mode.value != "seed":  # seed: the settings of a model trained before modes existed (it resumes)
            params["mode"] = self.mode.value
            params["epochs"] = int(self.epochs.value)
        layer_name = None if self.expression.value in (None, "X") else self.expression.value
        return spatial, grn, lr, col, out, layer_name, params

    def train(self):
        if self.jobs.busy:
            return
        try:
            spatial, grn, lr, col, out, layer_name, params = self._training_inputs()
        except Exception as exc:
            self.status.value = str(exc)
            notify_error(exc, "Train")
            return
        remember_priors(self.species.value, {"grn": grn, "lr": lr or ""})
        kwargs = dict(spatial=spatial, grn=grn, lr=lr, cluster_col=col, out=out, layer=layer_name, **params)
        slide = self.slide.value
        self.jobs.start_process(
            WARM_TRAINING,
            kwargs,
            lambda model: self.set_model(model, slide),
            threads=max(1, (os.cpu_count() or 2) - 1),  # a core left for the event loop
            cancelled_message="cancelled: finished genes are kept; Train again to resume",
            message="training...",
        )

    @property
    def busy(self) -> bool:
        return self.jobs.busy

    def _set_running(self, running: bool):
        self.train_btn.enabled, self.load_btn.enabled, self.cancel_btn.enabled = not running, not running, running

    def load(self):
        from ... import perturb_api  # pulls in torch, which the GUI process needs only once a model is loaded

        try:
            model = perturb_api.load_model(str(self.model_dir.value))
        except Exception as exc:
            notify_error(exc, "Load model")
            return
        self.set_model(model, self.slide.value)

    def cancel(self):
        if self.jobs.busy:
            self.jobs.cancel()
            self.status.value = "cancelling after the current batch of genes..."

    def set_model(self, model, slide_layer):
        """The model joins the session (the Knockout dock hears of it) with the slide that gives its cells' frame."""
        self.progress.value = 1000
        self.status.value = f"ready: {len(model.targets)} targets, {len(model.cluster_names)} clusters"
        percell = model.manifest.get("percell")
        if percell:
            self.status.value += (
                f"; {model.manifest.get('mode')} mode: per-cell coefficients for {percell['n_cnn']} targets, "
                f"cluster seeds for {percell['n_seed']}"
            )
        notify_info(f"perturbation model ready ({len(model.targets)} targets)")
        self.session.set_model(model, slide_layer)
