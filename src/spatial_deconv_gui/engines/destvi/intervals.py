"""DestVI's per-spot intervals: predictive draws through the trained encoder, and an ensemble of seeds.

DestVI has no posterior over the proportions: v_s (and the cell states gamma_s) are point estimates that an
amortised encoder computes from a spot's counts (scvi-tools' MRDeconv trains them by MAP with a prior on gamma,
not by a variational family over v). The model-based spread it does define is that of its own estimate under its
likelihood: at each spot the fitted model gives the counts' distribution NB(l_s Σ_c v_sc r_scg, θ_g); drawing
``n_samples`` count vectors from it (a gamma-Poisson draw per gene) and passing each through the trained encoder
gives the proportions the model would have reported for a replicate of that spot (a parametric bootstrap, no
retraining). Their 5 % / 95 % quantiles per type are the interval, widened to hold the point estimate. The
encoder's softmax never gives exactly 0, so in each draw a share below ``min_share`` (default 1 %, under a tenth of
a cell in a spot of eight) counts as absent and the row is renormalised; otherwise an absent type's interval could
never reach its true proportion 0.

The reference, the single-cell model and the encoder's weights are held fixed by that construction, and those
are what DestVI's seed changes (two seeds agree only at r 0.86-0.94 on the bundled Visium pairs). ``seeds`` N > 1
trains N models (seeds ``seed`` .. ``seed + N - 1``, single-cell model included): the point estimate is the mean
of their proportions, and the interval is the quantiles of all members' draws pooled (a mixture over the seeds),
widened to hold every member's point estimate and the mean, so the spread across seeds is always inside it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd
import torch

from ... import keys
from ..base import DeconvResult, RunControl
from .model import SpatialDeconv

LEVEL_QUANTILES = (0.05, 0.95)
# draws x spots x genes of simulated counts per chunk (float32): ~64 MB whatever the slide
CHUNK_ELEMENTS = 16_000_000


@torch.no_grad()
def predictive_draws(model: SpatialDeconv, x: torch.Tensor, n_samples: int, seed: int) -> np.ndarray:
    """Proportions (samples, spots, types) the trained encoder gives ``n_samples`` count vectors drawn per spot from
    the fitted model's negative binomial at that spot."""
    model.eval()
    n_spots, n_genes = x.shape
    theta = torch.exp(model.px_r).to(x.dtype)
    out = np.empty((n_samples, n_spots, model.n_labels), dtype=np.float32)
    step = max(1, CHUNK_ELEMENTS // max(1, n_samples * n_genes))
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        for start in range(0, n_spots, step):
            rows = slice(start, min(start + step, n_spots))
            rate = model.forward_outputs(x[rows].unsqueeze(0), False)[0][0]  # spots, genes
            rate = rate.clamp_min(1e-8).expand(n_samples, -1, -1)
            counts = torch.poisson(torch.distributions.Gamma(theta, theta / rate).sample())
            v = torch.softmax(model.V_encoder(torch.log1p(counts)), -1)[..., :-1]
            out[:, rows] = (v / v.sum(-1, keepdim=True)).float().cpu().numpy()
    return out


def draw_intervals(
    draws: np.ndarray, points: list[np.ndarray], min_share: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper): the 5 % / 95 % quantiles of ``draws`` (samples, spots, types), shares below ``min_share``
    counted as 0 in each draw, widened to hold each of ``points`` (spots, types)."""
    kept = np.where(draws < min_share, 0.0, draws.astype(np.float64))
    total = kept.sum(-1, keepdims=True)
    kept = np.where(total > 0, kept / np.where(total > 0, total, 1.0), draws)
    lower, upper = np.quantile(kept, LEVEL_QUANTILES, axis=0)
    for point in points:
        lower, upper = np.minimum(lower, point), np.maximum(upper, point)
    return lower, upper


class _MemberControl:
    """The run's control seen by one member of the ensemble: its messages say which seed is training."""

    def __init__(self, control: RunControl, label: str):
        self._control, self._label = control, label

    def report(self, stage, fraction, message="", partial=None, training=None):
        self._control.report(stage, fraction, f"{self._label}: {message}", partial, training)

    def __getattr__(self, name):
        return getattr(self._control, name)


def run_seed_ensemble(run_one, spatial, reference, config, control: RunControl) -> DeconvResult:
    """Train ``config.seeds`` models with consecutive seeds through ``run_one(spatial, reference, member_config,
    control, draws)`` and combine them: mean proportions, pooled predictive draws for the interval.

    Gamma, the model state used for imputation and the other per-model outputs are the first seed's (latent spaces
    of different seeds are not aligned, so they cannot be averaged). A user's stop ends the member training then
    and trains no further seed; the ensemble is the members trained so far.
    """
    t_start = time.perf_counter()
    n = int(config.seeds)
    members: list[DeconvResult] = []
    draws: list[np.ndarray] = []
    for i in range(n):
        member = dataclasses.replace(config, seed=int(config.seed) + i, seeds=1)
        label = f"seed {member.seed} ({i + 1}/{n})"
        members.append(run_one(spatial, reference, member, _MemberControl(control, label), draws))
        if control.stop_requested:
            break
    first = members[0]
    stack = np.stack([m.proportions for m in members])
    props = stack.mean(axis=0)
    obsm = dict(first.obsm)
    key, types = first.key, list(first.cell_types)
    barcodes = np.asarray(spatial.barcodes).astype(str)
    dummy = f"{key}_dummy_fraction"
    if dummy in obsm:
        obsm[dummy] = pd.DataFrame(
            np.mean([m.obsm[dummy].to_numpy() for m in members], axis=0),
            index=obsm[dummy].index,
            columns=obsm[dummy].columns,
        )
    if config.uncertainty:
        lower, upper = draw_intervals(np.concatenate(draws), [*stack, props], config.interval_min_share)
        obsm[keys.proportions_lower(key)] = pd.DataFrame(lower, index=barcodes, columns=types)
        obsm[keys.proportions_upper(key)] = pd.DataFrame(upper, index=barcodes, columns=types)
    params = dict(first.params)
    params.update(seed=int(config.seed), seeds=n, seeds_run=len(members))
    reasons = [m.stop["reason"] for m in members]
    uns = dict(first.uns)
    training_key = f"{key}_training"
    uns[training_key] = dict(
        uns[training_key],
        ensemble_seeds=[int(m.params["seed"]) for m in members],
        ensemble_proportions=stack.astype(np.float64),
        ensemble_epochs_run=[int(m.stop["epochs_run"]) for m in members],
        ensemble_stopped=reasons,
    )
    stop = {
        "reason": "user" if "user" in reasons else reasons[0],
        "epochs_run": int(members[-1].stop["epochs_run"]),
        "max_epochs": int(first.stop["max_epochs"]),
    }
    return dataclasses.replace(
        first,
        proportions=props,
        params=params,
        obsm=obsm,
        uns=uns,
        stop=stop,
        runtime_s=time.perf_counter() - t_start,
    )


__all__ = ["predictive_draws", "draw_intervals", "run_seed_ensemble"]
