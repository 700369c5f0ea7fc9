"""One function per job, shared by the CLI, the napari widgets and user scripts."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from . import __version__, keys
from .engines import cluster
from .engines.base import (  # noqa: F401  (re-exported for the GUI, which does not reach into engines)
    STOP_REASONS,
    Cancelled,
    DeconvResult,
    ProgressCallback,
    ProgressEvent,
    RunControl,
    TrainingStatus,
)
from .engines.devices import DeviceOutOfMemory, device_name, is_out_of_memory
from .engines.devices import resolve as _resolve_device
from .engines.registry import available_methods, build_config, get_method
from .io import InputError, ValidationReport, attach_result, read_h5ad, reference_input, spatial_input, validate
from .io.partial import PartialStore, input_identity, partial_store_path  # noqa: F401  (the CLI's)
from .io.read import chunked_spatial_input, labelled
from .io.slide import Slide, detect_format
from .io.slide import read_slide as _read_slide
from .io.validate import empty_spots
from .io.write import check_writable, known_colors, restore_dropped_spots, write_result_h5ad


@dataclass
class RunOutput:
    adata: ad.AnnData
    result: DeconvResult
    report: ValidationReport | None
    notices: list[str] = field(default_factory=list)  # what the user should hear of (spots left out, CPU fallback)
    partial_store: PartialStore | None = None  # the run's finished chunks on disk: remove once the output is written


def _as_adata(obj) -> ad.AnnData:
    return obj if isinstance(obj, ad.AnnData) else read_h5ad(obj)


def read_slide(path, **options) -> Slide:
    """A slide from any format :mod:`.io.slide` reads (.h5ad, Space Ranger, Visium HD, Xenium, SpatialData)."""
    return _read_slide(path, **options)


def _slide_adata(obj, options: dict | None) -> ad.AnnData:
    """The slide's AnnData with its small images kept in ``uns['spatial']``, so a saved result shows them too."""
    if isinstance(obj, ad.AnnData):
        return obj
    if isinstance(obj, Slide):
        return obj.adata
    return _read_slide(obj, **(options or {})).adata


def resolve_device(device: str = "auto") -> str:
    """'auto' picks CUDA when torch sees a GPU; asking for CUDA without one is a clear error."""
    return device_name(device)


def system_info() -> dict[str, Any]:
    """Versions and compute devices, as `spatial-deconv info` prints them."""

    import numba
    import numpy
    import scipy
    import torch

    info: dict[str, Any] = {
        "spatial_deconv_gui": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "anndata": importlib.metadata.version("anndata"),
        "numba": numba.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": bool(torch.cuda.is_available()),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "default_device": "cuda" if torch.cuda.is_available() else "cpu",
        "methods": sorted(available_methods()),
    }
    try:
        import napari

        info["napari"] = napari.__version__
    except Exception as exc:  # napari is optional for the CLI's engine jobs
        info["napari"] = f"unavailable ({type(exc).__name__})"
    return info


def validate_files(spatial, reference=None, **kwargs) -> ValidationReport:
    return validate(spatial, reference, **kwargs)


