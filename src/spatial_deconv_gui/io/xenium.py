"""10x Genomics Xenium output bundles: counts per cell, cell centroids (µm), the morphology image and cell outlines.

A bundle is the folder Xenium Onboard Analysis (or Xenium Ranger) writes per region. What is read from it:

* ``cell_feature_matrix.h5`` (or the ``cell_feature_matrix/`` MEX folder): counts; only "Gene Expression"
  features, the negative-control probes and codewords are dropped.
* ``cells.parquet`` (or ``cells.csv.gz``): one row per cell, ``x_centroid`` / ``y_centroid`` in µm.
* ``experiment.xenium``: a JSON manifest; its ``pixel_size`` is µm per morphology-image pixel.
* ``morphology_focus/morphology_focus_NNNN.ome.tif`` (XOA 2.x-3.x, one file per stain),
  ``morphology_focus/chNNNN_<stain>.ome.tif`` (XOA 4) or ``morphology_focus.ome.tif`` / ``morphology_mip.ome.tif``
  (1.x): OME-TIFF pyramids, opened lazily.
* ``cell_boundaries.parquet``: polygon vertices in µm, on request.

Coordinates: the cell table's µm are the world frame (``world_per_coord = 1``). The image's pixel grid starts at the
world origin with pixel (0, 0) covering [0, pixel_size) µm, the convention 10x's alignment notes and spatialdata-io
(which maps µm / pixel_size straight onto its corner-origin pixel grid) follow; napari puts pixel centres at
``translate + index * scale``, so the images carry a half-pixel ``translate``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import keys
from .errors import InputError
from .slide import MICRON, Slide, SlideImage

SPECS_FILE = "experiment.xenium"
MATRIX_H5 = "cell_feature_matrix.h5"
MATRIX_MEX = "cell_feature_matrix"
CELLS_FILES = ("cells.parquet", "cells.csv.gz")
BOUNDARIES_FILE = "cell_boundaries.parquet"
FOCUS_DIR = "morphology_focus"
FOCUS_CHANNEL_FILE = "morphology_focus_{:04d}.ome.tif"
LEGACY_IMAGE_FILES = ("morphology_focus.ome.tif", "morphology_mip.ome.tif")
CELL_ID, CELL_X, CELL_Y = "cell_id", "x_centroid", "y_centroid"

# The pixel size of every Xenium instrument so far; used when experiment.xenium is absent or lacks it.
DEFAULT_PIXEL_SIZE_UM = 0.2125
FALLBACK_CELL_DIAMETER_UM = 10.0
# XOA 2.x names no stains in its four focus files' file names; these are the multimodal segmentation kit's stains.
FOCUS_STAINS = ("DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin")
# Contrast limits come from the smallest pyramid level; a single-level image is sampled in a window this big.
CONTRAST_SAMPLE_PX = 2048
CONTRAST_PERCENTILES = (1.0, 99.5)


def looks_like_xenium(path: Path) -> bool:
    """Whether ``path`` is a Xenium bundle folder (or its ``experiment.xenium``); looks at file names only."""
    path = Path(path)
    if path.is_file():
        return path.name == SPECS_FILE
    if not path.is_dir():
        return False
    if (path / SPECS_FILE).is_file():
        return True
    has_matrix = (path / MATRIX_H5).is_file() or (path / MATRIX_MEX).is_dir()
    return has_matrix and any((path / name).is_file() for name in CELLS_FILES)


def read_xenium(path: str | os.PathLike, images: bool = True, boundaries: bool = False) -> Slide:
    """Read a Xenium bundle (the folder, or its ``experiment.xenium``) as a :class:`Slide` in µm.

    ``obsm['spatial']`` holds the cell centroids (x, y) in µm and ``obs`` the cell table's other columns (transcript
    counts, cell and nucleus areas, ...). ``images=False`` skips the morphology image; ``boundaries=True`` adds the cell
    outlines, in ``obs_names`` order. A missing or unreadable image or outline file is a notice, not an error.
    """
    folder = _bundle_folder(Path(path))
    notices: list[str] = []
    specs = _read_specs(folder, notices)
    adata = _read_matrix(folder)
    cells_file = _find_cells_file(folder)
    adata = _attach_cells(adata, _read_cells_table(cells_file), cells_file.name, _matrix_name(folder), notices)
    pixel_size = specs.get("pixel_size")
    pixel_size_known = isinstance(pixel_size, (int, float)) and pixel_size > 0
    pixel_size = float(pixel_size) if pixel_size_known else DEFAULT_PIXEL_SIZE_UM
    adata.uns["xenium"] = {"pixel_size": pixel_size, "analysis_sw_version": str(specs.get("analysis_sw_version", ""))}
    slide = Slide(
        adata=adata,
        format="xenium",
        path=folder,
        library_id=str(specs.get("region_name") or folder.name),
        world_per_coord=1.0,
        unit=MICRON,
        spot_diameter=_median_cell_diameter(adata.obs),
        notices=notices,
    )
    if images:
        slide.images = _read_morphology(folder, pixel_size, notices)
        if slide.images and not pixel_size_known:
            # Only the image depends on the pixel size; a bundle without one needs no word about it.
            notices.append(
                f"{SPECS_FILE} gives no pixel_size; the morphology image is placed at the Xenium "
                f"default of {DEFAULT_PIXEL_SIZE_UM} µm per pixel."
            )
    if boundaries:
        slide.boundaries = _read_boundaries(folder, adata.obs_names, notices)
    return slide


# --- counts and cells -------------------------------------------------------------------------------------------------


def _bundle_folder(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"{path} does not exist.", "check the path.", code="missing_file")
    if path.is_file():
        if path.name != SPECS_FILE:
            raise InputError(
                f"{path.name} is not a Xenium bundle.",
                f"open the Xenium output folder, or the {SPECS_FILE} file inside it.",
                code="unknown_format",
            )
        return path.parent
    return path


def _read_specs(folder: Path, notices: list[str]) -> dict[str, Any]:
    specs_path = folder / SPECS_FILE
    if not specs_path.is_file():
        return {}
    try:
        specs = json.loads(specs_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notices.append(f"{SPECS_FILE} could not be read ({exc}); its settings (the pixel size) fall back to defaults.")
        return {}
    return specs if isinstance(specs, dict) else {}


def _matrix_name(folder: Path) -> str:
    return MATRIX_H5 if (folder / MATRIX_H5).is_file() else f"{MATRIX_MEX}/"


def _read_matrix(folder: Path):
    from . import tenx

    if (folder / MATRIX_H5).is_file():
        return tenx.read_10x_h5(folder / MATRIX_H5)
    if (folder / MATRIX_MEX).is_dir():
        return tenx.read_10x_mex(folder / MATRIX_MEX)
    raise InputError(
        f"{folder} holds no cell-feature matrix: looked for {MATRIX_H5} and the {MATRIX_MEX}/ MEX folder.",
        f"open the Xenium output folder itself (the one holding {SPECS_FILE}), with its {MATRIX_H5}.",
        code="missing_matrix",
    )


def _find_cells_file(folder: Path) -> Path:
    for name in CELLS_FILES:
        if (folder / name).is_file():
            return folder / name
    raise InputError(
        f"{folder} holds no cells table: looked for {' and '.join(CELLS_FILES)}.",
        "copy the Xenium output folder whole; the cell centroids live in cells.parquet.",
        code="missing_positions",
    )


def _decoded(column: pd.Series) -> pd.Series:
    """Strings for a column that some XOA versions store as bytes."""
    if column.dtype == object and len(column) and isinstance(column.iloc[0], bytes):
        return column.str.decode("utf-8")
    return column


def _read_cells_table(path: Path) -> pd.DataFrame:
    try:
        if path.suffix == ".parquet":
            cells = pd.read_parquet(path)
        else:  # round_trip: the default fast float parser can be an ulp off what was written
            cells = pd.read_csv(path, dtype={CELL_ID: str}, float_precision="round_trip")
    except Exception as exc:  # pyarrow, gzip and the csv parser each raise their own kinds
        raise InputError(
            f"{path.name} could not be read ({type(exc).__name__}: {exc}).",
            "copy the file again from the Xenium output folder.",
            code="bad_positions",
        ) from exc
    missing = [c for c in (CELL_ID, CELL_X, CELL_Y) if c not in cells.columns]
    if missing:
        present = ", ".join(map(str, cells.columns[:8])) + (", ..." if len(cells.columns) > 8 else "")
        raise InputError(
            f"{path.name} lacks the column(s) {', '.join(missing)} (it has {present}).",
            "use the cells table Xenium wrote, with cell_id, x_centroid and y_centroid in µm.",
            code="bad_positions",
        )
    for column in cells.select_dtypes(include=object).columns:
        cells[column] = _decoded(cells[column])
    cells[CELL_ID] = cells[CELL_ID].astype(str)
    return cells


def _attach_cells(adata, cells: pd.DataFrame, cells_name: str, matrix_name: str, notices: list[str]):
    table_ids = pd.Index(cells[CELL_ID].to_numpy(), dtype=str)
    matrix_ids = adata.obs_names
    if not table_ids.is_unique:
        duplicated = table_ids[table_ids.duplicated()]
        raise InputError(
            f"{cells_name} lists {duplicated.size:,} cell ids more than once (e.g. {duplicated[0]!r}).",
            "use the cells table Xenium wrote for this run.",
            code="bad_positions",
        )
    if len(table_ids) == len(matrix_ids) and np.array_equal(table_ids.to_numpy(), matrix_ids.to_numpy()):
        rows = None  # the usual case: same cells, same order
    else:
        rows = table_ids.get_indexer(matrix_ids)
        unmatched = rows < 0
        if unmatched.any():
            raise InputError(
                f"{matrix_name} and {cells_name} list different cells: the matrix has {len(matrix_ids):,} cells, the "
                f"table {len(table_ids):,}, and {int(unmatched.sum()):,} matrix cells are not in the table "
                f"(e.g. {matrix_ids[np.flatnonzero(unmatched)[0]]!r}; the table's first id is {table_ids[0]!r}).",
                "use the matrix and the cells table of one run (Xenium Ranger re-segmentation rewrites both).",
                code="mismatched_cells",
            )
        if len(table_ids) > len(matrix_ids):
            notices.append(
                f"{cells_name} lists {len(table_ids) - len(matrix_ids):,} cells that {matrix_name} has no "
                f"counts for; they are left out."
            )
        cells = cells.iloc[rows]
    adata.obsm[keys.SPATIAL] = cells[[CELL_X, CELL_Y]].to_numpy(dtype=np.float64)
    obs = cells.drop(columns=[CELL_ID, CELL_X, CELL_Y])
    obs.index = pd.Index(matrix_ids, name=None)
    adata.obs = obs
    return adata


def _median_cell_diameter(obs: pd.DataFrame) -> float:
    if "cell_area" in obs.columns:
        areas = pd.to_numeric(obs["cell_area"], errors="coerce").to_numpy(dtype=float)
        areas = areas[np.isfinite(areas) & (areas > 0)]
        if areas.size:
            return float(np.median(2.0 * np.sqrt(areas / np.pi)))
    return FALLBACK_CELL_DIAMETER_UM


# --- the morphology image ---------------------------------------------------------------------------------------------


def _morphology_files(folder: Path) -> list[Path]:
    """The channel files of the morphology image, in channel order; [] when the bundle has none."""
    focus_dir = folder / FOCUS_DIR
    if focus_dir.is_dir():
        visible = sorted(p for p in focus_dir.glob("*.ome.tif") if not p.name.startswith("._"))
        numbered = [p for p in visible if re.fullmatch(r"morphology_focus_\d{4}\.ome\.tif", p.name)]
        named = [p for p in visible if re.fullmatch(r"ch\d{4}_.+\.ome\.tif", p.name)]
        if numbered or named:
            return numbered or named
    return [folder / name for name in LEGACY_IMAGE_FILES if (folder / name).is_file()][:1]


def _ome_channel_names(description: str | None) -> list[str]:
    if not description or "<OME" not in description[:2000]:
        return []
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(description)
    except ET.ParseError:
        return []
    return [el.get("Name", "") for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Channel"]


def _open_pyramid(path: Path) -> tuple[list[Any], str, list[str]]:
    """The levels (lazy zarr arrays, largest first), the axes and the OME channel names of one OME-TIFF.

    Each of XOA 2.x's focus files carries OME-XML describing all stains across the files; reading those as plain
    TIFFs keeps every file to its own pixels, so a missing or damaged sibling costs one channel, not the image.
    """
    import tifffile
    import zarr

    tiff = tifffile.TiffFile(path, **({"is_ome": False} if path.parent.name == FOCUS_DIR else {}))
    try:
        series = tiff.series[0]
        axes = series.axes
        names = _ome_channel_names(tiff.pages.first.description)
        node = zarr.open(series.aszarr(), mode="r")
        if isinstance(node, zarr.Group):
            levels = [node[key] for key in sorted(node.array_keys(), key=int)]
        else:
            levels = [node]
        # Open reads only the file's directory; decoding one tile here catches a truncated file or a codec that
        # is not installed (XOA compresses with JPEG 2000, which tifffile decodes through imagecodecs).
        probe = levels[0]
        probe[(slice(0, 1),) * probe.ndim]
    except BaseException:
        tiff.close()
        raise
    return levels, axes, names


def _contrast_limits(level) -> tuple[float, float]:
    starts = [max(0, (n - CONTRAST_SAMPLE_PX) // 2) for n in level.shape]
    window = tuple(slice(start, start + CONTRAST_SAMPLE_PX) for start in starts)
    sample = np.asarray(level[window], dtype=np.float64)
    lo, hi = (float(v) for v in np.percentile(sample, CONTRAST_PERCENTILES))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _channel_name(index: int, path: Path, ome_names: list[str]) -> str:
    """The name of stain ``index`` of a focus set: from the file's OME-XML, its file name, or XOA 2.x's order."""
    if len(ome_names) > index and len(ome_names) > 1 and ome_names[index]:
        return ome_names[index]  # XOA: each file lists every stain of the set
    if len(ome_names) == 1 and ome_names[0]:
        return ome_names[0]
    stain = re.fullmatch(r"ch\d{4}_(.+)\.ome\.tif", path.name)
    if stain:
        return stain.group(1)
    return FOCUS_STAINS[index] if index < len(FOCUS_STAINS) else f"channel {index}"


def _unreadable(path: Path, folder: Path, exc: BaseException) -> str:
    message = f"{path.relative_to(folder)} could not be read ({type(exc).__name__}: {exc})"
    if "imagecodecs" in str(exc):
        message += "; Xenium compresses its images with JPEG 2000: pip install imagecodecs"
    return message


def _read_morphology(folder: Path, pixel_size: float, notices: list[str]) -> list[SlideImage]:
    files = _morphology_files(folder)
    if not files:
        notices.append(
            f"{folder.name} has no morphology image (looked for {FOCUS_DIR}/{FOCUS_CHANNEL_FILE.format(0)}, "
            f"{' and '.join(LEGACY_IMAGE_FILES)}); the slide opens without one."
        )
        return []
    try:
        import tifffile  # noqa: F401
        import zarr  # noqa: F401
    except ImportError as exc:
        notices.append(
            f"the morphology image needs {exc.name}: pip install 'spatial-deconv-gui[spatial]'; the slide "
            f"opens without it."
        )
        return []
    several = len(files) > 1
    opened: list[tuple[Path, list[Any], str, list[str]]] = []
    for path in files:
        try:
            opened.append((path, *_open_pyramid(path)))
        except Exception as exc:  # tifffile and the codecs raise many kinds; any of them means "no picture"
            notices.append(
                _unreadable(path, folder, exc)
                + ("; that channel is left out." if several else "; the slide opens without an image.")
            )
    if not opened:
        return []
    translate = (pixel_size / 2.0, pixel_size / 2.0)  # centre of pixel (0, 0); see the module docstring
    if not several:
        path, levels, axes, names = opened[0]
        try:
            return [_single_file_image(path, levels, axes, names, pixel_size, translate)]
        except Exception as exc:
            notices.append(_unreadable(path, folder, exc) + "; the slide opens without an image.")
            return []
    return _multi_file_image(folder, opened, pixel_size, translate, notices)


def _single_file_image(path, levels, axes, names, pixel_size, translate) -> SlideImage:
    axes = axes.upper()
    if axes == "YX":
        return SlideImage(
            name="morphology",
            levels=levels,
            scale=pixel_size,
            translate=translate,
            rgb=False,
            contrast_limits=_contrast_limits(levels[-1]),
        )
    if axes in ("YXS", "CYX"):
        # An RGB picture (YXS, e.g. a post-Xenium H&E) or several stains in one file (CYX).
        rgb = axes == "YXS"
        n_channels = levels[0].shape[0]
        limits = None if rgb else [_contrast_limits(levels[-1][c]) for c in range(n_channels)]
        channel_names = (
            None if rgb else [names[c] if c < len(names) and names[c] else f"channel {c}" for c in range(n_channels)]
        )
        return SlideImage(
            name="morphology",
            levels=levels,
            scale=pixel_size,
            translate=translate,
            rgb=rgb,
            channel_axis=None if rgb else 0,
            channel_names=channel_names,
            contrast_limits=limits,
        )
    raise ValueError(f"axes {axes!r}; a 2-D image (YX, CYX or YXS) was expected")


def _multi_file_image(folder, opened, pixel_size, translate, notices) -> list[SlideImage]:
    first_path, first_levels, _, _ = opened[0]
    channels = []
    for path, levels, axes, names in opened:
        if axes.upper() != "YX" or levels[0].shape != first_levels[0].shape:
            notices.append(
                f"{path.relative_to(folder)} is {'x'.join(map(str, levels[0].shape))} ({axes}), not "
                f"{'x'.join(map(str, first_levels[0].shape))} like {first_path.name}; that channel is "
                "left out."
            )
            continue
        try:
            limits = _contrast_limits(levels[-1])
        except Exception as exc:
            notices.append(_unreadable(path, folder, exc) + "; that channel is left out.")
            continue
        channel_index = int(re.search(r"(\d{4})", path.name).group(1))
        channels.append((levels, limits, _channel_name(channel_index, path, names)))
    if not channels:
        return []
    try:
        import dask.array as da
    except ImportError:
        if len(channels) > 1:
            notices.append(
                "showing the first morphology stain only: stacking several needs dask "
                "(pip install 'spatial-deconv-gui[spatial]')."
            )
        da = None
    if len(channels) == 1 or da is None:
        levels, limits, name = channels[0]
        return [
            SlideImage(
                name=f"morphology {name}",
                levels=levels,
                scale=pixel_size,
                translate=translate,
                rgb=False,
                contrast_limits=limits,
            )
        ]
    n_levels = min(len(levels) for levels, _, _ in channels)
    stacked = [
        da.stack([da.from_array(levels[k], chunks=levels[k].chunks, inline_array=True) for levels, _, _ in channels])
        for k in range(n_levels)
    ]
    return [
        SlideImage(
            name="morphology",
            levels=stacked,
            scale=pixel_size,
            translate=translate,
            rgb=False,
            channel_axis=0,
            channel_names=[name for _, _, name in channels],
            contrast_limits=[limits for _, limits, _ in channels],
        )
    ]


# --- cell outlines ----------------------------------------------------------------------------------------------------


def _read_boundaries(folder: Path, obs_names: pd.Index, notices: list[str]) -> list[np.ndarray] | None:
    path = folder / BOUNDARIES_FILE
    if not path.is_file():
        notices.append(f"{folder.name} has no {BOUNDARIES_FILE}; cells are shown as circles.")
        return None
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[CELL_ID, "vertex_x", "vertex_y"])
    except Exception as exc:  # a damaged file or missing columns: both arrow errors of several kinds
        notices.append(
            f"{BOUNDARIES_FILE} could not be read ({type(exc).__name__}: {exc}); cells are shown as circles."
        )
        return None
    # Vertices of one cell are contiguous; encode the ids once (100k uniques, millions of rows) and map the uniques.
    encoded = pc.dictionary_encode(table.column(CELL_ID)).combine_chunks()
    unique_ids = pd.Series(encoded.dictionary.to_pandas())
    unique_ids = _decoded(unique_ids).astype(str)
    position_of_unique = pd.Index(obs_names).get_indexer(unique_ids.to_numpy())
    row_cell = position_of_unique[encoded.indices.to_numpy(zero_copy_only=False)]
    yx = np.column_stack([table.column("vertex_y").to_numpy(), table.column("vertex_x").to_numpy()]).astype(np.float64)
    keep = row_cell >= 0
    row_cell, yx = row_cell[keep], yx[keep]
    if row_cell.size > 1 and (np.diff(row_cell) < 0).any():
        order = np.argsort(row_cell, kind="stable")  # stable: keeps each polygon's vertex order
        row_cell, yx = row_cell[order], yx[order]
    if row_cell.size:
        # Xenium closes each polygon by repeating its first vertex; napari closes polygons itself.
        starts = np.flatnonzero(np.r_[True, row_cell[1:] != row_cell[:-1]])
        ends = np.r_[starts[1:], row_cell.size] - 1
        closing = ends[(ends > starts) & np.all(yx[ends] == yx[starts], axis=1)]
        if closing.size:
            retained = np.ones(row_cell.size, dtype=bool)
            retained[closing] = False
            row_cell, yx = row_cell[retained], yx[retained]
    vertices_per_cell = np.bincount(row_cell, minlength=len(obs_names))
    missing = int((vertices_per_cell == 0).sum())
    if missing:
        notices.append(f"{missing:,} cells have no outline in {BOUNDARIES_FILE}.")
    return np.split(yx, np.cumsum(vertices_per_cell)[:-1])


# --- a small bundle writer, for fixtures and examples -----------------------------------------------------------------


@contextlib.contextmanager
def _atomic(path: Path):
    """Yield a temporary sibling of ``path`` and move it into place only when the block succeeds."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _pyramid(image: np.ndarray, smallest_px: int = 256) -> list[np.ndarray]:
    levels = [image]
    while max(levels[-1].shape[-2:]) > smallest_px:
        levels.append(levels[-1][..., ::2, ::2])
    return levels


