"""cell2location's models end to end: gene selection -> reference signatures -> spatial model -> abundances."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..base import DeconvResult, PartialResult, RunControl, thread_cap
from ...io.inputs import ReferenceInput, SpatialInput
from ..bayes import CountData, resolve_torch_device
from .config import C2LConfig, check_config
from .model import ReferenceRegression, SpatialModel, SpatialPriors, default_reference_epochs, detection_mean_for


def filter_genes(counts: sp.spmatrix, cell_count_cutoff: float = 15, cell_percentage_cutoff2: float = 0.05,
                 nonz_mean_cutoff: float = 1.12) -> np.ndarray:
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
        keep_ref = filter_genes(sp.csr_matrix(reference.counts), config.cell_count_cutoff,
                                config.cell_percentage_cutoff2, config.nonz_mean_cutoff)
    s_genes = np.asarray(spatial.genes).astype(str)
    ref_pos = {g: i for i, g in enumerate(ref_genes) if keep_ref[i]}
    shared = [i for i, g in enumerate(s_genes) if g in ref_pos]
    if len(shared) < 10:
        raise ValueError(f"cell2location: only {len(shared)} genes shared by the slide and the reference "
                         f"(after the reference gene filter: {int(keep_ref.sum())} kept); need at least 10")
    s_cols = np.array(shared)
    r_cols = np.array([ref_pos[s_genes[i]] for i in shared])
    return s_cols, r_cols, s_genes[s_cols], int(keep_ref.sum())


def _resolve_device(device: str) -> torch.device:
    return resolve_torch_device(device)


def fit_reference_signatures(counts: sp.spmatrix, labels: np.ndarray, types: list[str], epochs: int,
                             batch_size: int = 2500, lr: float = 0.002, seed: int = 0,
                             device: torch.device | str = "cpu", control: RunControl | None = None,
                             ) -> tuple[np.ndarray, np.ndarray]:
    """NB regression signatures (types x genes, posterior means) and the loss per epoch."""
    control = control or RunControl()
    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    means = type_means(counts, labels, types)
    lab = np.array(pd.Categorical(labels, categories=types).codes)
    if (lab < 0).any():
        raise ValueError("reference labels outside the cell type list")
    n_cells = counts.shape[0]
    model = ReferenceRegression(len(types), counts.shape[1], means, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    labels_t = torch.as_tensor(lab, dtype=torch.long, device=device)
    full = n_cells <= batch_size
    if full:
        data = CountData(counts, device)
    else:
        dense = torch.as_tensor(sp.csr_matrix(counts).toarray(), dtype=torch.float32, device=device)
    history = torch.zeros(epochs, dtype=torch.float32, device=device)
    for epoch in range(epochs):
        if full:
            opt.zero_grad(set_to_none=True)
            loss = model.negative_elbo(data, labels_t, 1.0, gen)
            loss.backward()
            opt.step()
            history[epoch] = loss.detach()
        else:
            perm = torch.randperm(n_cells, generator=gen, device=device)
            total = torch.zeros((), device=device)
            for start in range(0, n_cells, batch_size):
                idx = perm[start:start + batch_size]
                opt.zero_grad(set_to_none=True)
                loss = model.negative_elbo(CountData(dense[idx]), labels_t[idx], n_cells / len(idx), gen)
                loss.backward()
                opt.step()
                total += loss.detach()
            history[epoch] = total
        if epoch % 50 == 0 or epoch == epochs - 1:
            control.check_cancel()
            control.report("reference", (epoch + 1) / epochs, f"reference epoch {epoch + 1}/{epochs}")
    return model.signatures(), history.cpu().numpy()


def train_spatial(model: SpatialModel, data: CountData, epochs: int, lr: float, seed: int,
                  control: RunControl, report_every: int, spot_index: np.ndarray, types: list[str],
                  ) -> tuple[np.ndarray, tuple[float, float]]:
    """Full-batch training; returns the loss per epoch and the steady-state (wall, CPU) seconds per epoch."""
    device = model.cell_state.device
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = torch.zeros(epochs, dtype=torch.float32, device=device)
    t0 = time.perf_counter()
    marks = {}
    for epoch in range(epochs):
        if epoch in (1, epochs - 1):
            marks[epoch] = (time.perf_counter(), time.process_time())
        opt.zero_grad(set_to_none=True)
        loss = model.negative_elbo(data, gen)
        loss.backward()
        opt.step()
        history[epoch] = loss.detach()
        done = epoch + 1
        if done % 25 == 0:
            control.check_cancel()
            control.report("spatial", done / epochs, f"epoch {done}/{epochs}, -ELBO {float(loss.detach()):.4g}")
        if done % report_every == 0 or done == epochs:
            control.check_cancel()
            ab = model.abundance_mean().double().cpu().numpy()
            props = ab / ab.sum(1, keepdims=True)
            rate = done / max(time.perf_counter() - t0, 1e-9)
            control.report("spatial", done / epochs,
                           f"epoch {done}/{epochs}, -ELBO {float(loss.detach()):.4g}, {rate:.1f} epochs/s",
                           partial=PartialResult(spot_index, props, list(types)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if epochs > 2:  # steady-state wall and CPU seconds per epoch (epochs 2 .. n-1), the first one excluded
        per_epoch = ((marks[epochs - 1][0] - marks[1][0]) / (epochs - 2),
                     (marks[epochs - 1][1] - marks[1][1]) / (epochs - 2))
    else:
        per_epoch = ((time.perf_counter() - t0) / max(epochs, 1), float("nan"))
    return history.cpu().numpy(), per_epoch


def run_c2l(spatial: SpatialInput, reference: ReferenceInput, config: C2LConfig = C2LConfig(),
            control: RunControl | None = None) -> DeconvResult:
    """Fit cell2location's reference regression and spatial model on ``spatial`` and ``reference``."""
    check_config(config)
    with thread_cap(config.n_threads):
        return _run(spatial, reference, config, control)