def run_deconvolution(
    spatial,
    reference,
    method: str = "rctd",
    *,
    params: dict[str, Any] | None = None,
    cell_type_col: str = "cell_type",
    layer: str | None = None,
    reference_layer: str | None = None,
    coord_key: str | None = None,
    numi_column: str | None = "nUMI",
    reference_numi_column: str | None = "nUMI",
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel_event: threading.Event | None = None,
    check: bool = True,
    slide_options: dict | None = None,
    stop_event: threading.Event | None = None,
    uncertainty: bool = False,
    scheduler=None,
    n_workers: int | None = None,
    partial_store: str | os.PathLike | None = None,
) -> RunOutput:
    """Validate, run one engine and return a *copy* of the slide with the result in its slots.

    Setting ``cancel_event`` abandons the run (:class:`Cancelled` is raised, nothing is returned). Setting
    ``stop_event`` ("stop now, keep the answer") ends the training of an iterative method (``c2l``, ``destvi``)
    at its next check, within about a second, and returns the answer it has then, marked in the run's uns entry
    (``uns[key]['stopped_early_by_user']`` True, ``stop_reason`` "user", ``epochs_run``); other methods finish
    normally. Progress events of iterative methods carry ``event.training`` (a
    :class:`~.engines.base.TrainingStatus`: epoch, cap, speed, the expected stop epoch once convergence is in
    sight, the stop reason at the end), from which an ETA bound and estimate follow.

    ``numi_column`` / ``reference_numi_column`` name the obs columns with each observation's total UMI (used
    when present, else the row sums); ``None`` always uses row sums. ``spatial`` is an AnnData, a
    :class:`Slide` or a path in any format :func:`read_slide` opens (``slide_options``: its table, bin_size).
    ``uncertainty`` also writes each spot's nominal 90 % interval (``keys.proportions_lower`` / ``_upper``), for the
    methods in :func:`methods_with_intervals`.

    ``scheduler`` runs RCTD's per-spot fits on Dask (see :mod:`.engines.cluster`): ``"local"`` (a LocalCluster
    of ``n_workers`` processes, by default one per core), a scheduler address such as ``"tcp://host:8786"``, or
    an open :class:`~.engines.cluster.Cluster`; ``None`` runs in this process. The answer is the same. When
    chunks of spots are lost to workers dying on them, :class:`~.engines.cluster.PiecesFailed` names the spots
    and its ``partial`` is the RunOutput for the others.

    ``partial_store`` (RCTD; the CLI passes ``OUT.partial``, see :func:`.io.partial.partial_store_path`) is a
    folder where each finished chunk of spots is written as it comes; a run stopped part way (killed, cancelled,
    chunks lost on a cluster) and started again with the same inputs and settings reads those chunks back instead
    of refitting them (a notice says how many); a folder left by other settings or another input is emptied
    first, with a notice. The returned :class:`RunOutput`'s ``partial_store`` is to be removed (its
    ``remove()``) once the output is written.
    """
    info = get_method(method)
    if partial_store is not None and info.name not in RESUMABLE_METHODS:
        raise InputError(
            f"{info.name} cannot resume from a partial-results store: it fits every spot in one model.",
            "leave partial_store out for this method (RCTD writes its chunks there).",
            code="partial_store_unsupported",
        )
    check_scheduler(info.name, scheduler)
    runner, config_cls = info.load()
    params = dict(params or {})
    if uncertainty:
        check_intervals(info.name, config_cls)
        params["uncertainty"] = True
    notices: list[str] = []
    params["device"], device_notice = _resolve_device(device)  # before reading anything: a bad device is quick
    if device_notice:
        notices.append(device_notice)
    lazy = _chunked_slide(spatial, params.get("chunk_spots"), layer, slide_options)
    if lazy is not None:
        sdata, counts_source = lazy
    else:
        sdata, counts_source = _slide_adata(spatial, slide_options), None
    rdata = _as_adata(reference)
    report = None
    if check:
        min_cells = int(params.get("cell_min", 25))
        report = validate(
            sdata,
            rdata,
            cell_type_col=cell_type_col,
            layer=layer,
            reference_layer=reference_layer,
            coord_key=coord_key,
            min_cells_per_type=min_cells,
            numi_column=numi_column,
            reference_numi_column=reference_numi_column,
            counts_source=counts_source,
        )
        # Types below the minimum are the engine's call (drop with a warning, or refuse when strict).
        blocking = [p for p in report.problems if p.severity == "error" and p.code != "small_cell_types"]
        if blocking:
            raise InputError(ValidationReport(blocking).format(), code=blocking[0].code)
        notices += [p.message for p in report.problems if p.severity == "warning"]
    config = build_config(config_cls, params)
    # Spots without a single count carry no information for any method: fit the others, NaN rows for these. A
    # slide read by chunks keeps every spot (its method's own filters leave the empty ones out, as NaN rows).
    totals = report.spot_totals if report is not None else None
    if counts_source is not None:
        kept = np.flatnonzero(totals) if totals is not None else np.arange(sdata.n_obs)
        empty = np.zeros(sdata.n_obs, dtype=bool)
    else:
        empty = empty_spots(sdata, layer, totals=totals)
        kept = np.flatnonzero(~empty)
    if not kept.size:
        raise InputError(
            "every spot of the slide has no counts.", "check that X (or --layer) holds the counts.", code="no_counts"
        )
    fit_data = sdata[kept] if empty.any() else sdata
    control = RunControl(_remapped(progress, kept) if empty.any() else progress, cancel_event, stop_event=stop_event)
    extra = {}
    store = None
    if partial_store is not None:
        store = PartialStore.open(
            partial_store,
            _run_identity(
                info.name,
                config,
                spatial,
                reference,
                layer,
                reference_layer,
                cell_type_col,
                coord_key,
                numi_column,
                reference_numi_column,
                slide_options,
            ),
        )
        extra["partial_store"] = store
    batch_col = None
    if hasattr(config, "reference_batch_col"):
        from .engines.c2l.config import batch_column

        batch_col = batch_column(config)
    if batch_col is not None:
        extra["reference_batches"] = reference_batch_labels(rdata, batch_col, cell_type_col)
    failure = None
    try:
        with cluster.using(scheduler, n_workers) as connected:
            if connected is not None:
                extra["cluster"] = connected
            if counts_source is not None:
                slide_input = chunked_spatial_input(sdata, counts_source, coord_key, numi_column, totals)
            else:
                slide_input = spatial_input(fit_data, layer, coord_key, numi_column)
            result = runner(
                slide_input,
                reference_input(rdata, cell_type_col, reference_layer, reference_numi_column),
                config,
                control,
                **extra,
            )
    except cluster.PiecesFailed as exc:  # the spots of lost chunks are unfitted; the others are kept
        if not isinstance(exc.partial, DeconvResult):
            raise
        failure, result = exc, exc.partial
    except BaseException as exc:
        if store is not None and not store.finished():  # nothing to resume: leave no empty store behind
            store.remove()
        if not isinstance(exc, Exception) or isinstance(exc, DeviceOutOfMemory) or not is_out_of_memory(exc):
            raise
        raise DeviceOutOfMemory.after(info.name, params["device"]) from exc
    if store is not None:
        notices += store.notices
        n_resumed = int(result.params.get("n_chunks_resumed", 0))
        if n_resumed:
            notices.append(
                f"resumed {n_resumed} of {result.params['n_chunks']} chunks of spots from {store.folder} (a run "
                f"with the same input and settings stopped after them); fitted the other "
                f"{result.params['n_chunks'] - n_resumed}."
            )
    notices += _unfitted_notices(result, result.method, np.asarray(fit_data.obs_names, dtype=str))
    if empty.any():
        result = restore_dropped_spots(result, kept, np.asarray(sdata.obs_names, dtype=str))
    out = attach_result(sdata, result, colors=known_colors(rdata, column=cell_type_col))
    if failure is not None:
        raise failure.named(failure.what, failure.noun, partial=RunOutput(out, result, report, notices, store))
    return RunOutput(out, result, report, notices, store)


