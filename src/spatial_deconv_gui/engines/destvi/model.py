"""DestVI's two models (Lopez et al. 2022, as scvi-tools 1.4 defines them), written in plain torch.

Single-cell model (CondSCVI): a conditional VAE, latent z (5 dims) per cell given its type c::

    z ~ N(0, I);  x_g ~ NB(l * softmax(f(z, c) + b_c)_g, theta_g)      (l = the cell's library size)

encoder and decoder two layers x 128, layer norm, ReLU, dropout 0.05, the type one-hot injected at every layer.

Spatial model (DestVI/MRDeconv): for spot s, per-type latent gamma_sc (the decoder of the single-cell model is
frozen), abundances v_s over the types plus one dummy "noise" type eta, gene correction beta::

    x_sg ~ NB(l_s * sum_c (v_sc + eps_v) r_scg, theta_g),  r_sc = softmax(f(gamma_sc, c) + b_c + beta),
    r_s,dummy = softmax(eta)

v and gamma are amortised (networks from log1p(x_s)); gamma is a mixture of 3 states per type whose prior is the
VampPrior-style empirical mixture (k-means of the single-cell posterior, 15 components per type); training adds
simulated spots made from prior draws (augmentation) with a supervised proportion term, and the published
sparsity / dummy-type / beta penalties and weights.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..bayes import nb_log_prob
from . import _fused

LOG_2PI = math.log(2 * math.pi)


def _normal_lp(x, mean, scale):
    """Sum over the last axis of Normal(mean, scale) log densities."""
    z = (x - mean) / scale
    return (-0.5 * z * z - torch.log(scale)).sum(-1) - 0.5 * LOG_2PI * x.shape[-1]


def _clamp_probs(p: torch.Tensor) -> torch.Tensor:
    """torch.distributions' clamp of probabilities before their log (to [eps, 1 - eps] of the dtype)."""
    eps = torch.finfo(p.dtype).eps
    return p.clamp(min=eps, max=1 - eps)


