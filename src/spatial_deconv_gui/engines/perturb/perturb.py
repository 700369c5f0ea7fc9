"""Knockout / overexpression and its propagation through the GRN and the tissue.

With per-cluster coefficients, the derivative of target t with respect to each of its modulator genes in cell
i is ("splash"):

    TF term  b * TF           d/dTF = b
    LR term  b * w_L * R      d/dR  = b * w_L  (if R > 0),   d/dL = b * R   (L enters through w_L)
    TFL term b * w_L * TF     d/dTF = b * w_L,               d/dL = b * TF

A propagation step (SpaceTravLR's loop):
  1. derivatives at the previous state S (the observed state at step 1);
  2. E = X0 + delta; received ligands W(E); in ligand columns the delta becomes the change of *received*
     ligand W(E) - W(X0) (the models see w_L, not L);
  3. one hop: delta_t = sum over modulators of derivative x delta;
  4. perturbed genes pinned to their value; X0 + delta clipped to [0, max observed]; S <- E.
The derivative products are evaluated as sparse matrix products per cluster over all targets at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...io.errors import InputError
from ..base import RunControl
from . import model_dir as md
from .ligands import choose_mode, received_ligands
from .modulators import LR, TF, TFL, parse_modulator
from .train import filtered


@dataclass
class PerturbModel:
    """A trained model: manifest, training expression and per-cluster coefficient matrices."""
    path: Path | None
    manifest: dict
    genes: list[str]
    expr: np.ndarray            # cells x model genes (the training expression)
    coords: np.ndarray
    clusters: np.ndarray        # cluster label per cell
    cluster_names: list[str]
    ligands: list[str]
    ligand_radius: np.ndarray
    scale_factor: float
    lr_pairs: list[tuple[str, str]]
    tfl_pairs: list[tuple[str, str]]
    # per cluster: sparse (genes x genes) TF->target, (lr pairs x genes), (tfl pairs x genes)
    B_tf: list[sp.csr_matrix] = field(default_factory=list)
    B_lr: list[sp.csr_matrix] = field(default_factory=list)
    B_tfl: list[sp.csr_matrix] = field(default_factory=list)
    coef_tables: dict = field(default_factory=dict)
    obsm: dict = field(default_factory=dict)
    obs_names: list[str] = field(default_factory=list)
    received_cache: tuple | None = None   # (ligand names, cells x ligands, mode) saved at training

    @property
    def targets(self) -> list[str]:
        return list(self.manifest.get("targets", []))

    def modulator_table(self, min_abs: float = 0.0) -> pd.DataFrame:
        """Long table (target, cluster, modulator, kind, coef) of non-zero coefficients."""
        rows = []
        kinds = {TF: "tf", LR: "lr", TFL: "tfl"}
        for t, df in self.coef_tables.items():
            bcols = [c for c in df.columns if c.startswith("beta_")]
            for _, r in df.iterrows():
                for c in bcols:
                    v = float(r[c])
                    if abs(v) > min_abs:
                        name = c[5:]
                        rows.append((t, str(r["cluster"]), name, kinds[parse_modulator(name)[0]], v))
        return pd.DataFrame(rows, columns=["target", "cluster", "modulator", "kind", "coef"])


def build_coefficients(genes, cluster_names, coef_tables: dict) -> tuple:
    """Sparse per-cluster coefficient matrices and the global pair lists from per-gene tables."""
    gi = {g: i for i, g in enumerate(genes)}
    cidx = {c: k for k, c in enumerate(cluster_names)}
    lr_pairs: dict = {}
    tfl_pairs: dict = {}
    ent = {TF: [[] for _ in cluster_names], LR: [[] for _ in cluster_names], TFL: [[] for _ in cluster_names]}
    for t, df in coef_tables.items():
        tcol = gi[t]
        bcols = [c for c in df.columns if c.startswith("beta_")]
        parsed = [parse_modulator(c[5:]) for c in bcols]
        vals = df[bcols].to_numpy(dtype=np.float64)
        for kind, gs in parsed:  # every pair's ligand counts as a ligand, even with zero coefficients
            if kind == LR:
                lr_pairs.setdefault(gs, len(lr_pairs))
            elif kind == TFL:
                tfl_pairs.setdefault(gs, len(tfl_pairs))
        for row, cl in enumerate(df["cluster"].astype(str)):
            k = cidx[cl]
            for (kind, gs), v in zip(parsed, vals[row]):
                if v == 0.0:
                    continue
                if kind == TF:
                    ent[TF][k].append((gi[gs[0]], tcol, v))
                elif kind == LR:
                    ent[LR][k].append((lr_pairs.setdefault(gs, len(lr_pairs)), tcol, v))
                else:
                    ent[TFL][k].append((tfl_pairs.setdefault(gs, len(tfl_pairs)), tcol, v))

    def mats(kind, nrows):
        out = []
        for k in range(len(cluster_names)):
            e = ent[kind][k]
            if e:
                r, c, v = map(np.asarray, zip(*e))
                m = sp.coo_matrix((v.astype(np.float64), (r, c)), shape=(nrows, len(genes))).tocsr()
                m.sum_duplicates()
            else:
                m = sp.csr_matrix((nrows, len(genes)))
            out.append(m)
        return out

    return (mats(TF, len(genes)), mats(LR, len(lr_pairs)), mats(TFL, len(tfl_pairs)), list(lr_pairs),
            list(tfl_pairs))


def model_from_tables(manifest: dict, genes, expr, coords, clusters, coef_tables: dict, path=None,
                      obsm=None, obs_names=None) -> PerturbModel:
    cluster_names = [str(c) for c in manifest["clusters"]]
    B_tf, B_lr, B_tfl, lr_pairs, tfl_pairs = build_coefficients(genes, cluster_names, coef_tables)
    ligs = list(dict.fromkeys([a for a, _ in lr_pairs] + [a for a, _ in tfl_pairs]))
    lrad = manifest.get("ligand_radius", {})
    missing = [g for g in ligs if g not in lrad]
    if missing:
        raise InputError(f"the model has no radius for ligands {missing[:5]}.", "train the model again.",
                         code="bad_model_dir")
    return PerturbModel(
        path=Path(path) if path else None, manifest=manifest, genes=list(genes), expr=np.asarray(expr, np.float64),
        coords=np.asarray(coords, np.float64), clusters=np.asarray(clusters).astype(str),
        cluster_names=cluster_names, ligands=ligs, ligand_radius=np.array([lrad[g] for g in ligs], np.float64),
        scale_factor=float(manifest.get("scale_factor", 1.0)), lr_pairs=lr_pairs, tfl_pairs=tfl_pairs,
        B_tf=B_tf, B_lr=B_lr, B_tfl=B_tfl, coef_tables=coef_tables, obsm=dict(obsm or {}),
        obs_names=list(obs_names) if obs_names is not None else [str(i) for i in range(len(expr))])


def load_model(path) -> PerturbModel:
    """Read a model directory written by :func:`train.train`."""
    from ...io.read import read_h5ad

    path = Path(path)
    manifest = md.read_manifest(path)
    data = read_h5ad(path / manifest.get("data_file", md.DATA))
    genes = list(map(str, data.var_names))
    if genes != list(manifest["genes"]):
        raise InputError(f"{path}: {md.DATA} does not match the manifest's genes.", "train the model again.",
                         code="bad_model_dir")
    done = md.finished_genes(path, manifest["targets"])
    tables = {t: md.read_coefs(path, t) for t in manifest["targets"] if t in done}
    if not tables:
        raise InputError(f"{path} has no trained genes yet.", "finish training first (it resumes).",
                         code="model_incomplete")
    X = data.X.toarray() if sp.issparse(data.X) else np.asarray(data.X)
    obsm = {k: np.asarray(v) for k, v in data.obsm.items()}
    model = model_from_tables(manifest, genes, X, obsm["spatial"], data.obs["cluster"].astype(str).to_numpy(),
                              tables, path=path, obsm=obsm, obs_names=list(map(str, data.obs_names)))
    rpath = path / md.RECEIVED
    if rpath.exists() and "received_ligands_mode" in manifest:
        W = np.load(rpath)
        if W.shape == (X.shape[0], len(manifest["ligands"])):
            model.received_cache = (list(manifest["ligands"]), W, manifest["received_ligands_mode"])
    return model


@dataclass
class PerturbStep:
    step: int
    n_steps: int
    delta: np.ndarray          # cells x model genes, after this step (before the final pin)


class Propagator:
    """Holds the fixed parts of a simulation (observed state, received ligands, index maps)."""

    def __init__(self, model: PerturbModel, ligand_mode: str = "exact", device=None, clip: bool = True):
        self.m = model
        self.mode = choose_mode(model.expr.shape[0], ligand_mode)
        self.device = device
        gi = {g: i for i, g in enumerate(model.genes)}
        self.gi = gi
        self.lig_idx = np.array([gi[g] for g in model.ligands], dtype=np.int64)
        li = {g: i for i, g in enumerate(model.ligands)}
        self.lr_l = np.array([li[a] for a, _ in model.lr_pairs], dtype=np.int64)
        self.lr_lg = np.array([gi[a] for a, _ in model.lr_pairs], dtype=np.int64)
        self.lr_r = np.array([gi[b] for _, b in model.lr_pairs], dtype=np.int64)
        self.tfl_l = np.array([li[a] for a, _ in model.tfl_pairs], dtype=np.int64)
        self.tfl_lg = np.array([gi[a] for a, _ in model.tfl_pairs], dtype=np.int64)
        self.tfl_t = np.array([gi[b] for _, b in model.tfl_pairs], dtype=np.int64)
        self.X0 = model.expr
        self.F0 = filtered(self.X0)
        self.max0 = self.X0.max(axis=0) if clip else np.full(self.X0.shape[1], np.inf)
        self.cluster_rows = [np.flatnonzero(model.clusters == c) for c in model.cluster_names]
        self.W0 = None
        cache = model.received_cache
        # an exact cache serves both modes (grid mode then approximates only the changes)
        if cache is not None and cache[2] in ("exact", self.mode) and set(model.ligands) <= set(cache[0]):
            pos = {g: i for i, g in enumerate(cache[0])}
            self.W0 = cache[1][:, [pos[g] for g in model.ligands]]
        if self.W0 is None:
            self.W0 = self._received(self.F0[:, self.lig_idx]) if len(self.lig_idx) else np.zeros((len(self.X0), 0))

    def _received(self, values, source_index=None):
        return received_ligands(self.m.coords, values, self.m.ligand_radius, scale=self.m.scale_factor,
                                mode=self.mode, device=self.device, source_index=source_index,
                                n_total=self.X0.shape[0])

    def delta_received(self, F_new: np.ndarray) -> np.ndarray:
        """W(F_new) - W(F0), summing only over cells whose ligand expression changed."""
        if not len(self.lig_idx):
            return np.zeros((self.X0.shape[0], 0))
        d = F_new[:, self.lig_idx] - self.F0[:, self.lig_idx]
        rows = np.flatnonzero(np.any(d != 0, axis=1))
        if rows.size == 0:
            return np.zeros_like(d)
        cols = np.flatnonzero(np.any(d[rows] != 0, axis=0))
        out = np.zeros_like(d)
        if self.mode == "grid" or rows.size > 0.5 * d.shape[0]:
            sub = self._received_cols(d[:, cols], cols)
        else:
            sub = self._received_cols(d[rows][:, cols], cols, source_index=rows)
        out[:, cols] = sub
        return out

    def _received_cols(self, values, cols, source_index=None):
        return received_ligands(self.m.coords, values, self.m.ligand_radius[cols], scale=self.m.scale_factor,
                                mode=self.mode, device=self.device, source_index=source_index,
                                n_total=self.X0.shape[0])

    def hop(self, F_s: np.ndarray, X_s: np.ndarray, W_s: np.ndarray, dmod: np.ndarray) -> np.ndarray:
        """One propagation hop: sum over modulators of derivative (at state S) x delta."""
        out = np.zeros_like(dmod)
        have_lr = len(self.m.lr_pairs) > 0
        have_tfl = len(self.m.tfl_pairs) > 0
        for k, rows in enumerate(self.cluster_rows):
            if rows.size == 0:
                continue
            D = dmod[rows]
            acc = np.asarray(self.m.B_tf[k].T @ D.T).T if self.m.B_tf[k].nnz else np.zeros_like(D)
            if have_lr and self.m.B_lr[k].nnz:
                Fr = F_s[rows][:, self.lr_r]
                q = (np.where(Fr > 0, W_s[rows][:, self.lr_l], 0.0) * D[:, self.lr_r] + Fr * D[:, self.lr_lg])
                acc = acc + np.asarray(self.m.B_lr[k].T @ q.T).T
            if have_tfl and self.m.B_tfl[k].nnz:
                q = F_s[rows][:, self.tfl_t] * D[:, self.tfl_lg] + W_s[rows][:, self.tfl_l] * D[:, self.tfl_t]
                acc = acc + np.asarray(self.m.B_tfl[k].T @ q.T).T
            out[rows] = acc
        return out


def perturbation_input(model: PerturbModel, genes, values, cells=None) -> tuple[np.ndarray, dict]:
    """Initial delta (cells x model genes) and the {gene: value} payload."""
    if isinstance(genes, str):
        genes = [genes]
    genes = [str(g) for g in genes]
    if np.isscalar(values):
        values = [float(values)] * len(genes)
    values = [float(v) for v in values]
    if len(values) != len(genes):
        raise InputError(f"{len(genes)} genes but {len(values)} values.", "give one value, or one per gene.",
                         code="bad_perturbation")
    unknown = [g for g in genes if g not in set(model.genes)]
    if unknown:
        raise InputError(f"genes {unknown} are not in the model (not a target or modulator).",
                         "perturb one of the model's genes (see its manifest 'genes').", code="unknown_gene")
    if any(v < 0 for v in values):
        raise InputError("perturbation values must be >= 0.", "use 0 for a knockout.", code="bad_perturbation")
    n = model.expr.shape[0]
    rows = np.arange(n) if cells is None else np.asarray(cells, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise InputError("cell indices out of range.", f"use indices in [0, {n - 1}].", code="bad_cells")
    sim = model.expr.copy()
    gi = {g: i for i, g in enumerate(model.genes)}
    for g, v in zip(genes, values):
        sim[rows, gi[g]] = v
    return sim - model.expr, dict(zip(genes, values))


def iter_perturbation(model: PerturbModel, genes, values=0.0, cells=None, n_steps: int = 4,
                      ligand_mode: str = "exact", device=None, clip: bool = True,
                      control: RunControl | None = None, propagator: Propagator | None = None
                      ) -> Iterator[PerturbStep]:
    """Yield the simulated delta after each propagation step (the last one has the perturbed genes pinned)."""
    control = control or RunControl()
    delta_in, payload = perturbation_input(model, genes, values, cells)
    prop = propagator or Propagator(model, ligand_mode=ligand_mode, device=device, clip=clip)
    X0 = prop.X0
    pin = delta_in != 0
    delta = delta_in.copy()
    F_s, X_s, W_s = prop.F0, X0, prop.W0
    lig = prop.lig_idx
    for step in range(n_steps):
        control.check_cancel()
        control.report("propagation", step / max(n_steps, 1), f"step {step + 1}/{n_steps}")
        E = X0 + delta
        F_e = filtered(E)
        dW = prop.delta_received(F_e)
        dmod = delta.copy()
        if lig.size:
            dmod[:, lig] = dW            # delta + (W(E) - W0) - (E - X0) on ligand columns
        new = prop.hop(F_s, X_s, W_s, dmod)
        delta = np.where(pin, delta_in, new)
        delta = np.clip(X0 + delta, 0.0, prop.max0) - X0
        F_s, X_s, W_s = F_e, E, prop.W0 + dW
        out = delta
        if step == n_steps - 1:
            out = delta.copy()
            rows = np.arange(X0.shape[0]) if cells is None else np.asarray(cells, dtype=np.int64)
            for g, v in payload.items():
                j = prop.gi[g]
                out[rows, j] = v - X0[rows, j]
        yield PerturbStep(step + 1, n_steps, out)
    if n_steps == 0:
        yield PerturbStep(0, 0, delta_in)
    control.report("propagation", 1.0, "done")


def simulate_perturbation(model: PerturbModel, genes, values=0.0, cells=None, n_steps: int = 4,
                          ligand_mode: str = "exact", device=None, clip: bool = True,
                          control: RunControl | None = None) -> np.ndarray:
    """Final delta (cells x model genes) after ``n_steps`` propagation steps."""
    last = None
    for last in iter_perturbation(model, genes, values, cells, n_steps, ligand_mode, device, clip, control):
        pass
    return last.delta
