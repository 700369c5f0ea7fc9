"""Knockout / overexpression and its propagation through the GRN and the tissue.

With per-cluster coefficients, the derivative of target t with respect to each of its modulator genes in cell
i is ("splash"):

    TF term  b * TF           d/dTF = b
    LR term  b * w_L * R      d/dR  = b * w_L  (if R > 0),   d/dL = b * R   (L enters through w_L)
    TFL term b * w_L * TF     d/dTF = b * w_L,               d/dL = b * TF

where w_L is the ligand received at the feature's own radius (one received value per (ligand, radius)
"channel": with the default per-pair rule a ligand in secreted and contact pairs has two).

A propagation step (SpaceTravLR's loop):
  1. derivatives at the previous state S (the observed state at step 1);
  2. E = X0 + delta; received ligands W(E); each LR / TF-ligand term takes the change of the *received* ligand
     of its channel, W(E) - W(X0), in place of the ligand's own delta (the models see w_L, not L). Under the
     'ligand' rule (SpaceTravLR's, and models of format 1) the ligand's column of the delta is replaced by it
     for every term, TF terms included, as SpaceTravLR does; under the 'pair' rule a TF term of a ligand gene
     keeps that gene's own delta;
  3. one hop: delta_t = sum over modulators of derivative x delta;
  4. perturbed genes pinned to their value; X0 + delta clipped to [0, max observed]; S <- E.
The derivative products are evaluated as sparse matrix products per cluster over all targets at once; the
received changes are kernel sums over the cells whose ligand expression changed only, all changed ligands of
one radius in one pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ... import keys
from ...io.errors import InputError
from ..base import RunControl
from . import model_dir as md
from .expression import filtered
from .ligands import choose_mode, received_ligands
from .modulators import LR, PAIR_SEP_LR, PAIR_SEP_TFL, RADIUS_RULES, TF, TFL, parse_modulator, received_channels
from .percell import PerCellBeta


@dataclass
class PerturbModel:
    """A trained model: manifest, training expression and per-cluster coefficient matrices."""

    path: Path | None
    manifest: dict
    genes: list[str]
    expr: np.ndarray  # cells x model genes (the training expression)
    coords: np.ndarray
    clusters: np.ndarray  # cluster label per cell
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
    received_cache: tuple | None = None  # (channels, cells x channels, mode) saved at training
    lr_radius: np.ndarray | None = None  # radius of each LR pair's received ligand (None: its ligand's radius)
    tfl_radius: np.ndarray | None = None  # same for TF-ligand pairs
    radius_rule: str = "ligand"  # 'pair' or 'ligand' (how the model was trained; format 1: 'ligand')
    channels: list = field(default_factory=list)  # distinct (ligand, radius) received values, set on init
    lr_channel: np.ndarray | None = None  # channel index of each LR pair / TF-ligand pair
    tfl_channel: np.ndarray | None = None
    store: md.CoefStore | None = None  # the coefficient store it was loaded from (format 3), else None
    # per-cell coefficients (mode 'full' / 'hybrid'): corrections to B_* cell by cell; None: the clusters' own
    percell: PerCellBeta | None = None
    # Propagators built for this model, by (ligand mode, device, clip): their set-up is paid once per model
    propagators: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        lrad = dict(zip(self.ligands, np.asarray(self.ligand_radius, dtype=np.float64).tolist()))
        if self.lr_radius is None:
            self.lr_radius = np.array([lrad[a] for a, _ in self.lr_pairs], dtype=np.float64)
        if self.tfl_radius is None:
            self.tfl_radius = np.array([lrad[a] for a, _ in self.tfl_pairs], dtype=np.float64)
        self.lr_radius = np.asarray(self.lr_radius, dtype=np.float64).reshape(-1)
        self.tfl_radius = np.asarray(self.tfl_radius, dtype=np.float64).reshape(-1)
        chans, lr_ch, tfl_ch = received_channels(
            self.lr_pairs, self.tfl_pairs, self.lr_radius.tolist(), self.tfl_radius.tolist()
        )
        self.channels = chans
        self.lr_channel = np.asarray(lr_ch, dtype=np.int64)
        self.tfl_channel = np.asarray(tfl_ch, dtype=np.int64)

    def __getstate__(self):
        # a model crosses processes (the Train dock trains in a child): its Propagators are rebuilt on use there
        return {**self.__dict__, "propagators": {}}

    @property
    def targets(self) -> list[str]:
        return list(self.manifest.get("targets", []))

    @property
    def mode(self) -> str:
        """Which training mode made the model: 'seed' (cluster coefficients), 'full' or 'hybrid' (per-cell)."""
        return str(self.manifest.get("mode", "seed"))

    def cell_cluster(self) -> np.ndarray:
        """Each cell's index into ``cluster_names`` (-1: none)."""
        return np.asarray(pd.Categorical(self.clusters, categories=self.cluster_names).codes, dtype=np.int64)

    def percell_moments(self) -> dict:
        """``{(kind, modulator row, target column, cluster): (mean, sd, cells)}`` of the per-cell coefficients
        over each cluster's cells (:meth:`percell.PerCellBeta.cluster_moments`); empty without them."""
        pc = self.percell
        if pc is None or pc.seed.size == 0:
            return {}
        mean, sd, n = pc.cluster_moments(self.cell_cluster())
        cluster = np.repeat(np.arange(pc.cluster_ptr.size - 1), np.diff(pc.cluster_ptr))
        keys_ = zip(pc.kind.tolist(), pc.row.tolist(), pc.target_col.tolist(), cluster.tolist())
        return dict(zip(keys_, zip(mean.tolist(), sd.tolist(), n.tolist())))

    def modulator_table(self, min_abs: float = 0.0) -> pd.DataFrame:
        """Long table (target, cluster, modulator, kind, coef, radius, coef_sd, coef_seed, per_cell) of the non-zero
        coefficients, as knockouts apply them: ``coef`` is the cluster's coefficient, or for a target with per-cell
        coefficients (mode 'full' / 'hybrid') the mean over the cluster's cells of the per-cell β, with
        ``coef_sd`` their standard deviation (0 for a cluster coefficient) and ``coef_seed`` the cluster lasso's
        seed. ``attrs['mode']`` names the mode that made the model."""
        rows = []
        kinds = {TF: "tf", LR: "lr", TFL: "tfl"}
        rad = {f"{a}{PAIR_SEP_LR}{b}": r for (a, b), r in zip(self.lr_pairs, self.lr_radius)}
        rad.update({f"{a}{PAIR_SEP_TFL}{b}": r for (a, b), r in zip(self.tfl_pairs, self.tfl_radius)})
        gi = {g: i for i, g in enumerate(self.genes)}
        pair_row = {LR: {p: i for i, p in enumerate(self.lr_pairs)}, TFL: {p: i for i, p in enumerate(self.tfl_pairs)}}
        cidx = {c: k for k, c in enumerate(self.cluster_names)}
        moments = self.percell_moments()
        for t, df in self.coef_tables.items():
            bcols = [c for c in df.columns if c.startswith("beta_")]
            parsed = [parse_modulator(c[5:]) for c in bcols]
            mrow = [gi.get(gs[0], -1) if kind == TF else pair_row[kind].get(gs, -1) for kind, gs in parsed]
            tcol = gi[t]
            for _, r in df.iterrows():
                k = cidx.get(str(r["cluster"]), -1)
                for c, (kind, _gs), row in zip(bcols, parsed, mrow):
                    seed = float(r[c])
                    if seed == 0.0:
                        continue
                    got = moments.get((kind, row, tcol, k))
                    v, sd = (seed, 0.0) if got is None else got[:2]
                    if abs(v) > min_abs:
                        name = c[5:]
                        rows.append(
                            (
                                t,
                                str(r["cluster"]),
                                name,
                                kinds[kind],
                                v,
                                float(rad.get(name, np.nan)),
                                sd,
                                seed,
                                got is not None,
                            )
                        )
        out = pd.DataFrame(rows, columns=list(MODULATOR_TABLE_COLUMNS))
        out.attrs["mode"] = self.mode
        return out


