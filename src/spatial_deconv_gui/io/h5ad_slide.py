"""An ``.h5ad`` slide, with the tissue image that scanpy / squidpy keep in ``uns['spatial'][library_id]``."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

from .. import keys
from .read import read_h5ad
from .slide import MICRON, Slide, SlideImage
from .spaceranger import microns_per_pixel


def spatial_library(adata: ad.AnnData) -> tuple[str | None, dict, list[str]]:
    """The library of ``uns['spatial']`` that the spots belong to, its entry, and notices for the user."""
    libraries = adata.uns.get(keys.SPATIAL_LIBRARIES)
    if not isinstance(libraries, dict) or not libraries:
        return None, {}, []
    names = [k for k, v in libraries.items() if isinstance(v, dict)]
    if not names:
        return None, {}, []
    notices = []
    if len(names) > 1:
        # squidpy marks each spot's library in obs['library_id']; with one library in the obs, use it.
        ids = adata.obs["library_id"].astype(str).unique() if "library_id" in adata.obs else []
        chosen = ids[0] if len(ids) == 1 and ids[0] in names else names[0]
        notices.append(
            f"uns['spatial'] holds {len(names)} libraries ({', '.join(names)}); showing the image of {chosen}."
        )
    else:
        chosen = names[0]
    return chosen, libraries[chosen], notices


def slide_from_adata(adata: ad.AnnData, path: Path | None, images: bool = True) -> Slide:
    library_id, library, notices = spatial_library(adata)
    scalefactors = dict(library.get("scalefactors", {})) if library else {}
    um = microns_per_pixel(scalefactors) if scalefactors else None
    world = um if um else 1.0
    diameter = scalefactors.get("spot_diameter_fullres")
    shown = []
    if images and library:
        stored = library.get("images", {}) or {}
        for res in ("hires", "lowres"):
            factor = scalefactors.get(f"tissue_{res}_scalef")
            if res in stored and factor:
                image = np.asarray(stored[res])
                if image.dtype.kind == "f" and image.max() <= 1.0:  # scanpy stores some images as floats in [0, 1]
                    image = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
                shown.append(SlideImage(name=res, levels=[image], scale=world / float(factor), rgb=image.ndim == 3))
                break
    return Slide(
        adata=adata,
        format="h5ad",
        path=path,
        library_id=library_id,
        images=shown,
        world_per_coord=world,
        unit=MICRON if um else "",
        spot_diameter=float(diameter) * world if diameter else None,
        notices=notices,
    )


def read_h5ad_slide(path, images: bool = True) -> Slide:
    path = Path(path)
    return slide_from_adata(read_h5ad(path), path, images=images)
