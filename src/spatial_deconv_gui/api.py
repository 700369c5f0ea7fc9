"""One function per job, shared by the CLI, the napari widgets and user scripts."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad

from . import __version__
from .engines.base import (  # noqa: F401  (re-exported for the GUI, which does not reach into engines)
    STOP_REASONS,
    Cancelled,
    DeconvResult,
    ProgressCallback,
    ProgressEvent,
    RunControl,
    TrainingStatus,
)
from .engines.registry import available_methods, build_config, get_method
from .io import InputError, ValidationReport, attach_result, read_h5ad, reference_input, spatial_input, validate
from .io.slide import Slide, detect_format
from .io.slide import read_slide as _read_slide
from .io.write import known_colors, write_h5ad_atomic


@dataclass
class RunOutput:
    adata: ad.AnnData
    result: DeconvResult
    report: ValidationReport | None


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
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"unknown device {device!r}.", "use auto, cpu or cuda.", code="unknown_device")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("CUDA was requested but torch sees no GPU.", "use --device cpu (or auto).", code="no_cuda")
    return device


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
    """
    info = get_method(method)
    runner, config_cls = info.load()
    sdata, rdata = _slide_adata(spatial, slide_options), _as_adata(reference)
    params = dict(params or {})
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
        )
        # Types below the minimum are the engine's call (drop with a warning, or refuse when strict).
        blocking = [p for p in report.problems if p.severity == "error" and p.code != "small_cell_types"]
        if blocking:
            raise InputError(ValidationReport(blocking).format(), code=blocking[0].code)
    params["device"] = resolve_device(device)
    config = build_config(config_cls, params)
    control = RunControl(progress, cancel_event, stop_event=stop_event)
    extra = {}
    batch_col = None
    if hasattr(config, "reference_batch_col"):
        from .engines.c2l.config import batch_column

        batch_col = batch_column(config)
    if batch_col is not None:
        extra["reference_batches"] = reference_batch_labels(rdata, batch_col, cell_type_col)
    result = runner(
        spatial_input(sdata, layer, coord_key, numi_column),
        reference_input(rdata, cell_type_col, reference_layer, reference_numi_column),
        config,
        control,
        **extra,
    )
    out = attach_result(sdata, result, colors=known_colors(rdata, column=cell_type_col))
    return RunOutput(out, result, report)


def check_output(path: str | os.PathLike, *inputs) -> Path:
    """Refuse, before any work, an output that would overwrite an input or that cannot be written as asked."""
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
    if path.suffix == ".zarr":
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
    return path


def save_result(
    adata: ad.AnnData, path: str | os.PathLike, protect: tuple = (), source=None, table: str | None = None
) -> Path:
    """Write atomically; refuses to overwrite any of the ``protect`` paths (the inputs).

    A ``.zarr`` path writes a new SpatialData object holding the elements of ``source`` (a SpatialData
    ``.zarr``) with ``adata`` as its table; anything else is an ``.h5ad``.
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
    return write_h5ad_atomic(adata, path)


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
    keep = rdata.obs[cell_type_col].notna().to_numpy() if cell_type_col in rdata.obs else slice(None)
    return np.asarray(rdata.obs[batch_col].to_numpy(), dtype=object)[keep]


def destvi_imputed_expression(source, cell_type: str, genes=None, spots=None):
    """DestVI's expression of ``genes`` within ``cell_type`` at ``spots`` (fractions of a cell's library), from a
    DestVI result or the ``uns['destvi_model']`` state it carries (DestVI's ``get_scale_for_ct``)."""
    from .engines.destvi.engine import impute_expression  # DestVI's module pulls in torch: only when imputing

    return impute_expression(source, cell_type, genes=genes, spots=spots)
