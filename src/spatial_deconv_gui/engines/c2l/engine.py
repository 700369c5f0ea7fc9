"""cell2location's models end to end: gene selection -> reference signatures -> spatial model -> abundances."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ... import keys
from ...io.inputs import ReferenceInput, SpatialInput
from ..base import DeconvResult, PartialResult, RunControl, TrainingStatus, thread_cap
from ..bayes import CountData, require_two_types
from ..convergence import ConvergenceMonitor, ConvergenceRule, eta_note, raise_diverged, stop_message
from ..devices import device_name, torch_device
from .config import C2LConfig, batch_column, check_config, convergence_rule
from .intervals import posterior_intervals
from .model import (
    ReferenceRegression,
    SpatialModel,
    SpatialPriors,
    default_reference_epochs,
    detection_mean_for,
)

KEY = "c2l"
# cell2location's own slots, beyond keys.py's common ones
ABUNDANCES = f"{KEY}_abundances"  # obsm: posterior mean cell abundance per spot and type
ABUNDANCES_Q05 = f"{KEY}_abundances_q05"  # obsm: its 5 % quantile
TRAINING = f"{KEY}_training"  # uns: loss curves, timings, genes, signatures


def filter_genes(
    counts: sp.spmatrix,
    cell_count_cutoff: float = 15,
    cell_percentage_cutoff2: float = 0.05,
    nonz_mean_cutoff: float = 1.12,
) -> np.ndarray:
    """cell2location's reference gene filter, as a boolean mask over genes.

    A gene is kept when it is detected in more than ``cell_percentage_cutoff2`` of the cells, or in more than
    ``cell_count_cutoff`` cells with a mean over its non-zero cells above ``nonz_mean_cutoff``.
    """
    csc = sp.csc_matrix(counts)
    n_cells = np.asarray((csc > 0).sum(0)).ravel().astype(float)
    totals = np.asarray(csc.sum(0)).ravel().astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        nonz_mean = np.where(n_cells > 0, totals / np.maximum(n_cells, 1), 0.0)
    many = n_cells > counts.shape[0] * cell_percentage_cutoff2
    some = (n_cells > cell_count_cutoff) & (nonz_mean > nonz_mean_cutoff)
    return many | some


def type_means(counts: sp.spmatrix, labels: np.ndarray, types: list[str]) -> np.ndarray:
    """Mean counts per type (types x genes): cell2location's ``compute_cluster_averages``."""
    csr = sp.csr_matrix(counts, dtype=np.float64)
    out = np.zeros((len(types), csr.shape[1]))
    for i, t in enumerate(types):
        rows = np.flatnonzero(labels == t)
        out[i] = np.asarray(csr[rows].mean(axis=0)).ravel()
    return out


def select_genes(spatial: SpatialInput, reference: ReferenceInput, config: C2LConfig = C2LConfig()):
    """Slide genes kept by the reference gene filter and present in both: (slide columns, reference columns,
    gene names, number of reference genes passing the filter)."""
    ref_genes = np.asarray(reference.genes).astype(str)
    keep_ref = np.ones(len(ref_genes), bool)
    if config.gene_filter:
        keep_ref = filter_genes(
            sp.csr_matrix(reference.counts),
            config.cell_count_cutoff,
            config.cell_percentage_cutoff2,
            config.nonz_mean_cutoff,
        )
    s_genes = np.asarray(spatial.genes).astype(str)
    ref_pos = {g: i for i, g in enumerate(ref_genes) if keep_ref[i]}
    shared = [i for i, g in enumerate(s_genes) if g in ref_pos]
    if len(shared) < 10:
        raise ValueError(
            f"cell2location: only {len(shared)} genes shared by the slide and the reference "
            f"(after the reference gene filter: {int(keep_ref.sum())} kept); need at least 10"
        )
    s_cols = np.array(shared)
    r_cols = np.array([ref_pos[s_genes[i]] for i in shared])
    return s_cols, r_cols, s_genes[s_cols], int(keep_ref.sum())


