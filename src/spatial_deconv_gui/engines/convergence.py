"""When to stop training a Bayesian engine: once its answer, the per-spot proportions, stops moving.

The engines' default epoch counts (cell2location 30,000, DestVI 2,000) are the references' safe upper bounds;
most of those epochs change nothing a user reads. The rule watches the answer itself rather than the ELBO,
whose changes say little about the proportions (a small ELBO gain can be a large move of a few spots, and the
single-sample ELBO is noisy).

Every ``check_every`` epochs the engine hands over the current proportions (spots x types). The change at
epoch e is measured against the answer ``window`` epochs earlier: for each spot the share of its cells that
changed type (half the L1 distance of the two proportion vectors, 0..1), and over spots its ``quantile``
(default the 95th percentile, so a few moving spots count, a single one does not). With ``smooth`` > 1 each
side is the mean of that many consecutive checks, which averages out minibatch noise (DestVI). A check is
settled when the change is below ``tol`` or, with ``noise_ratio``, when it is at most ``noise_ratio`` times the
change between the last two blocks of ``smooth`` checks: the answer then moved over the window no more than it
jitters from block to block (DestVI's minibatch answer never stops jittering, so an absolute tolerance would
never be met, or would stop during the approach). Training stops once ``patience`` consecutive checks are
settled and at least ``min_epochs`` ran; the epoch cap stays a bound.

While the change falls, its logarithm is close to linear in the epoch (the optimiser approaches the optimum
geometrically); a straight-line fit over the last checks, extrapolated to ``tol``, is the estimate of the epoch
the rule will stop at (:meth:`ConvergenceMonitor.expected_epoch`), which the progress reports next to the cap.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConvergenceRule:
    tol: float
    window: int
    check_every: int
    patience: int = 3
    min_epochs: int = 0
    quantile: float = 0.95
    smooth: int = 1
    # also converged when the change over the window is at most this multiple of the change between the last two
    # blocks of ``smooth`` checks: the answer moved no more than its own jitter (minibatch noise, DestVI)
    noise_ratio: float | None = None

    def __post_init__(self):
        if self.check_every < 1 or self.window < self.check_every or self.window % self.check_every:
            raise ValueError(f"window ({self.window}) must be a positive multiple of check_every ({self.check_every})")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol!r}")
        if self.smooth < 1 or self.smooth * self.check_every > self.window:
            raise ValueError(f"smooth ({self.smooth}) checks must fit in the window ({self.window} epochs)")
        if self.noise_ratio is not None and not self.noise_ratio > 0:
            raise ValueError(f"noise_ratio must be > 0, got {self.noise_ratio!r}")


def answer_change(p: np.ndarray, q: np.ndarray, quantile: float = 0.95) -> float:
    """``quantile`` over spots of the share of a spot's cells that changed type between answers ``p`` and ``q``."""
    moved = 0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum(1)
    moved = moved[np.isfinite(moved)]
    return float(np.quantile(moved, quantile)) if moved.size else 0.0


class ConvergenceMonitor:
    """Feed it the answer at every ``rule.check_every``-th epoch; :meth:`update` says when to stop."""

    def __init__(self, rule: ConvergenceRule, max_epochs: int):
        self.rule = rule
        self.max_epochs = int(max_epochs)
        self._answers: deque[tuple[int, np.ndarray]] = deque(maxlen=rule.window // rule.check_every + rule.smooth)
        self.trace: list[tuple[int, float]] = []  # (epoch, change) at every check with a full window
        self.noise_trace: list[tuple[int, float]] = []  # (epoch, change between the last two blocks) likewise
        self._below = 0
        self.converged_at: int | None = None

    def due(self, epoch: int) -> bool:
        return epoch % self.rule.check_every == 0

    def _mean(self, newest: int) -> np.ndarray:
        """Mean of the ``smooth`` answers ending at position ``newest`` of the kept answers."""
        items = list(self._answers)[newest - self.rule.smooth + 1 : newest + 1]
        return items[0][1] if len(items) == 1 else np.mean([a for _, a in items], axis=0)

    def update(self, epoch: int, proportions: np.ndarray) -> bool:
        """Record the answer at ``epoch``; True when training should stop here."""
        r = self.rule
        self._answers.append((int(epoch), np.array(proportions, dtype=np.float64, copy=True)))
        lag = r.window // r.check_every
        n = len(self._answers)
        if n < lag + r.smooth:
            return False
        old_epoch = self._answers[n - 1 - lag][0]
        if old_epoch != epoch - r.window:  # checks were not evenly spaced (should not happen): start over
            self._answers.clear()
            self._answers.append((int(epoch), np.array(proportions, dtype=np.float64, copy=True)))
            self._below = 0
            return False
        now = self._mean(n - 1)
        change = answer_change(now, self._mean(n - 1 - lag), r.quantile)
        self.trace.append((int(epoch), change))
        settled = change < r.tol
        if r.noise_ratio is not None:
            jitter = answer_change(now, self._mean(n - 1 - r.smooth), r.quantile)
            self.noise_trace.append((int(epoch), jitter))
            settled = settled or change <= r.noise_ratio * jitter
        self._below = self._below + 1 if settled else 0
        if self._below >= r.patience and epoch >= r.min_epochs:
            self.converged_at = int(epoch)
            return True
        return False

    def expected_epoch(self, epoch: int, fit_points: int = 5) -> int | None:
        """The epoch the rule is expected to stop at, or None while that cannot be told (change not falling)."""
        r = self.rule
        if self._below:
            return max(epoch + (r.patience - self._below) * r.check_every, r.min_epochs)
        pts = [(e, c) for e, c in self.trace[-fit_points:] if c > 0]
        if len(pts) < 3:
            return None
        e = np.array([p[0] for p in pts], np.float64)
        y = np.log([p[1] for p in pts])
        slope, intercept = np.polyfit(e, y, 1)
        if not slope < 0:
            return None
        reach = (math.log(r.tol) - intercept) / slope
        if not math.isfinite(reach):
            return None
        expected = int(math.ceil(reach / r.check_every) * r.check_every) + (r.patience - 1) * r.check_every
        return int(min(max(expected, epoch + r.check_every, r.min_epochs), self.max_epochs))


def eta_note(expected: int | None, max_epochs: int) -> str:
    """The part of a progress message that says where training is expected to stop."""
    if expected is None or expected >= max_epochs:
        return ""
    return f", converging: stop expected near epoch {expected}"


def stop_message(reason: str, epochs_run: int, max_epochs: int, rule: ConvergenceRule | None = None) -> str:
    """The last progress message of a training stage: why it stopped."""
    if reason == "converged":
        jitter = f" or no more than {rule.noise_ratio:g}x its jitter" if rule is not None and rule.noise_ratio else ""
        detail = f" (answer moved < {rule.tol:g}{jitter} over the last {rule.window} epochs)" if rule else ""
        return f"converged at epoch {epochs_run} of {max_epochs}{detail}"
    if reason == "user":
        return f"stopped by the user at epoch {epochs_run} of {max_epochs}; keeping this answer"
    return f"reached the epoch cap ({max_epochs})"


def raise_diverged(model: str, epoch: int, lr_flag: str, lr: float) -> None:
    """Training produced a NaN or infinite loss: one clear error, nothing kept (the CLI exits 2, writes nothing)."""
    from ..io.errors import InputError

    raise InputError(
        f"{model}: training diverged by epoch {epoch} (the loss became NaN or infinite) with learning rate {lr:g}.",
        f"lower the learning rate (--{lr_flag.replace('_', '-')}, e.g. {lr / 10:g}) and run again.",
        code="training_diverged",
    )
