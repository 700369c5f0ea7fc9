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

from .. import keys
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
    spatial = outs / "spatial"
    if not spatial.is_dir():
        return False
    # A spatial/ folder beside a count matrix is a Visium run even when its positions are missing, so that reading
    # it names the missing file instead of calling the folder unknown.
    return _find_positions(spatial) is not None or _find_matrix(outs) is not None


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
            # Space Ranger >= 2.1 writes fractional pixels with 17 digits; the default parser is off by an ulp.
            table = pd.read_csv(path, header=0 if has_header else None, float_precision="round_trip")
            if not has_header:
                table.columns = POSITION_COLUMNS[: table.shape[1]]
    except Exception as exc:  # pandas / pyarrow raise many kinds for a damaged table
        raise InputError(
            f"{path.name} is not a readable positions table ({type(exc).__name__}: {exc}).",
            "use the tissue_positions file that Space Ranger wrote.",
            code="bad_positions",
        ) from exc
    missing = [c for c in POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(
            f"{path.name} lacks the columns {missing} (it has {list(table.columns)}).",
            "use the tissue_positions file that Space Ranger wrote.",
            code="bad_positions",
        )
    table["barcode"] = table["barcode"].astype(str)
    return table.set_index("barcode")


def read_scalefactors(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path.name} is not readable JSON ({exc}).",
            "use the scalefactors_json.json that Space Ranger wrote.",
            code="bad_scalefactors",
        ) from exc


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
        # Examples from the unmatched side of each, so the user sees how the two spell their barcodes.
        matrix_example = unknown[0] if len(unknown) else (held[0] if len(held) else "-")
        unmatched = in_tissue[~in_tissue.isin(held)]
        positions_example = unmatched[0] if len(unmatched) else positions.index[0] if len(positions) else "-"
        raise InputError(
            f"the barcodes of {matrix_file.name} ({len(held):,}, e.g. {matrix_example}) and of "
            f"{positions_file.name} ({len(positions):,}, {len(in_tissue):,} in tissue, e.g. "
            f"{positions_example}) do not match: {len(unknown):,} barcodes of the matrix "
            "have no position.",
            "use the matrix and the spatial/ folder of the same Space Ranger run.",
            code="barcode_mismatch",
        )
    return np.flatnonzero(keep)


def _images(folders: list[Path], scalefactors: dict, um_per_px: float, notices: list[str], load: bool):
    """(uns images, SlideImage for napari): hires by default, lowres when hires is missing."""
    arrays: dict[str, np.ndarray] = {}
    if not load:
        return arrays, []
    found = False
    for res, name in IMAGE_FILES.items():
        hits = [h for folder in folders if folder.is_dir() for h in sorted(folder.glob(f"*{name}"))]
        if not hits:
            continue
        found = True
        try:
            arrays[res] = read_png(hits[0])
        except Exception as exc:  # PIL raises several kinds for a damaged PNG
            notices.append(f"{hits[0].name} could not be read ({type(exc).__name__}); opened without it.")
    shown = []
    for res in ("hires", "lowres"):
        factor = scalefactors.get(f"tissue_{res}_scalef")
        if res not in arrays:
            continue
        if not factor:
            notices.append(f"{IMAGE_FILES[res]} is not shown: the scale factors give no tissue_{res}_scalef.")
            continue
        if res == "hires" and "lowres" in arrays and np.ptp(arrays[res]) == 0 < np.ptp(arrays["lowres"]):
            # some published folders carry a blank placeholder in place of the hires image
            notices.append(f"{IMAGE_FILES[res]} is blank (one colour); showing {IMAGE_FILES['lowres']}.")
            continue
        shown.append(
            SlideImage(name=res, levels=[arrays[res]], scale=um_per_px / float(factor), rgb=arrays[res].ndim == 3)
        )
        break
    if not found:  # a damaged PNG has its own notice above
        notices.append(f"no tissue image in {folders[0]} ({', '.join(IMAGE_FILES.values())}); opened without an image.")
    return arrays, shown


