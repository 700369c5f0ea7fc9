"""DestVI end to end: shared genes -> single-cell model -> empirical prior -> spatial model -> proportions, gamma,
and cell-type-specific expression imputation from the stored model."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ... import keys
from ...io.errors import InputError
from ...io.inputs import ReferenceInput, SpatialInput
from ..base import DeconvResult, PartialResult, RunControl, TrainingStatus, thread_cap
from ..bayes import require_two_types
from ..convergence import ConvergenceMonitor, eta_note, raise_diverged, stop_message
from ..devices import torch_device
from .config import DestVIConfig, check_config, check_every, convergence_rule
from .intervals import draw_intervals, predictive_draws, run_seed_ensemble
from .model import CondVAE, FCStack, SpatialDeconv, vamp_prior

KEY = "destvi"
# DestVI's own slots, beyond keys.py's common ones
DUMMY_FRACTION = f"{KEY}_dummy_fraction"  # obsm: share of the noise type per spot
TRAINING = f"{KEY}_training"  # uns: loss curves and timings
MODEL_STATE = keys.DESTVI_MODEL  # uns: decoder weights and per-spot gammas, what imputation needs


def gamma_slot(cell_type: str) -> str:
    """obsm: the cell-state latent gamma of ``cell_type`` at each spot."""
    return f"{KEY}_gamma_{cell_type}"


DUMMY = "additional_0"


def shared_genes(spatial: SpatialInput, reference: ReferenceInput):
    s_genes = np.asarray(spatial.genes).astype(str)
    r_pos = {g: i for i, g in enumerate(np.asarray(reference.genes).astype(str))}
    shared = [i for i, g in enumerate(s_genes) if g in r_pos]
    if len(shared) < 10:
        raise ValueError(f"DestVI: only {len(shared)} genes shared by the slide and the reference; need at least 10")
    s_cols = np.array(shared)
    return s_cols, np.array([r_pos[s_genes[i]] for i in s_cols]), s_genes[s_cols]


def _adam(params, lr):
    # scvi-tools' training plan: Adam, eps 0.01, weight decay 1e-6, over the trainable parameters
    return torch.optim.Adam([p for p in params if p.requires_grad], lr=lr, eps=0.01, weight_decay=1e-6)


def _batches(n: int, size: int, gen: torch.Generator, device):
    perm = torch.randperm(n, generator=gen).to(device)
    return [perm[i : i + size] for i in range(0, n, size)]


def fit_single_cell(
    x: torch.Tensor, y: torch.Tensor, n_labels: int, config: DestVIConfig, control: RunControl, gen: torch.Generator
) -> tuple[CondVAE, np.ndarray]:
    model = CondVAE(x.shape[1], n_labels, config.n_hidden, config.n_latent, config.n_layers, config.dropout_rate).to(
        x.device
    )
    opt = _adam(model.parameters(), config.sc_lr)
    history = np.zeros(config.sc_epochs)
    model.epoch_seconds = np.zeros(config.sc_epochs)
    model.epoch_cpu_seconds = np.zeros(config.sc_epochs)
    for epoch in range(config.sc_epochs):
        t_ep, c_ep = time.perf_counter(), time.process_time()
        model.train()
        kl_w = min(1.0, epoch / config.sc_kl_warmup_epochs) if config.sc_kl_warmup_epochs else 1.0
        total = torch.zeros((), device=x.device)
        batches = _batches(len(x), config.sc_batch_size, gen, x.device)
        for idx in batches:
            opt.zero_grad(set_to_none=True)
            loss = model.loss(x[idx], y[idx], kl_w)
            loss.backward()
            opt.step()
            total += loss.detach()
        history[epoch] = float(total) / len(batches)
        if not np.isfinite(history[epoch]):
            raise_diverged("DestVI single-cell model", epoch + 1, "sc_lr", config.sc_lr)
        model.epoch_seconds[epoch] = time.perf_counter() - t_ep
        model.epoch_cpu_seconds[epoch] = time.process_time() - c_ep
        if epoch % 10 == 0 or epoch == config.sc_epochs - 1:
            control.check_cancel()
            control.report(
                "single-cell model",
                (epoch + 1) / config.sc_epochs,
                f"epoch {epoch + 1}/{config.sc_epochs}, loss {history[epoch]:.4g}",
            )
    model.eval()
    return model, history


def anneal_lr(config: DestVIConfig, k: int) -> float:
    """The learning rate of the ``k``-th epoch (1-based) of the final phase: linear from ``lr`` down to
    ``lr_anneal_to`` x ``lr`` at its last epoch."""
    return config.lr * (1.0 - (1.0 - config.lr_anneal_to) * k / config.lr_anneal_epochs)


@torch.no_grad()
def _infer_all(model: SpatialDeconv, x: torch.Tensor, chunk: int = 1024):
    vs, gs, ms = [], [], []
    for i in range(0, len(x), chunk):
        v, g, m = model.infer(x[i : i + chunk])
        vs.append(v)
        gs.append(g)
        ms.append(m)
    return torch.cat(vs), torch.cat(gs), torch.cat(ms)


def run_destvi(
    spatial: SpatialInput,
    reference: ReferenceInput,
    config: DestVIConfig = DestVIConfig(),
    control: RunControl | None = None,
) -> DeconvResult:
    """Fit DestVI's single-cell and spatial models; proportions drop the dummy type. ``config.seeds`` > 1 trains
    that many models and averages them (:func:`.intervals.run_seed_ensemble`)."""
    check_config(config)
    require_two_types("DestVI", reference.type_names)
    with thread_cap(config.n_threads):
        if config.seeds > 1:
            return run_seed_ensemble(_run, spatial, reference, config, control or RunControl())
        return _run(spatial, reference, config, control or RunControl())


def _run(
    spatial: SpatialInput,
    reference: ReferenceInput,
    config: DestVIConfig,
    control: RunControl,
    draws: list[np.ndarray] | None = None,
) -> DeconvResult:
    """One model; with ``config.uncertainty`` its predictive draws are appended to ``draws`` when given."""
    t_start = time.perf_counter()
    device = torch_device(config.device)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    control.report("genes", 0.0, "intersecting genes")
    types = reference.type_names
    s_cols, r_cols, genes = shared_genes(spatial, reference)
    control.report("genes", 1.0, f"{len(genes)} genes, {len(types)} cell types")

    labels = pd.Categorical(np.asarray(reference.cell_types).astype(str), categories=types).codes.astype(np.int64)
    xr = torch.as_tensor(sp.csr_matrix(reference.counts)[:, r_cols].toarray(), dtype=torch.float32, device=device)
    yr = torch.as_tensor(labels, device=device)
    control.report("single-cell model", 0.0, f"CondSCVI over {len(xr)} cells, {config.sc_epochs} epochs")
    t_sc = time.perf_counter()
    sc, sc_history = fit_single_cell(xr, yr, len(types), config, control, gen)
    sc_s = time.perf_counter() - t_sc
    control.report("prior", 0.0, "empirical prior (k-means per type)")
    vamp = vamp_prior(sc, xr, labels, p=config.vamp_prior_p, seed=config.seed)
    control.check_cancel()

    xs = torch.as_tensor(sp.csr_matrix(spatial.counts)[:, s_cols].toarray(), dtype=torch.float32, device=device)
    n_spots = xs.shape[0]
    model = SpatialDeconv(
        sc,
        vamp,
        n_states=config.n_states_per_label,
        prior_mode=config.prior_mode,
        dropout_amortization=config.dropout_amortization,
        augmentation=config.augmentation,
        n_samples_augmentation=config.n_samples_augmentation,
        eps_v=config.eps_v,
    )
    model.decoder_precision = config.decoder_precision
    opt = _adam(model.parameters(), config.lr)
    cap = config.max_epochs
    history = np.zeros(cap)
    epoch_s = np.zeros(cap)
    epoch_cpu = np.zeros(cap)
    rule = convergence_rule(config)
    monitor = ConvergenceMonitor(rule, cap) if rule is not None else None
    until = "at most " if rule is not None else ""
    control.report("spatial", 0.0, f"{n_spots} spots, {until}{cap} epochs")
    t_sp = time.perf_counter()
    loss_kw = dict(
        ct_sparsity_weight=config.ct_sparsity_weight,
        weighting_augmentation=config.weighting_augmentation,
        eta_reg=config.eta_reg,
        beta_reg=config.beta_reg,
        reconst_weight=config.reconst_weight,
    )
    reason, done, expected = "cap", 0, None
    # the final phase of falling learning rate: the last `anneal` epochs of the cap, or the `anneal` epochs after the
    # rule fires (it may fire only while a whole phase still fits under the cap); both kinds of run end settled
    anneal = int(config.lr_anneal_epochs)
    anneal_from, end, converged_at = cap - anneal, cap, None
    # the answers at the checks of the last average_epochs epochs: (epoch, proportions, dummy share)
    # (never more than the last quarter of the run: a short run's early answers are still far from its last)
    every, span = check_every(config), min(int(config.average_epochs), cap // 4)
    recent: list[tuple[int, np.ndarray, np.ndarray]] = []

    def check_answer() -> np.ndarray:
        v, _, _ = _infer_all(model, xs)
        v = v.double().cpu().numpy()
        p = v[:, :-1] / v[:, :-1].sum(1, keepdims=True)
        if span > 0:
            recent[:] = [item for item in recent if item[0] > done - span] + [(done, p, v[:, -1])]
        return p

    def status(stop_reason=None) -> TrainingStatus:
        return TrainingStatus(done, cap, done / max(time.perf_counter() - t_sp, 1e-9), expected, stop_reason)

    for epoch in range(cap):
        t_ep, c_ep = time.perf_counter(), time.process_time()
        if epoch >= anneal_from:
            opt.param_groups[0]["lr"] = anneal_lr(config, epoch - anneal_from + 1)
        model.train()
        kl_w = min(1.0, epoch / config.kl_warmup_epochs) if config.kl_warmup_epochs else 1.0
        total = torch.zeros((), device=device)
        batches = _batches(n_spots, config.batch_size, gen, device)
        try:
            for idx in batches:
                opt.zero_grad(set_to_none=True)
                loss = model.loss(xs[idx], kl_w, **loss_kw)
                loss.backward()
                opt.step()
                total += loss.detach()
        except FloatingPointError:
            raise_diverged("DestVI", epoch + 1, "lr", config.lr)
        history[epoch] = float(total) / len(batches)
        epoch_s[epoch] = time.perf_counter() - t_ep
        epoch_cpu[epoch] = time.process_time() - c_ep
        done = epoch + 1
        if not np.isfinite(history[epoch]):
            raise_diverged("DestVI", done, "lr", config.lr)
        control.check_cancel()
        if done == end:
            break
        if monitor is not None and converged_at is None and done <= cap - anneal and monitor.due(done):
            if monitor.update(done, check_answer()):
                reason, converged_at = "converged", done
                if not anneal:
                    break
                anneal_from, end = done, done + anneal
                expected = end
            else:
                expected = monitor.expected_epoch(done)
                expected = None if expected is None else min(expected + anneal, cap)
        elif span > 0 and done % every == 0 and done > end - span:
            check_answer()
        if control.stop_requested:
            reason = "user"
            break
        control.report(
            "spatial",
            done / (expected or cap),
            f"epoch {done}/{cap}{eta_note(expected, cap)}, loss {history[epoch]:.4g}",
            training=status(),
        )
        if done % config.report_every == 0:
            v, _, _ = _infer_all(model, xs)
            p = v[:, :-1].double().cpu().numpy()
            control.report(
                "spatial",
                done / (expected or cap),
                f"epoch {done}/{cap}",
                partial=PartialResult(np.arange(n_spots), p / p.sum(1, keepdims=True), list(types)),
                training=status(),
            )
    history, epoch_s, epoch_cpu = history[:done], epoch_s[:done], epoch_cpu[:done]
    message = stop_message(reason, converged_at if reason == "converged" else done, cap, rule)
    if anneal and reason != "user":
        message += f"; the learning rate fell to {config.lr_anneal_to:g}x over epochs {anneal_from + 1}-{done}"
    control.report("spatial", 1.0, message, training=status(reason))
    spatial_s = time.perf_counter() - t_sp

    v, gamma_modes, modes = _infer_all(model, xs)
    v = v.double().cpu().numpy()
    props = v[:, :-1] / v[:, :-1].sum(1, keepdims=True)
    answer_epochs = [done]
    if span > 0:
        # the final answer and the checks of the last `span` epochs before it, equally weighted
        span = min(span, done // 4)
        kept = [item for item in recent if done - span < item[0] < done]
        answer_epochs = [e for e, _, _ in kept] + [done]
        props = np.mean([p for _, p, _ in kept] + [props], axis=0)
        v = v.copy()
        v[:, -1] = np.mean([d for _, _, d in kept] + [v[:, -1]], axis=0)
    gamma = (modes.unsqueeze(-1) * gamma_modes).sum(1).double().cpu().numpy()  # spots, L, D
    barcodes = np.asarray(spatial.barcodes).astype(str)
    cols = [f"gamma_{d}" for d in range(config.n_latent)]
    obsm: dict[str, Any] = {
        gamma_slot(t): pd.DataFrame(gamma[:, i], index=barcodes, columns=cols) for i, t in enumerate(types)
    }
    obsm[DUMMY_FRACTION] = pd.DataFrame({DUMMY: v[:, -1]}, index=barcodes)
    if config.uncertainty:
        control.report("intervals", 0.0, f"{config.interval_samples} predictive draws per spot")
        spot_draws = predictive_draws(model, xs, config.interval_samples, config.seed)
        if draws is not None:
            draws.append(spot_draws)
        lower, upper = draw_intervals(spot_draws, [props], config.interval_min_share)
        obsm[keys.proportions_lower(KEY)] = pd.DataFrame(lower, index=barcodes, columns=list(types))
        obsm[keys.proportions_upper(KEY)] = pd.DataFrame(upper, index=barcodes, columns=list(types))
        control.report("intervals", 1.0, "intervals ready")
    params = config.to_dict()
    params.update(device=str(device), n_genes=int(len(genes)))
    state = export_state(model, gamma_modes, modes, genes, types, barcodes)
    return DeconvResult(
        key=KEY,
        method="DestVI",
        mode=None,
        cell_types=list(types),
        proportions=props,
        params=params,
        device=str(device),
        runtime_s=time.perf_counter() - t_start,
        stop={"reason": reason, "epochs_run": int(done), "max_epochs": int(cap)},
        obsm=obsm,
        uns={
            TRAINING: {
                "loss": history,
                "stopped": reason,
                "epochs_run": int(done),
                "answer_epochs": np.asarray(answer_epochs, np.int64),
                # the epoch the rule fired (the answer then trained `lr_anneal_epochs` more), 0 when it did not
                "converged_at": int(converged_at or 0),
                "lr_anneal_from": int(anneal_from) if anneal else -1,
                "sc_loss": sc_history,
                "spatial_seconds": float(spatial_s),
                "epoch_seconds": epoch_s,
                "epoch_cpu_seconds": epoch_cpu,
                "genes": [str(g) for g in genes],
                "sc_seconds": float(sc_s),
                "sc_epoch_seconds": sc.epoch_seconds,
                "sc_epoch_cpu_seconds": sc.epoch_cpu_seconds,
            },
            MODEL_STATE: state,
        },
    )


# ---------------------------------------------------------------------------------------------------
# imputation
# ---------------------------------------------------------------------------------------------------


def export_state(model: SpatialDeconv, gamma_modes: torch.Tensor, modes: torch.Tensor, genes, types, barcodes):
    """What imputation needs, as plain arrays (storable in ``uns``)."""
    st = {
        f"decoder_{k.replace('.', '_')}": v.detach().double().cpu().numpy()
        for k, v in model.decoder.state_dict().items()
    }
    st.update(
        {
            "px_decoder_weight": model.px_decoder.weight.detach().double().cpu().numpy(),
            "px_decoder_bias": model.px_decoder.bias.detach().double().cpu().numpy(),
            "per_ct_bias": model.per_ct_bias.detach().double().cpu().numpy(),
            "beta": model.beta.detach().double().cpu().numpy(),
            "batch_embedding": model.batch_embedding.detach().double().cpu().numpy(),
            "gamma_modes": gamma_modes.detach().float().cpu().numpy(),  # spots, states, types, latent
            "mode_weights": modes.detach().float().cpu().numpy(),  # spots, states, types
            "genes": np.asarray(genes).astype(str),
            "cell_types": np.asarray(types).astype(str),
            "barcodes": np.asarray(barcodes).astype(str),
            "n_layers": len(model.decoder.linears),
        }
    )
    return st


def _state_of(source) -> dict:
    if isinstance(source, DeconvResult) or hasattr(source, "uns"):
        if MODEL_STATE not in source.uns:
            raise InputError(
                f"the result holds no DestVI model (uns[{MODEL_STATE!r}]).",
                "run DestVI again (--method destvi) and keep its output .h5ad whole.",
                code="missing_model_state",
            )
        return check_state(source.uns[MODEL_STATE])
    if isinstance(source, dict) and MODEL_STATE in source:
        return check_state(source[MODEL_STATE])
    return check_state(source)


def check_state(st) -> dict:
    """A DestVI state read back from a file is used only when every entry is there with the shapes the others
    imply (numbers only: nothing in it is unpickled); otherwise one error names the first entry that is wrong."""

    def bad(entry: str, why: str):
        return InputError(
            f"the DestVI model state (uns[{MODEL_STATE!r}]) is damaged: {entry} {why}.",
            "run DestVI again (--method destvi); the result file may have been edited or cut short.",
            code="damaged_model_state",
        )

    if not isinstance(st, Mapping):
        raise bad("the state", f"is a {type(st).__name__}, not a mapping")
    required = ("genes", "cell_types", "barcodes", "n_layers", "gamma_modes", "mode_weights", "batch_embedding")
    required += ("px_decoder_weight", "px_decoder_bias", "per_ct_bias", "beta")
    for entry in required:
        if entry not in st:
            raise bad(entry, "is missing")
    try:
        n_layers = int(np.asarray(st["n_layers"]))
    except (TypeError, ValueError):
        raise bad("n_layers", "is not a number") from None
    for i in range(n_layers):
        for part in ("weight", "bias"):
            if f"decoder_linears_{i}_{part}" not in st:
                raise bad(f"decoder_linears_{i}_{part}", "is missing")
    n_genes, n_types, n_spots = len(st["genes"]), len(st["cell_types"]), len(st["barcodes"])
    arrays = {}
    for entry in (k for k in st if k not in ("genes", "cell_types", "barcodes", "n_layers")):
        value = np.asarray(st[entry])
        if value.dtype.kind not in "fiu":
            raise bad(entry, f"holds {value.dtype} values, not numbers")
        arrays[entry] = value
    gm, mw = arrays["gamma_modes"], arrays["mode_weights"]
    if gm.ndim != 4 or gm.shape[0] != n_spots or gm.shape[2] != n_types:
        raise bad("gamma_modes", f"has shape {gm.shape}, not ({n_spots} spots, states, {n_types} types, latent)")
    if mw.shape != gm.shape[:3]:
        raise bad("mode_weights", f"has shape {mw.shape}, not {gm.shape[:3]}")
    for entry, shape in (
        ("px_decoder_bias", (n_genes,)),
        ("beta", (n_genes,)),
        ("per_ct_bias", (n_types, n_genes)),
    ):
        if arrays[entry].shape != shape:
            raise bad(entry, f"has shape {arrays[entry].shape}, not {shape}")
    if arrays["px_decoder_weight"].ndim != 2 or arrays["px_decoder_weight"].shape[0] != n_genes:
        raise bad("px_decoder_weight", f"has shape {arrays['px_decoder_weight'].shape}, not ({n_genes}, hidden)")
    return st


def impute_expression(source, cell_type: str, genes=None, spots=None) -> pd.DataFrame:
    """Cell-type-specific expression of ``genes`` at ``spots`` (DestVI's ``get_scale_for_ct``): the normalised
    expression (fractions of a cell's library) that the model gives a cell of ``cell_type`` at each spot, from
    that spot's gamma. ``source`` is a DeconvResult, an AnnData holding the result or ``uns['destvi_model']``;
    ``spots`` are barcodes or integer positions (default all), ``genes`` names (default all model genes)."""
    st = _state_of(source)
    types = [str(t) for t in np.asarray(st["cell_types"])]
    if cell_type not in types:
        raise ValueError(f"unknown cell type {cell_type!r}; the model has {types}")
    c = types.index(cell_type)
    all_genes = np.asarray(st["genes"]).astype(str)
    barcodes = np.asarray(st["barcodes"]).astype(str)
    if genes is None:
        g_idx = np.arange(len(all_genes))
    else:
        pos = {g: i for i, g in enumerate(all_genes)}
        missing = [g for g in genes if g not in pos]
        if missing:
            raise ValueError(f"genes not in the DestVI model: {missing[:10]}")
        g_idx = np.array([pos[g] for g in genes])
    if spots is None:
        s_idx = np.arange(len(barcodes))
    else:
        spots = np.asarray(spots)
        if spots.dtype.kind in "iu":
            s_idx = spots.astype(int)
        else:
            bpos = {b: i for i, b in enumerate(barcodes)}
            s_idx = np.array([bpos[str(b)] for b in spots])
    gm = torch.as_tensor(np.asarray(st["gamma_modes"])[s_idx][:, :, c], dtype=torch.float64)  # spots, S, D
    w = torch.as_tensor(np.asarray(st["mode_weights"])[s_idx][:, :, c], dtype=torch.float64)  # spots, S
    n_layers = int(st["n_layers"])
    n_types = len(types)
    emb = torch.as_tensor(np.asarray(st["batch_embedding"]), dtype=torch.float64)
    x = torch.cat([gm, emb.expand(gm.shape[:-1] + emb.shape)], -1)
    for i in range(n_layers):
        W = torch.as_tensor(np.asarray(st[f"decoder_linears_{i}_weight"]), dtype=torch.float64)
        b = torch.as_tensor(np.asarray(st[f"decoder_linears_{i}_bias"]), dtype=torch.float64)
        n_in = W.shape[1] - (n_types if n_types > 1 else 0)
        x = x @ W[:, :n_in].T + b + (W[:, n_in:].T[c] if n_types > 1 else 0)
        x = torch.relu(torch.nn.functional.layer_norm(x, (x.shape[-1],)))
    Wp = torch.as_tensor(np.asarray(st["px_decoder_weight"]), dtype=torch.float64)
    bp = torch.as_tensor(np.asarray(st["px_decoder_bias"]), dtype=torch.float64)
    logits = x @ Wp.T + bp + torch.as_tensor(np.asarray(st["per_ct_bias"])[c]) + torch.as_tensor(np.asarray(st["beta"]))
    scale = (w.unsqueeze(-1) * torch.softmax(logits, -1)).sum(1).numpy()
    return pd.DataFrame(scale[:, g_idx], index=barcodes[s_idx], columns=all_genes[g_idx])


__all__ = ["run_destvi", "impute_expression", "shared_genes", "fit_single_cell", "FCStack"]