MODULATOR_TABLE_COLUMNS = (
    "target",
    "cluster",
    "modulator",
    "kind",
    "coef",
    "radius",
    "coef_sd",
    "coef_seed",
    "per_cell",
)


def cluster_mean_coefficients(model: PerturbModel) -> tuple[list, list, list]:
    """The model's per-cluster coefficient matrices (like ``B_tf``, ``B_lr``, ``B_tfl``) as knockouts apply them on
    average: each per-cell coefficient (mode 'full' / 'hybrid') replaced by its mean over the cluster's cells, the
    cluster's own coefficient elsewhere; and, per kind, 0/1 matrices of where the per-cell ones are. A seed model's
    own matrices (no copies)."""
    pc = model.percell
    mats = {TF: model.B_tf, LR: model.B_lr, TFL: model.B_tfl}
    empty = {kd: [sp.csr_matrix(m.shape) for m in ms] for kd, ms in mats.items()}
    if pc is None or pc.seed.size == 0:
        return mats, empty
    mean, _sd, _n = pc.cluster_moments(model.cell_cluster())
    out, where = {}, {}
    for kd, ms in mats.items():
        out[kd], where[kd] = [], []
        for k, m in enumerate(ms):
            e = pc.entries_of(k, kind=kd)
            if e.size == 0:
                out[kd].append(m)
                where[kd].append(empty[kd][k])
                continue
            m = sp.csr_matrix(m, copy=True)
            m.sum_duplicates()  # canonical: sorted column indices, so the non-zeros are in (row, column) order
            nz_key = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr)) * m.shape[1] + m.indices
            e_key = pc.row[e] * m.shape[1] + pc.target_col[e]
            pos = np.minimum(np.searchsorted(nz_key, e_key), max(nz_key.size - 1, 0))
            hit = nz_key[pos] == e_key if nz_key.size else np.zeros(e.size, bool)
            m.data[pos[hit]] = mean[e[hit]]  # each per-cell entry is one of the seed's non-zeros
            out[kd].append(m)
            where[kd].append(sp.coo_matrix((np.ones(e.size), (pc.row[e], pc.target_col[e])), shape=m.shape).tocsr())
    return out, where


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

    return (mats(TF, len(genes)), mats(LR, len(lr_pairs)), mats(TFL, len(tfl_pairs)), list(lr_pairs), list(tfl_pairs))


class StoreTables(Mapping):
    """``{target: coefficient table}`` over a coefficient store, each table built when asked for (the same
    DataFrame the format 1-2 CSV gives); loading never builds them. ``read_full`` gives the store with the
    columns the tables need beyond propagation's (read on the first table asked for)."""

    def __init__(self, store: md.CoefStore, targets: list[str], read_full=None):
        self.store = store
        self._read_full = read_full
        row = {t: i for i, t in enumerate(store.targets.tolist())}
        self._row = {t: row[t] for t in targets}

    def __getitem__(self, target):
        row = self._row[target]
        if self.store.n_cells is None:
            full = self._read_full()
            if full.targets.tolist() != self.store.targets.tolist():
                raise InputError("the coefficient store changed on disk since the model was loaded.", "load it again.")
            self.store = full
        return self.store.table(row)

    def __iter__(self):
        return iter(self._row)

    def __len__(self):
        return len(self._row)