SCHEDULER_METHODS = ("rctd",)
RESUMABLE_METHODS = ("rctd",)
# settings that change how the run reads or computes, not its answer: a resumed run may change them
_NOT_IN_IDENTITY = ("n_threads", "chunk_spots", "table_cache", "cache_dir")


def _run_identity(method, config, spatial, reference, *options) -> dict[str, Any]:
    """What a partial-results store must match to be resumed: the method, its settings and the inputs."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_IDENTITY}
    return {
        "method": method,
        "config": settings,
        "spatial": input_identity(spatial),
        "reference": input_identity(reference),
        "options": list(options),
    }


def check_scheduler(method: str, scheduler) -> None:
    """Only RCTD's per-spot fits run on a Dask cluster; the other methods refuse ``scheduler`` clearly."""
    if scheduler is None or method in SCHEDULER_METHODS:
        return
    raise InputError(
        f"{method} runs in one process: only RCTD's per-spot fits run on a Dask cluster (cell2location and DestVI "
        "train one model over all spots, the sketched flash fit is one solve).",
        "leave --scheduler out for this method (or pick --method rctd).",
        code="scheduler_unsupported",
    )


def _chunked_slide(spatial, chunk_spots, layer, slide_options):
    """(annotations, counts by chunks) when the method reads the slide by chunks (``chunk_spots``) and ``spatial``
    is a path to an .h5ad or a .zarr; else None (an AnnData or Slide is in memory already)."""
    if not chunk_spots or isinstance(spatial, (ad.AnnData, Slide)):
        return None
    from .io.chunked import open_lazy_slide

    path = Path(spatial)
    if path.suffix not in (".h5ad", ".zarr"):
        raise InputError(
            f"{path.name}: reading by chunks of spots (chunk_spots) takes an .h5ad or a .zarr store.",
            "convert the slide to .h5ad first (e.g. spatial_deconv_gui.io.read_slide(path).adata.write_h5ad), or "
            "leave chunk_spots unset.",
            code="chunks_need_h5ad",
        )
    return open_lazy_slide(path, layer, int(chunk_spots), table=(slide_options or {}).get("table"))


