"""Received ligands: how much of each ligand reaches a cell from its neighbours.

    r_iL = (s / N) * sum_j exp(-d_ij^2 / (2 r_L^2)) * x_jL

with one radius per received value: per ligand-receptor pair by default (secreted vs contact signalling, see
``modulators.feature_radii``), so a ligand with pairs of both kinds is received at two radii. Two ways to
compute it:

* **exact**: on the CPU by the fused numba kernels of ``_kernels.py`` (distance, exponential and product per row
  of a source tile, nothing larger than a tile in memory); on CUDA in row blocks with torch (a block is
  ``block x N``). An N x N matrix never exists.
* **grid**: the same sum evaluated exactly on a regular anchor grid of spacing ``h`` covering the slide, then
  bilinear interpolation at each cell. For a C^2 function on a cell of side h the bilinear error is at most
  ``h^2/8 * (max|f_xx| + max|f_yy|)`` and for this kernel ``|d^2/dx^2 exp(-d^2/2r^2)| <= 1/r^2``, so

      |r_grid - r_exact| <= h^2 / (4 r^2) * s * mean_j |x_jL|          (``grid_error_bound``)

  With the default ``h = r / 4`` that is ``s * mean|x_L| / 64``. Cost is ``G x N`` for G anchors instead of
  ``N x N``; a radius group whose grid would not be smaller than N/2 anchors is computed exactly.
"""

from __future__ import annotations

import math

import numpy as np

from ..devices import device_name, torch_device

DEFAULT_GRID_FACTOR = 4.0  # grid spacing = radius / DEFAULT_GRID_FACTOR
AUTO_GRID_MIN_CELLS = 20_000
_BLOCK_ELEMENTS = 4_000_000  # kernel entries per block (32 MB in float64; torch path)
_TILE = 512  # sources per tile (numba path)
_SYM_BUFFER_BYTES = 256 * 2**20