def coefficients_from_store(genes, cluster_names, targets, store: md.CoefStore, entries: dict | None = None) -> tuple:
    """What :func:`build_coefficients` gives from the tables, computed on the store's columns.

    The entries go in the same order as there (per cluster: targets in ``targets`` order, then each target's
    modulator order) and the pairs are numbered by first appearance in that order, so the matrices are
    identical, not just equal up to rounding.
    """
    gi = {g: i for i, g in enumerate(genes)}
    C = len(cluster_names)
    row_of = {t: i for i, t in enumerate(store.targets.tolist())}
    rows = np.array([row_of[t] for t in targets], dtype=np.int64)  # store row of each target, in order
    lengths = np.diff(store.mod_ptr)[rows]
    new_ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(new_ptr[-1])
    if rows.size == len(store.targets) and np.array_equal(rows, np.arange(rows.size)):
        codes = store.mod_code  # the store's order is the targets' (the usual case): no gather
    else:
        take = np.repeat(store.mod_ptr[rows] - new_ptr[:-1], lengths) + np.arange(total)  # ordered slots
        codes = store.mod_code[take]
    # every target lists ~all LR pairs (millions of slots on a whole slide): the vocabulary entries present and
    # their first slot in O(slots), not by sorting the slots
    first_all = np.full(len(store.mod_vocab), total, dtype=np.int64)
    np.minimum.at(first_all, codes, np.arange(total, dtype=np.int64))
    uniq = np.flatnonzero(first_all < total)
    first = first_all[uniq]
    rank = np.full(len(store.mod_vocab), -1, dtype=np.int64)
    rank[uniq] = np.arange(uniq.size)
    parsed = [parse_modulator(str(u)) for u in store.mod_vocab[uniq]]
    kind = np.array([k for k, _ in parsed], dtype=np.int64)
    row_index = np.zeros(len(uniq), dtype=np.int64)
    pairs = {}
    for kd in (LR, TFL):  # pairs numbered by first appearance
        sel = np.flatnonzero(kind == kd)
        sel = sel[np.argsort(first[sel], kind="stable")]
        row_index[sel] = np.arange(sel.size)
        pairs[kd] = [parsed[u][1] for u in sel]
    for u in np.flatnonzero(kind == TF):
        row_index[u] = gi[parsed[u][1][0]]
    # non-zeros of the kept targets, in (cluster, target order, modulator) order
    order_of_row = np.full(len(store.targets), -1, dtype=np.int64)
    order_of_row[rows] = np.arange(rows.size)
    nz_order = order_of_row[store.nz_target]
    keep = nz_order >= 0
    nz_order, nz_cluster = nz_order[keep], store.nz_cluster[keep].astype(np.int64)
    nz_mod, nz_value = store.nz_mod[keep].astype(np.int64), store.nz_value[keep]
    sort = np.lexsort((nz_mod, nz_order, nz_cluster))
    nz_order, nz_cluster, nz_mod, nz_value = nz_order[sort], nz_cluster[sort], nz_mod[sort], nz_value[sort]
    slot = rank[codes[new_ptr[nz_order] + nz_mod]]
    nz_kind, nz_row = kind[slot], row_index[slot]
    target_col = np.array([gi[t] for t in targets], dtype=np.int64)[nz_order]
    nonzero = nz_value != 0.0
    if entries is not None:  # what per-cell coefficients are built on (percell_from_store)
        entries.update(
            store_row=rows[nz_order],
            mod=nz_mod,
            cluster=nz_cluster,
            kind=nz_kind,
            row=nz_row,
            target_col=target_col,
            value=nz_value,
            nonzero=nonzero,
        )

    def mats(kd, nrows):
        out = []
        for k in range(C):
            sel = nonzero & (nz_kind == kd) & (nz_cluster == k)
            if sel.any():
                m = sp.coo_matrix(
                    (nz_value[sel].astype(np.float64), (nz_row[sel], target_col[sel])), shape=(nrows, len(genes))
                ).tocsr()
                m.sum_duplicates()
            else:
                m = sp.csr_matrix((nrows, len(genes)))
            out.append(m)
        return out

    return (mats(TF, len(genes)), mats(LR, len(pairs[LR])), mats(TFL, len(pairs[TFL])), pairs[LR], pairs[TFL])


def percell_from_store(genes, cluster_names, targets, store: md.CoefStore, entries: dict) -> PerCellBeta | None:
    """The model's :class:`percell.PerCellBeta` from a store with per-cell columns (None for a seed store, or
    when no target kept them). ``entries`` is what :func:`coefficients_from_store` filled in."""
    if not store.has_percell or store.pc_w is None or not np.any(store.pc_flag):
        return None
    n_mod = np.diff(store.mod_ptr)
    stride = int(n_mod.max()) + 1 if n_mod.size else 1
    wkey = store.pc_w_target.astype(np.int64) * stride + store.pc_w_mod.astype(np.int64)
    order = np.argsort(wkey, kind="stable")
    ekey = entries["store_row"] * stride + entries["mod"]
    pos = np.searchsorted(wkey[order], ekey)
    pos = np.minimum(pos, max(wkey.size - 1, 0))
    hit = entries["nonzero"] & (wkey[order][pos] == ekey) if wkey.size else np.zeros(ekey.size, bool)
    flagged = store.pc_flag.astype(bool)[entries["store_row"]]
    if np.any(flagged & entries["nonzero"] & ~hit):
        raise InputError(
            "the coefficient store's per-cell part does not cover every coefficient of its per-cell targets.",
            "train the model again.",
            code="bad_model_dir",
        )
    sel = np.flatnonzero(hit & flagged)  # already in (cluster, target, modulator) order
    cl = entries["cluster"][sel]
    cluster_ptr = np.searchsorted(cl, np.arange(len(cluster_names) + 1)).astype(np.int64)
    wrow = order[pos[sel]]
    return PerCellBeta(
        z=np.asarray(store.pc_z, dtype=np.float64),
        w=np.asarray(store.pc_w, dtype=np.float64),
        cluster_ptr=cluster_ptr,
        kind=entries["kind"][sel].astype(np.int64),
        row=entries["row"][sel].astype(np.int64),
        target_col=entries["target_col"][sel].astype(np.int64),
        seed=entries["value"][sel].astype(np.float64),
        block=store.pc_w_block.astype(np.int64)[wrow],
        wrow=wrow.astype(np.int64),
        targets=[str(t) for t, f in zip(store.targets.tolist(), store.pc_flag.tolist()) if f],
    )