class MinibatchCounts:
    """Minibatches of a counts matrix in :func:`nb_loglik`'s form, without deduplicating counts at every step.

    :class:`CountData` finds the distinct (gene, count) pairs of its matrix with a sort, which costs several
    times a training step when it is redone for each minibatch. Here the pairs of the whole matrix are found
    once; a minibatch only counts how often each pair occurs among its cells (a ragged gather over the CSR rows
    and a bincount), so the ``lgamma`` terms keep their few-thousand evaluations per step.
    """

    def __init__(self, counts: sp.spmatrix, device: torch.device | str = "cpu", dtype=torch.float32):
        csr = sp.csr_matrix(counts)
        n_genes = csr.shape[1]
        self.n_genes = n_genes
        self.dense = torch.as_tensor(csr.toarray(), dtype=dtype, device=device)
        key = csr.data.astype(np.float64) * n_genes + csr.indices
        uniq, inverse = np.unique(key, return_inverse=True)
        cols = np.remainder(uniq, n_genes).astype(np.int64)
        self.u_cols = torch.as_tensor(cols, device=device)
        self.u_values = torch.as_tensor((uniq - cols) / n_genes, dtype=dtype, device=device)
        self.lgamma_pairs = torch.lgamma(self.u_values.double() + 1)
        self.pair_of_entry = torch.as_tensor(inverse.ravel().astype(np.int64), device=device)  # CSR order
        self.indptr = torch.as_tensor(csr.indptr.astype(np.int64), device=device)
        self.row_nnz = self.indptr[1:] - self.indptr[:-1]

    def batch(self, idx: torch.Tensor):
        """The rows ``idx`` as an object :func:`nb_loglik` accepts (the attributes of :class:`CountData`)."""
        from types import SimpleNamespace

        lens = self.row_nnz[idx]
        offsets = torch.cumsum(lens, 0) - lens  # where each row's entries start in the gathered list
        pos = torch.arange(int(lens.sum()), device=idx.device) + torch.repeat_interleave(
            self.indptr[idx] - offsets, lens
        )
        weights = torch.bincount(self.pair_of_entry[pos], minlength=self.u_cols.numel()).to(self.u_values.dtype)
        dense = self.dense[idx]
        return SimpleNamespace(
            dense=dense,
            shape=tuple(dense.shape),
            u_cols=self.u_cols,
            u_values=self.u_values,
            u_weights=weights,
            nnz_per_gene=torch.bincount(self.u_cols, weights=weights, minlength=self.n_genes).view(1, -1),
            lgamma_x1=(self.lgamma_pairs * weights.double()).sum().to(self.u_values.dtype),
        )


def batch_codes(batches, n_cells: int) -> tuple[np.ndarray, list[str]]:
    """Integer batch index per reference cell and the batch names (sorted), checked.

    Missing labels or a length mismatch raise an :class:`InputError`; a batch with a single cell draws a
    ``RuntimeWarning`` (its detection efficiency and background rest on one cell: the priors decide them).
    """
    from ...io.errors import InputError

    arr = pd.Series(np.asarray(batches, dtype=object).ravel())
    if len(arr) != n_cells:
        raise InputError(
            f"cell2location: {len(arr)} reference batch labels for {n_cells} reference cells.",
            "pass one batch label per reference cell (after dropping cells without a cell type).",
            code="reference_batch_length",
        )
    missing = arr.isna().to_numpy()
    if missing.any():
        raise InputError(
            f"cell2location: {int(missing.sum())} reference cells have no batch label "
            f"(first: cell {int(np.flatnonzero(missing)[0])}).",
            "fill the batch column for every cell, or drop those cells.",
            code="reference_batch_missing",
        )
    names = arr.astype(str).to_numpy()
    order = sorted(set(names))
    codes = np.array(pd.Categorical(names, categories=order).codes, dtype=np.int64)
    sizes = np.bincount(codes, minlength=len(order))
    lonely = [b for b, n in zip(order, sizes) if n < 2]
    if lonely:
        warnings.warn(
            f"cell2location: reference batch(es) {lonely[:10]} have a single cell, so their detection "
            "efficiency and background are barely identified; merge them into a larger batch or drop "
            "those cells.",
            RuntimeWarning,
            stacklevel=2,
        )
    return codes, order