def kernel_sum(
    targets: np.ndarray,
    sources: np.ndarray,
    values: np.ndarray,
    radius: float,
    device=None,
    dtype=None,
    block: int | None = None,
    symmetric: bool = False,
    backend: str = "auto",
) -> np.ndarray:
    """``out[i, l] = sum_j exp(-|t_i - s_j|^2 / 2r^2) * values[j, l]`` in blocks (no T x S matrix).

    ``symmetric=True`` (targets are the sources) evaluates each off-diagonal kernel entry once and uses it
    for both directions, halving the exponentials. ``backend``: ``'numba'`` (CPU, float64), ``'torch'``, or
    ``'auto'`` (numba for float64 on the CPU, torch otherwise). ``block``: source tile (numba) or row block
    (torch) size. ``dtype``: a torch dtype, default float64. torch is imported only for the torch backend (a
    CPU knockout's process then starts without it).
    """
    float64 = dtype is None or str(dtype) == "torch.float64"
    if backend == "auto":
        on_cpu = device_name(None if device is None else str(device)) == "cpu"
        backend = "numba" if on_cpu and float64 else "torch"
    if backend == "numba":
        return _kernel_sum_numba(targets, sources, values, radius, block, symmetric)
    if backend != "torch":
        raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {backend!r}")
    import torch

    dev = torch_device(device)
    dtype = torch.float64 if dtype is None else dtype
    t = torch.as_tensor(np.ascontiguousarray(targets, dtype=np.float64), dtype=dtype, device=dev)
    s = torch.as_tensor(np.ascontiguousarray(sources, dtype=np.float64), dtype=dtype, device=dev)
    v = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float64), dtype=dtype, device=dev)
    n_t, n_s = t.shape[0], s.shape[0]
    out = torch.zeros((n_t, v.shape[1]), dtype=dtype, device=dev)
    if n_t == 0 or n_s == 0 or v.shape[1] == 0:
        return out.cpu().numpy()
    inv = -1.0 / (2.0 * float(radius) ** 2)
    b = block or max(1, _BLOCK_ELEMENTS // max(n_s, 1))
    # -d^2/2r^2 = inv*|t|^2 + inv*|s|^2 - 2*inv*(t . s) with one BLAS call per block, on centred coordinates
    # (rounding in d^2 stays ~1e-16 * extent^2, far below 2r^2 for any sensible radius)
    centre = s.mean(0, keepdim=True)
    t = t - centre
    s = s - centre
    ts = inv * (t * t).sum(1)
    ss = inv * (s * s).sum(1)
    sT = s.T.contiguous()
    if symmetric and n_t == n_s:
        bs = block or max(256, int(np.sqrt(_BLOCK_ELEMENTS)))
        for i0 in range(0, n_t, bs):
            i1 = min(n_t, i0 + bs)
            for j0 in range(i0, n_s, bs):
                j1 = min(n_s, j0 + bs)
                e = torch.addmm(ss[None, j0:j1], t[i0:i1], sT[:, j0:j1], alpha=-2.0 * inv)
                e.add_(ts[i0:i1, None]).exp_()  # rounding can leave ~1e-13 > 0 at d = 0: harmless
                out[i0:i1] += e @ v[j0:j1]
                if j0 != i0:
                    out[j0:j1] += e.T @ v[i0:i1]
        return out.cpu().numpy()
    for start in range(0, n_t, b):
        tb = t[start : start + b]
        e = ts[start : start + b, None] + ss[None, :]
        e.addmm_(tb, sT, alpha=-2.0 * inv)
        e.clamp_(max=0.0).exp_()
        out[start : start + b] = e @ v
    return out.cpu().numpy()


def _kernel_sum_numba(targets, sources, values, radius, block, symmetric) -> np.ndarray:
    import numba

    from . import _kernels

    t = np.ascontiguousarray(np.asarray(targets, dtype=np.float64).T)
    v = np.ascontiguousarray(np.asarray(values, dtype=np.float64).T)
    n_t, n_s, n_l = t.shape[1], np.asarray(sources).shape[0], v.shape[0]
    if n_t == 0 or n_s == 0 or n_l == 0:
        return np.zeros((n_t, n_l))
    c = -1.0 / (2.0 * float(radius) ** 2)
    tile = int(block or _TILE)
    n_threads = max(1, numba.get_num_threads())  # honours thread_cap / NUMBA_NUM_THREADS
    # the symmetric kernel keeps one output buffer per piece of work; with many columns on many cells the
    # plain kernel (no extra buffers, each exponential shared by all columns anyway) is used instead
    if symmetric and n_t == n_s and 4 * n_threads * n_l * n_t * 8 <= _SYM_BUFFER_BYTES:
        out = _kernels.gauss_sum_sym(t, v, c, tile, n_threads)
    else:
        s = np.ascontiguousarray(np.asarray(sources, dtype=np.float64).T)
        out = _kernels.gauss_sum(t, s, v, c, tile, n_threads)
    return out.T


def grid_spacing(radius: float, grid_factor: float = DEFAULT_GRID_FACTOR) -> float:
    return float(radius) / float(grid_factor)


def grid_error_bound(
    values: np.ndarray, radius: float, scale: float = 1.0, spacing: float | None = None, n_total: int | None = None
) -> np.ndarray:
    """Per-ligand bound on ``|grid - exact|`` (see the module docstring)."""
    h = grid_spacing(radius) if spacing is None else float(spacing)
    v = np.abs(np.asarray(values, dtype=np.float64))
    n = v.shape[0] if n_total is None else n_total
    return h * h / (4.0 * float(radius) ** 2) * float(scale) * v.sum(axis=0) / max(n, 1)


def _grid_axes(coords: np.ndarray, h: float):
    lo = coords.min(axis=0)
    hi = coords.max(axis=0)
    n = np.maximum(np.ceil((hi - lo) / h).astype(np.int64) + 1, 2)
    return lo, n


def n_grid_anchors(coords: np.ndarray, radius: float, grid_factor: float = DEFAULT_GRID_FACTOR) -> int:
    _, n = _grid_axes(np.asarray(coords, dtype=np.float64), grid_spacing(radius, grid_factor))
    return int(np.prod(n))


def grid_kernel_sum(
    coords: np.ndarray, sources: np.ndarray, values: np.ndarray, radius: float, spacing: float, device=None
) -> np.ndarray:
    """Kernel sums at ``coords`` by exact evaluation on an anchor grid + bilinear (2-D) / trilinear (3-D)."""
    coords = np.asarray(coords, dtype=np.float64)
    allc = np.vstack([coords, np.asarray(sources, dtype=np.float64)])
    lo, n = _grid_axes(allc, spacing)
    axes = [lo[k] + spacing * np.arange(n[k]) for k in range(coords.shape[1])]
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, coords.shape[1])
    anchor_vals = kernel_sum(mesh, sources, values, radius, device=device)
    anchor_vals = anchor_vals.reshape(*[int(m) for m in n], values.shape[1])
    rel = (coords - lo) / spacing
    idx = np.clip(np.floor(rel).astype(np.int64), 0, n - 2)
    frac = rel - idx
    out = np.zeros((coords.shape[0], values.shape[1]))
    dims = coords.shape[1]
    for corner in range(2**dims):
        bits = [(corner >> k) & 1 for k in range(dims)]
        w = np.ones(coords.shape[0])
        ii = []
        for k, bit in enumerate(bits):
            w = w * (frac[:, k] if bit else 1.0 - frac[:, k])
            ii.append(idx[:, k] + bit)
        out += w[:, None] * anchor_vals[tuple(ii)]
    return out