def percell_from_manifest_store(path, manifest, genes, cluster_names, targets, store, entries) -> PerCellBeta | None:
    """:func:`percell_from_store`, refusing a store that lacks the per-cell part its manifest's mode promises."""
    mode = manifest.get("mode", "seed")
    if mode != "seed" and not store.has_percell:
        raise InputError(
            f"{path}: the manifest says mode {mode!r} but the coefficient store holds no per-cell coefficients "
            "(its parts were written by a seed-mode training).",
            f"train the model again into a new folder with --mode {mode}.",
            code="bad_model_dir",
        )
    return percell_from_store(genes, cluster_names, targets, store, entries) if mode != "seed" else None


def model_from_tables(
    manifest: dict, genes, expr, coords, clusters, coef_tables: dict, path=None, obsm=None, obs_names=None
) -> PerturbModel:
    cluster_names = [str(c) for c in manifest["clusters"]]
    coefficients = build_coefficients(genes, cluster_names, coef_tables)
    return model_from_coefficients(
        manifest, genes, expr, coords, clusters, coefficients, coef_tables, path=path, obsm=obsm, obs_names=obs_names
    )


def model_from_coefficients(
    manifest: dict,
    genes,
    expr,
    coords,
    clusters,
    coefficients: tuple,
    coef_tables,
    path=None,
    obsm=None,
    obs_names=None,
) -> PerturbModel:
    cluster_names = [str(c) for c in manifest["clusters"]]
    B_tf, B_lr, B_tfl, lr_pairs, tfl_pairs = coefficients
    ligs = list(dict.fromkeys([a for a, _ in lr_pairs] + [a for a, _ in tfl_pairs]))
    version = int(manifest.get("format_version", 1))
    if version > md.FORMAT_VERSION:
        raise InputError(
            f"the model folder has format {version}; this version reads up to {md.FORMAT_VERSION}.",
            "update spatial-deconv-gui, or train the model again with this version.",
            code="bad_model_dir",
        )
    lrad = manifest.get("ligand_radius", {})
    missing = [g for g in ligs if g not in lrad]
    if missing:
        raise InputError(
            f"the model has no radius for ligands {missing[:5]}.", "train the model again.", code="bad_model_dir"
        )
    rule = manifest.get("radius_rule", "ligand")  # format 1: one radius per ligand
    if rule not in RADIUS_RULES:
        raise InputError(
            f"unknown radius_rule {rule!r} in the manifest.", "train the model again.", code="bad_model_dir"
        )

    def radii(pairs, key, sep):
        if key not in manifest:  # format 1: every pair of a ligand at the ligand's radius
            return np.array([lrad[a] for a, _ in pairs], np.float64)
        per = manifest[key]
        names = [f"{a}{sep}{b}" for a, b in pairs]
        lack = [n for n in names if n not in per]
        if lack:
            raise InputError(
                f"the manifest's {key} has no radius for {lack[:5]}.", "train the model again.", code="bad_model_dir"
            )
        return np.array([per[n] for n in names], np.float64)

    return PerturbModel(
        path=Path(path) if path else None,
        manifest=manifest,
        genes=list(genes),
        expr=np.asarray(expr, np.float64),
        coords=np.asarray(coords, np.float64),
        clusters=np.asarray(clusters).astype(str),
        cluster_names=cluster_names,
        ligands=ligs,
        ligand_radius=np.array([lrad[g] for g in ligs], np.float64),
        scale_factor=float(manifest.get("scale_factor", 1.0)),
        lr_pairs=lr_pairs,
        tfl_pairs=tfl_pairs,
        B_tf=B_tf,
        B_lr=B_lr,
        B_tfl=B_tfl,
        coef_tables=coef_tables,
        obsm=dict(obsm or {}),
        obs_names=list(obs_names) if obs_names is not None else [str(i) for i in range(len(expr))],
        lr_radius=radii(lr_pairs, "lr_radius", PAIR_SEP_LR),
        tfl_radius=radii(tfl_pairs, "tfl_radius", PAIR_SEP_TFL),
        radius_rule=rule,
    )


def load_model(path) -> PerturbModel:
    """Read a model directory written by :func:`train.train` (format 3 store; formats 1-2 with a notice)."""
    from ...io.read import read_h5ad

    path = Path(path)
    manifest = md.read_manifest(path)
    md.check_loadable(path, manifest)  # newer format or half-trained: say so before reading anything big
    md.check_files(path, manifest)
    data_path = path / manifest.get("data_file", md.DATA)
    try:
        data = read_h5ad(data_path)
    except InputError as exc:
        raise InputError(
            f"{path}: {data_path.name} cannot be read ({exc.problem})",
            f"delete {data_path} and run the same 'spatial-deconv perturb train' command again: it rewrites it "
            "and keeps the fitted targets (training resumes the folder).",
            code="bad_model_dir",
        ) from exc
    genes = list(map(str, data.var_names))
    if genes != list(manifest["genes"]):
        raise InputError(
            f"{path}: {md.DATA} does not match the manifest's genes.", "train the model again.", code="bad_model_dir"
        )
    targets = [str(t) for t in manifest["targets"]]
    cluster_names = [str(c) for c in manifest["clusters"]]
    store = None
    if md.uses_store(manifest):
        # only the columns propagation needs: the per-target fit statistics are read when a table is asked for
        store = md.read_store(path, manifest, md.PROPAGATION_COLUMNS)
        if store.clusters.tolist() != cluster_names:
            raise InputError(
                f"{path}: the coefficient store's clusters do not match the manifest's.",
                "train the model again.",
                code="bad_model_dir",
            )
        tables = StoreTables(store, targets, partial(md.read_store, path, manifest, md.TABLE_COLUMNS))
        entries: dict = {}
        coefficients = coefficients_from_store(genes, cluster_names, targets, store, entries)
        percell = percell_from_manifest_store(path, manifest, genes, cluster_names, targets, store, entries)
    else:
        md.notice_old_layout(path, int(manifest.get("format_version", 1)))
        done = md.finished_genes(path, targets)
        tables = {t: md.read_coefs_csv(path, t) for t in targets if t in done}
        if len(tables) < len(targets):
            raise InputError(
                f"{path} lacks the coefficient tables of {len(targets) - len(tables)} of its {len(targets)} targets.",
                "run the same 'spatial-deconv perturb train' command "
                "again: it resumes the folder and fits only the missing targets.",
                code="model_incomplete",
            )
        coefficients = build_coefficients(genes, cluster_names, tables)
        percell = None
    X = data.X.toarray() if sp.issparse(data.X) else np.asarray(data.X)
    obsm = {k: np.asarray(v) for k, v in data.obsm.items()}
    model = model_from_coefficients(
        manifest,
        genes,
        X,
        obsm[keys.SPATIAL],
        data.obs[md.CLUSTER_OBS].astype(str).to_numpy(),
        coefficients,
        tables,
        path=path,
        obsm=obsm,
        obs_names=list(map(str, data.obs_names)),
    )
    model.store = store
    model.percell = percell
    rpath = path / md.RECEIVED
    if rpath.exists() and "received_ligands_mode" in manifest:
        W = np.load(rpath, allow_pickle=False)
        if "received_channels" in manifest:
            names = [(str(a), float(r)) for a, r in manifest["received_channels"]]
        else:  # format 1: one column per ligand, at its radius
            lrad = manifest.get("ligand_radius", {})
            names = [(g, float(lrad[g])) for g in manifest["ligands"] if g in lrad]
        if W.shape == (X.shape[0], len(names)):
            model.received_cache = (names, W, manifest["received_ligands_mode"])
    return model


