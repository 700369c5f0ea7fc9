"""Storing engine results in AnnData slots and writing files without ever leaving a half-written one."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from .. import __version__, keys
from ..colors import FILTERED_COLOR, FILTERED_LABEL, cell_type_palette, palette_from_uns
from .errors import InputError

# uns: a categorical column's categories in colour order (keys.CELL_TYPE_NAMES for the cell-type column)
NAMES_SUFFIX = "_names"

# Entries of a model state in uns (DestVI's) with one row per spot; the state's other arrays are weights.
PER_SPOT_STATE = ("gamma_modes", "mode_weights")

if TYPE_CHECKING:  # io stays upstream of engines: results are duck-typed here
    from ..engines.base import DeconvResult


def h5_safe(value):
    """Make a value storable in ``uns`` (h5ad has no None, tuples or numpy scalars in dicts)."""
    if value is None:
        return "None"
    if isinstance(value, dict):
        return {str(k): h5_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [h5_safe(v) for v in value]
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in items):
            return np.asarray(items)
        return [str(v) if not isinstance(v, (dict, np.ndarray)) else v for v in items]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool, np.ndarray, pd.DataFrame)):
        return value
    return str(value)


def known_colors(*adatas: ad.AnnData, column: str = keys.CELL_TYPE) -> dict[str, str]:
    """Colours the user already chose: ``uns['cell_type_colors']`` aligned with ``obs['cell_type']``."""
    out: dict[str, str] = {}
    for a in adatas:
        if a is None:
            continue
        colors = a.uns.get(keys.colors(column))
        if colors is None:
            continue
        if column in a.obs and hasattr(a.obs[column], "cat"):
            cats = list(map(str, a.obs[column].cat.categories))
        elif f"{column}{NAMES_SUFFIX}" in a.uns:
            cats = list(map(str, a.uns[f"{column}{NAMES_SUFFIX}"]))
        else:
            continue
        out.update(palette_from_uns(cats, colors))
    return out


def sharing_counts(adata: ad.AnnData) -> ad.AnnData:
    """A new AnnData over the same spots and genes whose counts (X, layers) and obsp/varm are ``adata``'s own
    arrays, not copies; its obs, var, obsm mapping and uns are copies, so results can be added to it without
    touching ``adata``. Neither side modifies counts in place (the engines only read them), and copying them
    cost seconds and doubled the memory of a large slide."""
    if adata.is_view:  # a view's X is built on access; a copy of the subset is what it would hand out anyway
        adata = adata.copy()
    return ad.AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        obsm=dict(adata.obsm),
        varm=dict(adata.varm),
        obsp=dict(adata.obsp),
        layers=dict(adata.layers),
        uns=copy.deepcopy(dict(adata.uns)),
    )


def results_only(adata: ad.AnnData) -> ad.AnnData:
    """What a result ``.h5ad`` holds unless the counts are asked for (:func:`write_result_h5ad`).

    Kept: ``obs`` (the slide's spot annotations and the result's per-spot columns), ``var`` (gene names and
    annotations), ``obsm`` (coordinates and the result tables), ``uns`` (tissue images, colours, run parameters).
    Left out: ``X`` (written as absent: reading the file back for counts fails with a clear "no expression matrix"
    error), ``layers``, ``obsp`` and ``varm`` — the slide's own data, which the input file already holds and which
    made up nearly all of the writing time (a gzip-compressed copy of the counts).
    """
    return ad.AnnData(X=None, obs=adata.obs.copy(), var=adata.var.copy(), obsm=dict(adata.obsm), uns=dict(adata.uns))


def attach_result(adata: ad.AnnData, result: DeconvResult, colors: dict[str, str] | None = None) -> ad.AnnData:
    """A new AnnData holding ``adata``'s spots and ``result`` in the common slot scheme; ``adata`` is left
    untouched (its counts are shared, not copied: :func:`sharing_counts`)."""
    if result.proportions.shape[0] != adata.n_obs:
        raise ValueError(f"result has {result.proportions.shape[0]} rows for {adata.n_obs} spots")
    out = sharing_counts(adata)
    key = result.key
    types = [str(t) for t in result.cell_types]
    props = np.asarray(result.proportions, dtype=float)
    fitted = ~np.isnan(props).any(axis=1)
    out.obsm[keys.proportions(key)] = pd.DataFrame(props, index=out.obs_names, columns=types)
    dominant = np.full(adata.n_obs, FILTERED_LABEL, dtype=object)
    if fitted.any():
        dominant[fitted] = np.asarray(types, dtype=object)[np.argmax(props[fitted], axis=1)]
    out.obs[keys.dominant_type(key)] = pd.Categorical(dominant, categories=types + [FILTERED_LABEL])

    for name, value in result.obs.items():
        out.obs[name] = value.to_numpy() if isinstance(value, pd.Series) else value
    for name, value in result.obsm.items():
        if isinstance(value, pd.DataFrame):
            value = value.set_axis(out.obs_names, axis=0)
        out.obsm[name] = value
    out.uns[keys.run_info(key)] = h5_safe(
        {
            "method": result.method,
            "mode": result.mode,
            "parameters": result.params,
            "cell_types": types,
            "version": __version__,
            "device": result.device,
            "runtime_s": float(result.runtime_s),
            "n_fitted": int(fitted.sum()),
            "n_filtered": int((~fitted).sum()),
            **(
                {
                    keys.STOP_REASON: str(result.stop["reason"]),
                    keys.EPOCHS_RUN: int(result.stop["epochs_run"]),
                    keys.STOPPED_EARLY_BY_USER: result.stop["reason"] == "user",
                }
                if result.stop
                else {}
            ),
        }
    )
    for name, value in result.uns.items():
        out.uns[name] = h5_safe(value)

    palette = cell_type_palette(types, {**known_colors(adata), **(colors or {})})
    out.uns[keys.CELL_TYPE_NAMES] = types
    out.uns[keys.CELL_TYPE_COLORS] = [palette[t] for t in types]
    out.uns[keys.colors(keys.dominant_type(key))] = [palette[t] for t in types] + [FILTERED_COLOR]
    return out


def _full_rows(value, kept: np.ndarray, barcodes: np.ndarray):
    """``value`` (one row per fitted spot) with a row for every spot; the others filled as RCTD fills the spots it
    filters out: NaN, False, 0 (-1 in a 2-D integer table of indices), "filtered" for labels."""
    n = len(barcodes)
    if isinstance(value, pd.DataFrame):
        return value.set_axis(barcodes[kept], axis=0).reindex(barcodes)
    if isinstance(value, pd.Series):
        value = value.to_numpy()
    if isinstance(value, pd.Categorical):
        cats = list(value.categories) + ([FILTERED_LABEL] if FILTERED_LABEL not in value.categories else [])
        full = np.full(n, FILTERED_LABEL, dtype=object)
        full[kept] = np.asarray(value, dtype=object)
        return pd.Categorical(full, categories=cats)
    arr = np.asarray(value)
    if arr.ndim == 0 or arr.shape[0] != len(kept):
        return value
    kind = arr.dtype.kind
    if kind in "fc":
        fill = np.nan
    elif kind == "b":
        fill = False
    elif kind in "iu":
        fill = -1 if arr.ndim == 2 and kind == "i" else 0
    else:
        arr = arr.astype(object)
        fill = FILTERED_LABEL
    full = np.full((n, *arr.shape[1:]), fill, dtype=arr.dtype)
    full[kept] = arr
    return full


def restore_dropped_spots(result: DeconvResult, kept: np.ndarray, barcodes) -> DeconvResult:
    """A result fitted on the spots ``kept`` (indices into ``barcodes``, the whole slide) with a row for every spot;
    the left-out spots get NaN proportions, so they read as filtered. A model state in ``uns`` (a dict holding
    ``barcodes``, as DestVI's) gets every spot's barcode and NaN rows in its per-spot entries, so its spot
    positions match the slide's."""
    barcodes = np.asarray(barcodes, dtype=str)
    kept = np.asarray(kept)
    props = np.full((len(barcodes), result.proportions.shape[1]), np.nan)
    props[kept] = result.proportions
    uns = {}
    for name, value in result.uns.items():
        if isinstance(value, dict) and "barcodes" in value:
            value = {
                k: barcodes if k == "barcodes" else _full_rows(v, kept, barcodes) if k in PER_SPOT_STATE else v
                for k, v in value.items()
            }
        uns[name] = value
    return dataclasses.replace(
        result,
        proportions=props,
        obs={k: _full_rows(v, kept, barcodes) for k, v in result.obs.items()},
        obsm={k: _full_rows(v, kept, barcodes) for k, v in result.obsm.items()},
        uns=uns,
    )


# Temporary names beside a target: ".<name>.<pid>-<random><suffix>"; the pid tells a later run whether the writer
# is gone (killed mid-write), so that its litter can be swept without touching a live concurrent writer's file.
_TEMP_MARK = ".sdgtmp"
# a previous output renamed aside while its replacement moves in (folders: .zarr); put back if the writer died
ASIDE_SUFFIX = ".old"


def temp_name(path: Path, suffix: str = "") -> Path:
    """A fresh temporary sibling of ``path``, named after this process so :func:`sweep_litter` can judge it."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{_TEMP_MARK}{suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_litter(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that writers of ``path`` left when they were killed (their process is gone); a
    previous output that a killed writer had renamed aside comes back when nothing took its place."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(prefix) or _TEMP_MARK not in name:
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        try:
            if name.endswith(_TEMP_MARK + ASIDE_SUFFIX) and not os.path.lexists(path):
                os.replace(entry.path, path)
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output whose folder cannot be created or written, or that is a folder."""
    path = Path(path)
    if path.is_dir() and path.suffix != ".zarr":
        raise InputError(f"the output {path} is a folder.", "name a file, e.g. OUT.h5ad.", code="bad_output")
    folder = path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(
            f"the output folder {folder} cannot be created: {existing} is not a folder.",
            "choose an output in a folder you can write to.",
            code="output_not_writable",
        )
    # try it: permission bits do not tell (root, read-only mounts, ACLs, network file systems)
    probe = existing / f".sdg-write-probe.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch(exist_ok=False)
    except OSError as exc:
        raise InputError(
            f"the output folder {existing} is not writable ({exc.strerror or type(exc).__name__}).",
            "choose an output in a folder you can write to (or fix its permissions).",
            code="output_not_writable",
        ) from exc
    probe.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temp path beside ``path``; on success it replaces ``path`` in one rename, on failure it goes.

    A writer killed outright (SIGKILL, power loss) cannot clean up: its temporary is swept by the next writer of
    ``path``. The writer creates the temporary itself, so it gets the permissions a plain ``open()`` gives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_litter(path)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.unlink(tmp)


def write_h5ad_atomic(adata: ad.AnnData, path: str | os.PathLike, compression: str | None = "gzip") -> Path:
    """Write to a temp file in the target folder, then rename over the target: readers never see half a file."""
    with atomic_path(path, ".h5ad") as tmp:
        adata.write_h5ad(tmp, compression=compression)
    return Path(path)


def write_result_h5ad(adata: ad.AnnData, path: str | os.PathLike, counts: bool = False) -> Path:
    """Write a result: by default :func:`results_only` (uncompressed; the tables are small), with ``counts`` the
    whole AnnData as it is (gzip-compressed, as before)."""
    if counts:
        return write_h5ad_atomic(adata, path)
    return write_h5ad_atomic(results_only(adata), path, compression=None)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