def _read_space_ranger(
    outs: Path, library_id: str, images: bool, fmt: str, image_folders: tuple[Path, ...] = ()
) -> Slide:
    spatial = outs / "spatial"
    matrix_file = _find_matrix(outs)
    if matrix_file is None:
        raise InputError(
            f"{outs} has no count matrix (looked for {MATRIX_H5} and the {MATRIX_MEX}/ MEX folder).",
            "point to the outs/ folder of a Space Ranger run (or copy the matrix into it).",
            code="missing_matrix",
        )
    positions_file = _find_positions(spatial) if spatial.is_dir() else None
    if positions_file is None:
        raise InputError(
            f"{outs} has no spot positions (looked for spatial/{', spatial/'.join(POSITION_FILES)}).",
            "point to the outs/ folder of a Space Ranger run, with its spatial/ folder.",
            code="missing_positions",
        )
    scale_hits = sorted(spatial.glob(f"*{SCALEFACTORS}"))
    if not scale_hits:
        raise InputError(
            f"{outs} has no spatial/{SCALEFACTORS}.",
            "copy the spatial/ folder of the Space Ranger run whole: the scale factors place the spots on the image.",
            code="missing_scalefactors",
        )
    scalefactors = read_scalefactors(scale_hits[0])
    matrix = read_10x_h5(matrix_file) if matrix_file.is_file() else read_10x_mex(matrix_file)
    positions = read_positions(positions_file)
    rows = _match_barcodes(matrix, positions, matrix_file, positions_file)
    adata = matrix[rows].copy()
    pos = positions.loc[adata.obs_names]
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = pos[col].to_numpy().astype(np.int64)
    adata.obsm[keys.SPATIAL] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=float)

    notices: list[str] = []
    um = microns_per_pixel(scalefactors)
    unit = MICRON
    if um is None:
        um, unit = 1.0, "px"
        notices.append(f"{scale_hits[0].name} gives no pixel size; coordinates are in full-resolution pixels.")
    arrays, shown = _images([spatial, *image_folders], scalefactors, um, notices, images)
    adata.uns[keys.SPATIAL_LIBRARIES] = {
        library_id: {
            "images": arrays,
            "scalefactors": {k: v for k, v in scalefactors.items() if isinstance(v, (int, float))},
            "metadata": {"source": str(outs), "format": fmt},
        }
    }
    diameter = scalefactors.get("spot_diameter_fullres")
    return Slide(
        adata=adata,
        format=fmt,
        path=outs,
        library_id=library_id,
        images=shown,
        world_per_coord=um,
        unit=unit,
        spot_diameter=float(diameter) * um if diameter else None,
        notices=notices,
    )


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
            raise InputError(
                f"{binned} has no {int(bin_size):03d} µm bins (it has "
                f"{', '.join(f'{b} µm' for b in bins) or 'no square_NNNum folders'}).",
                f"choose one of them with --bin-size{' ' + str(min(bins)) if bins else ''}.",
                code="unknown_bin_size",
            )
        folder = bins[int(bin_size)]
        run = binned.parent
    # Bin folders carry their own copies of the images; older runs keep them only in outs/spatial.
    slide = _read_space_ranger(
        folder, f"{_library_id(run)}_{folder.name}", images, "visium_hd", image_folders=(run / "spatial",)
    )
    size = BIN_FOLDER.search(folder.name)
    if slide.unit == MICRON and size:
        slide.spot_diameter = float(int(size.group(1)))  # bins are squares of that side
    return slide


# --- Writers: Space Ranger-like folders for tests and example scripts -------------------------------------------

VISIUM_PITCH_UM = 100.0  # centre-to-centre distance of neighbouring Visium spots
# Fiducial / spot diameter ratio of a real Space Ranger scalefactors_json.json (144.46 px / 89.43 px).
FIDUCIAL_PER_SPOT = 144.45982486939 / 89.42751063343188
# Space Ranger downsamples the full-resolution image to these sizes (longer side, pixels).
HIRES_SIDE_PX, LOWRES_SIDE_PX = 2000, 600
# The pixel size of Visium HD full-resolution images as Space Ranger reports it for CytAssist captures.
HD_MICRONS_PER_PIXEL = 0.2738
POSITION_LAYOUTS = {
    "1.x": "tissue_positions_list.csv",
    "2.x": "tissue_positions.csv",
    "parquet": "tissue_positions.parquet",
}