@dataclass
class PerturbStep:
    step: int
    n_steps: int
    delta: np.ndarray  # cells x model genes, after this step (before the final pin)


class Propagator:
    """Holds the fixed parts of a simulation (observed state, received ligands, index maps)."""

    def __init__(self, model: PerturbModel, ligand_mode: str = "exact", device=None, clip: bool = True):
        self.m = model
        self.mode = choose_mode(model.expr.shape[0], ligand_mode)
        self.device = device
        self.rule = model.radius_rule
        gi = {g: i for i, g in enumerate(model.genes)}
        self.gi = gi
        self.lig_idx = np.array([gi[g] for g in model.ligands], dtype=np.int64)  # ligand gene columns
        li = {g: i for i, g in enumerate(model.ligands)}
        self.chan_lig = np.array([li[a] for a, _ in model.channels], dtype=np.int64)  # channel -> ligand
        self.chan_radius = np.array([r for _, r in model.channels], dtype=np.float64)
        self.lr_ch = np.asarray(model.lr_channel, dtype=np.int64)
        self.lr_lg = np.array([gi[a] for a, _ in model.lr_pairs], dtype=np.int64)
        self.lr_r = np.array([gi[b] for _, b in model.lr_pairs], dtype=np.int64)
        self.tfl_ch = np.asarray(model.tfl_channel, dtype=np.int64)
        self.tfl_lg = np.array([gi[a] for a, _ in model.tfl_pairs], dtype=np.int64)
        self.tfl_t = np.array([gi[b] for _, b in model.tfl_pairs], dtype=np.int64)
        self.lr_l, self.tfl_l = self.lr_ch, self.tfl_ch  # older names
        # 'ligand' rule: each ligand has one channel, and the ligand's column of the delta is replaced by it
        self.lig_chan = None
        if self.rule == "ligand" and len(self.lig_idx):
            first = {}
            for k, li_k in enumerate(self.chan_lig):
                first.setdefault(int(li_k), k)
            self.lig_chan = np.array([first[i] for i in range(len(self.lig_idx))], dtype=np.int64)
        self.X0 = model.expr
        self.F0 = filtered(self.X0)
        self.L0 = self.F0[:, self.lig_idx]
        self.max0 = self.X0.max(axis=0) if clip else np.full(self.X0.shape[1], np.inf)
        self.cluster_rows = [np.flatnonzero(model.clusters == c) for c in model.cluster_names]
        self.cell_cluster = np.asarray(
            pd.Categorical(model.clusters, categories=model.cluster_names).codes, dtype=np.int64
        )  # -1: a cell of no modelled cluster
        # per cluster CSR (modulator -> targets) of the coefficients, stacked for the numba hop
        self._csr = tuple(
            x
            for mats, nrows in (
                (model.B_tf, len(model.genes)),
                (model.B_lr, len(model.lr_pairs)),
                (model.B_tfl, len(model.tfl_pairs)),
            )
            for x in _stack_csr(mats, nrows, len(model.cluster_names))
        )
        self.W0 = None
        nch = len(model.channels)
        cache = model.received_cache
        # an exact cache serves both modes (grid mode then approximates only the changes)
        if cache is not None and cache[2] in ("exact", self.mode) and set(model.channels) <= set(cache[0]):
            pos = {c: i for i, c in enumerate(cache[0])}
            self.W0 = np.ascontiguousarray(cache[1][:, [pos[c] for c in model.channels]], dtype=np.float64)
        if self.W0 is None:
            self.W0 = (
                self._received(self.L0[:, self.chan_lig], self.chan_radius) if nch else np.zeros((len(self.X0), 0))
            )

    def _received(self, values, radii, source_index=None):
        return received_ligands(
            self.m.coords,
            values,
            radii,
            scale=self.m.scale_factor,
            mode=self.mode,
            device=self.device,
            source_index=source_index,
            n_total=self.X0.shape[0],
        )

    def _plan(self, d: np.ndarray):
        """Cells whose ligand values changed (rows of ``d``), the channels to update, and the cost of the kernel
        passes (pairs of cells: a symmetric pass over all cells, or changed cells x all cells, per radius)."""
        n = d.shape[0]
        nzd = d != 0
        rows = np.flatnonzero(nzd.any(axis=1))
        if rows.size == 0:
            return rows, rows, 0.0
        chs = np.flatnonzero(nzd[rows].any(axis=0)[self.chan_lig])
        per_radius = n * n / 2.0 if rows.size > 0.5 * n else float(n) * rows.size
        return rows, chs, np.unique(self.chan_radius[chs]).size * per_radius

    def delta_received(self, F_new: np.ndarray, prev: tuple | None = None) -> np.ndarray:
        """W(F_new) - W(F0) per channel (cells x channels).

        Received ligands are linear in the ligand values, so only cells whose ligand expression changed emit
        (``K[:, changed] @ delta``; when more than half the cells changed, one symmetric pass over all cells is
        cheaper), only channels of changed ligands are updated, and all changed channels of one radius share
        one kernel pass. ``prev = (ligand values, delta)`` of an earlier state: when fewer cells changed since
        then than since F0, the result is that delta plus the change since then - a
        propagation step whose ligands did not move costs no kernel pass at all.
        """
        n, nch = self.X0.shape[0], len(self.chan_lig)
        if not nch:
            return np.zeros((n, 0))
        L = F_new[:, self.lig_idx]
        d = L - self.L0
        rows, chs, cost = self._plan(d)
        base = None
        if prev is not None:  # (the grid approximation is linear in the values too: same anchors, same weights)
            d1 = L - prev[0]
            rows1, chs1, cost1 = self._plan(d1)
            if cost1 < cost:
                base, d, rows, chs = prev[1], d1, rows1, chs1
        out = np.zeros((n, nch)) if base is None else base.copy()
        if chs.size == 0:
            return out
        vals = d[:, self.chan_lig[chs]]
        if self.mode == "exact" and rows.size > 0.5 * n:
            sub = self._received(vals, self.chan_radius[chs])
        else:
            sub = self._received(vals[rows], self.chan_radius[chs], source_index=rows)
        out[:, chs] += sub
        return out

    def hop(
        self, F_s: np.ndarray, X_s: np.ndarray, W_s: np.ndarray, dmod: np.ndarray, dW: np.ndarray | None = None
    ) -> np.ndarray:
        """One propagation hop: sum over modulators of derivative (at state S) x delta.

        ``dmod`` is the delta each TF term sees; ``dW`` the change of each received channel (default: read
        from ``dmod``'s ligand columns, one channel per ligand, as before channels existed). Evaluated cell by
        cell over the non-zero coefficients of the cell's cluster (``_kernels.propagation_hop``).
        """
        from ._kernels import propagation_hop

        if dW is None:
            dW = dmod[:, self.lig_idx[self.chan_lig]] if len(self.chan_lig) else np.zeros((dmod.shape[0], 0))
        c64 = lambda a: np.ascontiguousarray(a, dtype=np.float64)  # noqa: E731
        (tf_p, tf_i, tf_v, lr_p, lr_i, lr_v, tfl_p, tfl_i, tfl_v) = self._csr
        out = np.zeros(dmod.shape)
        pc = self.m.percell
        if pc is not None and pc.seed.size:
            from ._kernels import percell_hop

            percell_hop(
                self.cell_cluster,
                c64(dmod),
                c64(dW),
                c64(F_s),
                c64(W_s),
                pc.cluster_ptr,
                pc.kind,
                pc.row,
                pc.target_col,
                pc.seed,
                pc.block,
                pc.wrow,
                pc.z,
                pc.w,
                self.lr_r,
                self.lr_ch,
                self.tfl_t,
                self.tfl_ch,
                out,
            )
        propagation_hop(
            self.cell_cluster,
            c64(dmod),
            c64(dW),
            c64(F_s),
            c64(W_s),
            tf_p,
            tf_i,
            tf_v,
            lr_p,
            lr_i,
            lr_v,
            self.lr_r,
            self.lr_ch,
            tfl_p,
            tfl_i,
            tfl_v,
            self.tfl_t,
            self.tfl_ch,
            out,
        )
        return out

    def _hop_numpy(self, F_s, X_s, W_s, dmod, dW):
        """Reference for :meth:`hop` with scipy's sparse products per cluster (tests)."""
        m = self.m
        out = np.zeros_like(dmod)
        for k, rows in enumerate(self.cluster_rows):
            if rows.size == 0:
                continue
            D = dmod[rows]
            acc = np.asarray(m.B_tf[k].T @ D.T)
            if len(m.lr_pairs):
                Fr = F_s[np.ix_(rows, self.lr_r)]
                q = (
                    np.where(Fr > 0, W_s[np.ix_(rows, self.lr_ch)], 0.0) * D[:, self.lr_r]
                    + Fr * dW[np.ix_(rows, self.lr_ch)]
                )
                acc = acc + m.B_lr[k].T @ q.T
            if len(m.tfl_pairs):
                q = (
                    F_s[np.ix_(rows, self.tfl_t)] * dW[np.ix_(rows, self.tfl_ch)]
                    + W_s[np.ix_(rows, self.tfl_ch)] * D[:, self.tfl_t]
                )
                acc = acc + m.B_tfl[k].T @ q.T
            out[rows] = np.asarray(acc).T
            pc = m.percell
            if pc is not None:  # each entry's per-cell change of coefficient times its derivative term
                e = pc.entries_of(k)
                if e.size:
                    f = pc.factor(e, rows) * pc.seed[e]  # (cells, entries)
                    q = np.zeros((rows.size, e.size))
                    for j, (kd, r) in enumerate(zip(pc.kind[e], pc.row[e])):
                        if kd == TF:
                            q[:, j] = D[:, r]
                        elif kd == LR:
                            fr = F_s[rows, self.lr_r[r]]
                            c = self.lr_ch[r]
                            q[:, j] = np.where(fr > 0, W_s[rows, c], 0.0) * D[:, self.lr_r[r]] + fr * dW[rows, c]
                        else:
                            c = self.tfl_ch[r]
                            q[:, j] = F_s[rows, self.tfl_t[r]] * dW[rows, c] + W_s[rows, c] * D[:, self.tfl_t[r]]
                    np.add.at(out, (rows[:, None], pc.target_col[e][None, :]), f * q)
        return out


