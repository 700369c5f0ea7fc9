"""Deterministic simulated slides with known cell-type proportions.

The tissue is a disc of spots on a hexagonal (Visium-like) or square grid. Each cell type owns smooth
spatial domains (a Gaussian-blurred random field per type, turned into proportions with a softmax), so
maps have the structure real tissue has and graph-regularised methods have something to exploit. Each
spot holds a Poisson number of cells split by those proportions; counts are negative binomial around the
cell-weighted mix of per-type expression profiles. The matching reference draws single cells from the
same profiles. Both carry ``obs['nUMI']``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.ndimage import gaussian_filter

from . import keys

DEFAULT_TYPE_NAMES = (
    "Astrocyte",
    "Endothelial",
    "Excitatory",
    "Inhibitory",
    "Microglia",
    "Oligodendrocyte",
    "OPC",
    "Pericyte",
    "Fibroblast",
    "Ependymal",
    "Bcell",
    "Tcell",
    "Macrophage",
    "Plasma",
    "Smooth_muscle",
)


@dataclass(frozen=True)
class SimulationConfig:
    n_spots: int = 1500
    n_genes: int = 300
    n_types: int = 6
    cells_per_type: int = 60
    mean_cells_per_spot: float = 6.0
    umi_per_cell: float = 250.0
    markers_per_type: int = 20
    marker_fold: float = 8.0
    dispersion: float = 10.0  # NB size parameter; larger is closer to Poisson
    domain_smoothness: float = 4.0  # blur width in spot spacings
    domain_sharpness: float = 3.0
    grid: str = "hex"
    seed: int = 0


def _grid_coords(n_spots: int, grid: str, rng: np.random.Generator) -> np.ndarray:
    # Lay a slightly larger lattice than needed and keep the n_spots nearest the centre: a round tissue.
    side = int(np.ceil(np.sqrt(n_spots * 4 / np.pi))) + 2
    ii, jj = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    if grid == "hex":
        x = jj * 1.0 + 0.5 * (ii % 2)
        y = ii * np.sqrt(3) / 2
    elif grid == "square":
        x, y = jj * 1.0, ii * 1.0
    else:
        raise ValueError(f"unknown grid {grid!r}: use 'hex' or 'square'")
    pts = np.column_stack([x.ravel(), y.ravel()]).astype(float)
    centre = pts.mean(axis=0)
    order = np.argsort(np.linalg.norm(pts - centre, axis=1), kind="stable")
    pts = pts[order[:n_spots]]
    # Visium spots sit 100 um apart; express coordinates in micrometres.
    return (pts - pts.min(axis=0)) * 100.0 + 50.0


def _domain_proportions(coords: np.ndarray, n_types: int, cfg: SimulationConfig, rng) -> np.ndarray:
    spacing = 100.0
    grid_xy = np.floor(coords / spacing).astype(int)
    h, w = grid_xy.max(axis=0) + 1
    logits = np.empty((coords.shape[0], n_types))
    for k in range(n_types):
        field = gaussian_filter(rng.standard_normal((h + 1, w + 1)), cfg.domain_smoothness, mode="reflect")
        field /= field.std() + 1e-12
        logits[:, k] = field[grid_xy[:, 0], grid_xy[:, 1]]
    logits *= cfg.domain_sharpness
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    # Tiny proportions are not cells; zero them so the truth is sparse like real spots.
    p[p < 0.03] = 0.0
    return p / p.sum(axis=1, keepdims=True)


def _type_profiles(n_types: int, n_genes: int, cfg: SimulationConfig, rng) -> np.ndarray:
    base = rng.gamma(shape=0.6, scale=1.0, size=n_genes) + 0.02
    profiles = np.tile(base, (n_types, 1)) * rng.lognormal(0.0, 0.3, size=(n_types, n_genes))
    for k in range(n_types):
        markers = rng.choice(n_genes, size=min(cfg.markers_per_type, n_genes), replace=False)
        profiles[k, markers] *= cfg.marker_fold
    return profiles / profiles.sum(axis=1, keepdims=True)


def _nb(mean: np.ndarray, size: float, rng) -> np.ndarray:
    lam = rng.gamma(shape=size, scale=mean / size)
    return rng.poisson(lam)


def simulate_dataset(config: SimulationConfig | None = None, **overrides) -> tuple[ad.AnnData, ad.AnnData]:
    """Return ``(spatial, reference)`` AnnData objects with known truth.

    spatial: counts in ``X`` (CSR int32), ``obsm['spatial']``, ``obsm['true_proportions']`` (DataFrame, cell
    fractions), ``obsm['true_umi_fractions']`` (each type's expected share of the spot's counts, which differs from
    its cell fraction as cells differ in size; what RCTD's weights estimate),
    ``obs['true_n_cells']``, ``obs['nUMI']``. reference: ``obs['cell_type']`` (categorical), ``obs['nUMI']``.
    """
    cfg = config or SimulationConfig()
    if overrides:
        cfg = SimulationConfig(**{**cfg.__dict__, **overrides})
    if not 2 <= cfg.n_types <= len(DEFAULT_TYPE_NAMES):
        raise ValueError(f"n_types must be between 2 and {len(DEFAULT_TYPE_NAMES)}")
    rng = np.random.default_rng(cfg.seed)
    types = list(DEFAULT_TYPE_NAMES[: cfg.n_types])
    genes = np.array([f"Gene{g:04d}" for g in range(cfg.n_genes)])
    profiles = _type_profiles(cfg.n_types, cfg.n_genes, cfg, rng)

    coords = _grid_coords(cfg.n_spots, cfg.grid, rng)
    props = _domain_proportions(coords, cfg.n_types, cfg, rng)
    n_cells = np.maximum(rng.poisson(cfg.mean_cells_per_spot, size=cfg.n_spots), 1)
    cells = np.vstack([rng.multinomial(n, p) for n, p in zip(n_cells, props)])
    cell_umi = rng.lognormal(np.log(cfg.umi_per_cell), 0.3, size=cells.shape)
    mean = (cells * cell_umi) @ profiles
    counts = _nb(mean, cfg.dispersion, rng).astype(np.int32)
    true_props = cells / cells.sum(axis=1, keepdims=True)
    type_umi = cells * cell_umi
    true_umi_fractions = type_umi / type_umi.sum(axis=1, keepdims=True)

    barcodes = [f"spot{i:06d}" for i in range(cfg.n_spots)]
    spatial = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"true_n_cells": n_cells, keys.NUMI: counts.sum(axis=1)}, index=barcodes),
        var=pd.DataFrame(index=genes),
    )
    spatial.obsm[keys.SPATIAL] = coords
    spatial.obsm[keys.TRUE_PROPORTIONS] = pd.DataFrame(true_props, index=barcodes, columns=types)
    spatial.obsm[keys.TRUE_UMI_FRACTIONS] = pd.DataFrame(true_umi_fractions, index=barcodes, columns=types)
    spatial.obs[keys.TRUE_DOMINANT_TYPE] = pd.Categorical(np.array(types)[true_props.argmax(axis=1)], categories=types)
    spatial.uns["description"] = "simulated slide (spatial_deconv_gui.simulate)"
    spatial.uns["simulation"] = {k: v for k, v in cfg.__dict__.items()}

    ref_types = np.repeat(np.arange(cfg.n_types), cfg.cells_per_type)
    ref_umi = rng.lognormal(np.log(cfg.umi_per_cell * 4), 0.3, size=ref_types.size)
    ref_counts = _nb(profiles[ref_types] * ref_umi[:, None], cfg.dispersion, rng).astype(np.int32)
    cell_names = [f"cell{i:06d}" for i in range(ref_types.size)]
    reference = ad.AnnData(
        X=sp.csr_matrix(ref_counts),
        obs=pd.DataFrame(
            {
                keys.CELL_TYPE: pd.Categorical(np.array(types)[ref_types], categories=types),
                keys.NUMI: ref_counts.sum(axis=1),
            },
            index=cell_names,
        ),
        var=pd.DataFrame(index=genes),
    )
    reference.uns["description"] = "simulated single-cell reference (spatial_deconv_gui.simulate)"
    return spatial, reference


# Stain colours of a haematoxylin & eosin section as RGB in [0, 1]: glass, eosin (cytoplasm), haematoxylin
# (nuclei). Each simulated type gets its own nuclear density so the domains show in the stain, as they do in
# real tissue, and a map can be judged against the picture under it.
_GLASS = np.array([0.96, 0.95, 0.96])
_EOSIN = np.array([0.91, 0.62, 0.76])
_HAEMATOXYLIN = np.array([0.36, 0.22, 0.56])


def tissue_image(
    coords_um: np.ndarray, proportions: np.ndarray, um_per_px: float = 5.0, seed: int = 0, margin_um: float = 150.0
) -> tuple[np.ndarray, tuple[float, float]]:
    """A simulated H&E image (uint8 RGB) under spots at ``coords_um`` (x, y in µm) with per-spot type
    ``proportions``; returns the image and the µm position (x, y) of its pixel (0, 0)'s centre."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    coords_um = np.asarray(coords_um, dtype=float)[:, :2]
    lo = coords_um.min(axis=0) - margin_um
    hi = coords_um.max(axis=0) + margin_um
    w, h = np.ceil((hi - lo) / um_per_px).astype(int) + 1
    xs, ys = np.meshgrid(lo[0] + np.arange(w) * um_per_px, lo[1] + np.arange(h) * um_per_px)
    dist, nearest = cKDTree(coords_um).query(np.column_stack([xs.ravel(), ys.ravel()]))
    n_types = proportions.shape[1]
    nuclear_density = np.linspace(0.15, 0.65, n_types)[rng.permutation(n_types)]
    density = (np.asarray(proportions) @ nuclear_density)[nearest].reshape(h, w)
    # a ragged tissue edge about 80 µm beyond the outer spots
    edge = gaussian_filter(rng.standard_normal((h, w)), 6) * 25.0
    tissue = (dist.reshape(h, w) + edge) < 80.0
    nuclei = gaussian_filter((rng.random((h, w)) < density * 0.07).astype(float), 0.7)
    nuclei = np.clip(nuclei * 4.0, 0, 0.9)
    fibres = gaussian_filter(rng.standard_normal((h, w)), 2.5)
    fibres /= fibres.std() + 1e-12
    eosin = np.clip(0.35 + 0.5 * density + 0.12 * fibres, 0.1, 1)[..., None]
    stain = _GLASS + eosin * (_EOSIN - _GLASS)
    stain = stain + nuclei[..., None] * (_HAEMATOXYLIN - stain)
    image = np.where(tissue[..., None], stain, _GLASS + rng.normal(0, 0.005, (h, w, 1)))
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), (float(lo[0]), float(lo[1]))