def fit_reference_signatures(
    counts: sp.spmatrix,
    labels: np.ndarray,
    types: list[str],
    epochs: int,
    batch_size: int = 2500,
    lr: float = 0.002,
    seed: int = 0,
    device: torch.device | str = "cpu",
    control: RunControl | None = None,
    batches: np.ndarray | None = None,
    details: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """NB regression signatures (types x genes, posterior means) and the loss per epoch.

    ``batches`` (one label per cell, optional) fits cell2location's per-batch detection efficiency and
    background (``batch_key``); without it all cells are one batch. ``details``, when given, receives the
    batch names, their fitted detection efficiencies and backgrounds, and the steady-state seconds per epoch.
    """
    control = control or RunControl()
    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    means = type_means(counts, labels, types)
    lab = np.array(pd.Categorical(labels, categories=types).codes)
    if (lab < 0).any():
        raise ValueError("reference labels outside the cell type list")
    n_cells = counts.shape[0]
    if batches is None:
        codes, names = np.zeros(n_cells, np.int64), ["all"]
    else:
        codes, names = batch_codes(batches, n_cells)
    model = ReferenceRegression(len(types), counts.shape[1], means, n_batches=len(names), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    labels_t = torch.as_tensor(lab, dtype=torch.long, device=device)
    batches_t = torch.as_tensor(codes, dtype=torch.long, device=device) if len(names) > 1 else None
    full = n_cells <= batch_size
    if full:
        data = CountData(counts, device)
    else:
        minibatches = MinibatchCounts(counts, device)
    history = torch.zeros(epochs, dtype=torch.float32, device=device)
    marks = {}
    for epoch in range(epochs):
        if epoch in (1, epochs - 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks[epoch] = time.perf_counter()
        if full:
            opt.zero_grad(set_to_none=True)
            loss = model.negative_elbo(data, labels_t, 1.0, gen, batches_t)
            loss.backward()
            opt.step()
            history[epoch] = loss.detach()
        else:
            perm = torch.randperm(n_cells, generator=gen, device=device)
            total = torch.zeros((), device=device)
            for start in range(0, n_cells, batch_size):
                idx = perm[start : start + batch_size]
                opt.zero_grad(set_to_none=True)
                loss = model.negative_elbo(
                    minibatches.batch(idx),
                    labels_t[idx],
                    n_cells / len(idx),
                    gen,
                    None if batches_t is None else batches_t[idx],
                )
                loss.backward()
                opt.step()
                total += loss.detach()
            history[epoch] = total
        if epoch % 50 == 0 or epoch == epochs - 1:
            control.check_cancel()
            control.report("reference", (epoch + 1) / epochs, f"reference epoch {epoch + 1}/{epochs}")
    if not torch.isfinite(history[-1]):
        raise_diverged("cell2location reference regression", epochs, "reference_lr", lr)
    if details is not None:
        effects = model.batch_effects()
        details.update(
            batches=list(names),
            batch_sizes=np.bincount(codes, minlength=len(names)).tolist(),
            detection=effects["detection"],
            background=effects["background"],
            seconds_per_epoch=(marks[epochs - 1] - marks[1]) / (epochs - 2) if epochs > 2 else float("nan"),
        )
    return model.signatures(), history.cpu().numpy()


def train_spatial(
    model: SpatialModel,
    data: CountData,
    epochs: int,
    lr: float,
    seed: int,
    control: RunControl,
    report_every: int,
    spot_index: np.ndarray,
    types: list[str],
    rule: ConvergenceRule | None = None,
    lr_anneal: float = 0.0,
) -> tuple[np.ndarray, tuple[float, float], str]:
    """Full-batch training for at most ``epochs`` epochs (fewer when ``rule`` says the answer converged, or the
    user asks to stop); returns the loss per epoch run, the steady-state (wall, CPU) seconds per epoch and why
    it stopped (:data:`~..base.STOP_REASONS`)."""
    device = model.cell_state.device
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # the last lr_anneal share of the epochs: the rate falls linearly to a fifth, which damps Adam's jitter
    anneal_from = epochs - int(round(lr_anneal * epochs))
    history = torch.zeros(epochs, dtype=torch.float32, device=device)
    monitor = ConvergenceMonitor(rule, epochs) if rule is not None else None
    t0 = time.perf_counter()
    marks = {1: (t0, time.process_time())}
    reason, done, expected = "cap", 0, None

    answer_of = {}  # epoch -> proportions: a report epoch that is also a check epoch computes them once

    def proportions() -> np.ndarray:
        if done not in answer_of:
            ab = model.abundance_mean().double().cpu().numpy()
            answer_of.clear()
            answer_of[done] = ab / ab.sum(1, keepdims=True)
        return answer_of[done]

    def status(stop_reason=None) -> TrainingStatus:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        return TrainingStatus(done, epochs, rate, expected, stop_reason)

    for epoch in range(epochs):
        if epoch == 1:
            marks[1] = (time.perf_counter(), time.process_time())
        if epoch >= anneal_from:
            opt.param_groups[0]["lr"] = lr * (1.0 - 0.8 * (epoch - anneal_from + 1) / (epochs - anneal_from))
        opt.zero_grad(set_to_none=True)
        loss = model.fused_negative_elbo(data, gen)
        loss.backward()
        opt.step()
        history[epoch] = loss.detach()
        done = epoch + 1
        if monitor is not None and monitor.due(done) and done < epochs:
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise_diverged("cell2location", done, "lr", lr)
            if monitor.update(done, proportions()):
                reason = "converged"
                break
            expected = monitor.expected_epoch(done)
        if done % 25 == 0:
            control.check_cancel()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise_diverged("cell2location", done, "lr", lr)
            if control.stop_requested and done < epochs:
                reason = "user"
                break
            control.report(
                "spatial",
                done / (expected or epochs),
                f"epoch {done}/{epochs}{eta_note(expected, epochs)}, -ELBO {loss_value:.4g}",
                training=status(),
            )
        if done % report_every == 0 or done == epochs:
            control.check_cancel()
            loss_value = float(loss.detach())
            rate = done / max(time.perf_counter() - t0, 1e-9)
            control.report(
                "spatial",
                done / (expected or epochs),
                f"epoch {done}/{epochs}, -ELBO {loss_value:.4g}, {rate:.1f} epochs/s",
                partial=PartialResult(spot_index, proportions(), list(types)),
                training=status(),
            )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    history = history[:done].cpu().numpy()
    if not np.isfinite(history[-1]):
        raise_diverged("cell2location", done, "lr", lr)
    control.report("spatial", 1.0, stop_message(reason, done, epochs, rule), training=status(reason))
    if done > 2:  # steady-state wall and CPU seconds per epoch (epochs 2 .. done), the first one excluded
        now = (time.perf_counter(), time.process_time())
        per_epoch = ((now[0] - marks[1][0]) / (done - 1), (now[1] - marks[1][1]) / (done - 1))
    else:
        per_epoch = ((time.perf_counter() - t0) / max(done, 1), float("nan"))
    return history, per_epoch, reason


def run_c2l(
    spatial: SpatialInput,
    reference: ReferenceInput,
    config: C2LConfig = C2LConfig(),
    control: RunControl | None = None,
    reference_batches: np.ndarray | None = None,
) -> DeconvResult:
    """Fit cell2location's reference regression and spatial model on ``spatial`` and ``reference``.

    ``reference_batches``: one batch label per reference cell (``api.reference_batch_labels`` reads them from
    the column ``config.reference_batch_col``); required when that column is set, and only used by the
    regression signatures.
    """
    check_config(config)
    require_two_types("cell2location", reference.type_names)
    col = batch_column(config)
    if col is not None and reference_batches is None:
        from ...io.errors import InputError

        raise InputError(
            f"cell2location: reference_batch_col={col!r} is set but no batch labels were passed.",
            f"pass reference_batches=api.reference_batch_labels(reference_adata, {col!r}, cell_type_col) to run_c2l.",
            code="reference_batch_labels",
        )
    if col is None:
        reference_batches = None
    elif config.signatures != "regression":
        warnings.warn(
            f"cell2location: reference_batch_col={col!r} is ignored with signatures={config.signatures!r}; "
            "use signatures='regression' to model the batches.",
            RuntimeWarning,
            stacklevel=2,
        )
    with thread_cap(training_threads(config)):
        return _run(spatial, reference, config, control, reference_batches)


def training_threads(config: C2LConfig) -> int | None:
    """torch threads for a run: ``n_threads`` when set; else one on the CPU, torch's own setting on a GPU.

    A training step is several hundred small tensor operations on matrices of a few MB: a second thread splits
    little work per operation and waits at every one of them, and on a machine with other busy processes it
    waits for a descheduled sibling (benchmarks/RESULTS.md, issue 21: 3-11x more CPU with two threads on the
    project's 2-core machine, at every load measured).
    """
    if config.n_threads is not None:
        return config.n_threads
    return 1 if device_name(config.device) == "cpu" else None


def _run(
    spatial: SpatialInput,
    reference: ReferenceInput,
    config: C2LConfig,
    control: RunControl | None,
    reference_batches: np.ndarray | None = None,
) -> DeconvResult:
    t_start = time.perf_counter()
    control = control or RunControl()
    device = torch_device(config.device)
    torch.manual_seed(config.seed)

    # ---- genes ---------------------------------------------------------------------------------------
    control.report("genes", 0.0, "selecting genes")
    types = reference.type_names
    s_cols, r_cols, genes, n_filtered = select_genes(spatial, reference, config)
    ref_counts = sp.csr_matrix(reference.counts)
    control.report("genes", 1.0, f"{len(genes)} genes, {len(types)} cell types")
    control.check_cancel()

    # ---- reference signatures ------------------------------------------------------------------------
    labels = np.asarray(reference.cell_types).astype(str)
    ref_sub = ref_counts[:, r_cols]
    ref_history = np.zeros(0, np.float32)
    ref_details: dict[str, Any] = {}
    if config.signatures == "regression":
        epochs_ref = config.reference_epochs or default_reference_epochs(ref_sub.shape[0])
        n_b = "" if reference_batches is None else f", {len(set(map(str, reference_batches)))} batches"
        control.report("reference", 0.0, f"NB regression over {ref_sub.shape[0]} cells{n_b}, {epochs_ref} epochs")
        signatures, ref_history = fit_reference_signatures(
            ref_sub,
            labels,
            types,
            epochs_ref,
            config.reference_batch_size,
            config.reference_lr,
            config.seed,
            device,
            control,
            batches=reference_batches,
            details=ref_details,
        )
    else:
        epochs_ref = 0
        signatures = type_means(ref_sub, labels, types)
    control.report("reference", 1.0, "signatures ready")
    control.check_cancel()

    # ---- spatial model -------------------------------------------------------------------------------
    counts = sp.csr_matrix(spatial.counts)[:, s_cols]
    totals = np.asarray(counts.sum(axis=1)).ravel()
    det_mean = detection_mean_for(totals, signatures, config.n_cells_per_location)
    priors = SpatialPriors(
        n_cells_per_location=float(config.n_cells_per_location),
        detection_alpha=float(config.detection_alpha),
        detection_mean=det_mean,
        n_groups=int(config.n_groups),
    )
    data = CountData(counts, device)
    model = SpatialModel(signatures, counts.shape[0], priors, device=device)
    n_spots = counts.shape[0]
    rule = convergence_rule(config)
    until = "at most " if rule is not None else ""
    control.report("spatial", 0.0, f"{n_spots} spots x {len(genes)} genes, {until}{config.max_epochs} epochs")
    t_sp = time.perf_counter()
    history, epoch_seconds, reason = train_spatial(
        model,
        data,
        config.max_epochs,
        config.lr,
        config.seed,
        control,
        config.report_every,
        np.arange(n_spots),
        types,
        rule,
        config.lr_anneal,
    )
    spatial_s = time.perf_counter() - t_sp

    abundances = model.abundance_mean().double().cpu().numpy()
    q05 = model.abundance_quantile(0.05).double().cpu().numpy()
    props = abundances / abundances.sum(1, keepdims=True)
    barcodes = np.asarray(spatial.barcodes).astype(str)
    interval_obsm = {}
    if config.uncertainty:
        control.report("intervals", 0.0, f"{config.interval_samples} posterior draws per spot")
        lower, upper, widened = posterior_intervals(
            model, props, config.interval_samples, config.seed, config.interval_min_cells
        )
        interval_obsm = {
            keys.proportions_lower(KEY): pd.DataFrame(lower, index=barcodes, columns=list(types)),
            keys.proportions_upper(KEY): pd.DataFrame(upper, index=barcodes, columns=list(types)),
        }
        control.report("intervals", 1.0, "intervals ready")

    params: dict[str, Any] = config.to_dict()
    params.update(
        device=str(device),
        detection_mean=float(det_mean),
        n_genes=int(len(genes)),
        reference_epochs_run=int(epochs_ref),
        torch_threads=int(torch.get_num_threads()),  # what training ran on (n_threads None: the default rule)
    )
    if config.uncertainty:
        params["interval_widened_cells"] = widened  # (spot, type) cells widened to hold the point estimate
    return DeconvResult(
        key=KEY,
        method="cell2location",
        mode=None,
        cell_types=list(types),
        proportions=props,
        params=params,
        device=str(device),
        runtime_s=time.perf_counter() - t_start,
        stop={"reason": reason, "epochs_run": int(len(history)), "max_epochs": int(config.max_epochs)},
        obsm={
            ABUNDANCES: pd.DataFrame(abundances, index=barcodes, columns=list(types)),
            ABUNDANCES_Q05: pd.DataFrame(q05, index=barcodes, columns=list(types)),
            **interval_obsm,
        },
        uns={
            TRAINING: {
                "loss": history.astype(np.float64),
                "reference_loss": ref_history.astype(np.float64),
                "loss_definition": "negative ELBO per epoch (full batch, summed over spots and genes)",
                "stopped": reason,
                "epochs_run": int(len(history)),
                "spatial_seconds": float(spatial_s),
                "seconds_per_epoch": float(epoch_seconds[0]),
                "cpu_seconds_per_epoch": float(epoch_seconds[1]),
                "genes": [str(g) for g in genes],
                "signatures": signatures.astype(np.float64),
                **(
                    {
                        "reference_batches": [str(b) for b in ref_details["batches"]],
                        "reference_batch_sizes": [int(n) for n in ref_details["batch_sizes"]],
                        "reference_detection": np.asarray(ref_details["detection"], np.float64),
                        "reference_background": np.asarray(ref_details["background"], np.float64),
                        "reference_seconds_per_epoch": float(ref_details["seconds_per_epoch"]),
                    }
                    if ref_details
                    else {}
                ),
            }
        },
    )