def model_propagator(model: PerturbModel, ligand_mode: str = "exact", device=None, clip: bool = True) -> Propagator:
    """The model's :class:`Propagator` for these settings, built on first use and kept on the model (a
    further knockout on the same model then starts propagating at once)."""
    key = (choose_mode(model.expr.shape[0], ligand_mode), None if device is None else str(device), bool(clip))
    prop = model.propagators.get(key)
    if prop is None:
        prop = model.propagators[key] = Propagator(model, ligand_mode=ligand_mode, device=device, clip=clip)
    return prop


def _stack_csr(mats, nrows: int, n_clusters: int):
    """(ptr[k, row], targets, coefficients) of per-cluster CSR matrices stacked into flat arrays."""
    ptr = np.zeros((n_clusters, nrows + 1), dtype=np.int64)
    idx, val = [np.zeros(0, np.int64)], [np.zeros(0, np.float64)]
    off = 0
    for k, mat in enumerate(mats):
        mat = sp.csr_matrix(mat)
        mat.sum_duplicates()
        ptr[k] = mat.indptr.astype(np.int64) + off
        idx.append(mat.indices.astype(np.int64))
        val.append(mat.data.astype(np.float64))
        off += mat.nnz
    return ptr, np.concatenate(idx), np.concatenate(val)


