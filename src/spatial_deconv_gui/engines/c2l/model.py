"""The two cell2location models, written from their published definitions (Kleshchevnikov et al. 2022).

Reference signatures (negative-binomial regression over labelled single cells, batches e = 1..E; cell2location's
``RegressionModel`` with ``batch_key``; E = 1 without a batch column)::

    mu_fg ~ Gamma(1, 1)                              per-type mean expression
    y_e ~ Gamma(1, 1)                                per-batch detection efficiency (one per batch)
    h_s ~ Gamma(9, 3)                                shared hyperprior of the background's spread
    m_e ~ Gamma(1, 100), e_e ~ Exp(h_s)              per-batch background mean and spread
    s_eg ~ Gamma(a_e, a_e / m_e), a_e = 1 / e_e^2    per-batch additive background per gene
    alpha_g = 1 / o_g^2, o_g ~ Exp(h_o), h_o ~ Gamma(9, 3)   gene-wise overdispersion, shared by all batches
    x_cg ~ NB(mean (mu_{f(c)g} + s_{e(c)g}) y_{e(c)}, inverse dispersion alpha_g)

Spatial model::

    m_g ~ Gamma(a_m, a_m / mm), a_m = 1 / e_m^2, e_m ~ Exp(3), mm ~ Gamma(1, 1)   platform effect per gene
    N_s ~ Gamma(N * v, v), B_s ~ Gamma(B, 1)                                     cells / groups per spot
    z_sr ~ Gamma(B_s / R, B_s / N_s)                                             spot loadings on R groups
    k_r ~ Gamma(A / B, 1), x_rf ~ Gamma(k_r / F, k_r)                            group -> type
    w_sf ~ Gamma(5 (z x)_sf, 5)                                                  cells of type f at spot s
    y_s ~ Gamma(d, d / y_e), y_e ~ Gamma(10, 10 / detection_mean)                detection per spot
    s_g, alpha_g as above (one batch)
    x_sg ~ NB(mean ((w g)_sg m_g + s_g) y_s, inverse dispersion alpha_g)

Both are fitted by maximising the ELBO under a mean-field log-normal posterior (one normal per element on
the log scale, initialised at the prior means, scale 0.1), full batch, Adam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..bayes import (
    HALF_LOG_2PI_E,
    CountData,
    LogNormalMeanField,
    exponential_lp,
    gamma_lp,
    nb_loglik,
    nb_pairs_grad,
    nb_pairs_value,
)

# spots x genes elements per block of the fused likelihood (~0.5 MB per float32 temporary: a block's few
# temporaries fit a core's L2 cache; on the lymph node pair the likelihood's passes took 25 % less CPU in 4 blocks
# than in one, at load 12)
_BLOCK_ELEMENTS = 131072

# ---------------------------------------------------------------------------------------------------
# reference regression
# ---------------------------------------------------------------------------------------------------


class ReferenceRegression(torch.nn.Module):
    """cell2location's reference NB regression; ``n_batches`` > 1 gives each batch its own detection efficiency
    ``y_e`` and background ``s_eg`` (with per-batch hyperparameters), as the package does with ``batch_key``."""

    def __init__(
        self, n_types: int, n_genes: int, init_mu_fg: np.ndarray, n_batches: int = 1, dtype=torch.float32, device=None
    ):
        super().__init__()
        E = int(n_batches)
        if E < 1:
            raise ValueError(f"n_batches must be >= 1, got {n_batches!r}")
        self.n_types, self.n_genes, self.n_batches = n_types, n_genes, E
        # initial values: the per-type means (as the package) and every other site at its prior mean
        init = {
            "per_cluster_mu_fg": np.asarray(init_mu_fg, dtype=np.float64) + 1e-4,
            "detection_mean_y_e": np.ones((E, 1)),
            "s_g_gene_add_alpha_hyp": np.full((1, 1), 3.0),
            "s_g_gene_add_mean": np.full((E, 1), 0.01),
            "s_g_gene_add_alpha_e_inv": np.full((E, 1), 1 / 3),
            "s_g_gene_add": np.full((E, n_genes), 0.01),
            "alpha_g_phi_hyp": np.full((1, 1), 3.0),
            "alpha_g_inverse": np.full((1, n_genes), 1 / 3),
        }
        self.guide = LogNormalMeanField(init, dtype=dtype, device=device)

    def negative_elbo(
        self,
        data: CountData,
        labels: torch.Tensor,
        scale: float = 1.0,
        generator: torch.Generator | None = None,
        batches: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-ELBO with the likelihood of the (mini)batch in ``data`` multiplied by ``scale`` (= n_cells / batch).

        ``labels`` and ``batches`` hold each cell's type and batch index (``batches`` may be None with one batch).
        """
        z, entropy = self.guide.sample(generator)
        lmu, mu_fg = z["per_cluster_mu_fg"]
        lye, y_e = z["detection_mean_y_e"]
        lsah, s_ah = z["s_g_gene_add_alpha_hyp"]
        lsm, s_m = z["s_g_gene_add_mean"]
        _, s_ei = z["s_g_gene_add_alpha_e_inv"]
        ls, s_g = z["s_g_gene_add"]
        lah, a_h = z["alpha_g_phi_hyp"]
        _, a_inv = z["alpha_g_inverse"]
        s_a = 1.0 / s_ei.pow(2)
        lp = (
            gamma_lp(lmu, mu_fg, 1.0, 1.0)
            + gamma_lp(lye, y_e, 1.0, 1.0)
            + gamma_lp(lsah, s_ah, 9.0, 3.0)
            + gamma_lp(lsm, s_m, 1.0, 100.0)
            + exponential_lp(s_ei, s_ah)
            + gamma_lp(ls, s_g, s_a, s_a / s_m)
            + gamma_lp(lah, a_h, 9.0, 3.0)
            + exponential_lp(a_inv, a_h)
        )
        if self.n_batches == 1:
            mu = (mu_fg[labels] + s_g) * y_e
        else:
            if batches is None:
                raise ValueError(f"the model has {self.n_batches} batches: pass each cell's batch index")
            mu = (mu_fg[labels] + s_g[batches]) * y_e[batches]
        ll = nb_loglik(mu, 1.0 / a_inv.pow(2), data)
        return -(lp + scale * ll + entropy)

    def signatures(self) -> np.ndarray:
        """Posterior mean of the per-type expression (types x genes), as cell2location exports it."""
        return self.guide.site_mean("per_cluster_mu_fg").double().cpu().numpy()

    def batch_effects(self) -> dict[str, np.ndarray]:
        """Posterior means of the per-batch detection efficiency (E) and background (E x genes)."""
        return {
            "detection": self.guide.site_mean("detection_mean_y_e").double().cpu().numpy().ravel(),
            "background": self.guide.site_mean("s_g_gene_add").double().cpu().numpy(),
        }


