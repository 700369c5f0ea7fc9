"""Storing engine results in AnnData slots and writing files without ever leaving a half-written one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from .. import __version__, keys
from ..colors import FILTERED_COLOR, FILTERED_LABEL, cell_type_palette, palette_from_uns

# uns: a categorical column's categories in colour order (keys.CELL_TYPE_NAMES for the cell-type column)
NAMES_SUFFIX = "_names"

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


def attach_result(adata: ad.AnnData, result: DeconvResult, colors: dict[str, str] | None = None) -> ad.AnnData:
    """A copy of ``adata`` holding ``result`` in the common slot scheme; ``adata`` is left untouched."""
    if result.proportions.shape[0] != adata.n_obs:
        raise ValueError(f"result has {result.proportions.shape[0]} rows for {adata.n_obs} spots")
    out = adata.copy()
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temp path beside ``path``; on success it replaces ``path`` in one rename, on failure it goes.

    The temp file gets the permissions a plain ``open()`` would give (mkstemp's are owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_h5ad_atomic(adata: ad.AnnData, path: str | os.PathLike, compression: str | None = "gzip") -> Path:
    """Write to a temp file in the target folder, then rename over the target: readers never see half a file."""
    with atomic_path(path, ".h5ad") as tmp:
        adata.write_h5ad(tmp, compression=compression)
    return Path(path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
