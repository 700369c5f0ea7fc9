"""The three RCTD fitting modes, each applied to one batch of pixels.

* full: all types at once.
* doublet: starting from the full fit, score every single type and every pair of the plausible types,
  then classify the pixel (singlet / doublet_certain / doublet_uncertain / reject) by likelihood gaps.
* multi: greedy forward selection of up to ``max_multi_types`` types, each addition has to improve the
  likelihood by ``doublet_threshold``; a type is "confident" when no swap comes within
  ``confidence_threshold``.

All sub-fits of a batch are pooled into a few large batched solves.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from .irwls import SharedDesign, SubsetDesign, solve_irwls
from .likelihood import TorchTable

CANDIDATE_MIN_WEIGHT = 0.01
SPOT_CLASSES = ("reject", "singlet", "doublet_certain", "doublet_uncertain")


@dataclass
class SolverSettings:
    n_iter: int = 50
    n_iter_score: int = 25
    min_change: float = 1e-3
    step: float = 0.3
    dtype: torch.dtype = torch.float64
    device: torch.device = torch.device("cpu")


def fit_full(P: torch.Tensor, y: torch.Tensor, numi: torch.Tensor, table: TorchTable, s: SolverSettings):
    design = SharedDesign(P, y, numi, table)
    res = solve_irwls(
        design, y.shape[0], n_iter=s.n_iter, min_change=s.min_change, step=s.step, dtype=s.dtype, device=s.device
    )
    return res.weights.cpu().numpy().astype(np.float64), res.converged.cpu().numpy()


def _fit_subsets(P, y, numi, table, rows: np.ndarray, types: np.ndarray, n_iter: int, s: SolverSettings, score: bool):
    """Fit each (pixel row, type list) problem; return weights, converged flags and (optionally) scores."""
    if len(rows) == 0:
        k = types.shape[1] if types.ndim == 2 else 0
        return np.zeros((0, k)), np.zeros(0, dtype=bool), np.zeros(0)
    r = torch.as_tensor(rows, dtype=torch.long, device=s.device)
    t = torch.as_tensor(types, dtype=torch.long, device=s.device)
    design = SubsetDesign(P, y, numi, r, t, table)
    res = solve_irwls(
        design, len(rows), n_iter=n_iter, min_change=s.min_change, step=s.step, dtype=s.dtype, device=s.device
    )
    sc = None
    if score:
        sc = design.score(res.weights, torch.arange(len(rows), device=s.device)).cpu().numpy().astype(np.float64)
    return res.weights.cpu().numpy().astype(np.float64), res.converged.cpu().numpy(), sc


def _candidates(weights_row: np.ndarray, k: int) -> list[int]:
    cand = [int(i) for i in np.flatnonzero(weights_row > CANDIDATE_MIN_WEIGHT)]
    if len(cand) == 0:
        cand = list(range(min(3, k)))
    if len(cand) == 1:
        cand.append(1 if cand[0] == 0 else 0)
    return cand


@dataclass
class DoubletBatch:
    weights: np.ndarray  # (B, K) full-mode weights
    converged_full: np.ndarray
    spot_class: np.ndarray  # (B,) int index into SPOT_CLASSES
    first_type: np.ndarray
    second_type: np.ndarray
    first_class: np.ndarray
    second_class: np.ndarray
    weights_doublet: np.ndarray  # (B, 2), sums to 1
    converged_doublet: np.ndarray
    min_score: np.ndarray
    singlet_score: np.ndarray
    pair_weights: np.ndarray | None = None  # (B, 2) the pair fit's weights before normalising (for intervals)


def _pair_check(cands, pair_score, singlet_scores, min_score, my_type, type_class, conf_thr):
    """Is ``my_type`` in every pair that scores within ``conf_thr`` of the best (type and class level)?

    Returns (all_pairs, all_pairs_class, singlet_score) where the singlet score may be lowered to the best
    singlet among same-class types that also appear in near-optimal pairs.
    """
    all_pairs = True
    all_pairs_class = type_class is not None
    same_class = [my_type]
    for a, b in combinations(cands, 2):
        if pair_score[(a, b)] < min_score + conf_thr:
            if a != my_type and b != my_type:
                all_pairs = False
            if type_class is not None:
                ca = type_class[my_type] == type_class[a]
                cb = type_class[my_type] == type_class[b]
                if not ca and not cb:
                    all_pairs_class = False
                if ca and a not in same_class:
                    same_class.append(a)
                if cb and b not in same_class:
                    same_class.append(b)
    if type_class is None:
        all_pairs_class = all_pairs
    s = singlet_scores[my_type]
    if all_pairs_class and not all_pairs and len(same_class) > 1:
        for t in same_class[1:]:
            s = min(s, singlet_scores[t])
    return all_pairs, all_pairs_class, s


def fit_doublet(
    P, y, numi, table, s: SolverSettings, conf_thr: float, doublet_thr: float, type_class: list[str] | None = None
) -> DoubletBatch:
    B = y.shape[0]
    K = P.shape[1]
    weights, conv_full = fit_full(P, y, numi, table, s)
    cands = [_candidates(weights[i], K) for i in range(B)]
    # singlet fits: one problem per (pixel, candidate)
    s_rows = np.array([i for i in range(B) for _ in cands[i]], dtype=np.int64)
    s_types = np.array([[c] for i in range(B) for c in cands[i]], dtype=np.int64).reshape(-1, 1)
    _, _, s_scores = _fit_subsets(P, y, numi, table, s_rows, s_types, s.n_iter_score, s, score=True)
    # pair fits: every unordered pair of candidates, in candidate order
    pairs = [list(combinations(cands[i], 2)) for i in range(B)]
    p_rows = np.array([i for i in range(B) for _ in pairs[i]], dtype=np.int64)
    p_types = np.array([list(p) for i in range(B) for p in pairs[i]], dtype=np.int64).reshape(-1, 2)
    _, _, p_scores = _fit_subsets(P, y, numi, table, p_rows, p_types, s.n_iter_score, s, score=True)

    spot_class = np.zeros(B, dtype=np.int64)
    first = np.zeros(B, dtype=np.int64)
    second = np.zeros(B, dtype=np.int64)
    first_cls = np.zeros(B, dtype=bool)
    second_cls = np.zeros(B, dtype=bool)
    min_scores = np.zeros(B)
    singlet_out = np.zeros(B)
    si = pi = 0
    for i in range(B):
        sing = {}
        for c in cands[i]:
            sing[c] = s_scores[si]
            si += 1
        pair_score = {}
        best = None
        min_score = 0.0
        for p in pairs[i]:
            sc = p_scores[pi]
            pi += 1
            pair_score[p] = sc
            # strict '<' keeps the first pair on ties, as the reference implementation does
            if best is None or sc < min_score:
                best, min_score = p, sc
        t1, t2 = best
        a1, ac1, s1 = _pair_check(cands[i], pair_score, sing, min_score, t1, type_class, conf_thr)
        a2, ac2, s2 = _pair_check(cands[i], pair_score, sing, min_score, t2, type_class, conf_thr)
        fc = sc2 = False
        if not ac1 and not ac2:
            cls = 0
            singlet_score = min_score + 2 * doublet_thr
        elif ac1 and not ac2:
            cls = 3
            fc = not a1
            singlet_score = s1
        elif not ac1 and ac2:
            cls = 3
            fc = not a2
            singlet_score = s2
            t1, t2 = t2, t1
        else:
            cls = 2
            singlet_score = min(s1, s2)
            fc, sc2 = not a1, not a2
            if s2 < s1:
                t1, t2 = t2, t1
                fc, sc2 = not a2, not a1
        if singlet_score - min_score < doublet_thr:
            cls = 1
        spot_class[i], first[i], second[i] = cls, t1, t2
        first_cls[i], second_cls[i] = fc, sc2
        min_scores[i], singlet_out[i] = min_score, singlet_score
    dw, dconv, _ = _fit_subsets(P, y, numi, table, np.arange(B), np.stack([first, second], 1), s.n_iter, s, score=False)
    raw = dw
    dw = dw / dw.sum(axis=1, keepdims=True)
    return DoubletBatch(
        weights, conv_full, spot_class, first, second, first_cls, second_cls, dw, dconv, min_scores, singlet_out, raw
    )


@dataclass
class MultiBatch:
    weights: np.ndarray  # (B, K) full-mode weights
    converged_full: np.ndarray
    type_indices: np.ndarray  # (B, max_types) -1 padded, in order of selection
    sub_weights: np.ndarray  # (B, max_types) 0 padded, sums to 1
    confident: np.ndarray  # (B, max_types) bool
    n_types: np.ndarray
    min_score: np.ndarray
    converged_sub: np.ndarray


def fit_multi(P, y, numi, table, s: SolverSettings, conf_thr: float, doublet_thr: float, max_types: int) -> MultiBatch:
    B = y.shape[0]
    weights, conv_full = fit_full(P, y, numi, table, s)
    remaining = []
    for i in range(B):
        c = [int(j) for j in np.flatnonzero(weights[i] > CANDIDATE_MIN_WEIGHT)]
        # spacexr stops with an error here; keep the pixel by starting from its largest full-mode weight
        remaining.append(c if c else [int(np.argmax(weights[i]))])
    chosen: list[list[int]] = [[] for _ in range(B)]
    cur = np.full(B, 1e10)
    active = np.ones(B, dtype=bool)
    for n in range(1, max_types + 1):
        rows, types = [], []
        for i in np.flatnonzero(active):
            for c in remaining[i]:
                rows.append(i)
                types.append(chosen[i] + [c])
        if not rows:
            break
        _, _, sc = _fit_subsets(
            P,
            y,
            numi,
            table,
            np.array(rows),
            np.array(types, dtype=np.int64).reshape(-1, n),
            s.n_iter_score,
            s,
            score=True,
        )
        best_score = {}
        best_type = {}
        for r_, t_, v in zip(rows, types, sc):
            if r_ not in best_score or v < best_score[r_]:
                best_score[r_], best_type[r_] = v, t_[-1]
        for i in np.flatnonzero(active):
            if i not in best_score or best_score[i] > cur[i] - doublet_thr:
                active[i] = False
                continue
            chosen[i].append(best_type[i])
            remaining[i].remove(best_type[i])
            cur[i] = best_score[i]
            if not remaining[i]:
                active[i] = False
        if not active.any():
            break
    # confidence: a chosen type is uncertain if swapping it for an unchosen candidate scores nearly as well
    rows, types, owner = [], [], []
    for i in range(B):
        for j, t in enumerate(chosen[i]):
            for c in remaining[i]:
                rows.append(i)
                types.append([x for x in chosen[i] if x != t] + [c])
                owner.append((i, j))
    confident = np.zeros((B, max_types), dtype=bool)
    for i in range(B):
        confident[i, : len(chosen[i])] = True
    by_size: dict[int, list[int]] = {}
    for q, tl in enumerate(types):
        by_size.setdefault(len(tl), []).append(q)
    for size, qs in by_size.items():
        _, _, sc = _fit_subsets(
            P,
            y,
            numi,
            table,
            np.array([rows[q] for q in qs]),
            np.array([types[q] for q in qs], dtype=np.int64).reshape(-1, size),
            s.n_iter_score,
            s,
            score=True,
        )
        for q, v in zip(qs, sc):
            i, j = owner[q]
            if v < cur[i] + conf_thr:
                confident[i, j] = False
    type_idx = np.full((B, max_types), -1, dtype=np.int64)
    sub_w = np.zeros((B, max_types))
    conv_sub = np.zeros(B, dtype=bool)
    n_types = np.array([len(c) for c in chosen])
    for size in sorted(set(n_types.tolist())):
        if size == 0:
            continue
        idx = np.flatnonzero(n_types == size)
        w, cv, _ = _fit_subsets(
            P, y, numi, table, idx, np.array([chosen[i] for i in idx], dtype=np.int64), s.n_iter, s, score=False
        )
        w = w / w.sum(axis=1, keepdims=True)
        type_idx[idx, :size] = np.array([chosen[i] for i in idx])
        sub_w[idx, :size] = w
        conv_sub[idx] = cv
    return MultiBatch(weights, conv_full, type_idx, sub_w, confident, n_types, cur, conv_sub)