# ---------------------------------------------------------------------------------------------------
# spatial model
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpatialPriors:
    n_cells_per_location: float = 8.0
    detection_alpha: float = 20.0
    detection_mean: float = 0.5
    n_groups: int = 50
    a_factors_per_location: float = 7.0
    b_groups_per_location: float = 7.0
    n_cells_mean_var_ratio: float = 1.0
    w_sf_mean_var_ratio: float = 5.0
    m_g_mean: float = 1.0
    m_g_mean_var_ratio: float = 1.0
    m_g_alpha_mean: float = 3.0
    detection_mean_alpha: float = 10.0


class SpatialModel(torch.nn.Module):
    """The cell2location spatial model for one batch; ``signatures`` is types x genes (expected counts per cell)."""

    def __init__(
        self,
        signatures: np.ndarray,
        n_spots: int,
        priors: SpatialPriors,
        dtype=torch.float32,
        device=None,
    ):
        super().__init__()
        F_, G = signatures.shape
        R, S = priors.n_groups, n_spots
        self.p, self.n_types, self.n_genes, self.n_spots = priors, F_, G, S
        self.register_buffer("cell_state", torch.as_tensor(signatures, dtype=dtype, device=device))
        p = priors
        # initial values: the prior means with every parent at its own prior mean
        N, B = p.n_cells_per_location, p.b_groups_per_location
        kr = p.a_factors_per_location / p.b_groups_per_location
        init = {
            "m_g_mean": np.full((1, 1), p.m_g_mean),
            "m_g_alpha_e_inv": np.full((1, 1), 1 / p.m_g_alpha_mean),
            "m_g": np.full((1, G), p.m_g_mean),
            "n_s_cells_per_location": np.full((S, 1), N),
            "b_s_groups_per_location": np.full((S, 1), B),
            "z_sr_groups_factors": np.full((S, R), N / R),
            "k_r_factors_per_groups": np.full((R, 1), kr),
            "x_fr_group2fact": np.full((R, F_), 1.0 / F_),
            "w_sf": np.full((S, F_), N / F_),
            "detection_mean_y_e": np.full((1, 1), p.detection_mean),
            "detection_y_s": np.full((S, 1), p.detection_mean),
            "s_g_gene_add_alpha_hyp": np.full((1, 1), 3.0),
            "s_g_gene_add_mean": np.full((1, 1), 0.01),
            "s_g_gene_add_alpha_e_inv": np.full((1, 1), 1 / 3),
            "s_g_gene_add": np.full((1, G), 0.01),
            "alpha_g_phi_hyp": np.full((1, 1), 3.0),
            "alpha_g_inverse": np.full((1, G), 1 / 3),
        }
        self.guide = LogNormalMeanField(init, dtype=dtype, device=device)
        # the sites whose Gamma prior has constant shape a and rate b (an exponential is a = 1): their part of
        # the fused ELBO's per-element shape - 1 and rate vectors is fixed, as is their normaliser
        mvr, nvr = p.m_g_mean_var_ratio, p.n_cells_mean_var_ratio
        constant = {
            "m_g_mean": (mvr * p.m_g_mean, mvr),
            "m_g_alpha_e_inv": (1.0, p.m_g_alpha_mean),
            "n_s_cells_per_location": (N * nvr, nvr),
            "b_s_groups_per_location": (B, 1.0),
            "k_r_factors_per_groups": (kr, 1.0),
            "w_sf": (None, p.w_sf_mean_var_ratio),  # shape 5 (z x)_sf varies, rate is constant
            "detection_mean_y_e": (p.detection_mean_alpha, p.detection_mean_alpha / p.detection_mean),
            "detection_y_s": (p.detection_alpha, None),  # rate detection_alpha / y_e varies
            "s_g_gene_add_alpha_hyp": (9.0, 3.0),
            "s_g_gene_add_mean": (1.0, 100.0),
            "alpha_g_phi_hyp": (9.0, 3.0),
        }
        shape_m1 = torch.zeros(self.guide.n, dtype=torch.float64)
        rate = torch.zeros(self.guide.n, dtype=torch.float64)
        self._const_normaliser = 0.0
        for name, (a, b) in constant.items():
            site = self.guide.sites[name]
            if a is not None:
                shape_m1[site.start : site.start + site.size] = a - 1
            if b is not None:
                rate[site.start : site.start + site.size] = b
            if a is not None and b is not None:
                self._const_normaliser += site.size * (a * math.log(b) - math.lgamma(a))
        self._const_normaliser += S * (-math.lgamma(p.detection_alpha))
        self.register_buffer("_shape_m1", shape_m1.to(dtype=dtype, device=device))
        self.register_buffer("_rate", rate.to(dtype=dtype, device=device))

    def negative_elbo(self, data: CountData, generator: torch.Generator | None = None) -> torch.Tensor:
        """-ELBO for one reparameterised draw, written site by site (autograd differentiates it).

        Training uses :meth:`fused_negative_elbo`, the same value with a hand-written gradient; this is the
        readable definition and the reference the fused one is tested against.
        """
        p = self.p
        R, F_ = p.n_groups, self.n_types
        z, entropy = self.guide.sample(generator)
        l_mm, mm = z["m_g_mean"]
        _, m_ei = z["m_g_alpha_e_inv"]
        l_mg, m_g = z["m_g"]
        l_n, n_s = z["n_s_cells_per_location"]
        l_b, b_s = z["b_s_groups_per_location"]
        l_z, z_sr = z["z_sr_groups_factors"]
        l_k, k_r = z["k_r_factors_per_groups"]
        l_x, x_fr = z["x_fr_group2fact"]
        l_w, w_sf = z["w_sf"]
        l_ye, y_e = z["detection_mean_y_e"]
        l_ys, y_s = z["detection_y_s"]
        l_sah, s_ah = z["s_g_gene_add_alpha_hyp"]
        l_sm, s_m = z["s_g_gene_add_mean"]
        _, s_ei = z["s_g_gene_add_alpha_e_inv"]
        l_s, s_g = z["s_g_gene_add"]
        l_ah, a_h = z["alpha_g_phi_hyp"]
        _, a_inv = z["alpha_g_inverse"]

        m_a = 1.0 / m_ei.pow(2)
        s_a = 1.0 / s_ei.pow(2)
        w_mu = z_sr @ x_fr
        vr = p.w_sf_mean_var_ratio
        lp = (
            gamma_lp(l_mm, mm, p.m_g_mean_var_ratio * p.m_g_mean, p.m_g_mean_var_ratio)
            + exponential_lp(m_ei, p.m_g_alpha_mean)
            + gamma_lp(l_mg, m_g, m_a, m_a / mm)
            + gamma_lp(l_n, n_s, p.n_cells_per_location * p.n_cells_mean_var_ratio, p.n_cells_mean_var_ratio)
            + gamma_lp(l_b, b_s, p.b_groups_per_location, 1.0)
            + gamma_lp(l_z, z_sr, b_s / R, b_s / n_s)
            + gamma_lp(l_k, k_r, p.a_factors_per_location / p.b_groups_per_location, 1.0)
            + gamma_lp(l_x, x_fr, k_r / F_, k_r)
            + gamma_lp(l_w, w_sf, w_mu * vr, vr)
            + gamma_lp(l_ye, y_e, p.detection_mean_alpha, p.detection_mean_alpha / p.detection_mean)
            + gamma_lp(l_ys, y_s, p.detection_alpha, p.detection_alpha / y_e)
            + gamma_lp(l_sah, s_ah, 9.0, 3.0)
            + gamma_lp(l_sm, s_m, 1.0, 100.0)
            + exponential_lp(s_ei, s_ah)
            + gamma_lp(l_s, s_g, s_a, s_a / s_m)
            + gamma_lp(l_ah, a_h, 9.0, 3.0)
            + exponential_lp(a_inv, a_h)
        )
        mu = torch.addmm(s_g, w_sf, self.cell_state * m_g) * y_s
        ll = nb_loglik(mu, 1.0 / a_inv.pow(2), data)
        return -(lp + ll + entropy)

    def fused_negative_elbo(self, data: CountData, generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`negative_elbo` for the same draw, differentiated by hand: one autograd node and ~790 tensor
        operations per step instead of ~430 nodes and ~1,280 operations (on small sites each costs its dispatch and
        bookkeeping, not arithmetic)."""
        guide = self.guide
        eps = torch.randn(guide.loc.shape, generator=generator, device=guide.loc.device, dtype=guide.loc.dtype)
        return _FusedSpatialELBO.apply(guide.loc, guide.raw_scale, eps, self, data)

    @torch.no_grad()
    def _negative_elbo_and_grad(self, loc, raw_scale, eps, data: CountData):
        """(-ELBO, its gradient with respect to loc, and to raw_scale) for the draw ``eps``.

        With u = loc + scale eps and z = exp(u), every prior is a Gamma(a, b) density of z whose gradient with
        respect to u is (a - 1) - b z, plus the terms of the sites whose a or b depend on u; the guide's entropy
        is sum log scale + sum loc + const. ``g`` collects d(log joint)/du element by element.
        """
        p = self.p
        R, F_, G, S = p.n_groups, self.n_types, self.n_genes, self.n_spots
        guide = self.guide
        scale = F.softplus(raw_scale)
        u = torch.addcmul(loc, scale, eps)
        x = torch.exp(u)
        shape_m1, rate = self._shape_m1.clone(), self._rate.clone()
        U, X, A1, B = guide._split(u), guide._split(x), guide._split(shape_m1), guide._split(rate)

        # hyperparameters of the sites whose prior depends on other sites
        m_a = X["m_g_alpha_e_inv"].pow(-2)
        m_b = m_a / X["m_g_mean"]
        A1["m_g"].copy_(m_a - 1)
        B["m_g"].copy_(m_b)
        b_s, n_s = X["b_s_groups_per_location"], X["n_s_cells_per_location"]
        z_a = b_s / R
        z_b = b_s / n_s
        A1["z_sr_groups_factors"].copy_(z_a - 1)
        B["z_sr_groups_factors"].copy_(z_b)
        k_r = X["k_r_factors_per_groups"]
        x_a = k_r / F_
        A1["x_fr_group2fact"].copy_(x_a - 1)
        B["x_fr_group2fact"].copy_(k_r)
        z_sr, x_fr = X["z_sr_groups_factors"], X["x_fr_group2fact"]
        vr = p.w_sf_mean_var_ratio
        w_a = (z_sr @ x_fr).mul_(vr)
        torch.sub(w_a, 1, out=A1["w_sf"])
        y_e = X["detection_mean_y_e"]
        ys_b = p.detection_alpha / y_e
        B["detection_y_s"].copy_(ys_b)
        s_ah = X["s_g_gene_add_alpha_hyp"]
        B["s_g_gene_add_alpha_e_inv"].copy_(s_ah)
        s_a = X["s_g_gene_add_alpha_e_inv"].pow(-2)
        s_b = s_a / X["s_g_gene_add_mean"]
        A1["s_g_gene_add"].copy_(s_a - 1)
        B["s_g_gene_add"].copy_(s_b)
        a_h = X["alpha_g_phi_hyp"]
        B["alpha_g_inverse"].copy_(a_h)

        # sum over sites of (a - 1) log z - b z, and its own-element gradient
        lp = torch.dot(shape_m1, u) - torch.dot(rate, x)
        g = torch.addcmul(shape_m1, rate, x, value=-1.0)
        Gd = guide._split(g)
        # normalisers a log b - lgamma(a) of the varying hyperparameters (per element of their site)
        lgamma_w_a = torch.lgamma(w_a)
        normaliser = (
            G * (m_a * torch.log(m_b) - torch.lgamma(m_a))
            + R * (z_a * torch.log(z_b) - torch.lgamma(z_a)).sum()
            + F_ * (x_a * torch.log(k_r) - torch.lgamma(x_a)).sum()
            + (math.log(vr) * w_a.sum() - lgamma_w_a.sum())
            + S * p.detection_alpha * torch.log(ys_b)
            + torch.log(s_ah)
            + G * (s_a * torch.log(s_b) - torch.lgamma(s_a))
            + G * torch.log(a_h)
        )
        lp = lp + normaliser.sum() + self._const_normaliser

        # gradients through the hyperparameters: d/du of a site is z * d/dz
        def gamma_hyper(a, b, parent_b, n, own):  # m_g / s_g: shape a = e^-2 (e the parent), rate a / parent_b
            su, sx = U[own].sum(), X[own].sum()
            d_a = n * (torch.log(b) + 1 - torch.digamma(a)) + su - sx / parent_b  # d lp / d a
            return -2 * a * d_a, b * sx - n * a  # d/du of the e site, of the parent_b site

        g_e, g_p = gamma_hyper(m_a, m_b, X["m_g_mean"], G, "m_g")
        Gd["m_g_alpha_e_inv"].add_(g_e)
        Gd["m_g_mean"].add_(g_p)
        g_e, g_p = gamma_hyper(s_a, s_b, X["s_g_gene_add_mean"], G, "s_g_gene_add")
        Gd["s_g_gene_add_alpha_e_inv"].add_(g_e)
        Gd["s_g_gene_add_mean"].add_(g_p)
        # z_sr ~ Gamma(b_s / R, b_s / n_s): d lp / d rate * rate = R a - rate * sum_r z
        d_rate = R * z_a - z_b * z_sr.sum(1, keepdim=True)
        d_shape = R * (torch.log(z_b) - torch.digamma(z_a)) + U["z_sr_groups_factors"].sum(1, keepdim=True)
        Gd["b_s_groups_per_location"].add_(z_a * d_shape + d_rate)
        Gd["n_s_cells_per_location"].sub_(d_rate)
        # x_fr ~ Gamma(k_r / F, k_r)
        Gd["k_r_factors_per_groups"].add_(
            k_r
            * (
                torch.log(k_r)
                + 1
                - torch.digamma(x_a)
                + U["x_fr_group2fact"].sum(1, keepdim=True) / F_
                - x_fr.sum(1, keepdim=True)
            )
        )
        # w_sf ~ Gamma(vr (z x)_sf, vr): d lp / d (z x) = vr (log vr - digamma(a) + log w)
        d_wmu = (U["w_sf"] - torch.digamma(w_a)).add_(math.log(vr)).mul_(vr)
        Gd["z_sr_groups_factors"].addcmul_(d_wmu @ x_fr.T, z_sr)
        Gd["x_fr_group2fact"].addcmul_(z_sr.T @ d_wmu, x_fr)
        # y_s ~ Gamma(d, d / y_e); the exponentials' rates s_ah and a_h
        Gd["detection_mean_y_e"].add_(ys_b * X["detection_y_s"].sum() - S * p.detection_alpha)
        Gd["s_g_gene_add_alpha_hyp"].add_(1 - s_ah * X["s_g_gene_add_alpha_e_inv"])
        Gd["alpha_g_phi_hyp"].add_(G - a_h * X["alpha_g_inverse"].sum())

        # likelihood: mu = ((w C) + s_g) y_s with C = cell_state * m_g, alpha = a_inv^-2; value and gradient in
        # blocks of spots, so that a block's spots x genes temporaries stay in the core's cache between the passes
        w_sf, m_g, s_g, y_s = X["w_sf"], X["m_g"], X["s_g_gene_add"], X["detection_y_s"]
        c = self.cell_state * m_g
        alpha = X["alpha_g_inverse"].pow(-2)
        alpha_col = alpha.view(-1, 1)
        log_lam_cols, r_cols, m_cols = torch.zeros_like(alpha), torch.zeros_like(alpha), torch.zeros_like(alpha)
        wt_m = torch.zeros_like(c)
        x_log_mu_over_lam = alpha.new_zeros(())
        g_w, g_ys = Gd["w_sf"], Gd["detection_y_s"]
        rows = max(1, _BLOCK_ELEMENTS // G)
        for i in range(0, S, rows):
            xb, wb, yb = data.dense[i : i + rows], w_sf[i : i + rows], y_s[i : i + rows]
            mu = torch.addmm(s_g, wb, c).mul_(yb)
            lam = mu + alpha
            log_lam = torch.log(lam)
            log_lam_cols += log_lam.sum(0, keepdim=True)
            x_flat = xb.reshape(-1)
            x_log_mu_over_lam += torch.dot(x_flat, torch.log(mu).reshape(-1)) - torch.dot(x_flat, log_lam.reshape(-1))
            r = (xb + alpha).div_(lam)  # (x + alpha) / lam; d ll / d mu = x / mu - r
            r_cols += r.sum(0, keepdim=True)
            # sum_g (d ll / d mu) mu = sum_g alpha_g (r_sg - 1): the gradient of log y_s
            g_ys[i : i + rows].add_(r @ alpha_col)
            m = torch.div(xb, mu).sub_(r).mul_(yb)  # d ll / d (w C + s_g)
            g_w[i : i + rows].addcmul_(m @ c.T, wb)
            wt_m.addmm_(wb.T, m)
            m_cols += m.sum(0, keepdim=True)
        g_ys.sub_(alpha.sum())
        pairs = (alpha, data.u_cols, data.u_values, data.u_weights, data.nnz_per_gene)
        ll = (
            S * (alpha * torch.log(alpha)).sum()
            - (alpha * log_lam_cols).sum()
            + x_log_mu_over_lam
            + nb_pairs_value(*pairs)
            - data.lgamma_x1
        )
        grad_alpha = S * (torch.log(alpha) + 1) - log_lam_cols - r_cols + nb_pairs_grad(*pairs)
        Gd["m_g"].addcmul_((self.cell_state * wt_m).sum(0, keepdim=True), m_g)
        Gd["s_g_gene_add"].addcmul_(m_cols, s_g)
        Gd["alpha_g_inverse"].addcmul_(grad_alpha, alpha, value=-2.0)

        entropy = torch.log(scale).sum() + guide.n * HALF_LOG_2PI_E + loc.sum()
        value = -(lp + ll + entropy)
        grad_loc = g.add_(1).neg_()  # -(g + 1)
        # d/d raw_scale: (-(g + 1) eps + eps - 1 / scale) sigmoid(raw) = (grad_loc eps + eps - 1 / scale) sigmoid
        grad_raw = torch.addcmul(eps, grad_loc, eps).sub_(scale.reciprocal()).mul_(torch.sigmoid(raw_scale))
        return value, grad_loc, grad_raw

    @torch.no_grad()
    def abundance_mean(self) -> torch.Tensor:
        return self.guide.site_mean("w_sf")

    @torch.no_grad()
    def abundance_quantile(self, q: float) -> torch.Tensor:
        s = self.guide.sites["w_sf"]
        loc = self.guide.loc[s.start : s.start + s.size]
        sc = torch.nn.functional.softplus(self.guide.raw_scale[s.start : s.start + s.size])
        zq = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(q)))
        return torch.exp(loc + zq * sc).view(s.shape)


class _FusedSpatialELBO(torch.autograd.Function):
    """The spatial model's -ELBO as one autograd node: the forward pass computes the gradient too (training
    always needs it), the backward pass hands it on."""

    @staticmethod
    def forward(ctx, loc, raw_scale, eps, model, data):
        value, grad_loc, grad_raw = model._negative_elbo_and_grad(loc, raw_scale, eps, data)
        ctx.save_for_backward(grad_loc, grad_raw)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        grad_loc, grad_raw = ctx.saved_tensors
        return grad_loc * grad_out, grad_raw * grad_out, None, None, None


def detection_mean_for(spatial_totals: np.ndarray, signatures: np.ndarray, n_cells_per_location: float) -> float:
    """cell2location's expected detection: (mean spot total / N cells) / mean per-type signature total."""
    sc_total = float(np.asarray(signatures).sum(1).mean())
    sp_total = float(np.mean(spatial_totals))
    return (sp_total / n_cells_per_location) / sc_total


def default_reference_epochs(n_cells: int) -> int:
    """The package's heuristic when no epoch count is given: min(round(20000 / n * 1000), 1000), at least 1."""
    return int(max(1, min(round(20000 / max(n_cells, 1) * 1000), 1000)))