def _write_ome_pyramid(path: Path, image: np.ndarray, pixel_size: float, description: str | None = None) -> None:
    import tifffile

    levels = _pyramid(image)
    # Compressed as XOA's are (it uses JPEG 2000, which needs imagecodecs); zlib level 1 keeps fixtures quick to write.
    options = {"tile": (256, 256), "compression": "zlib", "compressionargs": {"level": 1}}
    with _atomic(path) as partial, tifffile.TiffWriter(partial, bigtiff=True, ome=description is None) as tif:
        if description is None:
            tif.write(
                levels[0],
                subifds=len(levels) - 1,
                metadata={"axes": "YX", "PhysicalSizeX": pixel_size, "PhysicalSizeY": pixel_size},
                **options,
            )
        else:
            tif.write(levels[0], subifds=len(levels) - 1, description=description, metadata=None, **options)
        for level in levels[1:]:
            tif.write(np.ascontiguousarray(level), subfiletype=1, **options)


def _multi_file_ome_xml(
    index: int, names: list[str], uuids: list[str], shape: tuple[int, int], pixel_size: float
) -> str:
    """OME-XML for channel file ``index`` of a set: like XOA's, every file describes every stain and where it lives."""
    from xml.sax.saxutils import quoteattr

    channels = "".join(
        f'<Channel ID="Channel:{c}" SamplesPerPixel="1" Name={quoteattr(FOCUS_STAINS[c % 4])}/>'
        for c in range(len(names))
    )
    tiff_data = "".join(
        f'<TiffData FirstC="{c}" FirstT="0" FirstZ="0" IFD="0" PlaneCount="1">'
        f'<UUID FileName="{name}">{uuids[c]}</UUID></TiffData>'
        for c, name in enumerate(names)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" UUID="{uuids[index]}">'
        '<Image ID="Image:0" Name="morphology_focus"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint16" '
        f'SizeX="{shape[1]}" SizeY="{shape[0]}" SizeC="{len(names)}" SizeZ="1" SizeT="1" '
        f'PhysicalSizeX="{pixel_size}" PhysicalSizeY="{pixel_size}">{channels}{tiff_data}</Pixels></Image></OME>'
    )