def _integer_counts(adata: ad.AnnData):
    import scipy.sparse as sp

    counts = sp.csr_matrix(adata.X)
    if counts.nnz and (not np.array_equal(counts.data, np.round(counts.data)) or counts.data.min() < 0):
        raise ValueError("adata.X must hold non-negative integer counts")
    return counts.astype(np.int32)


def _write_matrix(adata: ad.AnnData, outs: Path, matrix: str) -> Path:
    """The filtered matrix as Space Ranger writes it: barcodes in obs order, symbols as names, Ensembl-like ids."""
    import gzip

    import scipy.io

    from .tenx import GENE_EXPRESSION, write_10x_h5

    if matrix not in ("h5", "mex"):
        raise ValueError(f"matrix {matrix!r}: use 'h5' or 'mex'")
    counts = _integer_counts(adata)
    barcodes = [str(b) for b in adata.obs_names]
    names = [str(n) for n in adata.var_names]
    ids = (
        [str(i) for i in adata.var["gene_ids"]]
        if "gene_ids" in adata.var
        else [f"ENSG{j + 1:011d}" for j in range(adata.n_vars)]
    )
    if matrix == "h5":
        return write_10x_h5(outs / MATRIX_H5, counts, barcodes, ids, names)
    mex = outs / MATRIX_MEX
    mex.mkdir(parents=True, exist_ok=True)
    with gzip.open(mex / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, counts.T.tocoo(), field="integer")  # MEX stores genes x barcodes
    features = [f"{i}\t{n}\t{GENE_EXPRESSION}" for i, n in zip(ids, names)]
    for name, lines in (("barcodes.tsv.gz", barcodes), ("features.tsv.gz", features)):
        with gzip.open(mex / name, "wt") as fh:
            fh.write("".join(f"{line}\n" for line in lines))
    return mex


def _pixel_column(values: np.ndarray) -> np.ndarray:
    # Space Ranger before 2.1 writes whole pixels, later versions fractions; keep whichever the data hold.
    return values.astype(np.int64) if np.array_equal(values, np.round(values)) else values


def _grid_index(values: np.ndarray, step: float) -> np.ndarray:
    return np.rint((values - values.min()) / step).astype(np.int64) if len(values) else values.astype(np.int64)


