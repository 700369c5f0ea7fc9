"""Shared pieces of the Bayesian engines (cell2location-style and DestVI-style models), in plain torch.

* :class:`LogNormalMeanField` - a mean-field variational family over positive latent variables (a normal
  distribution on the log scale per element, as an automatic "normal" guide gives for positive sites), all
  sites packed into two flat tensors so one fused optimiser step updates everything.
* :func:`gamma_lp`, :func:`exponential_lp` - log densities written on the log scale of the variable.
* :func:`nb_loglik` - the gamma-Poisson (negative binomial) log likelihood summed over a counts matrix, with a
  hand-written backward pass that only touches the non-zero counts for the ``lgamma`` terms.
* :func:`nb_log_prob` - elementwise NB log likelihood (mean / inverse-dispersion parametrisation), autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)
Z05 = 1.6448536269514722  # standard normal 95% quantile


def require_two_types(model: str, types) -> None:
    """Deconvolution splits a spot among cell types: with one type every proportion is 1, so refuse clearly."""
    if len(types) < 2:
        from ..io.errors import InputError

        raise InputError(
            f"{model}: the reference has {len(types)} cell type(s) ({', '.join(map(str, types))}); there is "
            "nothing to deconvolve.",
            "use a reference with at least two labelled cell types (check --cell-type-col).",
            code="too_few_types",
        )


def inv_softplus(x: float) -> float:
    return float(x + math.log(-math.expm1(-x)))


# ---------------------------------------------------------------------------------------------------
# log densities (x given through log_x and x, both already computed by the caller)
# ---------------------------------------------------------------------------------------------------


def _broadcast_sum(term, n: int):
    """Sum of ``term`` broadcast to ``n`` elements: each of its values repeats n / term.numel() times."""
    if not torch.is_tensor(term):
        return n * term
    return term.sum() * (n // term.numel()) if term.numel() != n else term.sum()


def gamma_lp(log_x: torch.Tensor, x: torch.Tensor, shape, rate) -> torch.Tensor:
    """Sum of Gamma(shape, rate) log densities; shape and rate broadcast against x (tensors or floats).

    Written as the sum of its parts (normaliser, (shape - 1) sum log x, rate sum x) with Python floats kept as
    numbers: a training step evaluates some twenty of these, and their cost is the number of tensor operations
    (each a few microseconds of dispatch on small sites), not arithmetic.
    """
    n = x.numel()
    if torch.is_tensor(shape) or torch.is_tensor(rate):
        log_rate = torch.log(rate) if torch.is_tensor(rate) else math.log(rate)
        lgamma_shape = torch.lgamma(shape) if torch.is_tensor(shape) else math.lgamma(shape)
        lp = _broadcast_sum(shape * log_rate - lgamma_shape, n)
    else:
        lp = n * (shape * math.log(rate) - math.lgamma(shape))
    if torch.is_tensor(shape):
        lp = lp + ((shape - 1) * log_x).sum()
    elif shape != 1:
        lp = lp + (shape - 1) * log_x.sum()
    return lp - ((rate * x).sum() if torch.is_tensor(rate) else rate * x.sum())


def exponential_lp(x: torch.Tensor, rate) -> torch.Tensor:
    if torch.is_tensor(rate):
        return _broadcast_sum(torch.log(rate), x.numel()) - (rate * x).sum()
    return x.numel() * math.log(rate) - rate * x.sum()


# ---------------------------------------------------------------------------------------------------
# mean-field log-normal family
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    name: str
    shape: tuple[int, ...]
    start: int
    size: int


class LogNormalMeanField(torch.nn.Module):
    """q(z) = prod LogNormal(loc, softplus(raw_scale)) over named positive sites, stored in two flat tensors.

    ``sample()`` returns ``{name: (log_z, z)}`` for a reparameterised draw and the entropy of q in the
    constrained space (normal entropy + E[log z], the log-Jacobian of exp), computed in closed form.
    """

    def __init__(
        self, init: dict[str, np.ndarray | torch.Tensor], init_scale: float = 0.1, dtype=torch.float32, device=None
    ):
        super().__init__()
        sites, chunks, pos = {}, [], 0
        for name, value in init.items():
            v = torch.as_tensor(
                np.asarray(value, dtype=np.float64) if not torch.is_tensor(value) else value, dtype=torch.float64
            )
            sites[name] = Site(name, tuple(v.shape), pos, v.numel())
            chunks.append(torch.log(v.clamp_min(1e-30)).reshape(-1))
            pos += v.numel()
        self.sites = sites
        loc = torch.cat(chunks).to(dtype=dtype, device=device)
        self.loc = torch.nn.Parameter(loc)
        self.raw_scale = torch.nn.Parameter(torch.full_like(loc, inv_softplus(init_scale)))

    @property
    def n(self) -> int:
        return self.loc.numel()

    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale)

    def _split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        # one split, not a slice per site: autograd then joins the sites' gradients in one pass, where each
        # slice's backward would write a zero-filled gradient of the whole flat tensor
        sites = list(self.sites.values())
        parts = torch.split(flat, [s.size for s in sites])
        return {s.name: part.view(s.shape) for s, part in zip(sites, parts)}

    def sample(self, generator: torch.Generator | None = None):
        scale = self.scale()
        eps = torch.randn(self.loc.shape, generator=generator, device=self.loc.device, dtype=self.loc.dtype)
        u = self.loc + scale * eps
        z = torch.exp(u)
        entropy = torch.log(scale).sum() + self.n * HALF_LOG_2PI_E + self.loc.sum()
        logs, vals = self._split(u), self._split(z)
        return {k: (logs[k], vals[k]) for k in logs}, entropy

    @torch.no_grad()
    def median(self) -> dict[str, torch.Tensor]:
        return self._split(torch.exp(self.loc))

    @torch.no_grad()
    def mean(self) -> dict[str, torch.Tensor]:
        s = self.scale()
        return self._split(torch.exp(self.loc + 0.5 * s * s))

    @torch.no_grad()
    def quantile(self, q: float) -> dict[str, torch.Tensor]:
        z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(q)))
        return self._split(torch.exp(self.loc + z * self.scale()))

    @torch.no_grad()
    def site_mean(self, name: str) -> torch.Tensor:
        s = self.sites[name]
        loc = self.loc[s.start : s.start + s.size]
        sc = F.softplus(self.raw_scale[s.start : s.start + s.size])
        return torch.exp(loc + 0.5 * sc * sc).view(s.shape)


# ---------------------------------------------------------------------------------------------------
# negative binomial likelihood
# ---------------------------------------------------------------------------------------------------


class CountData:
    """A counts matrix prepared for :func:`nb_loglik`.

    Besides the dense values it keeps, for the ``lgamma(x + alpha_g)`` terms of a per-gene dispersion, the
    distinct (gene, count) pairs among the non-zero entries with their multiplicities: counts repeat a lot, so
    these terms (and their digamma gradients) cost a few thousand evaluations instead of one per non-zero.
    """

    def __init__(self, counts, device=None, dtype=torch.float32):
        if torch.is_tensor(counts):
            dense = counts.to(dtype=dtype, device=device)
        else:
            dense = torch.as_tensor(np.asarray(sp.csr_matrix(counts).toarray()), dtype=dtype, device=device)
        self.shape = tuple(dense.shape)
        self.dense = dense
        rows, cols = torch.nonzero(dense, as_tuple=True)
        values = dense[rows, cols]
        n_genes = self.shape[1]
        # unique (gene, value) pairs: key = value * n_genes + gene (exact for integer counts)
        key = values.double() * n_genes + cols.double()
        uniq, weights = torch.unique(key, return_counts=True)
        self.u_cols = torch.remainder(uniq, n_genes).long()
        self.u_values = torch.div(uniq - self.u_cols.double(), n_genes).to(dtype)
        self.u_weights = weights.to(dtype)
        self.nnz_per_gene = torch.bincount(cols, minlength=n_genes).to(dtype).view(1, -1)
        # sum of lgamma(x + 1), a constant of the likelihood kept so that losses read as true log densities
        self.lgamma_x1 = float((torch.lgamma(self.u_values.double() + 1) * self.u_weights.double()).sum())


def nb_forward(mu, alpha, x, u_cols, u_values, u_weights, nnz_per_gene):
    """sum_{s,g} log NB(x_sg | mean mu_sg, inverse dispersion alpha_g), without the lgamma(x+1) constant; also
    returns what :func:`nb_backward` needs (lam = mu + alpha and the column sums of log lam).

    The dense terms are written as few passes over the spots x genes matrices as possible (sums of products as
    dot products, only the column sums of log(mu + alpha) kept): on a Visium slide these matrices are a few MB,
    so each pass over them is what an epoch pays.
    """
    lam = mu + alpha
    log_lam = torch.log(lam)
    log_lam_cols = log_lam.sum(0, keepdim=True)
    n = mu.shape[0]
    x_flat = x.reshape(-1)
    # alpha*log(alpha) - (x + alpha) log(alpha + mu) + x log mu, summed densely
    total = (
        n * (alpha * torch.log(alpha)).sum()
        - torch.dot(x_flat, log_lam.reshape(-1))
        - (alpha * log_lam_cols).sum()
        + torch.dot(x_flat, torch.log(mu).reshape(-1))
    )
    total = total + nb_pairs_value(alpha, u_cols, u_values, u_weights, nnz_per_gene)
    return total, lam, log_lam_cols


def nb_pairs_value(alpha, u_cols, u_values, u_weights, nnz_per_gene):
    """sum over the non-zeros of lgamma(x + alpha_g) - lgamma(alpha_g), through the distinct (gene, count) pairs."""
    a_u = alpha.reshape(-1)[u_cols]
    return (u_weights * torch.lgamma(u_values + a_u)).sum() - (nnz_per_gene * torch.lgamma(alpha)).sum()


def nb_pairs_grad(alpha, u_cols, u_values, u_weights, nnz_per_gene):
    """The gradient of :func:`nb_pairs_value` with respect to alpha (shaped as alpha)."""
    a_u = alpha.reshape(-1)[u_cols]
    dg = torch.zeros_like(alpha).reshape(-1).index_add_(0, u_cols, u_weights * torch.digamma(u_values + a_u))
    return dg.view_as(alpha) - nnz_per_gene * torch.digamma(alpha)


def nb_backward(mu, alpha, x, lam, log_lam_cols, u_cols, u_values, u_weights, nnz_per_gene, need_mu=True):
    """Gradients of :func:`nb_forward`'s total: (d/d mu or None, d/d alpha, r = (x + alpha) / lam)."""
    r = (x + alpha).div_(lam)
    grad_mu = torch.div(x, mu).sub_(r) if need_mu else None
    n = mu.shape[0]
    g = n * (torch.log(alpha) + 1) - log_lam_cols - r.sum(0, keepdim=True)
    grad_alpha = g + nb_pairs_grad(alpha, u_cols, u_values, u_weights, nnz_per_gene)
    return grad_mu, grad_alpha, r