def choose_mode(n_cells: int, mode: str = "auto") -> str:
    if mode not in ("auto", "exact", "grid"):
        raise ValueError(f"mode must be 'auto', 'exact' or 'grid', got {mode!r}")
    if mode == "auto":
        return "grid" if n_cells >= AUTO_GRID_MIN_CELLS else "exact"
    return mode


def received_ligands(
    coords: np.ndarray,
    values: np.ndarray,
    radii,
    scale: float = 1.0,
    mode: str = "exact",
    device=None,
    grid_factor: float = DEFAULT_GRID_FACTOR,
    source_index: np.ndarray | None = None,
    n_total: int | None = None,
) -> np.ndarray:
    """Received amount of each ligand column of ``values`` at every cell of ``coords``.

    ``radii`` gives one radius per column. With ``source_index`` only those rows emit (``values`` then has one
    row per source) while the normalisation stays ``1/n_total`` (default: number of cells) - used to add the
    contribution of changed cells only during propagation.
    """
    coords = np.asarray(coords, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (values.shape[1],))
    n = coords.shape[0] if n_total is None else int(n_total)
    sources = coords if source_index is None else coords[source_index]
    out = np.zeros((coords.shape[0], values.shape[1]))
    mode = choose_mode(coords.shape[0], mode)
    for r in np.unique(radii):
        cols = np.flatnonzero(radii == r)
        if mode == "grid" and n_grid_anchors(coords, r, grid_factor) < max(coords.shape[0] // 2, 1):
            res = grid_kernel_sum(coords, sources, values[:, cols], r, grid_spacing(r, grid_factor), device)
        else:
            res = kernel_sum(coords, sources, values[:, cols], r, device=device, symmetric=source_index is None)
        out[:, cols] = res * (float(scale) / n)
    return out


def auto_radius(coords: np.ndarray, multiple: float = 5.0) -> float:
    """A default secreted-signalling radius: ``multiple`` x the median nearest-neighbour distance."""
    from scipy.spatial import cKDTree

    c = np.asarray(coords, dtype=np.float64)
    if c.shape[0] < 2:
        return 1.0
    d, _ = cKDTree(c).query(c, k=2)
    med = float(np.median(d[:, 1]))
    return multiple * med if med > 0 and math.isfinite(med) else 1.0
