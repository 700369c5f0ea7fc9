"""One entry point for every slide format: :func:`read_slide` returns the counts and the images under them.

Coordinates, in one place:

* ``adata.obsm['spatial']`` holds (x, y) per spot in the format's own frame, as scanpy / squidpy store it
  (Visium: full-resolution image pixels; Xenium: µm), so a saved result stays readable by those tools.
* The *world* frame, shared by every napari layer of a slide, is ``coords * slide.world_per_coord``, in
  ``slide.unit`` (µm whenever the format gives the pixel size, else the file's own unit).
* Each :class:`SlideImage` maps its pixel (row, col) to world (y, x) by ``translate + index * scale``: the
  centre of pixel (0, 0) sits at ``translate``, as in napari's image layers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from .. import keys
from .errors import InputError

FORMATS = ("h5ad", "visium", "visium_hd", "xenium", "spatialdata")
MICRON = "µm"
VISIUM_SPOT_UM = 55.0
# Images larger than this on a side open as a lazy pyramid instead of one array in memory.
LAZY_IMAGE_PX = 8192


@dataclass
class SlideImage:
    """A tissue image in world coordinates; ``levels`` is a pyramid, largest first (one level for a PNG)."""

    name: str
    levels: list[Any]  # numpy / zarr / dask arrays, (y, x) or (y, x, c) or (c, y, x) with channel_axis
    scale: float = 1.0  # world units per level-0 pixel
    translate: tuple[float, float] = (0.0, 0.0)  # world (y, x) of the centre of level-0 pixel (0, 0)
    rgb: bool = True
    channel_axis: int | None = None  # for multichannel stains (Xenium morphology focus)
    channel_names: list[str] | None = None
    contrast_limits: tuple[float, float] | list[tuple[float, float]] | None = (
        None  # a pair per channel with channel_axis
    )

    @property
    def multiscale(self) -> bool:
        return len(self.levels) > 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.levels[0].shape)

    @property
    def yx_shape(self) -> tuple[int, int]:
        """Rows and columns of level 0, whichever axis holds the channels."""
        shape = [n for a, n in enumerate(self.shape) if a != self.channel_axis]
        return shape[0], shape[1]

    def display_levels(self) -> list[Any]:
        """The pyramid napari draws: a single level above :data:`LAZY_IMAGE_PX` on a side gets lazy halvings
        (strided views, nothing read), so the canvas never asks for the whole image at once."""
        axes = [a for a in range(self.levels[0].ndim) if a != self.channel_axis][:2]
        if self.multiscale or max(self.levels[0].shape[a] for a in axes) <= LAZY_IMAGE_PX:
            return list(self.levels)
        import dask.array as da

        base = self.levels[0]
        levels = [base if isinstance(base, da.Array) else da.from_array(base, chunks="auto")]
        halve = tuple(slice(None, None, 2) if a in axes else slice(None) for a in range(base.ndim))
        while max(levels[-1].shape[a] for a in axes) > 1024:
            levels.append(levels[-1][halve])
        return levels

    def layer_kwargs(self) -> dict:
        """Keyword arguments for ``viewer.add_image`` (data included)."""
        levels = self.display_levels()
        kwargs: dict[str, Any] = {
            "data": levels if len(levels) > 1 else levels[0],
            "multiscale": len(levels) > 1,
            "scale": (self.scale, self.scale),
            "translate": tuple(float(t) for t in self.translate),
            "name": self.name,
        }
        if self.channel_axis is not None:
            kwargs["channel_axis"] = self.channel_axis
            if self.channel_names:
                kwargs["name"] = [f"{self.name}: {c}" for c in self.channel_names]
        else:
            kwargs["rgb"] = self.rgb
        if self.contrast_limits is not None:
            kwargs["contrast_limits"] = self.contrast_limits
        return kwargs


@dataclass
class Slide:
    """A slide as read from disk: counts (``adata``), where the spots are, and the tissue under them."""

    adata: ad.AnnData
    format: str
    path: Path | None = None
    library_id: str | None = None
    images: list[SlideImage] = field(default_factory=list)
    world_per_coord: float = 1.0  # world units per unit of obsm['spatial']
    unit: str = ""  # "" when the file does not say
    spot_diameter: float | None = None  # world units; None = derive from the spacing of the spots
    boundaries: list[np.ndarray] | None = None  # cell outlines, world (y, x) vertices each
    notices: list[str] = field(default_factory=list)  # what the user should know (e.g. an unreadable image)
    table: str | None = None  # SpatialData: the table the slide came from
    region: str | None = None  # SpatialData: the shapes / points element the table annotates

    def world_yx(self, coords: np.ndarray | None = None) -> np.ndarray:
        """Spot positions in world (y, x) order, napari's."""
        if coords is None:
            coords = np.asarray(self.adata.obsm[keys.SPATIAL], dtype=float)
        coords = np.asarray(coords, dtype=float)[:, :2]
        return coords[:, ::-1] * self.world_per_coord

    def description(self) -> str:
        parts = [f"{self.format}", f"{self.adata.n_obs:,} spots x {self.adata.n_vars:,} genes"]
        if self.images:
            parts.append("images: " + ", ".join(f"{im.name} {'x'.join(map(str, im.yx_shape))}" for im in self.images))
        else:
            parts.append("no image")
        parts.append(f"unit {self.unit}")
        return "; ".join(parts)