def _run(spatial: SpatialInput, reference: ReferenceInput, config: C2LConfig,
         control: RunControl | None) -> DeconvResult:
    t_start = time.perf_counter()
    control = control or RunControl()
    device = _resolve_device(config.device)
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
    if config.signatures == "regression":
        epochs_ref = config.reference_epochs or default_reference_epochs(ref_sub.shape[0])
        control.report("reference", 0.0, f"NB regression over {ref_sub.shape[0]} cells, {epochs_ref} epochs")
        signatures, ref_history = fit_reference_signatures(
            ref_sub, labels, types, epochs_ref, config.reference_batch_size, config.reference_lr, config.seed,
            device, control)
    else:
        epochs_ref = 0
        signatures = type_means(ref_sub, labels, types)
    control.report("reference", 1.0, "signatures ready")
    control.check_cancel()

    # ---- spatial model -------------------------------------------------------------------------------
    counts = sp.csr_matrix(spatial.counts)[:, s_cols]
    totals = np.asarray(counts.sum(axis=1)).ravel()
    det_mean = detection_mean_for(totals, signatures, config.n_cells_per_location)
    priors = SpatialPriors(n_cells_per_location=float(config.n_cells_per_location),
                           detection_alpha=float(config.detection_alpha), detection_mean=det_mean,
                           n_groups=int(config.n_groups))
    data = CountData(counts, device)
    model = SpatialModel(signatures, counts.shape[0], priors, device=device)
    n_spots = counts.shape[0]
    control.report("spatial", 0.0, f"{n_spots} spots x {len(genes)} genes, {config.max_epochs} epochs")
    t_sp = time.perf_counter()
    history, epoch_seconds = train_spatial(model, data, config.max_epochs, config.lr, config.seed, control,
                            config.report_every, np.arange(n_spots), types)
    spatial_s = time.perf_counter() - t_sp

    abundances = model.abundance_mean().double().cpu().numpy()
    q05 = model.abundance_quantile(0.05).double().cpu().numpy()
    props = abundances / abundances.sum(1, keepdims=True)
    barcodes = np.asarray(spatial.barcodes).astype(str)
    control.report("spatial", 1.0, "done")

    params: dict[str, Any] = config.to_dict()
    params.update(device=str(device), detection_mean=float(det_mean), n_genes=int(len(genes)),
                  reference_epochs_run=int(epochs_ref))
    return DeconvResult(
        key="c2l", method="cell2location", mode=None, cell_types=list(types), proportions=props,
        params=params, device=str(device), runtime_s=time.perf_counter() - t_start,
        obsm={
            "c2l_abundances": pd.DataFrame(abundances, index=barcodes, columns=list(types)),
            "c2l_abundances_q05": pd.DataFrame(q05, index=barcodes, columns=list(types)),
        },
        uns={"c2l_training": {
            "loss": history.astype(np.float64),
            "reference_loss": ref_history.astype(np.float64),
            "loss_definition": "negative ELBO per epoch (full batch, summed over spots and genes)",
            "spatial_seconds": float(spatial_s),
            "seconds_per_epoch": float(epoch_seconds[0]),
            "cpu_seconds_per_epoch": float(epoch_seconds[1]),
            "genes": [str(g) for g in genes],
            "signatures": signatures.astype(np.float64),
        }},
    )