def add_tissue_image(spatial: ad.AnnData, library_id: str = "sample", um_per_px: float = 5.0, seed: int = 0):
    """Store a simulated H&E under ``spatial``'s spots in scanpy's ``uns['spatial']`` layout (in place).

    scanpy's convention maps coordinates to an image pixel by ``coords * tissue_hires_scalef``, with the image
    starting at coordinate 0, so the coordinates are shifted to put the image's first pixel there.
    """
    props = spatial.obsm[keys.TRUE_PROPORTIONS].to_numpy()
    image, origin = tissue_image(spatial.obsm[keys.SPATIAL], props, um_per_px=um_per_px, seed=seed)
    spatial.obsm[keys.SPATIAL] = np.asarray(spatial.obsm[keys.SPATIAL], dtype=float) - np.asarray(origin)
    spatial.uns[keys.SPATIAL_LIBRARIES] = {
        library_id: {
            "images": {"hires": image},
            # one full-resolution "pixel" per µm, so obsm['spatial'] keeps its micrometres
            "scalefactors": {
                "tissue_hires_scalef": 1.0 / um_per_px,
                "spot_diameter_fullres": 55.0,
                "microns_per_pixel": 1.0,
            },
            "metadata": {"source": "simulated H&E (spatial_deconv_gui.simulate.tissue_image)"},
        }
    }
    return spatial


