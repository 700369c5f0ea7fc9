"""Space Ranger outputs: Visium (1.x and 2.x layouts) and Visium HD binned outputs.

A hand-written reader rather than spatialdata-io's: it reads every layout in use (1.x headerless positions,
2.x CSV, parquet, MEX matrices, prefixed file names) where spatialdata-io's Visium reader takes the HDF5 and
CSV layouts only, and opening a folder then needs neither dask nor geopandas. The AnnData it returns follows
scanpy's ``read_visium`` convention (``obsm['spatial']`` in full-resolution pixels, images and scale factors
in ``uns['spatial'][library_id]``), so results saved from it open in scanpy and squidpy too.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .errors import InputError
from .slide import MICRON, VISIUM_SPOT_UM, Slide, SlideImage
from .tenx import read_10x_h5, read_10x_mex

POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
MATRIX_H5 = "filtered_feature_bc_matrix.h5"
MATRIX_MEX = "filtered_feature_bc_matrix"
SCALEFACTORS = "scalefactors_json.json"
IMAGE_FILES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}
BIN_FOLDER = re.compile(r"square_(\d+)um$")


def _outs(path: Path) -> Path:
    """Users pass the run folder, its ``outs/`` or the folder with the matrix; all mean the same slide."""
    return path / "outs" if (path / "outs").is_dir() else path


def _find_positions(spatial: Path) -> Path | None:
    for name in POSITION_FILES:
        for candidate in sorted(spatial.glob(f"*{name}")):  # GEO uploads prefix files with the sample name
            return candidate
    return None


def looks_like_visium(path: Path) -> bool:
    outs = _outs(path)
    return (outs / "spatial").is_dir() and _find_positions(outs / "spatial") is not None


def looks_like_visium_hd(path: Path) -> bool:
    outs = _outs(path)
    if (outs / "binned_outputs").is_dir() or path.name == "binned_outputs":
        return True
    return bool(BIN_FOLDER.search(path.name)) and (path / "spatial").is_dir()


def _find_matrix(outs: Path) -> Path | None:
    for pattern in (MATRIX_H5, f"*{MATRIX_H5}"):
        hits = sorted(outs.glob(pattern))
        if hits:
            return hits[0]
    for pattern in (MATRIX_MEX, f"*{MATRIX_MEX}"):
        hits = [p for p in sorted(outs.glob(pattern)) if p.is_dir()]
        if hits:
            return hits[0]
    return None


def read_positions(path: Path) -> pd.DataFrame:
    """Spot positions indexed by barcode, whichever of the three layouts Space Ranger wrote."""
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            with open(path) as fh:
                first = fh.readline()
            has_header = first.split(",")[0].strip().lower() == "barcode"
            table = pd.read_csv(path, header=0 if has_header else None)
            if not has_header:
                table.columns = POSITION_COLUMNS[: table.shape[1]]
    except Exception as exc:  # pandas / pyarrow raise many kinds for a damaged table
        raise InputError(f"{path.name} is not a readable positions table ({type(exc).__name__}: {exc}).",
                         "use the tissue_positions file that Space Ranger wrote.", code="bad_positions") from exc
    missing = [c for c in POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{path.name} lacks the columns {missing} (it has {list(table.columns)}).",
                         "use the tissue_positions file that Space Ranger wrote.", code="bad_positions")
    table["barcode"] = table["barcode"].astype(str)
    return table.set_index("barcode")


def read_scalefactors(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path.name} is not readable JSON ({exc}).", "use the scalefactors_json.json that "
                         "Space Ranger wrote.", code="bad_scalefactors") from exc


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB") if im.mode not in ("RGB", "L") else im
        return np.asarray(im)


def microns_per_pixel(scalefactors: dict) -> float | None:
    """µm per full-resolution pixel: given by Visium HD, and from the 55 µm spot for Visium."""
    if scalefactors.get("microns_per_pixel"):
        return float(scalefactors["microns_per_pixel"])
    if scalefactors.get("spot_diameter_fullres") and "fiducial_diameter_fullres" in scalefactors:
        return VISIUM_SPOT_UM / float(scalefactors["spot_diameter_fullres"])
    return None


def _match_barcodes(matrix: ad.AnnData, positions: pd.DataFrame, matrix_file: Path, positions_file: Path):
    in_tissue = positions.index[positions["in_tissue"].astype(int).to_numpy() == 1]
    held = matrix.obs_names
    keep = held.isin(in_tissue)
    unknown = held[~held.isin(positions.index)]
    if not keep.any() or len(unknown):
        raise InputError(
            f"the barcodes of {matrix_file.name} ({len(held):,}, e.g. {held[0] if len(held) else '-'}) and of "
            f"{positions_file.name} ({len(positions):,}, {len(in_tissue):,} in tissue, e.g. "
            f"{positions.index[0] if len(positions) else '-'}) do not match: {len(unknown):,} barcodes of the matrix "
            "have no position.", "use the matrix and the spatial/ folder of the same Space Ranger run.",
            code="barcode_mismatch")
    return np.flatnonzero(keep)


def _images(folders: list[Path], scalefactors: dict, um_per_px: float, notices: list[str], load: bool):
    """(uns images, SlideImage for napari): hires by default, lowres when hires is missing."""
    arrays: dict[str, np.ndarray] = {}
    if not load:
        return arrays, []
    for res, name in IMAGE_FILES.items():
        hits = [h for folder in folders if folder.is_dir() for h in sorted(folder.glob(f"*{name}"))]
        if not hits:
            continue
        try:
            arrays[res] = read_png(hits[0])
        except Exception as exc:  # PIL raises several kinds for a damaged PNG
            notices.append(f"{hits[0].name} could not be read ({type(exc).__name__}); opened without it.")
    shown = []
    for res in ("hires", "lowres"):
        factor = scalefactors.get(f"tissue_{res}_scalef")
        if res in arrays and factor:
            shown.append(SlideImage(name=res, levels=[arrays[res]], scale=um_per_px / float(factor),
                                    rgb=arrays[res].ndim == 3))
            break
    if not arrays:
        notices.append(f"no tissue image in {folders[0]} ({', '.join(IMAGE_FILES.values())}); opened without an "
                       "image.")
    return arrays, shown


def _read_space_ranger(outs: Path, library_id: str, images: bool, fmt: str,
                       image_folders: tuple[Path, ...] = ()) -> Slide:
    spatial = outs / "spatial"
    matrix_file = _find_matrix(outs)
    if matrix_file is None:
        raise InputError(f"{outs} has no count matrix (looked for {MATRIX_H5} and the {MATRIX_MEX}/ MEX folder).",
                         "point to the outs/ folder of a Space Ranger run (or copy the matrix into it).",
                         code="missing_matrix")
    positions_file = _find_positions(spatial) if spatial.is_dir() else None
    if positions_file is None:
        raise InputError(f"{outs} has no spot positions (looked for spatial/{', spatial/'.join(POSITION_FILES)}).",
                         "point to the outs/ folder of a Space Ranger run, with its spatial/ folder.",
                         code="missing_positions")
    scale_hits = sorted(spatial.glob(f"*{SCALEFACTORS}"))
    if not scale_hits:
        raise InputError(f"{outs} has no spatial/{SCALEFACTORS}.", "copy the spatial/ folder of the Space Ranger "
                         "run whole: the scale factors place the spots on the image.", code="missing_scalefactors")
    scalefactors = read_scalefactors(scale_hits[0])
    matrix = read_10x_h5(matrix_file) if matrix_file.is_file() else read_10x_mex(matrix_file)
    positions = read_positions(positions_file)
    rows = _match_barcodes(matrix, positions, matrix_file, positions_file)
    adata = matrix[rows].copy()
    pos = positions.loc[adata.obs_names]
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = pos[col].to_numpy().astype(np.int64)
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=float)

    notices: list[str] = []
    um = microns_per_pixel(scalefactors)
    unit = MICRON
    if um is None:
        um, unit = 1.0, "px"
        notices.append(f"{scale_hits[0].name} gives no pixel size; coordinates are in full-resolution pixels.")
    arrays, shown = _images([spatial, *image_folders], scalefactors, um, notices, images)
    adata.uns["spatial"] = {library_id: {
        "images": arrays,
        "scalefactors": {k: v for k, v in scalefactors.items() if isinstance(v, (int, float))},
        "metadata": {"source": str(outs), "format": fmt},
    }}
    diameter = scalefactors.get("spot_diameter_fullres")
    return Slide(adata=adata, format=fmt, path=outs, library_id=library_id, images=shown, world_per_coord=um,
                 unit=unit, spot_diameter=float(diameter) * um if diameter else None, notices=notices)


def _library_id(path: Path) -> str:
    return path.parent.name if path.name == "outs" else path.name


def read_visium(path, images: bool = True) -> Slide:
    """A Visium ``outs/`` folder (or the run folder above it)."""
    outs = _outs(Path(path))
    return _read_space_ranger(outs, _library_id(outs), images, "visium")


def bin_folders(binned: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in sorted(binned.iterdir()) if p.is_dir() and (m := BIN_FOLDER.search(p.name))}


def read_visium_hd(path, bin_size: int = 8, images: bool = True) -> Slide:
    """A Visium HD ``binned_outputs/square_NNNum/`` folder, or the ``outs/`` folder with a bin size (µm)."""
    path = Path(path)
    if BIN_FOLDER.search(path.name):
        folder = path
        run = path.parent.parent if path.parent.name == "binned_outputs" else path.parent
    else:
        outs = _outs(path)
        binned = outs if outs.name == "binned_outputs" else outs / "binned_outputs"
        bins = bin_folders(binned)
        if int(bin_size) not in bins:
            raise InputError(f"{binned} has no {int(bin_size):03d} µm bins (it has "
                             f"{', '.join(f'{b} µm' for b in bins) or 'no square_NNNum folders'}).",
                             f"choose one of them with --bin-size{' ' + str(min(bins)) if bins else ''}.",
                             code="unknown_bin_size")
        folder = bins[int(bin_size)]
        run = binned.parent
    # Bin folders carry their own copies of the images; older runs keep them only in outs/spatial.
    slide = _read_space_ranger(folder, f"{_library_id(run)}_{folder.name}", images, "visium_hd",
                               image_folders=(run / "spatial",))
    size = BIN_FOLDER.search(folder.name)
    if slide.unit == MICRON and size:
        slide.spot_diameter = float(int(size.group(1)))  # bins are squares of that side
    return slide