def perturbation_input(model: PerturbModel, genes, values, cells=None) -> tuple[np.ndarray, dict]:
    """Initial delta (cells x model genes) and the {gene: value} payload."""
    if isinstance(genes, str):
        genes = [genes]
    genes = [str(g) for g in genes]
    if np.isscalar(values):
        values = [float(values)] * len(genes)
    values = [float(v) for v in values]
    if len(values) != len(genes):
        raise InputError(
            f"{len(genes)} genes but {len(values)} values.", "give one value, or one per gene.", code="bad_perturbation"
        )
    unknown = [g for g in genes if g not in set(model.genes)]
    if unknown:
        raise InputError(
            f"genes {unknown} are not in the model (not a target or modulator).",
            "perturb one of the model's genes (see its manifest 'genes').",
            code="unknown_gene",
        )
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


def iter_perturbation(
    model: PerturbModel,
    genes,
    values=0.0,
    cells=None,
    n_steps: int = 4,
    ligand_mode: str = "exact",
    device=None,
    clip: bool = True,
    control: RunControl | None = None,
    propagator: Propagator | None = None,
) -> Iterator[PerturbStep]:
    """Yield the simulated delta after each propagation step (the last one has the perturbed genes pinned)."""
    control = control or RunControl()
    delta_in, payload = perturbation_input(model, genes, values, cells)
    prop = propagator or model_propagator(model, ligand_mode=ligand_mode, device=device, clip=clip)
    X0 = prop.X0
    pin_r, pin_c = np.nonzero(delta_in)
    pin_v = delta_in[pin_r, pin_c]
    delta = delta_in.copy()
    F_s, X_s, W_s = prop.F0, X0, prop.W0
    prev = (prop.L0, np.zeros_like(prop.W0))  # ligand values and received change of the last state
    for step in range(n_steps):
        control.check_cancel()
        control.report("propagation", step / max(n_steps, 1), f"step {step + 1}/{n_steps}")
        E = X0 + delta
        F_e = filtered(E)
        dW = prop.delta_received(F_e, prev)
        prev = (F_e[:, prop.lig_idx], dW)
        dmod = delta
        if prop.lig_chan is not None:
            dmod = delta.copy()
            dmod[:, prop.lig_idx] = dW[:, prop.lig_chan]  # delta + (W(E) - W0) - (E - X0) on ligand columns
        new = prop.hop(F_s, X_s, W_s, dmod, dW)
        new[pin_r, pin_c] = pin_v
        new += X0
        np.clip(new, 0.0, prop.max0, out=new)  # X0 + delta clipped to [0, observed max]
        delta = np.subtract(new, X0, out=new)
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


def simulate_perturbation(
    model: PerturbModel,
    genes,
    values=0.0,
    cells=None,
    n_steps: int = 4,
    ligand_mode: str = "exact",
    device=None,
    clip: bool = True,
    control: RunControl | None = None,
) -> np.ndarray:
    """Final delta (cells x model genes) after ``n_steps`` propagation steps."""
    last = None
    for last in iter_perturbation(model, genes, values, cells, n_steps, ligand_mode, device, clip, control):  # noqa: B007 (the last step is the answer)
        pass
    return last.delta


USAGE_COLUMNS = (
    "gene",
    "in_model",
    "n_targets",
    "total_abs_beta",
    "n_targets_as_tf",
    "n_targets_as_ligand",
    "n_targets_as_receptor",
    "n_candidate_targets",
    "beta_of",
)


def _candidate_counter(model: PerturbModel):
    """A function: vocabulary mask -> how many of ``model.targets`` list a modulator in it (after the modulator
    screen, zero coefficients included), and the vocabulary (names). O(slots) per call, no per-slot index."""
    targets = model.targets
    # a model built without load_model (e.g. kept by training) may carry its store only inside its tables
    store = model.store if model.store is not None else getattr(model.coef_tables, "store", None)
    if store is not None:
        row_of = {t: i for i, t in enumerate(store.targets.tolist())}
        rows = np.array([row_of[t] for t in targets], dtype=np.int64)
        codes, ptr = store.mod_code, store.mod_ptr
        names = store.mod_vocab.tolist()
    else:
        vocab: dict[str, int] = {}
        code, lengths = [], []
        for t in targets:
            cols = [c[5:] for c in model.coef_tables[t].columns if c.startswith("beta_")]
            code.extend(vocab.setdefault(c, len(vocab)) for c in cols)
            lengths.append(len(cols))
        codes = np.asarray(code, dtype=np.int64)
        ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        rows = np.arange(len(targets))
        names = list(vocab)

    def count(mask: np.ndarray) -> int:
        if not mask.any():
            return 0
        hits = np.concatenate([[0], np.cumsum(mask[codes], dtype=np.int64)])
        per_row = hits[ptr[1:]] - hits[ptr[:-1]]
        return int((per_row[rows] > 0).sum())

    return names, count