def _unfitted_notices(result: DeconvResult, method: str, barcodes: np.ndarray) -> list[str]:
    """No NaN goes unexplained: spots a method filters out (whole NaN rows) get a notice; a row that is only
    partly NaN, or infinite, is a failed fit and stops the run with the spots named."""
    props = np.asarray(result.proportions, dtype=float)
    unfitted = np.isnan(props).all(axis=1)
    broken = ~unfitted & ~np.isfinite(props).all(axis=1)
    if broken.any():
        raise InputError(
            f"{method} gave NaN or infinite proportions for {int(broken.sum())} spot(s) "
            f"(e.g. {', '.join(barcodes[broken][:3])}); that is a failed fit, not an answer.",
            "check those spots' counts; try another --seed, --dtype float64 or --device cpu.",
            code="non_finite_result",
        )
    if unfitted.any():
        return [
            f"{method} did not fit {int(unfitted.sum())} of {len(props)} spot(s) (below its filters, e.g. "
            f"{', '.join(barcodes[unfitted][:3])}); they are NaN rows, dominant type 'filtered'."
        ]
    return []


def _gives_intervals(config_cls) -> bool:
    return any(f.name == "uncertainty" for f in dataclasses.fields(config_cls))


def trains_iteratively(method: str) -> bool:
    """Whether ``method`` trains epoch by epoch, so that it can stop early and keep its answer (``stop_event``)."""
    info = available_methods().get(method)
    return info is not None and any(f.name == "early_stop" for f in dataclasses.fields(info.load()[1]))


def methods_with_intervals() -> list[str]:
    """The installed methods whose runs can write per-spot intervals (``uncertainty=True``)."""
    return [m for m in sorted(available_methods()) if _gives_intervals(get_method(m).load()[1])]


def check_intervals(method: str, config_cls=None) -> None:
    """An :class:`InputError` when ``method`` cannot give per-spot intervals."""
    if config_cls is None:
        config_cls = get_method(method).load()[1]
    if not _gives_intervals(config_cls):
        raise InputError(
            f"{method} gives no per-spot interval yet, so --uncertainty cannot be used with it.",
            f"run without --uncertainty, or use a method that gives intervals: {', '.join(methods_with_intervals())}.",
            code="no_intervals",
        )


def _remapped(progress: ProgressCallback | None, kept: np.ndarray) -> ProgressCallback | None:
    """Partial results index the spots that were fitted; the GUI colours spots of the whole slide."""
    if progress is None:
        return None

    def forward(event):
        if event.partial is not None:
            event = replace(event, partial=replace(event.partial, spot_index=kept[event.partial.spot_index]))
        progress(event)

    return forward


def check_output(path: str | os.PathLike, *inputs, side_file: bool = False) -> Path:
    """Refuse, before any work, an output that would overwrite an input or that cannot be written as asked.

    ``side_file`` (a CSV or PNG beside the result) skips the checks of the result's own format (.h5ad / .zarr).
    """
    path = Path(path)
    for p in inputs:
        if p is None or isinstance(p, (ad.AnnData, Slide)):
            continue
        p = Path(p).resolve()
        if p == path.resolve() or p in path.resolve().parents and path.suffix == ".zarr":
            raise InputError(
                f"the output {path} is (inside) one of the inputs.",
                "choose another output path; inputs are never overwritten.",
                code="output_is_input",
            )
    if side_file:
        pass
    elif path.suffix == ".zarr":
        source = inputs[0] if inputs else None
        if isinstance(source, (ad.AnnData, Slide)) or source is None or detect_format(source) != "spatialdata":
            raise InputError(
                f"a .zarr output ({path.name}) is written for a SpatialData .zarr input only.",
                "write an .h5ad (the default), or open the slide from its SpatialData .zarr.",
                code="zarr_output_needs_zarr_input",
            )
    elif path.suffix != ".h5ad":
        raise InputError(
            f"the output {path.name} is neither an .h5ad nor a .zarr.",
            "name it OUT.h5ad (or OUT.zarr for a SpatialData input).",
            code="bad_output",
        )
    check_writable(path)
    return path