def _spot_pitch(coords: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if len(coords) < 2:
        return 1.0
    dist, _ = cKDTree(coords).query(coords, k=2)
    return float(np.median(dist[:, 1]))


def _off_tissue_barcodes(n: int, taken: set[str], rng: np.random.Generator) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        barcode = "".join(rng.choice(list("ACGT"), 16)) + "-1"
        if barcode not in taken:
            taken.add(barcode)
            out.append(barcode)
    return out


def _write_positions(table: pd.DataFrame, spatial: Path, layout: str) -> Path:
    if layout not in POSITION_LAYOUTS:
        raise ValueError(f"layout {layout!r}: use one of {', '.join(POSITION_LAYOUTS)}")
    path = spatial / POSITION_LAYOUTS[layout]
    if layout == "parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False, header=layout == "2.x")
    return path


def visium_scalefactors(coords: np.ndarray) -> dict:
    """Space Ranger-like scale factors for Visium spots at full-resolution pixels ``coords`` (x, y).

    The spot diameter follows from the spots' pitch (55 µm spots 100 µm apart); the full-resolution image is taken
    to reach one pitch past the farthest spot, and hires / lowres to be 2000 / 600 pixels on that side.
    """
    coords = np.asarray(coords, dtype=float)[:, :2]
    pitch = _spot_pitch(coords)
    spot = pitch * VISIUM_SPOT_UM / VISIUM_PITCH_UM
    extent = float(coords.max()) + pitch
    return {
        "spot_diameter_fullres": spot,
        "fiducial_diameter_fullres": spot * FIDUCIAL_PER_SPOT,
        "tissue_hires_scalef": HIRES_SIDE_PX / extent,
        "tissue_lowres_scalef": LOWRES_SIDE_PX / extent,
    }


def _rgb_uint8(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype.kind == "f" and image.size and image.max() <= 1.0:  # scanpy's float images in [0, 1]
        image = np.clip(np.rint(image * 255), 0, 255)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"image must be (y, x) or (y, x, 3|4), got shape {image.shape}")
    return image.astype(np.uint8)


def _write_images(image: np.ndarray, folders: list[Path], hires_scalef: float, lowres_scalef: float) -> None:
    """``image`` (at hires scale) as tissue_hires_image.png and an area-averaged tissue_lowres_image.png."""
    from PIL import Image

    hires = Image.fromarray(_rgb_uint8(image))
    ratio = lowres_scalef / hires_scalef
    lowres = hires.resize(
        (max(1, round(hires.width * ratio)), max(1, round(hires.height * ratio))), Image.Resampling.BOX
    )
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        hires.save(folder / IMAGE_FILES["hires"])
        lowres.save(folder / IMAGE_FILES["lowres"])


def _uns_library(adata: ad.AnnData) -> dict:
    """The one library of scanpy's ``uns['spatial']``, or {} when there is none (or several)."""
    libraries = adata.uns.get(keys.SPATIAL_LIBRARIES)
    if not isinstance(libraries, dict):
        return {}
    entries = [v for v in libraries.values() if isinstance(v, dict)]
    return entries[0] if len(entries) == 1 else {}


def write_visium_folder(
    adata: ad.AnnData,
    folder,
    layout: str = "2.x",
    matrix: str = "h5",
    image: np.ndarray | None = None,
    scalefactors: dict | None = None,
    out_of_tissue: int = 0,
) -> Path:
    """Write a Space Ranger-like Visium ``outs/`` folder from ``adata`` and return it.

    ``adata``: integer counts in X, barcodes as obs names, gene symbols as var names (``var['gene_ids']`` when
    present, else made-up Ensembl-like ids), spot centres (x, y) in full-resolution pixels in ``obsm['spatial']``.
    ``layout``: "1.x" (headerless ``tissue_positions_list.csv``), "2.x" (``tissue_positions.csv``) or "parquet";
    ``matrix``: "h5" (``filtered_feature_bc_matrix.h5``) or "mex" (the gzipped ``filtered_feature_bc_matrix/``).
    ``out_of_tissue`` extra spots (``in_tissue`` 0, not in the matrix) are listed in the positions, which come
    in another order than the matrix, as in Space Ranger's own files.
    ``scalefactors`` override :func:`visium_scalefactors` (and those of ``adata.uns['spatial']``, scanpy's layout,
    when it holds one library); ``image``: an RGB uint8 array at hires scale (default: that library's hires image),
    written as the hires PNG and, downsampled, the lowres one.
    """
    folder = Path(folder)
    coords = np.asarray(adata.obsm[keys.SPATIAL], dtype=float)[:, :2]
    library = _uns_library(adata)
    if image is None:
        image = (library.get("images") or {}).get("hires")
    given = {k: v for k, v in (library.get("scalefactors") or {}).items() if isinstance(v, (int, float))}
    given.update(scalefactors or {})
    if image is not None and "tissue_hires_scalef" not in given:
        raise ValueError("give scalefactors['tissue_hires_scalef'] with the image: its pixel size is not implied")
    factors = {**visium_scalefactors(coords), **given}
    if "tissue_hires_scalef" in given and "tissue_lowres_scalef" not in given:
        factors["tissue_lowres_scalef"] = given["tissue_hires_scalef"] * LOWRES_SIDE_PX / HIRES_SIDE_PX

    spatial = folder / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    _write_matrix(adata, folder, matrix)

    rng = np.random.default_rng(0)
    pitch = _spot_pitch(coords)
    extra = _off_tissue_barcodes(out_of_tissue, set(map(str, adata.obs_names)), rng)
    # Off-tissue spots lie in a row below the tissue, a pitch apart.
    extra_xy = (
        np.column_stack(
            [coords[:, 0].min() + pitch * np.arange(out_of_tissue), np.full(out_of_tissue, coords[:, 1].max() + pitch)]
        )
        if out_of_tissue
        else np.empty((0, 2))
    )
    xy = np.vstack([coords, extra_xy])
    table = pd.DataFrame(
        {
            "barcode": [str(b) for b in adata.obs_names] + extra,
            "in_tissue": np.r_[np.ones(adata.n_obs, np.int64), np.zeros(out_of_tissue, np.int64)],
            # Visium's hexagonal array: rows a pitch * sqrt(3)/2 apart, columns half a pitch apart
            "array_row": _grid_index(xy[:, 1], pitch * np.sqrt(3) / 2),
            "array_col": _grid_index(xy[:, 0], pitch / 2),
            "pxl_row_in_fullres": _pixel_column(xy[:, 1]),
            "pxl_col_in_fullres": _pixel_column(xy[:, 0]),
        }
    )
    _write_positions(table.iloc[rng.permutation(len(table))], spatial, layout)
    (spatial / SCALEFACTORS).write_text(json.dumps(factors, indent=4))
    if image is not None:
        _write_images(image, [spatial], float(factors["tissue_hires_scalef"]), float(factors["tissue_lowres_scalef"]))
    return folder


def write_visium_hd_folder(
    adata_by_bin: dict[int, ad.AnnData],
    outs_folder,
    image: np.ndarray | None = None,
    microns_per_pixel: float = HD_MICRONS_PER_PIXEL,
    *,
    hires_scalef: float | None = None,
    lowres_scalef: float | None = None,
    matrix: str = "h5",
    images_in: str = "both",
) -> Path:
    """Write a Space Ranger-like Visium HD ``outs/`` folder and return it.

    ``adata_by_bin`` maps a bin size (µm) to its bins: integer counts in X, barcodes as obs names, bin centres
    (x, y) in full-resolution pixels in ``obsm['spatial']``. Each goes to ``binned_outputs/square_NNNum/`` with
    its matrix, ``spatial/tissue_positions.parquet`` and ``spatial/scalefactors_json.json``. ``image`` (RGB uint8 at
    hires scale; then ``hires_scalef`` is required) goes into each bin's ``spatial/`` (``images_in`` "bins"), into
    ``outs/spatial/`` ("outs", as older runs keep it) or both; lowres is a downsampled copy.
    """
    if images_in not in ("bins", "outs", "both"):
        raise ValueError(f"images_in {images_in!r}: use 'bins', 'outs' or 'both'")
    if image is not None and hires_scalef is None:
        raise ValueError("give hires_scalef with the image: its pixel size is not implied")
    outs = Path(outs_folder)
    extent = max(
        float(np.asarray(a.obsm[keys.SPATIAL], dtype=float)[:, :2].max()) + size / microns_per_pixel
        for size, a in adata_by_bin.items()
    )
    hires = float(hires_scalef) if hires_scalef is not None else HIRES_SIDE_PX / extent
    lowres = float(lowres_scalef) if lowres_scalef is not None else hires * LOWRES_SIDE_PX / HIRES_SIDE_PX
    image_folders = [outs / "spatial"] if images_in in ("outs", "both") else []
    for size, adata in sorted(adata_by_bin.items()):
        folder = outs / "binned_outputs" / f"square_{int(size):03d}um"
        spatial = folder / "spatial"
        spatial.mkdir(parents=True, exist_ok=True)
        _write_matrix(adata, folder, matrix)
        xy = np.asarray(adata.obsm[keys.SPATIAL], dtype=float)[:, :2]
        bin_px = size / microns_per_pixel
        table = pd.DataFrame(
            {
                "barcode": [str(b) for b in adata.obs_names],
                "in_tissue": np.ones(adata.n_obs, np.int64),
                "array_row": _grid_index(xy[:, 1], bin_px),
                "array_col": _grid_index(xy[:, 0], bin_px),
                "pxl_row_in_fullres": xy[:, 1],
                "pxl_col_in_fullres": xy[:, 0],
            }
        )
        _write_positions(table, spatial, "parquet")
        (spatial / SCALEFACTORS).write_text(
            json.dumps(
                {
                    "spot_diameter_fullres": bin_px,
                    "bin_size_um": float(size),
                    "microns_per_pixel": microns_per_pixel,
                    "tissue_hires_scalef": hires,
                    "tissue_lowres_scalef": lowres,
                },
                indent=4,
            )
        )
        if images_in in ("bins", "both"):
            image_folders.append(spatial)
    if image is not None:
        _write_images(image, image_folders, hires, lowres)
    return outs
