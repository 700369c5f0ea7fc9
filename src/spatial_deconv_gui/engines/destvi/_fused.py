"""The CPU fast path of DestVI's frozen decoder: the same function as ``SpatialDeconv.decoder_hidden`` followed
by ``_PxMix`` (output layer, softmax, mixture over states and types), computed with fewer passes over memory.

For rows r = (sample, spot, state, type) with the type fastest (type = r mod L)::

    a_1 = drop(relu(LN(gamma_r W_1^T + b_1[type])))           (rank-D first layer, fused with LN/ReLU/dropout)
    a_i = drop(relu(LN(a_{i-1} W_i^T + b_i[type])))           (i = 2..n_layers)
    out_b = sum_k w_bk softmax(a_n W_p^T + c[type])_k          (k = (state, type) of spot-sample b)

* The matrix products with the frozen weights go through oneDNN (``mkldnn._linear_pointwise``), the same fp32
  products as torch's default BLAS call but with kernels chosen for the CPU's instruction set. Frozen weights
  need no weight gradient, so backward is one product per layer (the input gradient).
* Layer norm (no affine), ReLU and dropout are one numba pass forward and one backward per layer.
* The dropout keep mask is a hash of (key, element index) (splitmix64, keep iff its top 32 bits >= p 2^32), so
  it costs no memory: backward recomputes it from the key. Keep probability 1 - p to 2^-32.
* The mixture over (state, type) and its backward (including the per-type bias gradient) are numba passes;
  the softmax stays torch's vectorised kernel.

* With ``decoder_precision`` bfloat16 (``FrozenDecoder(bf16=True)``) the products take bfloat16 operands and
  accumulate in float32 (oneDNN's AMX kernels on CPUs that have them: ~5x faster than float32 there); the
  softmax kernel reads the bfloat16 logits and the mixture's backward writes the logit gradient as bfloat16
  directly (no separate conversion pass over the largest arrays). The stochastic training step itself moves a
  gradient by far more (a different dropout mask changes the gradient w.r.t. gamma by ~70 %; bfloat16 by 2-5 %).

Used for float32 tensors on the CPU when oneDNN is available; everything else takes the plain torch path.
"""

from __future__ import annotations

import functools
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

_FM = {"reassoc", "contract", "nsz", "arcp"}
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
_LN_EPS = 1e-5
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO, the high part exact in few bits
_LN2_LO = np.float32(-2.12194440e-4)