class _NBLogLik(torch.autograd.Function):
    """:func:`nb_forward` with :func:`nb_backward` as its backward pass."""

    @staticmethod
    def forward(ctx, mu, alpha, x, u_cols, u_values, u_weights, nnz_per_gene):
        total, lam, log_lam_cols = nb_forward(mu, alpha, x, u_cols, u_values, u_weights, nnz_per_gene)
        ctx.save_for_backward(mu, alpha, x, lam, log_lam_cols, u_cols, u_values, u_weights, nnz_per_gene)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_mu, grad_alpha, _ = nb_backward(*ctx.saved_tensors, need_mu=ctx.needs_input_grad[0])
        if grad_mu is not None:
            grad_mu.mul_(grad_out)
        return grad_mu, grad_alpha * grad_out, None, None, None, None, None


def nb_loglik(mu: torch.Tensor, alpha: torch.Tensor, data: CountData) -> torch.Tensor:
    """Total NB log likelihood of ``data`` (spots x genes) given means ``mu`` and per-gene ``alpha`` (1 x genes)."""
    return (
        _NBLogLik.apply(mu, alpha, data.dense, data.u_cols, data.u_values, data.u_weights, data.nnz_per_gene)
        - data.lgamma_x1
    )


def nb_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Elementwise NB log likelihood with mean ``mu`` and inverse dispersion ``theta`` (autograd)."""
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1.0)
    )


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row Pearson correlation of two equally shaped matrices (NaN where a row is constant)."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(1) / den