def relu_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """dropout(relu(x)): the keep mask is drawn from 16 random bits per element (keep probability exact to
    1/65536), which costs a quarter of torch's Bernoulli sampler on CPU."""
    if not training or p <= 0:
        return F.relu(x)
    bits = torch.randint(-(2**31), 2**31 - 1, ((x.numel() + 1) // 2,), dtype=torch.int32, device=x.device)
    keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= (-32768 + int(round(p * 65536)))
    mask = (keep & (x > 0)).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * mask


def _mixture_lp(g: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(g | mean_lj, diag scale_lj^2) for g (..., L, D) against components (L, p, D) -> (..., L, p),
    as a quadratic form so the component axis goes through a matrix product."""
    a = 1.0 / (scale * scale)  # L, p, D
    b = mean * a
    c = (mean * b).sum(-1) + 2 * torch.log(scale).sum(-1) + mean.shape[-1] * LOG_2PI  # L, p
    lead = g.shape[:-2]
    L, D = g.shape[-2:]
    gl = g.reshape(-1, L, D).transpose(0, 1)  # L, rows, D
    quad = torch.bmm(gl * gl, a.transpose(1, 2)) - 2 * torch.bmm(gl, b.transpose(1, 2))  # L, rows, p
    return (-0.5 * (quad + c.unsqueeze(1))).transpose(0, 1).reshape(lead + (L, mean.shape[1]))


class _NBSum(torch.autograd.Function):
    """sum of log NB(x | mu, theta) (scvi-tools' parametrisation, eps 1e-8) without lgamma(x + 1)."""

    @staticmethod
    def forward(ctx, x, mu, theta):
        eps = 1e-8
        log_tm = torch.log(theta + mu + eps)
        res = (
            theta * (torch.log(theta + eps) - log_tm)
            + x * (torch.log(mu + eps) - log_tm)
            + torch.lgamma(x + theta)
            - torch.lgamma(theta)
        )
        ctx.save_for_backward(x, mu, theta)
        return res.sum()

    @staticmethod
    def backward(ctx, grad):
        x, mu, theta = ctx.saved_tensors
        eps = 1e-8
        inv_tm = 1.0 / (theta + mu + eps)
        r = (theta + x) * inv_tm
        g_mu = (x / (mu + eps) - r) * grad if ctx.needs_input_grad[1] else None
        g_theta = None
        if ctx.needs_input_grad[2]:
            per = (
                torch.log(theta + eps)
                + theta / (theta + eps)
                - torch.log(theta + mu + eps)
                - r
                + torch.digamma(x + theta)
            )
            lead = per.reshape(-1, per.shape[-1])
            g_theta = (lead.sum(0) - lead.shape[0] * torch.digamma(theta)) * grad
        return None, g_mu, g_theta


def nb_sum(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return _NBSum.apply(x, mu, theta)


class _PxMix(torch.autograd.Function):
    """out[b] = sum_k w[b, k] softmax(W h[b, k] + bias[k mod L]) for h (B, K, H), W (G, H) (frozen), bias (L, G),
    w (B, K): the output layer, softmax and mixture in one node (bias added in place, two passes backward)."""

    @staticmethod
    def forward(ctx, h, weight, bias, w):
        B, K, _ = h.shape
        L, G = bias.shape
        logits = torch.matmul(h, weight.t())
        logits.view(B, K // L, L, G).add_(bias)
        p = torch.softmax(logits, -1)
        del logits
        ctx.save_for_backward(p, w, weight)
        ctx.L = L
        return torch.bmm(w.unsqueeze(1), p).squeeze(1)

    @staticmethod
    def backward(ctx, g):
        p, w, weight = ctx.saved_tensors
        B, K, G = p.shape
        c = torch.bmm(p, g.unsqueeze(-1))  # B, K, 1
        wk = w.unsqueeze(-1)
        gl = torch.addcmul(-(c * wk), g.unsqueeze(1), wk).mul_(p)  # w p (g - <p, g>)
        g_h = torch.matmul(gl, weight) if ctx.needs_input_grad[0] else None
        g_bias = gl.view(-1, ctx.L, G).sum(0) if ctx.needs_input_grad[2] else None
        return g_h, None, g_bias, c.squeeze(-1)


class FCStack(nn.Module):
    """Fully connected layers (Linear -> LayerNorm without affine -> ReLU -> Dropout), optionally with a
    categorical covariate injected as a one-hot input of every layer (added as a column lookup)."""

    def __init__(
        self, n_in: int, n_out: int, n_cat: int = 0, n_layers: int = 2, n_hidden: int = 128, dropout: float = 0.1
    ):
        super().__init__()
        self.n_cat = n_cat if n_cat > 1 else 0
        dims = [n_in] + (n_layers - 1) * [n_hidden] + [n_out]
        self.sizes = list(zip(dims[:-1], dims[1:]))
        self.linears = nn.ModuleList([nn.Linear(a + self.n_cat, b) for a, b in self.sizes])
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cat: torch.Tensor | None = None) -> torch.Tensor:
        for (a, _), lin in zip(self.sizes, self.linears):
            if self.n_cat:
                x = F.linear(x, lin.weight[:, :a], lin.bias) + lin.weight[:, a:].t()[cat]
            else:
                x = lin(x)
            x = relu_dropout(F.layer_norm(x, (x.shape[-1],)), self.dropout, self.training)
        return x


# ---------------------------------------------------------------------------------------------------
# single-cell model
# ---------------------------------------------------------------------------------------------------


class CondVAE(nn.Module):
    def __init__(
        self,
        n_genes: int,
        n_labels: int,
        n_hidden: int = 128,
        n_latent: int = 5,
        n_layers: int = 2,
        dropout: float = 0.05,
        batch_dim: int = 5,
    ):
        super().__init__()
        self.n_genes, self.n_labels, self.n_latent = n_genes, n_labels, n_latent
        self.n_hidden, self.n_layers, self.dropout, self.batch_dim = n_hidden, n_layers, dropout, batch_dim
        self.px_r = nn.Parameter(torch.randn(n_genes))
        self.encoder = FCStack(n_genes, n_hidden, n_labels, n_layers, n_hidden, dropout)
        self.mean_encoder = nn.Linear(n_hidden, n_latent)
        self.var_encoder = nn.Linear(n_hidden, n_latent)
        # the (single) batch embedding that the decoder sees next to z
        self.batch_embedding = nn.Parameter(torch.randn(batch_dim))
        self.decoder = FCStack(n_latent + batch_dim, n_hidden, n_labels, n_layers, n_hidden, dropout)
        self.px_decoder = nn.Linear(n_hidden, n_genes)
        self.per_ct_bias = nn.Parameter(torch.zeros(n_labels, n_genes))

    def encode(self, x: torch.Tensor, y: torch.Tensor):
        h = self.encoder(torch.log1p(x), y)
        return self.mean_encoder(h), torch.exp(self.var_encoder(h)) + 1e-4

    def decode_scale(self, z: torch.Tensor, y: torch.Tensor, extra_bias: torch.Tensor | None = None):
        emb = self.batch_embedding.expand(z.shape[:-1] + (self.batch_dim,))
        h = self.decoder(torch.cat([z, emb], -1), y)
        logits = self.px_decoder(h) + self.per_ct_bias[y]
        if extra_bias is not None:
            logits = logits + extra_bias
        return torch.softmax(logits, -1)

    def loss(self, x: torch.Tensor, y: torch.Tensor, kl_weight: float) -> torch.Tensor:
        m, v = self.encode(x, y)
        z = m + v.sqrt() * torch.randn_like(m)
        scale = self.decode_scale(z, y)
        mu = x.sum(1, keepdim=True) * scale
        rec = -nb_log_prob(x, mu, torch.exp(self.px_r)).sum(-1)
        kl = 0.5 * (v + m * m - 1.0 - torch.log(v)).sum(-1)
        return (rec + kl_weight * kl).mean()


def kmeans(x: np.ndarray, k: int, n_init: int = 30, n_iter: int = 300, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; the labels of the best of ``n_init`` runs."""
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    n = len(x)
    for _ in range(n_init):
        centres = [x[rng.integers(n)]]
        d2 = ((x - centres[0]) ** 2).sum(1)
        for _ in range(1, k):
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
            centres.append(x[rng.choice(n, p=p)])
            d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
        c = np.array(centres)
        labels = None
        for _ in range(n_iter):
            dist = ((x[:, None, :] - c[None]) ** 2).sum(-1)
            new = dist.argmin(1)
            if labels is not None and (new == labels).all():
                break
            labels = new
            for j in range(k):
                pts = x[labels == j]
                if len(pts):
                    c[j] = pts.mean(0)
        inertia = ((x - c[labels]) ** 2).sum()
        if inertia < best_inertia:
            best, best_inertia = labels.copy(), inertia
    return best


@torch.no_grad()
def vamp_prior(model: CondVAE, x: torch.Tensor, y: np.ndarray, p: int = 15, seed: int = 0, n_init: int = 30):
    """Empirical prior per type: k-means (p clusters) of the cells' posterior means; per cluster the mean of
    the means, variance = mean posterior variance + variance of the means, weight = cluster share."""
    model.eval()
    m, v = model.encode(x, torch.as_tensor(y, device=x.device))
    m, v = m.double().cpu().numpy(), v.double().cpu().numpy()
    L, D = model.n_labels, model.n_latent
    mean = np.zeros((L, p, D))
    var = np.ones((L, p, D))
    w = np.zeros((L, p))
    for c in range(L):
        idx = np.flatnonzero(y == c)
        labels = kmeans(m[idx], p, n_init=n_init, seed=seed + c) if 0 < p < len(idx) else np.arange(len(idx))
        keys, counts = np.unique(labels, return_counts=True)
        for j, key in enumerate(keys):
            sel = idx[labels == key]
            var[c, j] = v[sel].mean(0) + m[sel].var(0)
            mean[c, j] = m[sel].mean(0)
        w[c, : len(keys)] = counts / counts.sum()
    return mean, var, w


# ---------------------------------------------------------------------------------------------------
# spatial model
# ---------------------------------------------------------------------------------------------------


class SpatialDeconv(nn.Module):
    def __init__(
        self,
        sc: CondVAE,
        vamp: tuple[np.ndarray, np.ndarray, np.ndarray],
        n_states: int = 3,
        prior_mode: str = "mog",
        dropout_amortization: float = 0.03,
        augmentation: bool = True,
        n_samples_augmentation: int = 2,
        eps_v: float = 2e-3,
    ):
        super().__init__()
        G, L, D, H = sc.n_genes, sc.n_labels, sc.n_latent, sc.n_hidden
        self.n_genes, self.n_labels, self.n_latent = G, L, D
        self.prior_mode, self.augmentation, self.eps_v = prior_mode, augmentation, eps_v
        self.n_states = n_states if prior_mode == "mog" else 1
        self.n_aug = n_samples_augmentation
        self.batch_dim = sc.batch_dim
        # frozen pieces of the single-cell model
        self.decoder = copy.deepcopy(sc.decoder)
        self.px_decoder = copy.deepcopy(sc.px_decoder)
        for prm in list(self.decoder.parameters()) + list(self.px_decoder.parameters()):
            prm.requires_grad_(False)
        self.register_buffer("per_ct_bias", sc.per_ct_bias.detach().clone())
        self.px_r = nn.Parameter(sc.px_r.detach().clone())
        # a fresh batch embedding, as the original builds a new one for the spatial model
        self.batch_embedding = nn.Parameter(torch.randn(sc.batch_dim, device=sc.px_r.device))
        self.eta = nn.Parameter(torch.zeros(1, G, device=sc.px_r.device))
        self.beta = nn.Parameter(torch.zeros(G, device=sc.px_r.device))
        dev = sc.px_r.device
        mean, var, w = (torch.as_tensor(a, dtype=torch.float32, device=dev) for a in vamp)
        self.register_buffer("mean_vprior", mean)
        self.register_buffer("var_vprior", var)
        self.register_buffer("mp_vprior", w)
        n_out = self.n_states * L * D + self.n_states * L if prior_mode == "mog" else L * D
        self.gamma_encoder = nn.Sequential(FCStack(G, H, 0, 2, H, dropout_amortization), nn.Linear(H, n_out))
        self.V_encoder = nn.Sequential(FCStack(G, H, 0, sc.n_layers, H, 0.0), nn.Linear(H, L + 1))
        self.to(dev)
        self.use_fused = True  # the CPU float32 fast path of the frozen decoder (see _fused); False: plain torch
        self.decoder_precision = "float32"  # or "bfloat16" / "auto": the fast path's products (see _fused)
        self._frozen = None

    def frozen_decoder(self, like: torch.Tensor):
        """The fused path's copy of the frozen decoder, or None where it does not apply (GPU, float64, off)."""
        if not (self.use_fused and _fused.available(like) and self.px_decoder.weight.dtype == torch.float32):
            return None
        bf16 = _fused.use_bf16(self.decoder_precision)
        if self._frozen is None or self._frozen.bf16 != bf16:
            self._frozen = _fused.FrozenDecoder(self.decoder, self.px_decoder, self.n_latent, self.n_labels, bf16)
        return self._frozen

    def decode_mix(self, gamma: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_k w[b, k] r_k for gamma (B, K, D) (K = states x types, type fastest) and weights w (B, K), where
        r_k = softmax(decoder(gamma_bk, type k) W_p^T + b_p + b_type + beta): (B, G)."""
        B, K, D = gamma.shape
        dec = self.frozen_decoder(gamma)
        if dec is not None:
            return _fused.decoder_mix(
                gamma.reshape(B * K, D), dec.bias1(self.batch_embedding), self.out_bias(), w, dec, self.training
            )
        L = self.n_labels
        h = self.decoder_hidden(gamma.reshape(B, K // L, L, D)).reshape(B, K, -1)
        return _PxMix.apply(h, self.px_decoder.weight, self.out_bias(), w)

    # -- pieces -----------------------------------------------------------------------------------
    def decoder_hidden(self, gamma: torch.Tensor) -> torch.Tensor:
        """Last hidden layer of the frozen decoder for gamma of shape (..., L, D) -> (..., L, H); the scales are
        softmax(W h + b + b_c + beta).

        The label sits on axis -2, so the one-hot input columns of every decoder layer and the per-type bias
        are broadcast as (L, H) / (L, G) biases instead of being gathered per row."""
        D = self.n_latent
        x = gamma
        for i, ((a, _), lin) in enumerate(zip(self.decoder.sizes, self.decoder.linears)):
            W = lin.weight
            if i == 0:
                # input = [gamma, batch embedding]; the embedding part is a bias shared by all rows
                bias = lin.bias + W[:, D:a] @ self.batch_embedding
                x = F.linear(x, W[:, :D], None)
            else:
                bias = lin.bias
                x = F.linear(x, W[:, :a], None)
            if self.decoder.n_cat:
                x = x + (bias.unsqueeze(0) + W[:, a:].t())
            else:
                x = x + bias
            x = relu_dropout(F.layer_norm(x, (x.shape[-1],)), self.decoder.dropout, self.training)
        return x

    def out_bias(self) -> torch.Tensor:
        return self.px_decoder.bias + self.per_ct_bias + self.beta  # L, G

    def type_logits(self, gamma: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.decoder_hidden(gamma), self.px_decoder.weight.t()) + self.out_bias()

    def type_scales(self, gamma: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.type_logits(gamma), -1)

    def encode(self, z: torch.Tensor):
        """(gamma (n, m, S, L, D), mode weights (n, m, S, L), v (n, m, L + 1)) from log1p counts z."""
        n, m = z.shape[:2]
        L, D, S = self.n_labels, self.n_latent, self.n_states
        g = self.gamma_encoder(z)
        if self.prior_mode == "mog":
            modes = torch.softmax(g[..., S * L * D :].reshape(n, m, S, L), dim=2)
            gamma = g[..., : S * L * D].reshape(n, m, S, D, L).transpose(-1, -2)
        else:
            gamma = g.reshape(n, m, 1, D, L).transpose(-1, -2)
            modes = torch.ones(n, m, 1, L, device=z.device)
        v = torch.softmax(self.V_encoder(z), -1)
        return gamma, modes, v

    def _rng(self) -> np.random.Generator:
        """numpy generator of the CPU augmentation draws, seeded from torch's generator on first use."""
        if getattr(self, "_np_rng", None) is None:
            self._np_rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
        return self._np_rng

    def _prior_draws_numpy(self, n: int, m: int):
        """(prior draws (n, m, L, D), Dirichlet(0.03) type ratios (n, m, L), mixing ratio per sample (n, m, 1))."""
        rng = self._rng()
        L = self.n_labels
        if getattr(self, "_prior_np", None) is None:
            w = self.mp_vprior.double().cpu().numpy()
            cdf = np.cumsum(w / w.sum(-1, keepdims=True), -1)
            self._prior_np = (cdf, self.mean_vprior.cpu().numpy(), np.sqrt(self.var_vprior.cpu().numpy()) + 1e-4)
        cdf, mean, sd = self._prior_np
        u = rng.random((n, m, L, 1))
        comp = np.minimum((u > cdf[None, None]).sum(-1), cdf.shape[1] - 1)  # n, m, L
        lab = np.arange(L)
        eps = rng.standard_normal((n, m, L, mean.shape[-1]), dtype=np.float32)
        prior_sampled = torch.from_numpy(mean[lab, comp] + sd[lab, comp] * eps)
        # torch's Dirichlet sampler floors each gamma draw at the float32 tiny before normalising: no exact 0
        ratios = np.maximum(rng.dirichlet(np.full(L, 0.03), (n, m)), np.finfo(np.float32).tiny)
        ratios = torch.from_numpy((ratios / ratios.sum(-1, keepdims=True)).astype(np.float32))
        mix = rng.beta(0.4, 0.5, (self.n_aug - 1, m, 1)).astype(np.float32)
        ratio = torch.from_numpy(
            np.concatenate([np.zeros((1, m, 1), np.float32), np.ones((1, m, 1), np.float32), mix], 0)
        )
        return prior_sampled, ratios, ratio

    def _prior_draws_torch(self, n: int, m: int, dev):
        L = self.n_labels
        comp = torch.distributions.Categorical(probs=self.mp_vprior).sample((n, m))  # n, m, L
        lab = torch.arange(L, device=dev).expand(n, m, L)
        mu = self.mean_vprior[lab, comp]
        sd = torch.sqrt(self.var_vprior[lab, comp]) + 1e-4
        prior_sampled = mu + sd * torch.randn_like(mu)  # n, m, L, D
        ratios = torch.distributions.Dirichlet(torch.full((L,), 0.03, device=dev)).sample((n, m))
        ratios = torch.nan_to_num(ratios, nan=1.0 / L)
        mix = (
            torch.distributions.Beta(torch.tensor(0.4, device=dev), torch.tensor(0.5, device=dev))
            .sample((self.n_aug - 1, m))
            .unsqueeze(-1)
        )
        ratio = torch.cat([torch.zeros(1, m, 1, device=dev), torch.ones(1, m, 1, device=dev), mix], 0)
        return prior_sampled, ratios, ratio

    @torch.no_grad()
    def _augment(self, x: torch.Tensor):
        """Simulated spots (scvi-tools' augmentation): sample 0 is the data itself, sample 1 a spot built from
        prior draws (library + 50), samples 2.. a Beta(0.4, 0.5) mix of the two. Sample 0's draws get weight 0
        everywhere, so only samples 1.. are decoded and sampled."""
        n, m = self.n_aug + 1, x.shape[0]
        L = self.n_labels
        dev = x.device
        if dev.type == "cpu":
            prior_sampled, ratios, ratio = self._prior_draws_numpy(n, m)
        else:
            prior_sampled, ratios, ratio = self._prior_draws_torch(n, m, dev)
        library = x.sum(-1).view(1, m, 1).repeat(n - 1, 1, 1)
        library[0] = library[0] + 50
        aug_rate = (
            self.decode_mix(prior_sampled[1:].reshape((n - 1) * m, L, -1), ratios[1:].reshape((n - 1) * m, L)).reshape(
                n - 1, m, -1
            )
            * library
        )
        theta = torch.exp(self.px_r)
        if dev.type == "cpu":
            # NB(mean aug_rate, inverse dispersion theta) as a gamma-Poisson mixture, numpy's samplers
            rng = self._rng()
            try:
                lam = rng.gamma(theta.double().numpy(), (aug_rate.double().clamp_min(1e-8) / theta.double()).numpy())
                counts = torch.from_numpy(rng.poisson(lam).astype(np.float32))
            except ValueError as exc:  # numpy refuses NaN or astronomically large rates: the model diverged
                raise FloatingPointError(f"simulated-spot rates overflowed ({exc})") from exc
        else:
            lam = torch.distributions.Gamma(theta, theta / aug_rate.clamp_min(1e-8)).sample()
            counts = torch.poisson(lam)
        x_aug = torch.cat([x.unsqueeze(0), (1 - ratio[1:]) * x.unsqueeze(0) + ratio[1:] * counts], 0)
        return x_aug, prior_sampled, ratios, ratio

    def forward_outputs(self, x_aug: torch.Tensor, training: bool):
        z = torch.log1p(x_aug)
        library = x_aug.sum(-1, keepdim=True)
        gamma, modes, v = self.encode(z)
        eps_v = self.eps_v if training else 0.0
        n, m = z.shape[:2]
        # px_scale = sum_c (v_c + eps) sum_s modes_sc softmax(logits_sc) + (v_dummy + eps) softmax(eta), fused
        w = (modes * (v[..., :-1] + eps_v).unsqueeze(2)).reshape(n * m, -1)
        px_scale = self.decode_mix(gamma.reshape(n * m, w.shape[1], -1), w).reshape(n, m, self.n_genes)
        px_scale = px_scale + (v[..., -1:] + eps_v) * torch.softmax(self.eta, -1)
        return library * px_scale, gamma, modes, v

    def loss(
        self,
        x: torch.Tensor,
        kl_weight: float,
        ct_sparsity_weight: float = 2.0,
        weighting_augmentation: float = 100.0,
        eta_reg: float = 1.0,
        beta_reg: float = 1.0,
        reconst_weight: float = 3.0,
    ) -> torch.Tensor:
        if self.augmentation:
            x_aug, prior_sampled, ratios, ratio = self._augment(x)
        else:
            x_aug = x.unsqueeze(0)
        n, m = x_aug.shape[:2]
        px_rate, gamma, modes, v = self.forward_outputs(x_aug, True)
        theta = torch.exp(self.px_r)
        # sum over samples, spots and genes of -log NB (the lgamma(x + 1) term has no gradient)
        with torch.no_grad():
            const = torch.lgamma(x_aug + 1).sum()
        reconst_total = const - nb_sum(x_aug, px_rate, theta)
        glo = -beta_reg * (-0.5 * self.beta.pow(2) - 0.5 * math.log(2 * math.pi)).sum()
        loss_aug = torch.zeros((), device=x.device)
        if self.augmentation:
            true = torch.cat([ratios[1], torch.zeros(m, 1, device=x.device)], -1) + 1e-20
            true = true / true.sum(-1, keepdim=True)
            pred = v[1] / v[1].sum(-1, keepdim=True)
            loss_aug = weighting_augmentation * (true * (torch.log(true) - torch.log(pred))).sum() / m
            mp_vp = torch.cat(
                [
                    (1 - ratio.unsqueeze(-1)) * self.mp_vprior.expand(n, m, -1, -1),
                    ratio.unsqueeze(-1) * ratios.unsqueeze(-1),
                ],
                -1,
            )  # n, m, L, p + 1
        else:
            mp_vp = self.mp_vprior.expand(n, m, -1, -1)
        # gamma (n, m, S, L, D): log density under the per-type mixture prior (the empirical components, plus
        # with augmentation one component at each simulated draw), per (n, m, S, L)
        if self.prior_mode == "mog":
            # the original builds Normal(mean, var) here (the variance used as the scale): kept as published
            sc_v = self.var_vprior
            # torch's Categorical(probs=...) inside the original's MixtureSameFamily: normalise, clamp to
            # [eps, 1 - eps] (float32 eps), log, renormalise; components of weight 0 keep weight ~1.2e-7
            logw = torch.log_softmax(torch.log(_clamp_probs(mp_vp / mp_vp.sum(-1, keepdim=True))), -1)
        else:
            sc_v = torch.sqrt(self.var_vprior) + 1e-4
            logw = torch.log(1e-3 + mp_vp)
        comp = _mixture_lp(gamma, self.mean_vprior, sc_v)  # n, m, S, L, p
        if self.augmentation:
            sc_e = (
                sc_v.min(-2).values if self.prior_mode == "mog" else torch.sqrt(self.var_vprior.min(-2).values) + 1e-4
            )
            extra = _normal_lp(gamma, prior_sampled.unsqueeze(2), sc_e)  # n, m, S, L
            comp = torch.cat([comp, extra.unsqueeze(-1)], -1)
        pre = torch.logsumexp(comp + logw.unsqueeze(2), -1)  # n, m, S, L
        if self.prior_mode == "mog":
            ll = (pre * (modes + 1e-6)).sum(2)  # n, m, L
            neg_prior = -(ll * (v[..., :-1] + 1e-3)).sum(-1)  # n, m
        else:
            neg_prior = -pre.squeeze(2).sum(-1)
        v0 = v[0]
        # Categorical(probs=v0).entropy() as torch computes it: -sum p log(clamp(p, eps, 1 - eps))
        sparsity = ct_sparsity_weight * -(v0 * torch.log(_clamp_probs(v0))).sum(-1)  # m
        sparsity = sparsity - eta_reg * (-v0[:, -1:]).sum()
        # = mean over (samples, spots) of reconst_weight * reconst + kl_weight * (prior + sparsity) + glo + aug
        return (
            reconst_weight * reconst_total / (n * m) + kl_weight * (neg_prior.mean() + sparsity.mean()) + glo + loss_aug
        )

    @torch.no_grad()
    def infer(self, x: torch.Tensor):
        """Evaluation-mode outputs for spots x: proportions over L + 1, gamma modes, mode weights."""
        self.eval()
        z = torch.log1p(x.unsqueeze(0))
        gamma, modes, v = self.encode(z)
        return v[0], gamma[0], modes[0]
