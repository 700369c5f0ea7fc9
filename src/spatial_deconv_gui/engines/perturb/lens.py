"""The interaction lens: what drives one target gene in one cell, and which cells respond to a ligand.

* **Modulators of a target in a cell**: the cell's coefficients β of the target with the value of each feature in
  the cell, as training builds them (``train.build_features``): a TF term's feature is the TF's expression x_TF; a
  ligand-receptor term's is w_L * f(x_R); a TF-ligand term's is w_L * x_TF, where w_L is the ligand received at
  the term's radius (its channel) and f the expression filter. The term ``beta * feature`` is what the modulator
  adds to the cell's predicted expression of the target. β is read by :func:`cell_coefficients` /
  :func:`term_coefficients` alone: the coefficients of the cell's cluster, or for a target with per-cell
  coefficients (``mode`` 'full' / 'hybrid') the cell's own, ``seed * (1 + z_i . w)`` (:mod:`percell`).
* **Senders**: the received ligand is a kernel sum (``ligands.received_ligands``),
  ``w_L(i) = (s/N) * sum_j exp(-d_ij^2 / 2r^2) f(x_jL)``; a sender j's share of it is the summand. The lens lists,
  for each ligand term whose partner (receptor or TF) the cell expresses, the other cells within the term's radius
  r that express the ligand, with their share, their support ``sqrt(f(x_jL) * f(x_i,partner))`` and the part of
  the target's term they account for, ``beta * share * partner``. The cell's own ligand counts too (distance 0:
  ``own_share``), and cells farther than r still send a little, the kernel's tail: ``within_radius`` in the
  modulator table says how much of w_L the listed senders carry.
* **Who responds** to a ligand knocked out (or set to a value): the first propagation step of that perturbation,
  computed by propagation itself (``perturb.iter_perturbation``, one step), so the map is the Δ a knockout's
  first step gives. At the observed state, with D the change of the ligand's expression and dW the change of the
  ligand it sends at each radius, that step is ``Δ_t = sum β * (f(x_R) dW)`` over the target's ligand-receptor
  terms, ``β * f(x_TF) dW`` over its TF-ligand terms, ``β * D`` over terms where the gene is itself a TF (under
  the 'ligand' radius rule D is replaced by the received change) and ``β * 1[x_R > 0] W0 D`` where it is a pair's
  receptor; then the perturbed gene pinned and X0 + Δ clipped to [0, observed max]. The responders listed are
  the targets with a non-zero coefficient on one of those terms, with the terms that reach them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from ...io.errors import InputError
from .expression import filtered
from .modulators import LR, PAIR_SEP_LR, PAIR_SEP_TFL, TF, TFL
from .perturb import iter_perturbation, model_propagator

KIND_NAMES = {TF: "tf", LR: "lr", TFL: "tfl"}
MODULATOR_COLUMNS = (
    "modulator",
    "kind",
    "ligand",
    "partner",
    "radius",
    "beta",
    "feature",
    "term",
    "received",
    "partner_value",
    "supported",
    "n_senders",
    "within_radius",
    "own_share",
)
SENDER_COLUMNS = (
    "modulator",
    "ligand",
    "radius",
    "sender",
    "distance",
    "ligand_value",
    "weight",
    "share",
    "support",
    "term_share",
)


class LensIndex:
    """What the lens needs of a model, built once per model: filtered expression, a k-d tree of the cells, the
    coefficient matrices by target column (CSC) and the received ligands the model was trained with."""

    def __init__(self, model):
        self.model = model
        self.gi = {g: i for i, g in enumerate(model.genes)}
        self.F = filtered(model.expr)
        self.coords = np.asarray(model.coords, dtype=np.float64)
        self.tree = cKDTree(self.coords)
        self.cell_cluster = np.asarray(
            pd.Categorical(model.clusters, categories=model.cluster_names).codes, dtype=np.int64
        )
        self._csc: dict = {}
        self.received_columns = None  # cells x model.channels, when the model kept what training computed
        cache = model.received_cache
        if cache is not None and set(model.channels) <= set(cache[0]):
            pos = {c: i for i, c in enumerate(cache[0])}
            self.received_columns = np.asarray(cache[1])[:, [pos[c] for c in model.channels]]

    def n_cells(self) -> int:
        return self.coords.shape[0]

    def csc(self, kind: int, cluster: int) -> sp.csc_matrix:
        key = (kind, cluster)
        if key not in self._csc:
            mats = {TF: self.model.B_tf, LR: self.model.B_lr, TFL: self.model.B_tfl}[kind]
            self._csc[key] = sp.csc_matrix(mats[cluster])
        return self._csc[key]

    def received_at(self, cell: int, channels) -> np.ndarray:
        """The ligand the cell receives on each channel (index into ``model.channels``): the model's own value
        when training kept it, else the kernel sum over all cells."""
        channels = np.asarray(channels, dtype=np.int64)
        if self.received_columns is not None:
            return self.received_columns[cell, channels]
        m = self.model
        d2 = ((self.coords - self.coords[cell]) ** 2).sum(axis=1)
        out = np.zeros(channels.size)
        for n, ch in enumerate(channels):
            lig, r = m.channels[ch]
            out[n] = m.scale_factor / len(d2) * float(np.exp(-d2 / (2.0 * r * r)) @ self.F[:, self.gi[lig]])
        return out


def _check_cell(index: LensIndex, cell) -> int:
    n = index.n_cells()
    cell = int(cell)
    if not 0 <= cell < n:
        raise InputError(f"cell {cell} is out of range.", f"use an index in [0, {n - 1}].", code="bad_cells")
    return cell


def _check_target(index: LensIndex, target: str) -> int:
    if target not in index.gi:
        raise InputError(
            f"{target!r} is not a gene of the model.", "pick one of the model's targets.", code="unknown_gene"
        )
    return index.gi[target]


def cell_coefficients(index: LensIndex, cell: int, target: str) -> list[tuple[int, int, float]]:
    """``(kind, row, beta)`` of every non-zero coefficient of ``target`` in ``cell`` (row: the TF's gene column,
    or the pair's index in ``model.lr_pairs`` / ``model.tfl_pairs``): the coefficients of the cell's cluster, and
    for a target with per-cell coefficients (mode 'full' / 'hybrid') the cell's own."""
    k = int(index.cell_cluster[cell])
    if k < 0:
        return []
    col = index.gi[target]
    out = []
    for kind in (TF, LR, TFL):
        m = index.csc(kind, k)
        lo, hi = m.indptr[col], m.indptr[col + 1]
        out.extend((kind, int(r), float(v)) for r, v in zip(m.indices[lo:hi], m.data[lo:hi]) if v != 0.0)
    pc = index.model.percell
    if pc is not None:
        e = pc.entries_of(k, target_col=col)
        if e.size:
            beta = pc.seed[e] * (1.0 + pc.factor(e, [cell])[0])
            at = {(kind, row): n for n, (kind, row, _) in enumerate(out)}
            for kind, row, b in zip(pc.kind[e].tolist(), pc.row[e].tolist(), beta.tolist()):
                n = at.get((kind, row))
                if n is not None:
                    out[n] = (kind, row, float(b))
    return out


def _term_rows(index: LensIndex, kind: int, row: int) -> list:
    """One modulator row's coefficients in each cluster (1 x genes sparse rows)."""
    mats = {TF: index.model.B_tf, LR: index.model.B_lr, TFL: index.model.B_tfl}[kind]
    return [sp.csr_matrix(m)[row] for m in mats]


def _columns(rows: list) -> np.ndarray:
    return np.unique(np.concatenate([r.indices[r.data != 0] for r in rows] + [np.zeros(0, np.int64)]))


def term_targets(index: LensIndex, kind: int, row: int) -> np.ndarray:
    """The target columns with a non-zero coefficient on one modulator row in some cluster (per-cell coefficients
    scale the seed's non-zeros, so they reach the same targets)."""
    return _columns(_term_rows(index, kind, row)).astype(np.int64)


def term_coefficients(index: LensIndex, kind: int, row: int) -> tuple[np.ndarray, np.ndarray]:
    """(target columns, cells x targets β) of one modulator row in every cell: the targets it has a non-zero
    coefficient for in some cluster; each cell's own for targets with per-cell coefficients (see
    :func:`cell_coefficients`)."""
    rows = _term_rows(index, kind, row)
    cols = _columns(rows)
    beta = np.zeros((index.n_cells(), cols.size))
    if cols.size == 0:
        return cols.astype(np.int64), beta
    per_cluster = np.vstack([r.toarray()[0, cols] for r in rows] + [np.zeros(cols.size)])  # last row: no cluster
    beta = per_cluster[index.cell_cluster]
    pc = index.model.percell
    if pc is not None:
        where = {int(c): j for j, c in enumerate(cols)}
        for k in range(len(index.model.cluster_names)):
            e = pc.entries_of(k, kind=kind, row=row)
            cells = np.flatnonzero(index.cell_cluster == k)
            if e.size and cells.size:
                j = np.array([where[int(c)] for c in pc.target_col[e]], dtype=np.int64)
                beta[np.ix_(cells, j)] = pc.seed[e] * (1.0 + pc.factor(e, cells))
    return cols.astype(np.int64), beta


@dataclass
class CellLens:
    """One cell's modulators of one target (``MODULATOR_COLUMNS``, largest |β| first) and the neighbours that
    send each ligand term's ligand (``SENDER_COLUMNS``)."""

    cell: int
    target: str
    cluster: str
    modulators: pd.DataFrame
    senders: pd.DataFrame
    coords: np.ndarray  # the model's coordinates (the senders' rows index them)


def cell_lens(model, cell: int, target: str, top: int | None = None, index: LensIndex | None = None) -> CellLens:
    """The interaction lens of ``target`` in ``cell`` (see the module docstring). ``top`` keeps the modulators of
    largest |β|; ``index`` is the model's :class:`LensIndex` (built here when not given)."""
    index = index if index is not None else LensIndex(model)
    cell = _check_cell(index, cell)
    _check_target(index, target)
    m = index.model
    coefs = cell_coefficients(index, cell, target)
    coefs.sort(key=lambda c: (-abs(c[2]), c[0], c[1]))
    if top is not None:
        coefs = coefs[: int(top)]
    x, F = m.expr[cell], index.F[cell]
    rows, senders = [], []
    for kind, row, beta in coefs:
        if kind == TF:
            name = m.genes[row]
            feature = float(x[row])
            rows.append(
                (name, "tf", "", name, np.nan, beta, feature, beta * feature, np.nan, feature, False, 0, np.nan, np.nan)
            )
            continue
        if kind == LR:
            lig, partner = m.lr_pairs[row]
            ch, radius, name = int(m.lr_channel[row]), float(m.lr_radius[row]), f"{lig}{PAIR_SEP_LR}{partner}"
            partner_feature = float(F[index.gi[partner]])  # training multiplies by the filtered receptor
        else:
            lig, partner = m.tfl_pairs[row]
            ch, radius, name = int(m.tfl_channel[row]), float(m.tfl_radius[row]), f"{lig}{PAIR_SEP_TFL}{partner}"
            partner_feature = float(x[index.gi[partner]])  # and by the TF's expression as it is
        received = float(index.received_at(cell, [ch])[0])
        feature = received * partner_feature
        partner_f = float(F[index.gi[partner]])
        supported = partner_f > 0
        found = _senders(index, cell, lig, radius) if supported else None
        n_send, within = 0, np.nan
        if found is not None:
            idx, dist, lval, weight, share = found
            n_send = int(idx.size)
            within = float(share.sum() / received) if received > 0 else np.nan
            support = np.sqrt(lval * partner_f)
            for j, d, lv, w, s, sup in zip(idx, dist, lval, weight, share, support):
                senders.append((name, lig, radius, int(j), d, lv, w, s, sup, beta * s * partner_feature))
        rows.append(
            (
                name,
                KIND_NAMES[kind],
                lig,
                partner,
                radius,
                beta,
                feature,
                beta * feature,
                received,
                partner_f,
                supported,
                n_send,
                within,
                m.scale_factor / index.n_cells() * float(F[index.gi[lig]]),
            )
        )
    k = int(index.cell_cluster[cell])
    return CellLens(
        cell,
        target,
        m.cluster_names[k] if k >= 0 else "",
        pd.DataFrame(rows, columns=list(MODULATOR_COLUMNS)),
        pd.DataFrame(senders, columns=list(SENDER_COLUMNS)),
        index.coords,
    )


def _senders(index: LensIndex, cell: int, ligand: str, radius: float):
    """Other cells within ``radius`` of ``cell`` expressing ``ligand``: indices (nearest first), distances,
    filtered ligand values, kernel weights and shares of the received ligand."""
    m = index.model
    idx = np.asarray(index.tree.query_ball_point(index.coords[cell], r=radius), dtype=np.int64)
    idx = idx[idx != cell]
    lval = index.F[idx, index.gi[ligand]]
    idx, lval = idx[lval > 0], lval[lval > 0]
    dist = np.sqrt(((index.coords[idx] - index.coords[cell]) ** 2).sum(axis=1))
    order = np.lexsort((idx, dist))
    idx, lval, dist = idx[order], lval[order], dist[order]
    weight = np.exp(-(dist**2) / (2.0 * radius * radius))
    share = m.scale_factor / index.n_cells() * weight * lval
    return idx, dist, lval, weight, share


@dataclass
class WhoResponds:
    """The first-step response to a perturbation of ``ligand``: ``delta`` (cells x ``model.genes``, the gene
    itself pinned) and the responding targets (``targets``: how each is reached, its mean and largest |Δ|),
    largest mean |Δ| first."""

    ligand: str
    value: float
    delta: np.ndarray
    targets: pd.DataFrame
    genes: list

    def of(self, gene: str) -> np.ndarray:
        return self.delta[:, self.genes.index(gene)]

    def total_abs(self) -> np.ndarray:
        """Per cell, Σ |Δ| over the responding targets."""
        cols = [self.genes.index(g) for g in self.targets["target"]]
        return np.abs(self.delta[:, cols]).sum(axis=1) if cols else np.zeros(self.delta.shape[0])


def who_responds(
    model,
    ligand: str,
    value: float = 0.0,
    cells=None,
    ligand_mode: str = "exact",
    device=None,
    clip: bool = True,
    index: LensIndex | None = None,
) -> WhoResponds:
    """The first propagation step of setting ``ligand`` to ``value`` (0: a knockout) in ``cells`` (default all):
    its Δ is :func:`perturb.iter_perturbation`'s first step (the model's propagator, built once per model), and
    the responding targets are those with a non-zero coefficient on a term involving the ligand, each listed with
    the terms that reach it (see the module docstring)."""
    index = index if index is not None else LensIndex(model)
    m = index.model
    if ligand not in index.gi:
        raise InputError(f"{ligand!r} is not a gene of the model.", "pick one of its ligands.", code="unknown_gene")
    if value < 0:
        raise InputError("perturbation values must be >= 0.", "use 0 for a knockout.", code="bad_perturbation")
    n, g = index.n_cells(), index.gi[ligand]
    rows = None if cells is None else np.asarray(cells, dtype=np.int64).ravel()
    if rows is not None and rows.size and (rows.min() < 0 or rows.max() >= n):
        # a negative index would silently pin another cell
        raise InputError("cells out of range.", f"use indices in [0, {n - 1}].", code="bad_cells")
    prop = model_propagator(m, ligand_mode=ligand_mode, device=device, clip=clip)
    first = next(iter_perturbation(m, [ligand], [float(value)], rows, 1, ligand_mode, device, clip, propagator=prop))
    delta = first.delta
    via: dict[int, set] = {}

    def reached(kind, row, how):
        for c in term_targets(index, kind, row):
            via.setdefault(int(c), set()).add(how)

    reached(TF, g, f"{ligand} (as a TF)")
    for p, (a, b) in enumerate(m.lr_pairs):
        if ligand in (a, b):
            reached(LR, p, f"{a}{PAIR_SEP_LR}{b}")
    for p, (a, b) in enumerate(m.tfl_pairs):
        if ligand in (a, b):
            reached(TFL, p, f"{a}{PAIR_SEP_TFL}{b}")
    responders = sorted(c for c in via if c != g)
    table = pd.DataFrame(
        {
            "target": [m.genes[c] for c in responders],
            "via": [", ".join(sorted(via[c])) for c in responders],
            "mean_abs_delta": [float(np.abs(delta[:, c]).mean()) for c in responders],
            "max_abs_delta": [float(np.abs(delta[:, c]).max()) for c in responders],
        }
    )
    table = table.sort_values("mean_abs_delta", ascending=False, kind="stable").reset_index(drop=True)
    return WhoResponds(ligand, float(value), delta, table, list(m.genes))
