"""Gene representations fed to the solver: expected CountSketch weights (default) or a seeded CountSketch.

Leverage-weighted CountSketch (FlashDeconv): gene j gets amplitude a_j = clip(√(g·ℓ_j), 0.1, 10) (ℓ the
normalised leverage, g the number of genes), a random bucket among d and a random sign; each bucket is then
scaled to unit norm (times √(g/d)). Gene j's weight is thus a_j / √(a_j² + S_j), S_j the squared amplitudes
sharing its bucket. The *expected* representation keeps every gene and scales it by the expectation of
that weight over the random hashing, which has the closed form

    w_j = a_j π^{-1/2} ∫₀^∞ t^{-1/2} e^{-t a_j²} ∏_{i≠j} (1 − (1 − e^{-t a_i²}) / d) dt

(from x^{-1/2} = π^{-1/2} ∫ t^{-1/2} e^{-tx} dt and independence of the bucket indicators). It is evaluated
with the trapezoid rule in log t on 3000 nodes in [1e-7, 1e5]. The constant √(g/d) is left out; it does not
change the solution under automatic λ.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

N_QUAD = 3000
T_RANGE = (1e-7, 1e5)


def amplitudes(leverage: np.ndarray | None, n_genes: int) -> np.ndarray:
    if leverage is None:
        p = np.full(n_genes, 1.0 / max(n_genes, 1))
    else:
        p = np.asarray(leverage, dtype=np.float64)
        p = p / (p.sum() + 1e-10)
    return np.clip(np.sqrt(p * n_genes + 1e-10), 0.1, 10.0)


def expected_weights(
    leverage: np.ndarray | None, n_genes: int, sketch_dim: int = 512, n_quad: int = N_QUAD, block_elems: int = 1 << 23
) -> np.ndarray:
    """Exact expected absolute CountSketch weight of each gene (deterministic, positive)."""
    if sketch_dim <= 0:
        raise ValueError(f"sketch_dim must be positive, got {sketch_dim}")
    if n_genes == 0:
        return np.empty(0)
    a = amplitudes(leverage, n_genes)
    a2 = a * a
    if sketch_dim == 1:
        return a / np.sqrt(a2.sum())
    logt = np.linspace(np.log(T_RANGE[0]), np.log(T_RANGE[1]), n_quad)
    # trapezoid weights on the log-t grid (non-uniform float spacing handled exactly)
    h = np.diff(logt)
    tw = np.zeros(n_quad)
    tw[:-1] += 0.5 * h
    tw[1:] += 0.5 * h
    inv_d = 1.0 / sketch_dim
    total = np.zeros(n_genes)
    step = max(2, block_elems // n_genes)
    for s in range(0, n_quad, step):
        t = np.exp(logt[s : s + step])
        e = -np.outer(a2, t)  # genes x nodes: −t a_i²
        logf = np.log1p(np.expm1(e) * inv_d)  # log(1 − (1 − e^{−t a_i²})/d)
        others = logf.sum(axis=0)[None, :] - logf  # Σ_{i≠j}
        # t^{-1/2} dt = t^{1/2} d(log t)
        total += np.exp(e + others) @ (np.sqrt(t) * tw[s : s + step])
    return a * total / np.sqrt(np.pi)


def countsketch(leverage: np.ndarray | None, n_genes: int, sketch_dim: int, seed: int | None):
    """Random (bucket, signed value) per gene of the leverage-weighted CountSketch Ω (genes × d).

    Draws use ``numpy.random.RandomState(seed)``: first the buckets, then the signs, the convention of
    FlashDeconv's legacy sketch, so a seed gives the same Ω as there.
    """
    rng = np.random.RandomState(seed)
    bucket = rng.randint(0, sketch_dim, size=n_genes)
    sign = rng.choice([-1, 1], size=n_genes).astype(np.float64)
    a = amplitudes(leverage, n_genes)
    col_norm = np.sqrt(np.bincount(bucket, weights=a * a, minlength=sketch_dim))
    col_norm = np.maximum(col_norm, 1e-10)
    value = sign * a * (np.sqrt(n_genes / sketch_dim) / col_norm[bucket])
    return bucket.astype(np.int64), value


def sketch_matrix(bucket: np.ndarray, value: np.ndarray, sketch_dim: int) -> sp.csr_matrix:
    g = bucket.size
    return sp.csr_matrix((value, (np.arange(g), bucket)), shape=(g, sketch_dim))
