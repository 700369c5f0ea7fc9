"""Contracts shared by every deconvolution engine.

Engines take plain arrays (see :mod:`spatial_deconv_gui.io.inputs`), report progress through a
:class:`RunControl`, and return a :class:`DeconvResult`. They know nothing of Qt or AnnData writing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


class Cancelled(Exception):
    """Raised inside an engine when the user asked it to stop; no partial result is kept."""


@dataclass
class PartialResult:
    """Proportions for a batch of spots that just finished, so a GUI can colour them early.

    ``spot_index`` indexes the *input* spots (before any filtering).
    """

    spot_index: np.ndarray
    proportions: np.ndarray
    cell_types: list[str]


@dataclass
class TrainingStatus:
    """Where an iterative training stands, for an ETA that knows about early stopping.

    ``max_epochs`` is the cap: ``seconds_left_max`` (the cap at the current speed) is an upper bound on the time
    left. ``expected_epochs`` is the convergence rule's estimate of the epoch it will stop at, once the answer's
    change per check is falling steadily enough to extrapolate (None before: only the bound is known);
    ``seconds_left_expected`` goes with it. ``stop_reason`` is set on the last event of the stage:
    ``"converged"``, ``"cap"`` or ``"user"`` (see :data:`STOP_REASONS`).
    """

    epoch: int
    max_epochs: int
    epochs_per_s: float
    expected_epochs: int | None = None
    stop_reason: str | None = None

    @property
    def seconds_left_max(self) -> float:
        return max(self.max_epochs - self.epoch, 0) / self.epochs_per_s if self.epochs_per_s > 0 else float("inf")

    @property
    def seconds_left_expected(self) -> float | None:
        if self.expected_epochs is None or self.epochs_per_s <= 0:
            return None
        return max(self.expected_epochs - self.epoch, 0) / self.epochs_per_s


STOP_REASONS = {
    "converged": "the answer stopped moving (convergence rule)",
    "cap": "the epoch cap was reached",
    "user": "stopped by the user; the answer at that epoch is kept",
}


@dataclass
class ProgressEvent:
    """One progress report. ``training`` is set by iterative engines (cell2location, DestVI) during training."""

    stage: str
    fraction: float
    message: str = ""
    partial: PartialResult | None = None
    training: TrainingStatus | None = None


ProgressCallback = Callable[[ProgressEvent], None]


class RunControl:
    """Progress reporting, cooperative cancellation and "stop now, keep the answer" for one engine run.

    The engine calls :meth:`report` at natural checkpoints (between batches, epochs or iterations) and
    :meth:`check_cancel` where stopping is safe. Events without a partial result are rate limited to
    ``max_rate`` per second so that a GUI thread is never flooded; stage changes, partial results and events
    carrying a stop reason are always delivered.

    Cancel (:meth:`cancel`) abandons the run: the engine raises :class:`Cancelled` and nothing is kept.
    Stop (:meth:`request_stop`) ends iterative training at its next check and the engine returns the answer it
    has then, marked as stopped by the user; engines without iterations ignore it and finish normally.
    """

    def __init__(
        self,
        callback: ProgressCallback | None = None,
        cancel_event: threading.Event | None = None,
        max_rate: float = 5.0,
        stop_event: threading.Event | None = None,
    ):
        self._callback = callback
        self.cancel_event = cancel_event or threading.Event()
        self.stop_event = stop_event or threading.Event()
        self._min_interval = 1.0 / max_rate if max_rate > 0 else 0.0
        self._last_emit = 0.0
        self._last_stage: str | None = None

    def report(
        self,
        stage: str,
        fraction: float,
        message: str = "",
        partial: PartialResult | None = None,
        training: TrainingStatus | None = None,
    ):
        if self._callback is None:
            return
        now = time.monotonic()
        stage_changed = stage != self._last_stage
        done = fraction >= 1.0 or (training is not None and training.stop_reason is not None)
        if not (stage_changed or done or partial is not None) and now - self._last_emit < self._min_interval:
            return
        self._last_emit = now
        self._last_stage = stage
        self._callback(ProgressEvent(stage, float(min(max(fraction, 0.0), 1.0)), message, partial, training))

    def cancel(self):
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check_cancel(self):
        if self.cancel_event.is_set():
            raise Cancelled("run cancelled by the user")

    def request_stop(self):
        """Stop iterative training at the next check and keep the answer it has then."""
        self.stop_event.set()

    @property
    def stop_requested(self) -> bool:
        return self.stop_event.is_set()


@dataclass
class DeconvResult:
    """What an engine hands back; :func:`spatial_deconv_gui.io.write.attach_result` stores it.

    ``proportions`` has one row per *input* spot (NaN rows for spots the method filtered out), columns in
    ``cell_types`` order, rows summing to 1 otherwise.
    """

    key: str
    method: str
    mode: str | None
    cell_types: list[str]
    proportions: np.ndarray
    params: dict[str, Any]
    device: str
    runtime_s: float
    obs: dict[str, Any] = field(default_factory=dict)
    obsm: dict[str, Any] = field(default_factory=dict)
    uns: dict[str, Any] = field(default_factory=dict)
    # iterative engines: why training ended and after how many epochs (written into the run's uns entry)
    stop: dict[str, Any] | None = None

    @property
    def fitted(self) -> np.ndarray:
        return ~np.isnan(self.proportions).any(axis=1)

    def proportions_frame(self, index) -> pd.DataFrame:
        return pd.DataFrame(self.proportions, index=index, columns=list(self.cell_types))


@contextlib.contextmanager
def thread_cap(n_threads: int | None):
    """Cap torch's and numba's threads for one run, then restore them (``None``: leave them as they are).

    torch's setting is process-wide, numba's belongs to the calling thread.
    """
    if n_threads is None:
        yield
        return
    import numba
    import torch

    old_torch, old_numba = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(max(1, int(n_threads)))
    numba.set_num_threads(max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        numba.set_num_threads(old_numba)