def save_result(
    adata: ad.AnnData,
    path: str | os.PathLike,
    protect: tuple = (),
    source=None,
    table: str | None = None,
    counts: bool = False,
) -> Path:
    """Write atomically; refuses to overwrite any of the ``protect`` paths (the inputs).

    A ``.zarr`` path writes a new SpatialData object holding the elements of ``source`` (a SpatialData
    ``.zarr``) with ``adata`` as its table; anything else is an ``.h5ad``. An ``.h5ad`` holds the results and the
    slide's annotations but not its counts (:func:`~.io.write.results_only`: obs, var, obsm, uns; X absent) unless
    ``counts`` is True, which writes the whole AnnData, counts and layers included.
    """
    path = Path(path)
    for p in protect:
        if p is not None and not isinstance(p, (ad.AnnData, Slide)) and Path(p).resolve() == path.resolve():
            raise InputError(
                f"the output {path} is one of the input files.",
                "choose another output path; inputs are never overwritten.",
                code="output_is_input",
            )
    if path.suffix == ".zarr":
        from .io.sdata import write_spatialdata_result

        check_output(path, source, *protect)
        return write_spatialdata_result(adata, source, path, table=table)
    check_writable(path)
    return write_result_h5ad(adata, path, counts=counts)


def reference_batch_labels(reference, batch_col: str, cell_type_col: str = "cell_type"):
    """One batch label per reference cell, aligned with the cells the engines receive (those with a cell type),
    for cell2location's ``reference_batch_col`` (``run_c2l(..., reference_batches=...)``)."""
    import numpy as np

    rdata = _as_adata(reference)
    if batch_col not in rdata.obs:
        raise InputError(
            f"the reference has no obs column {batch_col!r} for the batches.",
            f"pass --reference-batch-col with one of {list(rdata.obs.columns)}.",
            code="unknown_reference_batch_col",
        )
    keep = labelled(rdata.obs[cell_type_col]) if cell_type_col in rdata.obs else slice(None)
    return np.asarray(rdata.obs[batch_col].to_numpy(), dtype=object)[keep]


def destvi_imputed_expression(source, cell_type: str, genes=None, spots=None):
    """DestVI's expression of ``genes`` within ``cell_type`` at ``spots`` (fractions of a cell's library), from a
    DestVI result or the ``uns['destvi_model']`` state it carries (DestVI's ``get_scale_for_ct``)."""
    from .engines.destvi.engine import impute_expression  # DestVI's module pulls in torch: only when imputing

    return impute_expression(source, cell_type, genes=genes, spots=spots)


# -- for the GUI: DestVI imputation a chunk at a time, results read back from a saved file ---------------------
IMPUTE_CHUNK_VALUES = 4_000_000  # spots x states x genes per imputation step (~32 MB of float64)


def destvi_state(*holders) -> dict | None:
    """The DestVI model state (``uns['destvi_model']``) the first of ``holders`` (results, AnnDatas) carries."""
    for holder in holders:
        uns = getattr(holder, "uns", None)
        if uns is not None and keys.DESTVI_MODEL in uns:
            return uns[keys.DESTVI_MODEL]
    return None