def available(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


@functools.cache
def native_bf16() -> bool:
    """The CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16 dot products) and oneDNN can use it."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        native = any(c() for c in checks if c is not None)
        return bool(native and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(precision: str) -> bool:
    """Whether the CPU fast path multiplies in bfloat16 for a ``decoder_precision`` setting."""
    return precision == "bfloat16" or (precision == "auto" and native_bf16())


def linear_nt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for a 2-d float32 CPU x and a frozen (out, in) w, through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def keep_threshold(p: float) -> np.uint64:
    return np.uint64(min(int(round(p * 2.0**32)), 2**32))


@njit(inline="always")
def _keep(key, e, thr):
    x = key + e * _GOLD
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    x = x ^ (x >> _S31)
    return (x >> _S32) >= thr


@njit(parallel=True, nogil=True, cache=True)
def keep_mask(key, thr, n_rows, n_cols):
    """The dropout keep mask the fused kernels use for (key, rows x cols): for tests and the plain path."""
    out = np.empty((n_rows, n_cols), np.bool_)
    for r in prange(n_rows):
        base = np.uint64(r * n_cols)
        for j in range(n_cols):
            out[r, j] = _keep(key, base + np.uint64(j), thr)
    return out


@njit(parallel=True, nogil=True, fastmath=_FM, cache=True)
def _ln_fwd(z, gam, w1t, bias, n_types, key, thr, scale, train, save, nrm, rstd, out):
    """Per row r: y = (z_r, or gam_r @ w1t when gam has rows) + bias[r mod L]; n = LN(y) (no affine);
    out = dropout(relu(n)). With ``save``, n goes to nrm and 1/std to rstd (for backward); z may be nrm."""
    n_rows, h = out.shape
    d_in = gam.shape[1]
    fused_in = gam.shape[0] > 0
    inv_h = np.float32(1.0 / h)
    zero = np.float32(0.0)
    for r in prange(n_rows):
        t = r % n_types
        s = zero
        if fused_in:
            for j in range(h):
                out[r, j] = bias[t, j]
            for d in range(d_in):
                gd = gam[r, d]
                for j in range(h):
                    out[r, j] += gd * w1t[d, j]
            for j in range(h):
                s += out[r, j]
        else:
            for j in range(h):
                y = z[r, j] + bias[t, j]
                out[r, j] = y
                s += y
        mu = s * inv_h
        v = zero
        for j in range(h):
            c = out[r, j] - mu
            v += c * c
        rs = np.float32(1.0) / np.sqrt(v * inv_h + np.float32(_LN_EPS))
        base = np.uint64(r * h)
        if save:
            rstd[r] = rs
            if train:
                for j in range(h):
                    nv = (out[r, j] - mu) * rs
                    nrm[r, j] = nv
                    on = (nv > zero) & _keep(key, base + np.uint64(j), thr)
                    out[r, j] = nv * scale if on else zero
            else:
                for j in range(h):
                    nv = (out[r, j] - mu) * rs
                    nrm[r, j] = nv
                    out[r, j] = nv if nv > zero else zero
        elif train:
            for j in range(h):
                nv = (out[r, j] - mu) * rs
                on = (nv > zero) & _keep(key, base + np.uint64(j), thr)
                out[r, j] = nv * scale if on else zero
        else:
            for j in range(h):
                nv = (out[r, j] - mu) * rs
                out[r, j] = nv if nv > zero else zero


@njit(parallel=True, nogil=True, fastmath=_FM, cache=True)
def _ln_bwd(g, nrm, rstd, key, thr, scale, train, w1g, g_in):
    """In place: g (gradient w.r.t. the layer's output) -> gradient w.r.t. its pre-norm input. When g_in has
    rows (first layer), also g_in = g @ w1g (the gradient w.r.t. the rank-D input)."""
    n_rows, h = g.shape
    d_in = g_in.shape[1]
    with_in = g_in.shape[0] > 0
    inv_h = np.float32(1.0 / h)
    zero = np.float32(0.0)
    for r in prange(n_rows):
        base = np.uint64(r * h)
        s1 = zero
        s2 = zero
        if train:
            for j in range(h):
                nv = nrm[r, j]
                on = (nv > zero) & _keep(key, base + np.uint64(j), thr)
                gn = g[r, j] * scale if on else zero
                g[r, j] = gn
                s1 += gn
                s2 += gn * nv
        else:
            for j in range(h):
                nv = nrm[r, j]
                gn = g[r, j] if nv > zero else zero
                g[r, j] = gn
                s1 += gn
                s2 += gn * nv
        s1 *= inv_h
        s2 *= inv_h
        rs = rstd[r]
        for j in range(h):
            g[r, j] = rs * (g[r, j] - s1 - nrm[r, j] * s2)
        if with_in:
            for d in range(d_in):
                acc = zero
                for j in range(h):
                    acc += g[r, j] * w1g[d, j]
                g_in[r, d] = acc


@njit(parallel=True, nogil=True, fastmath=_FM, cache=True)
def _softmax_mix(p, bias, w, n_types, n_chunks, out, l16):
    """In place p (logits, rows (b, k)) -> softmax(p + bias[k mod L]) per row; out[b] = sum_k w[b, k] p_(b, k).
    When l16 has rows, the logits are read from it instead (bfloat16 bits as int16, same shape as p) and p is
    only written.

    exp is evaluated as 2^n e^y (|y| <= ln 2 / 2, degree-7 Taylor polynomial, n put into the exponent bits)
    so that the loop vectorises; relative error ~1e-7 like the float32 library exp. Arguments below -87
    (after subtracting the row maximum) are clamped: their exp (~1e-38) is nil next to the row's maximum 1."""
    n_b, n_k = w.shape
    n_g = p.shape[1]
    step = (n_b + n_chunks - 1) // n_chunks
    zero = np.float32(0.0)
    one = np.float32(1.0)
    from_bf16 = l16.shape[0] > 0
    for c in prange(n_chunks):
        eb = np.empty(n_g, np.int32)
        ef = eb.view(np.float32)
        for b in range(c * step, min(n_b, (c + 1) * step)):
            for j in range(n_g):
                out[b, j] = zero
            for k in range(n_k):
                r = b * n_k + k
                t = k % n_types
                mx = np.float32(-3.0e38)
                if from_bf16:
                    for j in range(n_g):
                        eb[j] = np.int32(l16[r, j]) << np.int32(16)  # bfloat16 bits -> the float32 they round
                    for j in range(n_g):
                        v = ef[j] + bias[t, j]
                        p[r, j] = v
                        mx = max(mx, v)
                else:
                    for j in range(n_g):
                        v = p[r, j] + bias[t, j]
                        p[r, j] = v
                        mx = max(mx, v)
                for j in range(n_g):
                    x = max(p[r, j] - mx, np.float32(-87.0))
                    nf = np.floor(x * _LOG2E + np.float32(0.5))
                    y = x - nf * _LN2_HI - nf * _LN2_LO
                    q = one + y * (
                        one
                        + y
                        * (
                            np.float32(0.5)
                            + y
                            * (
                                np.float32(1 / 6)
                                + y
                                * (
                                    np.float32(1 / 24)
                                    + y * (np.float32(1 / 120) + y * (np.float32(1 / 720) + y * np.float32(1 / 5040)))
                                )
                            )
                        )
                    )
                    p[r, j] = q
                    eb[j] = (np.int32(nf) + np.int32(127)) << np.int32(23)
                s = zero
                for j in range(n_g):
                    e = p[r, j] * ef[j]
                    p[r, j] = e
                    s += e
                inv = one / s
                wk = w[b, k]
                for j in range(n_g):
                    e = p[r, j] * inv
                    p[r, j] = e
                    out[b, j] += wk * e


@njit(parallel=True, nogil=True, fastmath=_FM, cache=True)
def _mix_bwd(p, w, g, n_types, n_chunks, g_w, g_bias_parts, gl16):
    """In place p (rows (b, k)) -> gl = w p (g_b - <p, g_b>) (the gradient w.r.t. the logits);
    g_w[b, k] = <p_(b, k), g_b>; g_bias_parts[c, t] = sum of gl over the rows of type t in chunk c.
    When gl16 has rows, gl goes there instead, rounded to bfloat16 (bits as int16; nearest, ties to even)."""
    n_b, n_k = w.shape
    n_g = p.shape[1]
    step = (n_b + n_chunks - 1) // n_chunks
    zero = np.float32(0.0)
    to_bf16 = gl16.shape[0] > 0
    for c in prange(n_chunks):
        eb = np.empty(n_g, np.int32)
        ef = eb.view(np.float32)
        for t in range(n_types):
            for j in range(n_g):
                g_bias_parts[c, t, j] = zero
        for b in range(c * step, min(n_b, (c + 1) * step)):
            for k in range(n_k):
                r = b * n_k + k
                s = zero
                for j in range(n_g):
                    s += p[r, j] * g[b, j]
                g_w[b, k] = s
                wk = w[b, k]
                t = k % n_types
                if to_bf16:
                    for j in range(n_g):
                        v = wk * p[r, j] * (g[b, j] - s)
                        ef[j] = v
                        g_bias_parts[c, t, j] += v
                    for j in range(n_g):
                        x = eb[j]
                        x = x + np.int32(0x7FFF) + ((x >> np.int32(16)) & np.int32(1))
                        gl16[r, j] = np.int16(x >> np.int32(16))
                else:
                    for j in range(n_g):
                        v = wk * p[r, j] * (g[b, j] - s)
                        p[r, j] = v
                        g_bias_parts[c, t, j] += v


_EMPTY2 = np.zeros((0, 0), np.float32)
_EMPTY1 = np.zeros(0, np.float32)
_EMPTY16 = np.zeros((0, 0), np.int16)


class FrozenDecoder:
    """The frozen decoder's weights laid out for the fused kernels (built once per spatial model).

    With ``bf16`` the products with the hidden and output weights take bfloat16 operands (weights rounded once,
    activations and gradients per step) and accumulate in float32 (oneDNN's AMX / AVX512-BF16 kernels); layer
    norm, softmax, the mixture and everything after stay float32. The weights get no gradient either way."""

    def __init__(self, decoder, px_decoder, n_latent: int, n_types: int, bf16: bool = False):
        lins = list(decoder.linears)
        sizes = decoder.sizes
        n_cat = decoder.n_cat
        with torch.no_grad():
            W1 = lins[0].weight.detach().float()
            a0 = sizes[0][0]
            self.w1t = W1[:, :n_latent].t().contiguous()  # D, H
            self.w1e = W1[:, n_latent:a0].contiguous()  # H, batch_dim
            self.b1 = lins[0].bias.detach().float().clone()
            self.c1 = W1[:, a0:].t().contiguous() if n_cat else torch.zeros(n_types, W1.shape[0])
            self.w = [lin.weight.detach().float()[:, :a].contiguous() for (a, _), lin in zip(sizes[1:], lins[1:])]
            self.w_t = [x.t().contiguous() for x in self.w]
            self.b = [
                (lin.bias.detach().float() + (lin.weight.detach().float()[:, a:].t() if n_cat else 0.0))
                .expand(n_types, -1)
                .contiguous()
                for (a, _), lin in zip(sizes[1:], lins[1:])
            ]
            self.wp = px_decoder.weight.detach().float().contiguous()  # G, H
            self.wp_t = self.wp.t().contiguous()  # H, G
            bf = torch.bfloat16
            self.w16 = [x.to(bf) for x in self.w] if bf16 else None
            self.w_t16 = [x.to(bf) for x in self.w_t] if bf16 else None
            self.wp16 = self.wp.to(bf) if bf16 else None
            self.wp_t16 = self.wp_t.to(bf) if bf16 else None
        self.bf16 = bool(bf16)
        self.n_types = n_types
        self.dropout = float(decoder.dropout)
        self.workspace = _Workspace()

    def bias1(self, batch_embedding: torch.Tensor) -> torch.Tensor:
        """(L, H) first-layer bias: own bias + batch embedding columns + type one-hot columns (autograd)."""
        return (self.b1 + self.w1e @ batch_embedding).unsqueeze(0) + self.c1


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class _Workspace:
    """Buffers reused from step to step (fresh pages cost more than the kernels that fill them). A buffer that
    a graph saved for backward is not handed out again until that backward has run (or the graph is gone)."""

    def __init__(self):
        self.buf: dict[str, torch.Tensor] = {}
        self.owner: dict[str, object] = {}

    def get(self, name: str, rows: int, cols: int) -> torch.Tensor:
        own = self.owner.get(name)
        if own is not None:
            ctx = own()
            if ctx is not None and not ctx.used:
                return torch.empty(rows, cols)
            del self.owner[name]
        t = self.buf.get(name)
        if t is None or t.shape[0] < rows or t.shape[1] != cols:
            t = self.buf[name] = torch.empty(rows, cols)
        return t[:rows]

    def hold(self, name: str, ctx) -> None:
        self.owner[name] = weakref.ref(ctx)


class _DecoderMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gamma, bias1, out_bias, w, dec: FrozenDecoder, training: bool, grad: bool):
        R = gamma.shape[0]
        B, K = w.shape
        L = dec.n_types
        p = dec.dropout
        ws = dec.workspace
        train = bool(training and p > 0)
        thr = keep_threshold(p)
        scale = np.float32(1.0 / (1.0 - p)) if p < 1 else np.float32(0.0)
        save = grad and any(ctx.needs_input_grad[:4])
        keys = (
            [np.uint64(int(k)) for k in torch.randint(0, 2**62, (1 + len(dec.w),)).tolist()]
            if train
            else [np.uint64(0)] * (1 + len(dec.w))
        )
        H = dec.w1t.shape[1]
        gamma = gamma.detach().contiguous()
        bias1 = bias1.detach().contiguous()
        a = ws.get("a", R, H)
        nrms, rstds = [], []
        nrm = ws.get("nrm0", R, H) if save else None
        rstd = ws.get("rstd0", R, 1).view(-1) if save else None
        _ln_fwd(
            _EMPTY2,
            _np(gamma),
            _np(dec.w1t),
            _np(bias1),
            L,
            keys[0],
            thr,
            scale,
            train,
            save,
            _np(nrm) if save else _EMPTY2,
            _np(rstd) if save else _EMPTY1,
            _np(a),
        )
        nrms.append(nrm), rstds.append(rstd)
        for i, (W, b) in enumerate(zip(dec.w, dec.b)):
            z = F.linear(a.to(torch.bfloat16), dec.w16[i]).float() if dec.bf16 else linear_nt(a, W)
            a = ws.get("a" if i % 2 else "a2", R, W.shape[0])
            rstd = ws.get(f"rstd{i + 1}", R, 1).view(-1) if save else None
            _ln_fwd(
                _np(z),
                _EMPTY2,
                _EMPTY2,
                _np(b),
                L,
                keys[i + 1],
                thr,
                scale,
                train,
                save,
                _np(z) if save else _EMPTY2,
                _np(rstd) if save else _EMPTY1,
                _np(a),
            )
            nrms.append(z if save else None), rstds.append(rstd)
        if dec.bf16:
            logits16 = F.linear(a.to(torch.bfloat16), dec.wp16)
            prob = torch.empty(R, logits16.shape[1])
            l16 = _np(logits16.view(torch.int16))
        else:
            prob = linear_nt(a, dec.wp)  # logits, turned into probabilities in place
            l16 = _EMPTY16
        G = prob.shape[1]
        out = torch.empty(B, G)
        n_chunks = max(1, min(B, torch.get_num_threads()))
        w_c = w.detach().contiguous()
        _softmax_mix(_np(prob), _np(out_bias.detach().contiguous()), _np(w_c), L, n_chunks, _np(out), l16)
        if save:
            ctx.dec, ctx.keys, ctx.train, ctx.thr, ctx.scale = dec, keys, train, thr, scale
            ctx.save_for_backward(prob, w_c, *nrms, *rstds)
            ctx.used = False
            for i in range(len(nrms)):
                ws.hold(f"rstd{i}", ctx)
            ws.hold("nrm0", ctx)
        return out

    @staticmethod
    def backward(ctx, g_out):
        if ctx.used:
            raise RuntimeError("the fused DestVI decoder supports one backward pass per forward")
        dec: FrozenDecoder = ctx.dec
        prob, w, *rest = ctx.saved_tensors
        n = len(rest) // 2
        nrms, rstds = rest[:n], rest[n:]
        R, G = prob.shape
        B, K = w.shape
        L = dec.n_types
        n_chunks = max(1, min(B, torch.get_num_threads()))
        g_w = torch.empty(B, K)
        parts = torch.empty(n_chunks, L, G)
        if dec.bf16:
            gl16 = torch.empty(R, G, dtype=torch.bfloat16)
            _mix_bwd(
                _np(prob),
                _np(w),
                _np(g_out.contiguous()),
                L,
                n_chunks,
                _np(g_w),
                _np(parts),
                _np(gl16.view(torch.int16)),
            )
            del prob
            g = F.linear(gl16, dec.wp_t16).float()  # R, H
            del gl16
        else:
            _mix_bwd(_np(prob), _np(w), _np(g_out.contiguous()), L, n_chunks, _np(g_w), _np(parts), _EMPTY16)
            g = linear_nt(prob, dec.wp_t)  # R, H
            del prob
        g_bias_out = parts.sum(0)
        for i in range(len(dec.w) - 1, -1, -1):
            _ln_bwd(
                _np(g),
                _np(nrms[i + 1]),
                _np(rstds[i + 1]),
                ctx.keys[i + 1],
                ctx.thr,
                ctx.scale,
                ctx.train,
                _EMPTY2,
                _EMPTY2,
            )
            g = F.linear(g.to(torch.bfloat16), dec.w_t16[i]).float() if dec.bf16 else linear_nt(g, dec.w_t[i])
        g_gamma = torch.empty(R, dec.w1t.shape[0])
        _ln_bwd(
            _np(g), _np(nrms[0]), _np(rstds[0]), ctx.keys[0], ctx.thr, ctx.scale, ctx.train, _np(dec.w1t), _np(g_gamma)
        )
        g_bias1 = g.view(-1, L, g.shape[1]).sum(0) if ctx.needs_input_grad[1] else None
        ctx.used = True
        return g_gamma, g_bias1, g_bias_out, g_w, None, None, None


def decoder_mix(
    gamma: torch.Tensor,
    bias1: torch.Tensor,
    out_bias: torch.Tensor,
    w: torch.Tensor,
    dec: FrozenDecoder,
    training: bool,
) -> torch.Tensor:
    """out (B, G) = sum_k w[b, k] softmax(decoder(gamma_(b, k)) W_p^T + out_bias[k mod L]) for gamma (B * K, D)."""
    return _DecoderMix.apply(gamma, bias1, out_bias, w, dec, training, torch.is_grad_enabled())
