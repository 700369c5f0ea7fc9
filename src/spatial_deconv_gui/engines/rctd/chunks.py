"""RCTD's per-spot fits for one chunk of spots, as a pure function of the chunk and what every chunk shares.

After the platform effect and sigma (one step over the whole slide) the spots are independent: the engine fits
them chunk by chunk, in this process or as tasks on a Dask cluster (:mod:`..cluster`), with the same function
and the same chunks, so both give the same answer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ..cluster import task_threads
from .intervals import observed_information, pair_intervals, simplex_intervals
from .likelihood import LikelihoodTable
from .modes import SolverSettings, fit_doublet, fit_full, fit_multi


@dataclass(eq=False)  # hashed by identity: the per-process cache below keys on the object
class PixelModel:
    """What every chunk's fit reads: the regression profiles, the likelihood at the run's sigma and the
    mode's settings (sent once to each worker)."""

    profiles: np.ndarray  # regression genes x types, platform effect applied
    table: LikelihoodTable
    settings: SolverSettings
    mode: str
    confidence_threshold: float
    doublet_threshold: float
    type_class: list[str] | None
    max_types: int
    uncertainty: bool
    interval_draws: int
    seed: int
    task_threads: int | None = None  # numba threads per chunk (set for Dask tasks; None: the process's own)

    @property
    def n_types(self) -> int:
        return self.profiles.shape[1]


# the torch forms of a model's profiles and table, built once per process (a worker fits many chunks)
_TORCH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _torch_parts(model: PixelModel):
    parts = _TORCH.get(model)
    if parts is None:
        s = model.settings
        parts = (
            torch.as_tensor(model.profiles, dtype=s.dtype, device=s.device),
            model.table.to_torch(s.device, s.dtype),
        )
        _TORCH[model] = parts
    return parts


def output_arrays(model: PixelModel, n: int) -> dict[str, np.ndarray]:
    """Zeroed outputs for ``n`` spots: the fields :func:`fit_chunk` returns, one row per spot."""
    K, mode = model.n_types, model.mode
    out: dict[str, np.ndarray] = {
        "weights": np.zeros((n, K)),
        "conv": np.zeros(n, dtype=bool),
        "props": np.zeros((n, K)),
    }
    if mode == "doublet":
        out.update(
            spot_class=np.zeros(n, dtype=np.int64),
            first=np.zeros(n, dtype=np.int64),
            second=np.zeros(n, dtype=np.int64),
            first_cls=np.zeros(n, dtype=bool),
            second_cls=np.zeros(n, dtype=bool),
            wd=np.zeros((n, 2)),
            min_score=np.zeros(n),
            singlet_score=np.zeros(n),
            conv_full=np.zeros(n, dtype=bool),
        )
    elif mode == "multi":
        m = model.max_types
        out.update(
            type_idx=np.full((n, m), -1, dtype=np.int64),
            sub_w=np.zeros((n, m)),
            conf=np.zeros((n, m), dtype=bool),
            n_types=np.zeros(n, dtype=np.int64),
            min_score=np.zeros(n),
            conv_full=np.zeros(n, dtype=bool),
        )
    if model.uncertainty:
        out["lower"] = np.zeros((n, K))
        out["upper"] = np.zeros((n, K))
    return out


def fit_chunk(counts: sp.csr_matrix, numi: np.ndarray, model: PixelModel) -> dict[str, np.ndarray]:
    """Fit the chunk's spots (``counts``: spots x regression genes, ``numi``: their total UMI); returns the
    :func:`output_arrays` fields for them, ``props`` the proportions."""
    with task_threads(model.task_threads):
        return _fit_chunk(counts, numi, model)


def _fit_chunk(counts: sp.csr_matrix, numi: np.ndarray, model: PixelModel) -> dict[str, np.ndarray]:
    P_t, ttable = _torch_parts(model)
    s = model.settings
    K = model.n_types
    n = counts.shape[0]
    y = torch.as_tensor(np.asarray(counts.todense(), dtype=np.float64), dtype=s.dtype, device=s.device)
    u = torch.as_tensor(np.asarray(numi, dtype=np.float64), dtype=s.dtype, device=s.device)
    out: dict[str, np.ndarray] = {}
    if model.mode == "full":
        w, conv = fit_full(P_t, y, u, ttable, s)
        out["weights"], out["conv"] = w, conv
        total = w.sum(axis=1, keepdims=True)
        out["props"] = np.divide(w, total, out=np.full_like(w, 1.0 / K), where=total > 0)
        if model.uncertainty:
            info = observed_information(P_t, y, u, ttable, w)
            out["lower"], out["upper"] = simplex_intervals(w, info, model.interval_draws, model.seed)
    elif model.mode == "doublet":
        r = fit_doublet(P_t, y, u, ttable, s, model.confidence_threshold, model.doublet_threshold, model.type_class)
        out.update(
            weights=r.weights,
            conv=r.converged_doublet,
            conv_full=r.converged_full,
            spot_class=r.spot_class,
            first=r.first_type,
            second=r.second_type,
            first_cls=r.first_class,
            second_cls=r.second_class,
            wd=r.weights_doublet,
            min_score=r.min_score,
            singlet_score=r.singlet_score,
        )
        p = np.zeros((n, K))
        rows = np.arange(n)
        singlet = r.spot_class == 1
        # spacexr's doublet proportions: a singlet is all first type; otherwise the fitted pair weights
        p[rows, r.first_type] = np.where(singlet, 1.0, r.weights_doublet[:, 0])
        p[rows[~singlet], r.second_type[~singlet]] += r.weights_doublet[~singlet, 1]
        out["props"] = p
        if model.uncertainty:
            out["lower"], out["upper"] = pair_intervals(
                P_t, y, u, ttable, r.first_type, r.second_type, r.pair_weights, p, model.interval_draws, model.seed
            )
    else:
        r = fit_multi(P_t, y, u, ttable, s, model.confidence_threshold, model.doublet_threshold, model.max_types)
        out.update(
            weights=r.weights,
            conv=r.converged_sub,
            conv_full=r.converged_full,
            type_idx=r.type_indices,
            sub_w=r.sub_weights,
            conf=r.confident,
            n_types=r.n_types,
            min_score=r.min_score,
        )
        p = np.zeros((n, K))
        for j in range(model.max_types):
            ok = r.type_indices[:, j] >= 0
            p[np.flatnonzero(ok), r.type_indices[ok, j]] += r.sub_weights[ok, j]
        out["props"] = p
    return out