def destvi_imputation_steps(state: dict, cell_type: str, gene: str, chunk: int | None = None):
    """DestVI's imputed expression of ``gene`` within ``cell_type`` at every spot, a chunk of spots at a time.

    A generator for a worker: yields the fraction of spots done after each chunk and returns the values (one per
    spot of the model, in its ``barcodes`` order; fractions of a cell's library, as
    :func:`destvi_imputed_expression`).
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


def in_slide_order(state: dict, obs_names, values):
    """Values in a DestVI model's spot order (its barcodes) put in a slide's order; NaN where the model has none."""
    barcodes = np.asarray(state["barcodes"]).astype(str)
    obs = np.asarray(obs_names).astype(str)
    if np.array_equal(barcodes, obs):
        return np.asarray(values, dtype=np.float64)
    return pd.Series(np.asarray(values, dtype=np.float64), index=barcodes).reindex(obs).to_numpy()


def saved_results(spatial, slide_options: dict | None = None) -> list[RunOutput]:
    """The deconvolution results a saved slide carries (written by :func:`save_result`), one per method key,
    rebuilt as run outputs; a slide without results gives an empty list."""
    adata = _slide_adata(spatial, slide_options)
    out = []
    for slot, props in adata.obsm.items():
        key = slot.removesuffix(keys.PROPORTIONS_SUFFIX)
        info = adata.uns.get(keys.run_info(key))
        if key == slot or not hasattr(props, "columns") or not isinstance(info, dict) or "method" not in info:
            continue
        mode = info.get("mode")
        obs = {c: adata.obs[c] for c in (keys.spot_class(key),) if c in adata.obs}
        carries_state = str(info["method"]) == "destvi" and keys.DESTVI_MODEL in adata.uns
        uns = {keys.DESTVI_MODEL: adata.uns[keys.DESTVI_MODEL]} if carries_state else {}
        result = DeconvResult(
            key=key,
            method=str(info["method"]),
            mode=None if mode in (None, "", "None") else str(mode),
            cell_types=[str(c) for c in props.columns],
            proportions=np.asarray(props, dtype=float),
            params=dict(info.get("parameters", {})),
            device=str(info.get("device", "")),
            runtime_s=float(info.get("runtime_s", 0.0)),
            obs=obs,
            uns=uns,
        )
        out.append(RunOutput(adata, result, None))
    return out


# -- a consensus of several results -------------------------------------------------------------------------
def result_keys(adata: ad.AnnData) -> list[str]:
    """The keys of the deconvolution results an AnnData carries (a proportions slot with its run's uns entry)."""
    found = []
    for slot, props in adata.obsm.items():
        key = slot.removesuffix(keys.PROPORTIONS_SUFFIX)
        info = adata.uns.get(keys.run_info(key))
        if key != slot and hasattr(props, "columns") and isinstance(info, dict) and "method" in info:
            found.append(key)
    return found


def _label(source, index: int) -> str:
    return Path(source).name if isinstance(source, (str, os.PathLike)) else f"result {index + 1}"


def _pick_key(adata: ad.AnnData, wanted: str | None, label: str) -> str:
    have = result_keys(adata)
    if wanted is not None:
        if wanted not in have:
            raise InputError(
                f"{label} has no result with key {wanted!r} (it has: {', '.join(have) or 'none'}).",
                "pass --key with one of those keys (once for all inputs, or once per input).",
                code="unknown_result_key",
            )
        return wanted
    own = [k for k in have if k != keys.CONSENSUS] or have
    if len(own) != 1:
        raise InputError(
            f"{label} holds {len(own)} results ({', '.join(own) or 'none'}): which one goes into the consensus?",
            "pass --key KEY (once for all inputs, or once per input)." if own else "give the result files of runs.",
            code="which_result" if own else "no_result",
        )
    return own[0]


def _examples(names, n: int = 5) -> str:
    names = list(names)
    shown = ", ".join(map(str, names[:n]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _check_same_spots(labels: list[str], adatas: list[ad.AnnData]) -> None:
    first = pd.Index(adatas[0].obs_names)
    problems = []
    for label, a in zip(labels, adatas):
        if not pd.Index(a.obs_names).is_unique:
            raise InputError(
                f"{label} has duplicate spot names, so its spots cannot be matched with the other results'.",
                "make the spot names unique (adata.obs_names_make_unique()) before the runs.",
                code="duplicate_spots",
            )
    for label, a in zip(labels[1:], adatas[1:]):
        names = pd.Index(a.obs_names)
        missing, extra = first.difference(names, sort=False), names.difference(first, sort=False)
        if len(missing) or len(extra):
            line = f"{label} ({len(names)} spots) vs {labels[0]} ({len(first)} spots):"
            if len(missing):
                line += f" {len(missing)} of {labels[0]}'s spots missing (e.g. {_examples(missing)});"
            if len(extra):
                line += f" {len(extra)} spots not in {labels[0]} (e.g. {_examples(extra)});"
            problems.append(line.rstrip(";"))
    if problems:
        raise InputError(
            "the results are not of the same slide: their spot names differ. " + " ".join(problems),
            "combine results of runs on one slide (the same spots).",
            code="different_slides",
        )


def _shared_types(labels: list[str], types: list[list[str]], align: bool) -> tuple[list[str], list[str]]:
    """The types of the consensus (the first result's order) and the types left out (only with ``align``)."""
    shared = [t for t in types[0] if all(t in ts for ts in types[1:])]
    dropped = sorted({t for ts in types for t in ts} - set(shared))
    if not dropped:
        return shared, []
    if not align:
        lines = [f"{label}: {', '.join(t for t in ts if t not in shared)}" for label, ts in zip(labels, types)]
        lines = [line for line, ts in zip(lines, types) if set(ts) - set(shared)]
        raise InputError(
            "the results have different cell types. Types not in every result: "
            + "; ".join(lines)
            + f". Shared by all ({len(shared)}): {', '.join(shared) or 'none'}.",
            "run the methods with one reference, or pass --align-types (align_types=True) to combine the shared "
            "types only (each result's rows renormalised over them).",
            code="different_cell_types",
        )
    if len(shared) < 2:
        raise InputError(
            f"the results share {len(shared)} cell type(s) ({', '.join(shared) or 'none'}): nothing to combine.",
            "combine results that were run with the same reference.",
            code="different_cell_types",
        )
    return shared, dropped


CONSENSUS_INTERVAL = "inverse-variance, widened by the methods' spread (Birge ratio)"


def weighting_phrase(weighting: str) -> str:
    """How a consensus weighted its methods (its ``params['weighting']``), in words for a status line."""
    phrases = {"intervals": "weighted by the methods' 90% intervals", "equal": "equal weights"}
    return phrases.get(weighting, f"weighting: {weighting}")


def consensus(
    results,
    *,
    key: list[str] | str | None = None,
    names: list[str] | None = None,
    align_types: bool = False,
    weighting: str = "auto",
) -> RunOutput:
    """A consensus of two or more results of one slide (AnnDatas or result files, each holding the result named by
    ``key`` — one key for all, or one per input — or a single result).

    Returns a copy of the first input holding ``obsm['consensus_proportions']`` (per spot and type the
    inverse-variance weighted mean of the methods' proportions when every result has its 90 % interval, else their
    mean; rows renormalised), ``obs['consensus_agreement']`` (1 − mean pairwise total-variation distance, in
    [0, 1], higher = more agreement), ``uns['consensus_type_agreement']`` (per type: agreement, mean absolute
    difference, mean correlation, mean consensus proportion) and the run's ``uns['consensus']`` entry (inputs,
    weighting, dropped types, the interval's construction or why there is none). With interval weights it also
    holds the consensus's nominal 90 % interval, ``obsm['consensus_proportions_q05'/'_q95']``
    (:func:`.engines.consensus.combined_interval`); without, none. See :mod:`.engines.consensus`. Inputs are not
    modified.

    Results of different slides (spot names), or with different cell types unless ``align_types``, are an
    :class:`InputError` naming the difference.
    """
    from .engines import consensus as engine

    results = list(results)
    if len(results) < 2:
        raise InputError(
            f"a consensus needs two or more results; got {len(results)}.",
            "give two or more result files of the same slide (e.g. an RCTD and a FlashDeconv run).",
            code="one_result",
        )
    if weighting not in engine.WEIGHTINGS:
        raise InputError(
            f"unknown weighting {weighting!r}.", f"use one of {', '.join(engine.WEIGHTINGS)}.", code="bad_weighting"
        )
    if isinstance(key, str) or key is None:
        wanted = [key] * len(results)
    else:
        wanted = list(key)
        if len(wanted) == 1:
            wanted *= len(results)
        if len(wanted) != len(results):
            raise InputError(
                f"{len(wanted)} keys for {len(results)} results.",
                "pass --key once (for all inputs) or once per input, in the inputs' order.",
                code="key_count",
            )
    labels = [_label(src, i) for i, src in enumerate(results)]
    t0 = time.perf_counter()
    adatas = [_as_adata(src) for src in results]
    chosen = [_pick_key(a, k, label) for a, k, label in zip(adatas, wanted, labels)]
    if names is None:
        names = [f"{k} ({label})" if chosen.count(k) > 1 else k for k, label in zip(chosen, labels)]
    # what the errors call each input: its file and key, or the name it was given
    called = [
        f"{label} ({k})" if isinstance(src, (str, os.PathLike)) else n
        for src, label, k, n in zip(results, labels, chosen, names)
    ]
    _check_same_spots(called, adatas)
    order = adatas[0].obs_names
    types, dropped = _shared_types(
        called, [list(map(str, a.obsm[keys.proportions(k)].columns)) for a, k in zip(adatas, chosen)], align_types
    )
    props, lower, upper = [], [], []
    for a, k in zip(adatas, chosen):
        p = a.obsm[keys.proportions(k)].set_axis(list(map(str, a.obsm[keys.proportions(k)].columns)), axis=1)
        p = p.set_axis(a.obs_names, axis=0).loc[order, types]
        scale = 1.0
        if dropped:  # renormalised over the shared types; a row with none of them has no answer on them
            total = p.sum(axis=1).to_numpy()[:, None]
            scale = np.where(total > 0, total, np.nan)
        props.append(p.to_numpy(dtype=float) / scale)
        lo_slot, hi_slot = keys.proportions_lower(k), keys.proportions_upper(k)
        if lo_slot in a.obsm and hi_slot in a.obsm:
            bounds = []
            for slot in (lo_slot, hi_slot):
                b = a.obsm[slot].set_axis(list(map(str, a.obsm[slot].columns)), axis=1).set_axis(a.obs_names, axis=0)
                bounds.append(np.clip(b.loc[order, types].to_numpy(dtype=float) / scale, 0.0, 1.0))
            lower.append(bounds[0])
            upper.append(bounds[1])
        else:
            lower.append(None)
            upper.append(None)
    if weighting == "intervals" and any(lo is None for lo in lower):
        without = [n for n, lo in zip(names, lower) if lo is None]
        raise InputError(
            f"weighting by intervals needs every result's 90% interval; {', '.join(without)} has none.",
            "run those methods with --uncertainty, or use --weighting auto / equal.",
            code="no_intervals",
        )
    out = engine.consensus(props, types, lower, upper, weighting=weighting)
    interval_obsm, no_interval = {}, ""
    if out.lower is not None:
        index = adatas[0].obs_names
        interval_obsm = {
            keys.proportions_lower(keys.CONSENSUS): pd.DataFrame(out.lower, index=index, columns=types),
            keys.proportions_upper(keys.CONSENSUS): pd.DataFrame(out.upper, index=index, columns=types),
        }
    elif any(lo is None for lo in lower):
        without = [n for n, lo in zip(names, lower) if lo is None]
        verb = "carries" if len(without) == 1 else "carry"
        no_interval = f"{', '.join(without)} {verb} no interval (run with --uncertainty)"
    else:
        no_interval = "equal weights were asked for (--weighting equal)"
    result = DeconvResult(
        key=keys.CONSENSUS,
        method=keys.CONSENSUS,
        mode=out.weighting,
        cell_types=types,
        proportions=out.proportions,
        params={
            "inputs": names,
            "files": labels,
            "result_keys": chosen,
            "weighting": out.weighting,
            "min_width": engine.MIN_WIDTH,
            "align_types": bool(align_types),
            "dropped_types": dropped,
            "interval": CONSENSUS_INTERVAL if out.lower is not None else "none",
            "no_interval_because": no_interval,
        },
        device="cpu",
        runtime_s=time.perf_counter() - t0,
        obs={keys.CONSENSUS_AGREEMENT: out.agreement},
        obsm=interval_obsm,
        uns={keys.CONSENSUS_TYPE_AGREEMENT: out.type_agreement},
    )
    notices = []
    if dropped:
        notices.append(f"cell types not in every result were left out: {', '.join(dropped)}.")
    if no_interval:
        notices.append(f"equal weights and no consensus interval: {no_interval}.")
    unfitted = int(np.isnan(out.proportions).any(axis=1).sum())
    if unfitted:
        notices.append(f"{unfitted} spot(s) fitted by no result are NaN rows.")
    combined = attach_result(adatas[0], result)
    if not interval_obsm:  # the first input may be an earlier consensus: its interval is not this one's
        for slot in (keys.proportions_lower(keys.CONSENSUS), keys.proportions_upper(keys.CONSENSUS)):
            combined.obsm.pop(slot, None)
    _carry_results(combined, adatas[1:], chosen[1:])
    return RunOutput(combined, result, None, notices)


def _carry_results(target: ad.AnnData, sources: list[ad.AnnData], chosen: list[str]) -> None:
    """Put the other inputs' results (proportions, intervals, dominant type, run entry) beside the first's, so the
    consensus file shows every method it combined; a key the target already has is left as it is."""
    for a, k in zip(sources, chosen):
        if keys.proportions(k) in target.obsm:
            continue
        for slot in (keys.proportions(k), keys.proportions_lower(k), keys.proportions_upper(k)):
            if slot in a.obsm:
                target.obsm[slot] = a.obsm[slot].set_axis(a.obs_names, axis=0).loc[target.obs_names]
        column = keys.dominant_type(k)
        if column in a.obs:
            target.obs[column] = a.obs[column].loc[target.obs_names].to_numpy()
            target.obs[column] = target.obs[column].astype(a.obs[column].dtype)
            if keys.colors(column) in a.uns:
                target.uns[keys.colors(column)] = a.uns[keys.colors(column)]
        target.uns[keys.run_info(k)] = a.uns[keys.run_info(k)]