def write_binned_slide(
    path,
    n_bins: int,
    n_genes: int = 2000,
    n_types: int = 10,
    bin_um: float = 8.0,
    umi_median: float = 80.0,
    doublet_fraction: float = 0.4,
    chunk_bins: int = 50_000,
    seed: int = 0,
) -> dict:
    """Write a Visium HD-like slide straight to an ``.h5ad`` at ``path``, ``chunk_bins`` bins at a time.

    Square bins of ``bin_um`` µm on a grid; each bin holds one cell type (a singlet) or two (a doublet, in
    ``doublet_fraction`` of the bins, the second type from a neighbouring domain); types form smooth domains. A
    bin's UMI is log-normal around ``umi_median`` (clipped to 10..1,000: tens to a few hundred), its molecules drawn
    from its types' profiles, which carry a per-gene platform effect against the reference's. Only one chunk of
    counts is ever in memory; ``X`` is CSR int32. The truth is in ``obsm['true_proportions']`` (float32),
    ``obs['true_first_type']`` / ``obs['true_second_type']`` (-1 for singlets). Returns the matching reference
    (an AnnData, ``obs['cell_type']``, 150 cells per type) and the number of stored values, as a dict.
    """
    import h5py
    from anndata.io import write_elem

    rng = np.random.default_rng(seed)
    types = [f"type{k:02d}" for k in range(n_types)]
    genes = np.array([f"Gene{g:05d}" for g in range(n_genes)])
    base = rng.gamma(0.5, 1.0, n_genes) + 0.01
    profiles = base[None, :] * rng.lognormal(0.0, 0.5, (n_types, n_genes))
    for k in range(n_types):
        profiles[k, rng.choice(n_genes, max(1, n_genes // 50), replace=False)] *= 10.0
    profiles /= profiles.sum(axis=1, keepdims=True)
    platform = rng.lognormal(0.0, 0.3, n_genes)
    slide_profiles = profiles * platform
    slide_profiles /= slide_profiles.sum(axis=1, keepdims=True)
    cum_profiles = np.cumsum(slide_profiles, axis=1)

    side = int(np.ceil(np.sqrt(n_bins)))
    coarse = max(4, side // 60)  # ~60 bins (~0.5 mm) per domain feature
    field_grid = rng.standard_normal((n_types, coarse + 3, coarse + 3))

    def domain_types(rows, cols):
        from scipy.ndimage import map_coordinates

        logits = np.stack(
            [
                map_coordinates(field_grid[k], [rows * coarse / side + 1, cols * coarse / side + 1], order=3)
                for k in range(n_types)
            ],
            axis=1,
        )
        order = np.argsort(-logits, axis=1)
        return order[:, 0], order[:, 1]

    path = Path(path)
    nnz = 0
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        x = f.create_group("X")
        x.attrs["encoding-type"] = "csr_matrix"
        x.attrs["encoding-version"] = "0.1.0"
        x.attrs["shape"] = (n_bins, n_genes)
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = np.zeros(n_bins + 1, dtype=np.int64)
        truth = np.zeros((n_bins, n_types), dtype=np.float32)
        first_all = np.zeros(n_bins, dtype=np.int16)
        second_all = np.full(n_bins, -1, dtype=np.int16)
        for lo in range(0, n_bins, chunk_bins):
            hi = min(lo + chunk_bins, n_bins)
            idx = np.arange(lo, hi)
            rows, cols = idx // side, idx % side
            first, second = domain_types(rows.astype(float), cols.astype(float))
            doublet = rng.random(hi - lo) < doublet_fraction
            share = np.where(doublet, rng.uniform(0.3, 0.7, hi - lo), 1.0)
            umi = np.clip(np.rint(rng.lognormal(np.log(umi_median), 0.6, hi - lo)), 10, 1000).astype(np.int64)
            bin_of = np.repeat(np.arange(hi - lo), umi)
            typ = np.where(rng.random(bin_of.size) < share[bin_of], first[bin_of], second[bin_of])
            gene = np.empty(bin_of.size, dtype=np.int64)
            for k in range(n_types):
                m = typ == k
                gene[m] = np.minimum(np.searchsorted(cum_profiles[k], rng.random(int(m.sum()))), n_genes - 1)
            block = sp.csr_matrix((np.ones(bin_of.size, dtype=np.int32), (bin_of, gene)), shape=(hi - lo, n_genes))
            block.sum_duplicates()
            block.sort_indices()
            n_new = block.nnz
            data.resize((nnz + n_new,))
            indices.resize((nnz + n_new,))
            data[nnz:] = block.data.astype(np.int32)
            indices[nnz:] = block.indices.astype(np.int32)
            indptr[lo + 1 : hi + 1] = nnz + block.indptr[1:]
            nnz += n_new
            truth[idx, first] = share
            truth[idx[doublet], second[doublet]] += 1.0 - share[doublet]
            first_all[lo:hi] = first
            second_all[lo:hi] = np.where(doublet, second, -1)
        x.create_dataset("indptr", data=indptr)
        barcodes = np.array([f"s_008um_{i // side:05d}_{i % side:05d}-1" for i in range(n_bins)])
        write_elem(
            f,
            "obs",
            pd.DataFrame({"true_first_type": first_all, "true_second_type": second_all}, index=barcodes),
        )
        write_elem(f, "var", pd.DataFrame(index=genes))
        coords = np.column_stack([np.arange(n_bins) % side, np.arange(n_bins) // side]).astype(np.float64) * bin_um
        write_elem(f, "obsm", {keys.SPATIAL: coords, keys.TRUE_PROPORTIONS: truth})
        write_elem(f, "uns", {"description": f"simulated Visium HD-like slide, {bin_um:g} µm bins"})
        for name in ("varm", "obsp", "varp", "layers"):
            write_elem(f, name, {})

    cells_per_type = 150
    ref_types = np.repeat(np.arange(n_types), cells_per_type)
    ref_umi = rng.integers(1000, 4000, ref_types.size)
    ref_counts = rng.poisson(profiles[ref_types] * ref_umi[:, None]).astype(np.int32)
    reference = ad.AnnData(
        X=sp.csr_matrix(ref_counts),
        obs=pd.DataFrame(
            {keys.CELL_TYPE: pd.Categorical(np.array(types)[ref_types], categories=types)},
            index=[f"cell{i:05d}" for i in range(ref_types.size)],
        ),
        var=pd.DataFrame(index=genes),
    )
    return {"reference": reference, "nnz": int(nnz), "types": types}
