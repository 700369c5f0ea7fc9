"""The bundled simulated slide and its reference, so the plugin works with no files at hand.

The files are generated deterministically by :func:`build_sample`; ``python -m spatial_deconv_gui.sample_data``
rewrites them, and a test checks that the shipped files equal a fresh build.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .. import keys
from ..colors import cell_type_palette
from ..simulate import SimulationConfig, add_tissue_image, simulate_dataset

HERE = Path(__file__).parent
SAMPLE_SPATIAL = HERE / "sample_spatial.h5ad"
SAMPLE_REFERENCE = HERE / "sample_reference.h5ad"
SAMPLE_CONFIG = SimulationConfig(n_spots=1200, n_genes=300, n_types=6, cells_per_type=60, seed=7)


def build_sample() -> tuple[ad.AnnData, ad.AnnData]:
    spatial, reference = simulate_dataset(SAMPLE_CONFIG)
    add_tissue_image(spatial, library_id="sample", seed=SAMPLE_CONFIG.seed)
    types = list(reference.obs[keys.CELL_TYPE].cat.categories)
    palette = cell_type_palette(types)
    reference.uns[keys.CELL_TYPE_COLORS] = np.array([palette[t] for t in types], dtype=object)
    spatial.uns[keys.colors(keys.TRUE_DOMINANT_TYPE)] = np.array(
        [palette[t] for t in spatial.obs[keys.TRUE_DOMINANT_TYPE].cat.categories], dtype=object
    )
    spatial.uns["description"] = (
        "Simulated slide bundled with spatial-deconv-gui: 1200 Visium-like spots, 6 cell types in smooth "
        "spatial domains, negative-binomial counts, a simulated H&E image under the spots (uns['spatial']); the "
        "truth is in obsm['true_proportions']."
    )
    return spatial, reference


def write_sample(folder: Path = HERE) -> tuple[Path, Path]:
    from ..io.write import write_h5ad_atomic

    spatial, reference = build_sample()
    return (
        write_h5ad_atomic(spatial, folder / SAMPLE_SPATIAL.name),
        write_h5ad_atomic(reference, folder / SAMPLE_REFERENCE.name),
    )


def sample_paths() -> tuple[Path, Path]:
    """Paths of the shipped files, rebuilding them if a source checkout lacks them."""
    if not (SAMPLE_SPATIAL.exists() and SAMPLE_REFERENCE.exists()):
        write_sample()
    return SAMPLE_SPATIAL, SAMPLE_REFERENCE


def grn_sample_paths(folder: Path | None = None) -> dict[str, Path]:
    """The simulated tissue with a known GRN and its simulated priors, generated once into the user cache.

    Keys: ``spatial`` (.h5ad), ``grn`` and ``lr`` (CSV priors), ``truth`` (the true modulators, CSV).
    """
    import platformdirs

    from ..engines.perturb.simulate import simulate_grn_tissue, write_simulated_priors
    from ..io.write import write_h5ad_atomic

    folder = Path(folder or platformdirs.user_cache_dir("spatial-deconv-gui")) / "grn_sample_v1"
    paths = {
        "spatial": folder / "grn_tissue.h5ad",
        "grn": folder / "sim_grn_prior.csv",
        "lr": folder / "sim_lr_prior.csv",
        "truth": folder / "sim_true_modulators.csv",
    }
    if not all(p.exists() for p in paths.values()):
        adata = simulate_grn_tissue()
        written = write_simulated_priors(adata, folder)
        sim = adata.uns[keys.PERTURB_SIM]
        adata.uns[keys.PERTURB_SIM] = {k: v for k, v in sim.items() if not isinstance(v, pd.DataFrame)}
        adata.uns["description"] = (
            "Simulated tissue bundled with spatial-deconv-gui: 1500 cells, 60 genes, a known "
            "sparse GRN with ligand signalling; priors in the CSV files beside it."
        )
        write_h5ad_atomic(adata, paths["spatial"])
        assert Path(written["grn_prior"]) == paths["grn"] and Path(written["lr_prior"]) == paths["lr"]
    return paths
