"""Which modulators each target gene gets: its TFs, ligand-receptor pairs, and TF-ligand pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .priors import SECRETED

TF, LR, TFL = 0, 1, 2
GROUP_NAMES = ("tf", "lr", "tfl")
PAIR_SEP_LR = "$"  # same spelling as SpaceTravLR's beta columns: ligand$receptor, ligand#tf
PAIR_SEP_TFL = "#"


@dataclass
class TargetModulators:
    """A target's modulators: its TFs, LR pairs and TF-ligand pairs.

    The LR pairs are held as indices into ``pairs``, the list shared by every target of a run (a target gets
    all usable pairs but those involving itself: on a whole-transcriptome slide ~1,800 of them, so per-target
    lists of tuples would cost seconds per run)."""

    target: str
    tfs: list[str] = field(default_factory=list)
    lr_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    tfl: list[tuple[str, str]] = field(default_factory=list)  # (ligand, tf)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # shared: the run's LR pairs

    @classmethod
    def from_lists(cls, target, tfs, lr, tfl) -> TargetModulators:
        return cls(target, list(tfs), np.arange(len(lr), dtype=np.int64), list(tfl), list(lr))

    @property
    def lr(self) -> list[tuple[str, str]]:
        return [self.pairs[i] for i in self.lr_index]

    @property
    def names(self) -> list[str]:
        return (
            list(self.tfs)
            + [f"{a}{PAIR_SEP_LR}{b}" for a, b in self.lr]
            + [f"{a}{PAIR_SEP_TFL}{b}" for a, b in self.tfl]
        )

    @property
    def groups(self) -> np.ndarray:
        return np.array([TF] * len(self.tfs) + [LR] * len(self.lr_index) + [TFL] * len(self.tfl), dtype=np.int64)

    def __len__(self):
        return len(self.tfs) + len(self.lr_index) + len(self.tfl)

    @property
    def genes(self) -> set[str]:
        g = set(self.tfs)
        for a, b in self.lr:
            g.update((a, b))
        for a, b in self.tfl:
            g.update((a, b))
        return g


def parse_modulator(name: str) -> tuple[int, tuple[str, ...]]:
    """(group, genes) from a modulator name: 'TF', 'L$R' or 'L#TF'."""
    if PAIR_SEP_LR in name:
        a, b = name.split(PAIR_SEP_LR, 1)
        return LR, (a, b)
    if PAIR_SEP_TFL in name:
        a, b = name.split(PAIR_SEP_TFL, 1)
        return TFL, (a, b)
    return TF, (name,)


def usable_lr(lr: pd.DataFrame, var_names) -> pd.DataFrame:
    """LR rows whose ligand and receptor are both measured (table order kept)."""
    vs = set(map(str, var_names))
    return lr[lr.ligand.isin(vs) & lr.receptor.isin(vs)].reset_index(drop=True)


RADIUS_RULES = ("pair", "ligand")


def ligand_radii(lr_usable: pd.DataFrame, radius: float, contact_radius: float) -> dict[str, float]:
    """One radius per ligand: that of its first pair in the table (SpaceTravLR's rule)."""
    first = lr_usable.drop_duplicates(subset="ligand", keep="first")
    return {
        lig: (float(radius) if sig == SECRETED else float(contact_radius))
        for lig, sig in zip(first.ligand, first.signaling)
    }


def pair_radii(lr_usable: pd.DataFrame, radius: float, contact_radius: float) -> dict[tuple[str, str], float]:
    """One radius per ligand-receptor pair from its own annotation (secreted: ``radius``, contact:
    ``contact_radius``); a pair listed twice with different annotations keeps its first row's."""
    first = lr_usable.drop_duplicates(subset=["ligand", "receptor"], keep="first")
    return {
        (a, b): (float(radius) if sig == SECRETED else float(contact_radius))
        for a, b, sig in zip(first.ligand, first.receptor, first.signaling)
    }


def feature_radii(
    lr_usable: pd.DataFrame | None, lr_pairs, tfl_pairs, radius: float, contact_radius: float, rule: str = "pair"
) -> tuple[list[float], list[float]]:
    """The radius of the received ligand each LR and TF-ligand feature uses.

    ``rule='pair'``: an LR pair uses its own annotation's radius, so a ligand with secreted and contact pairs is
    received at both radii. ``rule='ligand'`` (SpaceTravLR): every pair of a ligand uses the radius of the
    ligand's first pair in the table. TF-ligand links carry no annotation: they use the ligand's radius under
    either rule.
    """
    if rule not in RADIUS_RULES:
        raise ValueError(f"radius_rule must be one of {RADIUS_RULES}, got {rule!r}")
    empty = pd.DataFrame(columns=["ligand", "receptor", "signaling"])
    lu = lr_usable if lr_usable is not None else empty
    per_lig = ligand_radii(lu, radius, contact_radius)
    per_pair = pair_radii(lu, radius, contact_radius)
    lr_r = [per_pair[p] if rule == "pair" else per_lig[p[0]] for p in lr_pairs]
    tfl_r = [per_lig.get(a, float(radius)) for a, _ in tfl_pairs]
    return lr_r, tfl_r


def received_channels(lr_pairs, tfl_pairs, lr_radii, tfl_radii) -> tuple[list[tuple[str, float]], list[int], list[int]]:
    """Distinct (ligand, radius) received values the features need, and each LR / TF-ligand feature's index
    into them (LR pairs first, in order, then TF-ligand pairs)."""
    chans: dict[tuple[str, float], int] = {}
    lr_ch = [chans.setdefault((a, float(r)), len(chans)) for (a, _), r in zip(lr_pairs, lr_radii)]
    tfl_ch = [chans.setdefault((a, float(r)), len(chans)) for (a, _), r in zip(tfl_pairs, tfl_radii)]
    return list(chans), lr_ch, tfl_ch


def receptor_levels(expr: np.ndarray, var_names, clusters: np.ndarray, genes) -> dict[str, float]:
    """Max over clusters of each gene's cluster-mean expression."""
    idx = {g: i for i, g in enumerate(map(str, var_names))}
    cols = [idx[g] for g in genes]
    out = np.full(len(cols), -np.inf)
    for c in np.unique(clusters):
        m = clusters == c
        out = np.maximum(out, np.asarray(expr[m][:, cols].mean(axis=0)).ravel())
    return dict(zip(genes, out))


def ligand_expression_rank(expr: np.ndarray, var_names, ligands) -> list[str]:
    """``ligands`` by mean expression over all cells, highest first (ties in the given order)."""
    idx = {g: i for i, g in enumerate(map(str, var_names))}
    means = np.asarray(expr[:, [idx[g] for g in ligands]].mean(axis=0)).ravel() if len(ligands) else np.zeros(0)
    order = np.argsort(-means, kind="stable")
    return [ligands[i] for i in order]


def select_modulators(
    var_names,
    targets,
    grn: pd.DataFrame,
    lr: pd.DataFrame | None,
    expr: np.ndarray,
    clusters: np.ndarray,
    tfl: pd.DataFrame | None = None,
    receptor_thresh: float = 0.01,
    tf_ligand_cutoff: float = 0.01,
    tfl_top: int = 5,
    max_ligands: int | None = None,
) -> tuple[dict[str, TargetModulators], list[str]]:
    """Modulators of every target, and the orphans (targets with none).

    TFs: GRN regulators of the target that are measured. LR pairs: both genes measured, the receptor's highest
    cluster mean above ``receptor_thresh``, neither gene the target itself; with ``max_ligands``, only the pairs
    of the ``max_ligands`` ligands of highest mean expression (SpaceTravLR's screen of ligands by expression).
    TF-ligand pairs (with a ligand->TF table): for each of the target's TFs, its ``tfl_top`` strongest LR
    ligands with weight > ``tf_ligand_cutoff``.
    """
    vs = list(map(str, var_names))
    vset = set(vs)
    g = grn[grn.tf.isin(vset) & grn.target.isin(vset)]
    regs = g.groupby("target", sort=False)["tf"].apply(lambda s: list(dict.fromkeys(s))).to_dict()
    pairs: list[tuple[str, str]] = []
    if lr is not None and len(lr):
        lu = usable_lr(lr, vs)
        if len(lu):
            lev = receptor_levels(expr, vs, clusters, sorted(set(lu.receptor)))
            lu = lu[lu.receptor.map(lambda r: lev[r] > receptor_thresh)]
            if max_ligands is not None:
                keep = set(ligand_expression_rank(expr, vs, list(dict.fromkeys(lu.ligand)))[: int(max_ligands)])
                lu = lu[lu.ligand.isin(keep)]
            pairs = list(dict.fromkeys(zip(lu.ligand, lu.receptor)))
    lr_ligands = list(dict.fromkeys(a for a, _ in pairs))
    tfl_by_tf: dict[str, list[str]] = {}
    if tfl is not None and len(tfl) and lr_ligands:
        t2 = tfl[tfl.ligand.isin(set(lr_ligands)) & tfl.tf.isin(vset) & (tfl.weight > tf_ligand_cutoff)]
        for tf, sub in t2.groupby("tf", sort=False):
            tfl_by_tf[tf] = list(sub.sort_values("weight", ascending=False, kind="stable").ligand[:tfl_top])
    # pairs involving each gene: a target gets every pair but those
    involving: dict[str, list[int]] = {}
    for k, (a, b) in enumerate(pairs):
        involving.setdefault(a, []).append(k)
        if b != a:
            involving.setdefault(b, []).append(k)
    all_pairs = np.arange(len(pairs), dtype=np.int64)
    out: dict[str, TargetModulators] = {}
    orphans: list[str] = []
    for t in targets:
        t = str(t)
        tfs = [x for x in regs.get(t, []) if x != t]
        lr_index = np.delete(all_pairs, involving[t]) if t in involving else all_pairs
        tflp = [(lig, tf) for tf in tfs for lig in tfl_by_tf.get(tf, []) if lig != t]
        m = TargetModulators(t, tfs, lr_index, tflp, pairs)
        if len(m) == 0:
            orphans.append(t)
        else:
            out[t] = m
    return out, orphans
