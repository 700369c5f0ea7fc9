"""Slides too large for napari's Points layer are drawn as RGBA images.

Past some tens of thousands of points a Points layer is slow to add and to redraw in software GL
(every marker is a sprite: ~0.35 s a frame at 100k here), while an image of the same spots is one texture
whatever the spot count. Spots sit on a grid whose pitch is the median spot spacing, so regular platforms
(Visium HD bins, Stereo-seq) map one-to-one; for irregular ones (Slide-seq beads, Xenium cells) the pitch is
halved until fewer than 1% of spots share a pixel (:func:`choose_pitch`), and each spot is then drawn as a
square one spacing wide, its own centre pixel painted last so that every spot stays visible. The spot ->
pixel map is kept so that results are painted into the same frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POINTS_LIMIT = 50_000
MAX_COLLISIONS = 0.01
MAX_PIXELS = 16_000_000


@dataclass(frozen=True)
class Raster:
    shape: tuple[int, int]
    pitch: float
    origin_yx: tuple[float, float]
    ij: np.ndarray  # (n, 2) pixel row/col per spot
    footprint: int = 1  # spot drawn as a footprint x footprint square

    @property
    def pixel(self) -> np.ndarray:
        return self.ij[:, 0] * self.shape[1] + self.ij[:, 1]

    @property
    def layer_kwargs(self) -> dict:
        # Pixel centres sit on the spot positions: translate by the origin, scale by the pitch.
        return {"scale": (self.pitch, self.pitch), "translate": self.origin_yx}


def make_raster(coords_yx: np.ndarray, pitch: float, spacing: float | None = None) -> Raster:
    coords_yx = np.asarray(coords_yx, dtype=float)
    origin = coords_yx.min(axis=0)
    ij = np.rint((coords_yx - origin) / pitch).astype(np.int64)
    shape = (int(ij[:, 0].max()) + 1, int(ij[:, 1].max()) + 1)
    footprint = max(1, int(round((spacing or pitch) / pitch)))
    return Raster(shape, float(pitch), (float(origin[0]), float(origin[1])), ij, footprint)


def choose_pitch(coords_yx: np.ndarray, spacing: float) -> float:
    """The largest pitch (spacing, spacing/2, ...) at which under 1% of spots collide on one pixel."""
    coords_yx = np.asarray(coords_yx, dtype=float)
    extent = np.ptp(coords_yx, axis=0) + spacing
    pitch = float(spacing)
    for _ in range(4):
        r = make_raster(coords_yx, pitch)
        if 1.0 - np.unique(r.pixel).size / len(r.pixel) <= MAX_COLLISIONS or np.prod(extent / (pitch / 2)) > MAX_PIXELS:
            break
        pitch /= 2
    return pitch


def to_uint8(rgba: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(rgba, dtype=np.float32) * 255), 0, 255).astype(np.uint8)


def paint(
    raster: Raster, rgba: np.ndarray, image: np.ndarray | None = None, index: np.ndarray | None = None
) -> np.ndarray:
    """uint8 RGBA image (transparent background) with each spot's colour; ``index`` repaints a subset."""
    if image is None:
        image = np.zeros((*raster.shape, 4), dtype=np.uint8)
    colours = to_uint8(rgba)
    ij = raster.ij if index is None else raster.ij[index]
    h, w = raster.shape
    k = raster.footprint
    if k > 1:
        lo = -(k // 2)
        for dy in range(lo, lo + k):
            for dx in range(lo, lo + k):
                if dy == 0 and dx == 0:
                    continue
                y, x = ij[:, 0] + dy, ij[:, 1] + dx
                ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
                image[y[ok], x[ok]] = colours[ok]
    image[ij[:, 0], ij[:, 1]] = colours
    return image


def read_colours(raster: Raster, image: np.ndarray) -> np.ndarray:
    """Each spot's colour as float RGBA, read from its centre pixel."""
    return np.asarray(image)[raster.ij[:, 0], raster.ij[:, 1]].astype(np.float32) / 255.0