def write_xenium_bundle(
    adata,
    folder: str | os.PathLike,
    pixel_size: float = DEFAULT_PIXEL_SIZE_UM,
    image: np.ndarray | None = None,
    layout: str = "2.0",
    cells_format: str = "parquet",
    matrix_format: str = "h5",
) -> Path:
    """Write a small Xenium-like bundle from ``adata`` (integer counts in X, centroids (x, y) in µm in
    ``obsm['spatial']``; optional ``obs['cell_area']`` in µm²) and return the folder.

    Adds two negative-control probes and a negative-control codeword to the matrix, as Xenium does, and a closed
    hexagon per cell of the cell's area to ``cell_boundaries.parquet``. ``image``: a 2-D uint16 morphology image (or
    (c, y, x) stains, layout "2.0" only) written as a tiled OME-TIFF pyramid; ``layout`` "2.0" puts it in
    ``morphology_focus/morphology_focus_NNNN.ome.tif``, "1.0" in ``morphology_focus.ome.tif``. ``cells_format``:
    "parquet" or "csv.gz"; ``matrix_format``: "h5" or "mex".
    """
    import scipy.sparse as sp

    from . import tenx

    if layout not in ("1.0", "2.0") or cells_format not in ("parquet", "csv.gz") or matrix_format not in ("h5", "mex"):
        raise ValueError(
            f"layout {layout!r}, cells_format {cells_format!r}, matrix_format {matrix_format!r}: use "
            "layout '1.0' or '2.0', cells_format 'parquet' or 'csv.gz', matrix_format 'h5' or 'mex'"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = sp.csr_matrix(adata.X)
    if counts.nnz and not np.array_equal(counts.data, np.round(counts.data)):
        raise ValueError("adata.X must hold integer counts")
    counts = counts.astype(np.int32)
    n_cells, n_genes = counts.shape
    cell_ids = np.asarray(adata.obs_names, dtype=str)
    xy = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64)[:, :2]
    rng = np.random.default_rng(0)

    control_names = ["NegControlProbe_00042", "NegControlProbe_00062", "NegControlCodeword_0500"]
    control_types = ["Negative Control Probe", "Negative Control Probe", "Negative Control Codeword"]
    controls = sp.csr_matrix(rng.poisson(0.05, size=(n_cells, len(control_names))).astype(np.int32))
    matrix = sp.hstack([counts, controls], format="csr")
    gene_names = list(map(str, adata.var_names))
    gene_ids = list(map(str, adata.var["gene_ids"])) if "gene_ids" in adata.var else gene_names
    feature_ids, feature_names = gene_ids + control_names, gene_names + control_names
    feature_types = [tenx.GENE_EXPRESSION] * n_genes + control_types
    if matrix_format == "h5":
        with _atomic(folder / MATRIX_H5) as partial:
            tenx.write_10x_h5(partial, matrix, cell_ids, feature_ids, feature_names, feature_types)
    else:
        import scipy.io

        mex = folder / MATRIX_MEX
        mex.mkdir(exist_ok=True)
        with _atomic(mex / "matrix.mtx.gz") as partial, gzip.open(partial, "wb") as fh:
            scipy.io.mmwrite(fh, matrix.T.tocoo(), field="integer")
        features = ["\t".join(row) for row in zip(feature_ids, feature_names, feature_types)]
        for name, lines in (("barcodes.tsv.gz", cell_ids), ("features.tsv.gz", features)):
            with _atomic(mex / name) as partial, gzip.open(partial, "wt") as fh:
                fh.write("".join(f"{line}\n" for line in lines))

    cell_area = (
        np.asarray(adata.obs["cell_area"], dtype=np.float64) if "cell_area" in adata.obs else np.full(n_cells, 65.0)
    )
    transcripts = np.asarray(counts.sum(axis=1)).ravel()
    cells = pd.DataFrame(
        {
            CELL_ID: cell_ids,
            CELL_X: xy[:, 0],
            CELL_Y: xy[:, 1],
            "transcript_counts": transcripts,
            "control_probe_counts": np.asarray(controls.sum(axis=1)).ravel(),
            "total_counts": transcripts + np.asarray(controls.sum(axis=1)).ravel(),
            "cell_area": cell_area,
            "nucleus_area": 0.35 * cell_area,
        }
    )
    cells_path = folder / f"cells.{cells_format}"
    with _atomic(cells_path) as partial:
        if cells_format == "parquet":
            cells.to_parquet(partial, index=False)
        else:
            with gzip.open(partial, "wt") as fh:
                cells.to_csv(fh, index=False)

    # A regular hexagon of circumradius r has area (3 sqrt(3) / 2) r^2; its six corners average to the centroid.
    radius = np.sqrt(2.0 * cell_area / (3.0 * np.sqrt(3.0)))
    angles = np.deg2rad(np.r_[np.arange(0, 360, 60), 0])  # closed, as Xenium writes them
    boundaries = pd.DataFrame(
        {
            CELL_ID: np.repeat(cell_ids, angles.size),
            "vertex_x": (xy[:, :1] + radius[:, None] * np.cos(angles)).ravel(),
            "vertex_y": (xy[:, 1:] + radius[:, None] * np.sin(angles)).ravel(),
            "label_id": np.repeat(np.arange(1, n_cells + 1, dtype=np.uint32), angles.size),
        }
    )
    with _atomic(folder / BOUNDARIES_FILE) as partial:
        boundaries.to_parquet(partial, index=False)

    image_files: list[str] = []
    if image is not None:
        image = np.asarray(image)
        if image.ndim == 3 and layout == "2.0":
            stains = list(image)
        elif image.ndim == 2:
            stains = [image]
        else:
            raise ValueError(f"image must be 2-D (or (c, y, x) with layout '2.0'), not {image.shape}")
        if layout == "1.0":
            _write_ome_pyramid(folder / LEGACY_IMAGE_FILES[0], stains[0], pixel_size)
            image_files = [LEGACY_IMAGE_FILES[0]]
        else:
            import uuid

            (folder / FOCUS_DIR).mkdir(exist_ok=True)
            names = [FOCUS_CHANNEL_FILE.format(c) for c in range(len(stains))]
            uuids = [f"urn:uuid:{uuid.uuid4()}" for _ in names]
            for c, stain in enumerate(stains):
                _write_ome_pyramid(
                    folder / FOCUS_DIR / names[c],
                    stain,
                    pixel_size,
                    _multi_file_ome_xml(c, names, uuids, stain.shape, pixel_size),
                )
            image_files = [f"{FOCUS_DIR}/{name}" for name in names]

    specs = {
        "major_version": 5 if layout == "2.0" else 4,
        "minor_version": 0,
        "patch_version": 0,
        "run_name": "simulated",
        "region_name": folder.name,
        "analysis_sw_version": "xenium-2.0.0.10" if layout == "2.0" else "xenium-1.9.0.0",
        "pixel_size": pixel_size,
        "num_cells": int(n_cells),
        "images": {"morphology_focus_filepath": image_files[0] if image_files else ""},
        "xenium_explorer_files": {"cells_zarr_filepath": "cells.zarr.zip"},
    }
    with _atomic(folder / SPECS_FILE) as partial:
        partial.write_text(json.dumps(specs, indent=2), encoding="utf-8")
    return folder