def gene_usage(model: PerturbModel, genes) -> pd.DataFrame:
    """How much the model's targets use each of ``genes``, one row per gene (``USAGE_COLUMNS``).

    ``n_targets``: targets with a non-zero coefficient (in any cluster) on a modulator that involves the gene - as a
    TF, as the ligand or the receptor of a ligand-receptor pair, as the ligand or the TF of a TF-ligand pair;
    ``total_abs_beta`` sums |coefficient| over those (target, cluster, modulator) entries, each the coefficient a
    knockout applies: the cluster's, or for a target with per-cell coefficients (mode 'full' / 'hybrid') the mean
    over the cluster's cells of the per-cell β (:func:`cluster_mean_coefficients`); ``beta_of`` says which
    ('cluster', 'per-cell mean', or both joined by ' + '); ``n_targets_as_*`` split ``n_targets`` by role (a target
    can count under several); ``n_candidate_targets``: targets that had such a modulator after the modulator
    screen, zero or not (candidates - n_targets is what the lasso zeroed). A gene with ``n_targets == 0`` moves
    nothing but itself when knocked out. ``attrs['mode']`` names the mode that made the model.
    """
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    gi = {g: i for i, g in enumerate(model.genes)}
    targets = model.targets
    tcol = np.array([gi[t] for t in targets], dtype=np.int64)
    col_to_target = np.full(len(model.genes), -1, dtype=np.int64)
    col_to_target[tcol] = np.arange(len(targets))
    # role -> (stacked per-cluster matrices, row of each gene); rows of a gene in pair matrices: pairs it is part of
    lr_by_gene = {0: {}, 1: {}}
    for p, pair in enumerate(model.lr_pairs):
        for side in (0, 1):
            lr_by_gene[side].setdefault(pair[side], []).append(p)
    tfl_by_gene = {0: {}, 1: {}}
    for p, pair in enumerate(model.tfl_pairs):
        for side in (0, 1):
            tfl_by_gene[side].setdefault(pair[side], []).append(p)
    names, count_candidates = _candidate_counter(model)
    involved = [set(parse_modulator(n)[1]) for n in names]
    mats, percell_at = cluster_mean_coefficients(model)
    rows = []
    for g in genes:
        roles = {"tf": set(), "ligand": set(), "receptor": set()}
        total = 0.0
        n_entries = n_percell = 0

        def add(kind, sel, role):
            nonlocal total, n_entries, n_percell
            if not sel:
                return
            for m, at in zip(mats[kind], percell_at[kind]):
                sub = m[sel]
                nz = sub.data != 0
                roles[role].update(col_to_target[sub.indices[nz]].tolist())
                total += float(np.abs(sub.data[nz]).sum())
                n_entries += int(nz.sum())
                n_percell += int(at[sel].nnz)

        if g in gi:
            add(TF, [gi[g]], "tf")
        add(LR, lr_by_gene[0].get(g, []), "ligand")
        add(LR, lr_by_gene[1].get(g, []), "receptor")
        add(TFL, tfl_by_gene[0].get(g, []), "ligand")
        add(TFL, tfl_by_gene[1].get(g, []), "tf")
        used = set().union(*roles.values())
        used.discard(-1)
        n_cand = count_candidates(np.array([g in inv for inv in involved], dtype=bool))
        beta_of = " + ".join(
            w for w, n in (("cluster", n_entries - min(n_percell, n_entries)), ("per-cell mean", n_percell)) if n
        )
        rows.append(
            (
                g,
                g in gi,
                len(used),
                total,
                len(roles["tf"] - {-1}),
                len(roles["ligand"] - {-1}),
                len(roles["receptor"] - {-1}),
                n_cand,
                beta_of,
            )
        )
    out = pd.DataFrame(rows, columns=list(USAGE_COLUMNS))
    out.attrs["mode"] = model.mode
    return out


def usage_header(model: PerturbModel) -> str:
    """One line naming the mode that made the model and what the |beta| of :func:`usage_notice` is."""
    mode = model.mode
    pc = model.percell
    if pc is None or pc.seed.size == 0:
        extra = " (no target kept per-cell coefficients)" if mode != "seed" else ""
        return f"model: {mode} mode{extra}; |beta| below sums the cluster coefficients."
    return (
        f"model: {mode} mode, per-cell coefficients for {len(pc.targets)} of its {len(model.targets)} targets; "
        "|beta| below sums, for those, each cluster's mean over its cells of the per-cell beta (what a knockout "
        "applies there on average), the cluster coefficients for the others."
    )


def usage_notice(row) -> str:
    """One line saying what a knockout of ``row['gene']`` (a row of :func:`gene_usage`) can move."""
    g = row["gene"]
    if not row["in_model"]:
        return f"{g} is not in the model (not a target or modulator of any target)."
    if row["n_targets"] == 0:
        if row["n_candidate_targets"]:
            return (
                f"{g} is used by no target's model: it was a candidate modulator of {row['n_candidate_targets']} "
                "targets and the lasso set all its coefficients to 0; a knockout moves only its own expression."
            )
        return f"{g} is used by no target's model (no target has it as a modulator); a knockout moves only itself."
    of = str(row.get("beta_of", "") or "")
    how = ", per-cell beta as each cluster's mean over its cells" if "per-cell" in of else ""
    return (
        f"{g} is used by {row['n_targets']} of the model's targets (total |beta| {row['total_abs_beta']:.3g}{how}; "
        f"candidate modulator of {row['n_candidate_targets']})."
    )