def detect_format(path: str | os.PathLike) -> str | None:
    """The slide format at ``path`` (a file or a folder), or None when nothing here is a slide we know."""
    from . import sdata, spaceranger, xenium

    path = Path(path)
    if path.is_file():
        if path.suffix == ".h5ad":
            return "h5ad"
        if path.name == "experiment.xenium":
            return "xenium"
        return None
    if not path.is_dir():
        return None
    if sdata.looks_like_spatialdata(path):
        return "spatialdata"
    if xenium.looks_like_xenium(path):
        return "xenium"
    if spaceranger.looks_like_visium_hd(path):
        return "visium_hd"
    if spaceranger.looks_like_visium(path):
        return "visium"
    return None


def read_slide(
    path: str | os.PathLike | ad.AnnData,
    *,
    table: str | None = None,
    bin_size: int = 8,
    images: bool = True,
    boundaries: bool = False,
) -> Slide:
    """Read a slide from a Space Ranger ``outs/`` (Visium, Visium HD), a Xenium bundle, a SpatialData
    ``.zarr`` or an ``.h5ad`` (with scanpy's ``uns['spatial']`` images when present).

    ``table`` picks the SpatialData table when there are several; ``bin_size`` the Visium HD bin (µm) when
    ``path`` is an ``outs/`` folder; ``images=False`` skips the tissue images; ``boundaries=True`` reads Xenium
    cell outlines. Every problem is one :class:`InputError` naming what is missing and what was looked for.
    """
    if isinstance(path, ad.AnnData):
        from .h5ad_slide import slide_from_adata

        return slide_from_adata(path, None, images=images)
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist.", "check the path.", code="missing_file")
    fmt = detect_format(path)
    if fmt is None:
        raise InputError(
            f"{path} is not a slide this tool reads.",
            "open an .h5ad, a Space Ranger outs/ folder (Visium or Visium HD, or one binned_outputs/square_NNNum/ "
            "folder), a Xenium output bundle, or a SpatialData .zarr.",
            code="unknown_format" if path.is_dir() else "not_h5ad",
        )
    if fmt == "h5ad":
        from .h5ad_slide import read_h5ad_slide

        return read_h5ad_slide(path, images=images)
    if fmt == "visium":
        from .spaceranger import read_visium

        return read_visium(path, images=images)
    if fmt == "visium_hd":
        from .spaceranger import read_visium_hd

        return read_visium_hd(path, bin_size=bin_size, images=images)
    if fmt == "xenium":
        from .xenium import read_xenium

        return read_xenium(path, images=images, boundaries=boundaries)
    from .sdata import read_spatialdata

    return read_spatialdata(path, table=table, images=images)


def read_slide_adata(path, **options) -> ad.AnnData:
    """Only the counts and coordinates of a slide, for jobs that need no image."""
    if isinstance(path, ad.AnnData):
        return path
    return read_slide(path, images=False, **options).adata
