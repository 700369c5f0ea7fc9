"""SpatialData ``.zarr`` stores: read one table with its spots and images as a :class:`Slide`, write results back.

What is read, and in which frame:

* The table is the only one in the store, or the one the caller names. Its ``uns['spatialdata_attrs']`` names the
  region (the shapes / points element whose instances its rows are), ``region_key`` (the obs column saying which
  region a row belongs to) and ``instance_key`` (the obs column holding each row's index in that element).
* The world frame is one of the region's coordinate systems: the one it shares with images, ``"global"`` first.
* spatialdata's raster convention (``spatialdata.transformations._utils.compute_coordinates``, and the labels
  centroids in ``spatialdata.get_centroids``, which use it): pixel index ``i`` covers intrinsic ``[i, i + 1)``, so
  its *centre* is at ``i + 0.5``; shapes and points coordinates are in the same intrinsic units before the element's
  transformation. A :class:`SlideImage` puts the centre of pixel (0, 0) at ``translate`` (napari's convention), so
  ``translate = affine(0.5, 0.5)``.

Writing copies the source store file by file and rewrites only the table, so images, shapes and anything
spatialdata would not round-trip stay byte-identical, and the source is only ever read.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .. import keys
from .errors import InputError
from .slide import MICRON, VISIUM_SPOT_UM, Slide, SlideImage
from .write import ASIDE_SUFFIX, sweep_litter, temp_name

ELEMENT_GROUPS = ("tables", "images", "shapes", "points", "labels")
ATTRS_KEY = "spatialdata_attrs"  # spatialdata.models.TableModel.ATTRS_KEY, without importing spatialdata
MICRON_UNITS = {"micrometer", "micrometre", "micron", "um", "µm", "μm"}
INSTALL_FIX = 'install the SpatialData extra: pip install "spatial-deconv-gui[spatial]"'


def looks_like_spatialdata(path: str | os.PathLike) -> bool:
    """A SpatialData store: a folder that is a zarr group holding any element group (``tables/``, ``images/``, ...).

    A ``.zarr`` folder counts even without element groups, so that opening one gets a precise error from
    :func:`read_spatialdata` rather than "unknown format". Looks at names only: no spatialdata, zarr or dask import.
    """
    path = Path(path)
    if not path.is_dir():
        return False
    is_group = (path / "zarr.json").is_file() or (path / ".zgroup").is_file()
    has_elements = any((path / name).is_dir() for name in ELEMENT_GROUPS)
    if path.suffix == ".zarr":
        return is_group or has_elements
    return is_group and has_elements


def _import_spatialdata():
    try:
        import spatialdata
    except ImportError as exc:
        raise InputError(
            f"reading and writing SpatialData .zarr needs the spatialdata package ({exc}).",
            INSTALL_FIX,
            code="missing_dependency",
        ) from exc
    return spatialdata


@contextlib.contextmanager
def _quiet_zarr():
    """Silence what the user can do nothing about here: zarr 3's notice (on every array written) that sharding will
    become its default, ome-zarr's deprecation of the downsampler spatialdata calls, and spatialdata's advice to
    rewrite stores in an older zarr format (the result store is written in the source's format, on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ome_zarr")
        warnings.filterwarnings(
            "ignore", message="SpatialData is not stored in the most current format", category=UserWarning
        )
        yield


def _read_store(path: Path, selection: tuple[str, ...] | None = None):
    # Imported here, not at the top: opening an .h5ad must not pay for (or need) spatialdata, dask and geopandas.
    sd = _import_spatialdata()
    if not looks_like_spatialdata(path):
        raise InputError(
            f"{path} is not a SpatialData .zarr store (no zarr group with tables/, images/, shapes/, "
            "points/ or labels/).",
            "pass the folder that spatialdata wrote (it ends in .zarr).",
            code="not_spatialdata",
        )
    try:
        with _quiet_zarr():
            return sd.read_zarr(path, selection=selection) if selection else sd.read_zarr(path)
    except Exception as exc:  # corrupt or foreign stores fail deep inside zarr / ome-zarr with their own types
        raise InputError(
            f"spatialdata could not read {path}: {type(exc).__name__}: {exc}",
            "check that the store is complete and was written by spatialdata (or spatialdata-io).",
            code="unreadable_spatialdata",
        ) from exc


# --------------------------------------------------------------------------------------------------------------
# tables and the elements they annotate
# --------------------------------------------------------------------------------------------------------------


def _pick_table(tables, table: str | None, path: Path) -> tuple[str, ad.AnnData]:
    names = list(tables.keys())
    if not names:
        raise InputError(
            f"{path} holds no table, so there are no counts to deconvolve.",
            "open a SpatialData store with a table (an AnnData of counts per spot or cell).",
            code="no_table",
        )
    if table is None:
        if len(names) > 1:
            raise InputError(
                f"{path} holds {len(names)} tables: {', '.join(names)}.",
                "choose one with --table NAME (table= in Python).",
                code="several_tables",
            )
        table = names[0]
    if table not in tables:
        raise InputError(
            f"{path} has no table {table!r}; its tables are: {', '.join(names)}.",
            "pass one of those names with --table.",
            code="unknown_element",
        )
    return table, tables[table]


def _table_link(table: ad.AnnData, name: str) -> tuple[list[str], str, str]:
    """(regions, region_key, instance_key) of a table, or an InputError when it annotates nothing."""
    attrs = table.uns.get(ATTRS_KEY) or {}
    regions = attrs.get("region")
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    if regions is None or region_key is None or instance_key is None:
        raise InputError(
            f"table {name!r} does not say which spots its rows are (no region / region_key / "
            f"instance_key in uns['{ATTRS_KEY}']).",
            "link it to its shapes with spatialdata.models.TableModel.parse(table, region=..., "
            "region_key=..., instance_key=...) and save the store again.",
            code="table_not_linked",
        )
    regions = [str(regions)] if isinstance(regions, str) else [str(r) for r in np.ravel(regions)]
    for key in (region_key, instance_key):
        if key not in table.obs:
            raise InputError(
                f"table {name!r} names obs column {key!r} in uns['{ATTRS_KEY}'] but has no such column.",
                "re-link the table with spatialdata.models.TableModel.parse.",
                code="table_not_linked",
            )
    return regions, str(region_key), str(instance_key)


def _element_group(sdata, name: str) -> str | None:
    for group in ("shapes", "points", "labels", "images"):
        if name in getattr(sdata, group):
            return group
    return None


def _coordinate_systems(element) -> list[str]:
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True).keys())


def _choose_coordinate_system(sdata, region_element) -> str:
    """The region's coordinate system that has images, "global" first, else the one with the largest image."""
    systems = _coordinate_systems(region_element)
    if not systems:
        raise InputError(
            "the region element has no coordinate system.",
            "give it a transformation to 'global'.",
            code="no_coordinate_system",
        )
    shared: dict[str, list[int]] = {}
    for image in sdata.images.values():
        pixels = int(np.prod(_levels(image)[0].shape))
        for cs in _coordinate_systems(image):
            if cs in systems:
                shared.setdefault(cs, []).append(pixels)
    if "global" in shared or (not shared and "global" in systems):
        return "global"
    if not shared:
        return systems[0]
    return max(shared, key=lambda cs: (len(shared[cs]), max(shared[cs])))


def _affine(element, cs: str, axes: tuple[str, str]) -> np.ndarray:
    """The element -> ``cs`` transformation as a 3x3 matrix on ``axes`` (homogeneous coordinates)."""
    from spatialdata.transformations import get_transformation

    return np.asarray(
        get_transformation(element, to_coordinate_system=cs).to_affine_matrix(input_axes=axes, output_axes=axes),
        dtype=float,
    )


def _uniform_scale(matrix: np.ndarray) -> float | None:
    """s when the 2D affine is exactly x -> s * x with s > 0 (no translation, rotation, shear or anisotropy)."""
    linear, shift = matrix[:2, :2], matrix[:2, 2]
    s = float(linear[0, 0])
    if (
        s > 0
        and not shift.any()
        and linear[0, 1] == 0
        and linear[1, 0] == 0
        and np.isclose(linear[1, 1], s, rtol=1e-12, atol=0)
    ):
        return s
    return None


def _region_centres(element, group: str, name: str) -> tuple[pd.Index, np.ndarray, np.ndarray | None]:
    """(instance ids, intrinsic (x, y) centres, circle radii or None) of a shapes or points element."""
    if group == "shapes":
        if len(element) == 0:
            raise InputError(
                f"shapes element {name!r} is empty.", "link the table to a non-empty element.", code="empty_region"
            )
        geometry = element.geometry
        kinds = set(geometry.geom_type.unique())
        if kinds <= {"Point"}:
            xy = np.column_stack([geometry.x.to_numpy(float), geometry.y.to_numpy(float)])
            radius = element["radius"].to_numpy(float) if "radius" in element.columns else None
            return pd.Index(element.index), xy, radius
        if kinds <= {"Polygon", "MultiPolygon"}:
            centroids = geometry.centroid
            return (
                pd.Index(element.index),
                np.column_stack([centroids.x.to_numpy(float), centroids.y.to_numpy(float)]),
                None,
            )
        raise InputError(
            f"shapes element {name!r} mixes geometries {sorted(kinds)}.",
            "link the table to circles or polygons.",
            code="unsupported_region",
        )
    if group == "points":
        frame = element[["x", "y"]].compute()
        return pd.Index(frame.index), frame.to_numpy(float), None
    raise InputError(
        f"the table annotates {group} element {name!r}; spots are read from shapes (circles or "
        "polygons) or points only.",
        "link the table to a shapes element (spatialdata-io's Xenium reader: table for "
        "'cell_circles'), or compute centroids into a shapes element.",
        code="unsupported_region",
    )


def _match_instances(instances: np.ndarray, index: pd.Index, region: str, table: str) -> np.ndarray:
    """Positions in ``index`` of each table row's instance id, in table order."""
    if not index.is_unique:
        raise InputError(
            f"element {region!r} has repeated instance ids, so table rows cannot be matched to it.",
            "give the element a unique index.",
            code="duplicate_instances",
        )
    positions = index.get_indexer(pd.Index(instances))
    if (positions < 0).all() and len(instances) and index.dtype != pd.Index(instances).dtype:
        # e.g. ids stored as strings in one place and integers in the other
        positions = index.astype(str).get_indexer(pd.Index(instances).astype(str))
    missing = np.flatnonzero(positions < 0)
    if missing.size:
        raise InputError(
            f"{missing.size:,} of {len(instances):,} rows of table {table!r} have an instance id that element "
            f"{region!r} ({len(index):,} instances) does not hold, e.g. {instances[missing[0]]!r}.",
            "the table and the element must come from the same run; re-link them with TableModel.parse.",
            code="missing_instances",
        )
    return positions


# --------------------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------------------


def _levels(image) -> list:
    """The xarray DataArrays of an image element, largest first."""
    from xarray import DataArray

    if isinstance(image, DataArray):
        return [image]
    arrays = [next(iter(image[key].ds.data_vars.values())) for key in image.children]
    return sorted(arrays, key=lambda a: -int(np.prod(a.shape)))


def _slide_image(name: str, image, cs: str, notices: list[str]) -> SlideImage | None:
    levels = _levels(image)
    dims = tuple(levels[0].dims)
    if dims != ("c", "y", "x"):
        notices.append(f"image {name!r} has axes {dims}; only 2D (c, y, x) images are shown.")
        return None
    matrix = _affine(image, cs, ("y", "x"))
    linear, shift = matrix[:2, :2], matrix[:2, 2]
    scale = float(linear[0, 0])
    if not (scale > 0 and linear[0, 1] == 0 and linear[1, 0] == 0 and np.isclose(linear[1, 1], scale, rtol=1e-9)):
        notices.append(
            f"image {name!r} is rotated, sheared, flipped or scaled unequally in y and x in {cs!r}; "
            "it is not shown (only scale + translation can be)."
        )
        return None
    translate = (float(shift[0] + 0.5 * scale), float(shift[1] + 0.5 * scale))  # centre of pixel (0, 0)
    data = [level.data for level in levels]  # dask arrays: nothing is read until napari draws a tile
    n_channels = int(levels[0].sizes["c"])
    if n_channels in (3, 4) and levels[0].dtype == np.uint8:
        return SlideImage(
            name=name, levels=[d.transpose(1, 2, 0) for d in data], scale=scale, translate=translate, rgb=True
        )
    if n_channels == 1:
        return SlideImage(name=name, levels=[d[0] for d in data], scale=scale, translate=translate, rgb=False)
    channel_names = [str(c) for c in levels[0].coords["c"].values] if "c" in levels[0].coords else None
    return SlideImage(
        name=name, levels=data, scale=scale, translate=translate, rgb=False, channel_axis=0, channel_names=channel_names
    )


# --------------------------------------------------------------------------------------------------------------
# units, from the store's own metadata (spatialdata keeps none in memory)
# --------------------------------------------------------------------------------------------------------------


def _group_attributes(folder: Path) -> dict:
    for meta, key in (("zarr.json", "attributes"), (".zattrs", None)):
        try:
            content = json.loads((folder / meta).read_text())
        except (OSError, ValueError):
            continue
        return content.get(key, {}) if key else content
    return {}


def _output_units(attributes: Any, cs: str) -> set[str]:
    """Units of the space axes of every NGFF transformation in ``attributes`` whose output is ``cs``."""
    units: set[str] = set()
    if isinstance(attributes, dict):
        for transform in attributes.get("coordinateTransformations", []) or []:
            output = transform.get("output") if isinstance(transform, dict) else None
            if isinstance(output, dict) and output.get("name") == cs:
                units.update(
                    str(a.get("unit")) for a in output.get("axes", []) if a.get("type") == "space" and a.get("unit")
                )
        for value in attributes.values():
            units |= _output_units(value, cs)
    elif isinstance(attributes, list):
        for value in attributes:
            units |= _output_units(value, cs)
    return units


def _unit(path: Path, group: str, name: str, cs: str) -> str:
    """µm when the store says the coordinate system's axes are micrometres; else "px".

    spatialdata itself writes the placeholder unit "unit" (it tracks none), so stores from spatialdata-io come out
    as "px": for Visium that is right (the global frame is full-resolution pixels), for Xenium the numbers are µm.
    """
    units = {u.lower() for u in _output_units(_group_attributes(path / group / name), cs)}
    return MICRON if units and units <= MICRON_UNITS else "px"


# --------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------


def read_spatialdata(
    path: str | os.PathLike, table: str | None = None, images: bool = True, *, region: str | None = None
) -> Slide:
    """One table of a SpatialData store as a :class:`Slide`: its counts, the centres of the spots it annotates
    and the images in the same coordinate system (lazily, as dask arrays).

    ``table`` picks the table when there are several. When a table annotates several regions, ``region`` picks
    one (default: the first, with a notice); the slide then holds only that region's rows.
    """
    path = Path(path)
    sdata = _read_store(path)
    table_name, source = _pick_table(sdata.tables, table, path)
    regions, region_key, instance_key = _table_link(source, table_name)
    notices: list[str] = []
    if region is None:
        region = regions[0]
        if len(regions) > 1:
            notices.append(
                f"table {table_name!r} annotates {len(regions)} regions ({', '.join(regions)}); showing "
                f"{region!r} only (choose another with region=)."
            )
    elif region not in regions:
        raise InputError(
            f"table {table_name!r} does not annotate {region!r}; it annotates {', '.join(regions)}.",
            "pass one of those as the region.",
            code="unknown_element",
        )
    group = _element_group(sdata, region)
    if group is None:
        raise InputError(
            f"table {table_name!r} annotates {region!r}, but {path} has no element of that name.",
            "the store is incomplete; re-write it with spatialdata.",
            code="unknown_element",
        )
    element = getattr(sdata, group)[region]

    rows = np.flatnonzero(source.obs[region_key].astype(str).to_numpy() == region)
    if rows.size == 0:
        raise InputError(
            f"no row of table {table_name!r} has {region!r} in obs[{region_key!r}].",
            "re-link the table with spatialdata.models.TableModel.parse.",
            code="table_not_linked",
        )
    adata = source[rows].copy() if len(rows) < source.n_obs else source.copy()
    if len(rows) < source.n_obs:
        # The copy annotates only its own region, so writing it back links each row to the right element.
        adata.uns[ATTRS_KEY] = {**dict(source.uns[ATTRS_KEY]), "region": region}
    index, xy, radius = _region_centres(element, group, region)
    positions = _match_instances(adata.obs[instance_key].to_numpy(), index, region, table_name)
    xy = xy[positions]
    radius = radius[positions] if radius is not None else None

    cs = _choose_coordinate_system(sdata, element)
    matrix = _affine(element, cs, ("x", "y"))
    scale = _uniform_scale(matrix)
    # A pure scale keeps obsm['spatial'] in the element's own units (as the file has them) with world_per_coord =
    # the scale; any translation, rotation or anisotropy is applied here instead, leaving world_per_coord = 1.
    if scale is None:
        xy = xy @ matrix[:2, :2].T + matrix[:2, 2]
        linear = float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
        world_per_coord = 1.0
    else:
        linear = world_per_coord = scale
    adata.obsm[keys.SPATIAL] = xy
    spot_diameter = float(2 * np.median(radius) * linear) if radius is not None and len(radius) else None

    slide_images: list[SlideImage] = []
    if images:
        for name, image in sdata.images.items():
            if cs in _coordinate_systems(image):
                found = _slide_image(name, image, cs, notices)
                if found is not None:
                    slide_images.append(found)
    return Slide(
        adata=adata,
        format="spatialdata",
        path=path,
        images=slide_images,
        world_per_coord=world_per_coord,
        unit=_unit(path, group, region, cs),
        spot_diameter=spot_diameter,
        notices=notices,
        table=table_name,
        region=region,
    )


# --------------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------------


def _expand(values, rows: np.ndarray, n: int):
    """A column of ``len(rows)`` values spread over ``n`` rows, missing elsewhere, in a dtype the zarr writer keeps."""
    if isinstance(values, pd.DataFrame):
        out = pd.DataFrame(np.nan, index=pd.RangeIndex(n), columns=values.columns, dtype=float)
        out.iloc[rows] = values.to_numpy(dtype=float)
        return out
    if isinstance(getattr(values, "dtype", None), pd.CategoricalDtype):
        categorical = pd.Categorical(values)
        codes = np.full(n, -1, dtype=np.int64)
        codes[rows] = categorical.codes
        return pd.Categorical.from_codes(codes, dtype=categorical.dtype)
    values = np.asarray(values)
    if values.dtype.kind == "b":
        out = pd.array([pd.NA] * n, dtype="boolean")
    elif values.dtype.kind in "iu":
        out = pd.array([pd.NA] * n, dtype="Int64")
    elif values.dtype.kind == "f":
        out = np.full((n, *values.shape[1:]), np.nan)
    else:  # strings and objects: categorical, whose missing code the writer stores
        return _expand(pd.Categorical(values.astype(str)), rows, n)
    out[rows] = values
    return out


def _result_table(result: ad.AnnData, source: ad.AnnData, name: str, region_key: str, instance_key: str) -> ad.AnnData:
    """The table to store: ``result`` itself when it has the source's rows, else the source table with the result's
    new slots spread over the rows of the one region the result covers (missing on the other regions' rows)."""
    if result.n_obs == source.n_obs and np.array_equal(result.obs_names, source.obs_names):
        out = result.copy()
        for key in (region_key, instance_key):  # the link is the source's, whatever the result's obs holds
            out.obs[key] = source.obs[key].values
        return out
    region = (result.uns.get(ATTRS_KEY) or {}).get("region")
    region_rows = (
        np.flatnonzero(source.obs[region_key].astype(str).to_numpy() == str(region))
        if isinstance(region, str)
        else np.array([], dtype=int)
    )
    if region_rows.size == 0 or not np.array_equal(result.obs_names, source.obs_names[region_rows]):
        raise InputError(
            f"the result's {result.n_obs:,} rows are not the rows of table {name!r} "
            f"({source.n_obs:,}) nor of one of its regions, in the same order.",
            "save the result of a slide read from this store (or save it as .h5ad).",
            code="rows_mismatch",
        )
    out = source.copy()
    for column in result.obs.columns:
        if column not in out.obs:
            out.obs[column] = _expand(result.obs[column], region_rows, out.n_obs)
    for key, value in result.obsm.items():
        if key not in out.obsm:
            expanded = _expand(
                value if isinstance(value, pd.DataFrame) else np.asarray(value, dtype=float), region_rows, out.n_obs
            )
            out.obsm[key] = expanded.set_axis(out.obs_names) if isinstance(expanded, pd.DataFrame) else expanded
    for key, value in result.uns.items():
        if key != ATTRS_KEY:
            out.uns[key] = value
    return out


_SWAP_TRIES = 20


def _replace_folder(built: Path, target: Path) -> None:
    """Put ``built`` at ``target``: an existing target is renamed aside, swapped, then deleted.

    A folder cannot be renamed over a non-empty one, so when another run writing the same output puts its store
    at ``target`` between our two renames, ours is moved aside in turn and the swap tried again: the last writer
    wins, as with files, and neither run fails.
    """
    asides: list[Path] = []
    try:
        for _ in range(_SWAP_TRIES):
            if target.exists() or target.is_symlink():
                aside = temp_name(target, ASIDE_SUFFIX)
                try:
                    os.replace(target, aside)
                    asides.append(aside)
                except FileNotFoundError:  # another writer moved it first
                    pass
            try:
                os.replace(built, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        raise OSError(errno.EBUSY, f"{target} kept changing while this run replaced it", str(target))
    except BaseException:
        if asides and not (target.exists() or target.is_symlink()):
            os.replace(asides.pop(), target)  # the output as it was
        raise
    finally:
        for aside in asides:
            if aside.is_dir() and not aside.is_symlink():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                aside.unlink(missing_ok=True)


@contextlib.contextmanager
def _building(out_path: Path):
    """A fresh temporary folder beside ``out_path``; on success it replaces ``out_path``, on failure it goes."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sweep_litter(out_path)
    built = temp_name(out_path)
    try:
        yield built
        _replace_folder(built, out_path)
    finally:
        if built.exists():
            shutil.rmtree(built, ignore_errors=True)


def _check_output(source: Path, out_path: Path) -> None:
    src, out = source.resolve(), out_path.resolve()
    if src == out:
        raise InputError(
            f"the output {out_path} is the input store.",
            "choose another output path; inputs are never overwritten.",
            code="output_is_input",
        )
    if src in out.parents or out in src.parents:
        raise InputError(
            f"the output {out_path} and the input {source} contain one another.",
            "choose an output outside the input store (and not a folder holding it).",
            code="output_is_input",
        )
    if out_path.exists() and not looks_like_spatialdata(out_path):
        raise InputError(
            f"{out_path} exists and is not a SpatialData store; it would be replaced whole.",
            "choose a new path, or delete it first.",
            code="output_exists",
        )


def write_spatialdata_result(
    result: ad.AnnData, source: str | os.PathLike, out_path: str | os.PathLike, table: str | None = None
) -> Path:
    """Write a new SpatialData store at ``out_path``: the ``source`` store's elements, with its table ``table`` (the
    only one when None) replaced by ``result`` and linked to the same region.

    ``result`` holds the source table's rows in order (or those of the one region a slide was read from). The
    source store is only read; ``out_path`` appears whole or not at all.
    """
    source, out_path = Path(source), Path(out_path)
    _check_output(source, out_path)
    sd = _import_spatialdata()
    from spatialdata.models import TableModel

    with warnings.catch_warnings():  # reading tables alone, their regions are absent by design
        warnings.filterwarnings("ignore", message="The table is annotating", category=UserWarning)
        source_tables = _read_store(source, selection=("tables",)).tables
    name, source_table = _pick_table(source_tables, table, source)
    regions, region_key, instance_key = _table_link(source_table, name)
    new_table = _result_table(result, source_table, name, region_key, instance_key)
    new_table.uns.pop(ATTRS_KEY, None)
    new_table = TableModel.parse(
        new_table, region=regions if len(regions) > 1 else regions[0], region_key=region_key, instance_key=instance_key
    )
    with _building(out_path) as built:
        # A file copy keeps every other element exactly as it was (no re-encoding of large images).
        shutil.copytree(source, built, symlinks=False)
        with _quiet_zarr():
            sdata = sd.read_zarr(built)
            sdata.tables[name] = new_table
            shutil.rmtree(built / "tables" / name)
            sdata.write_element(name)
            sdata.write_consolidated_metadata()
    return out_path


def write_spatialdata_fixture(
    adata: ad.AnnData,
    out_path: str | os.PathLike,
    image: np.ndarray | None = None,
    spot_radius: float = VISIUM_SPOT_UM / 2,
    region: str = "spots",
    table_name: str = "table",
    extra_tables: dict[str, ad.AnnData] | None = None,
    *,
    world_per_coord: float = 1.0,
    image_scale: float = 1.0,
    image_scale_factors: list[int] | None = None,
) -> Path:
    """A small SpatialData store, written by spatialdata itself, from an AnnData with ``obsm['spatial']`` (x, y).

    Circles (``spot_radius``, in obsm['spatial'] units) named ``region`` map to "global" by a scale of
    ``world_per_coord``; the table ``table_name`` annotates them (``obs['region']``, ``obs['spot_id']``). ``image``
    (y, x, 3) uint8 maps to "global" by a scale of ``image_scale`` (world units per pixel), as a pyramid when
    ``image_scale_factors`` is given. ``extra_tables`` with as many rows annotate the same circles; others annotate
    nothing.
    """
    sd = _import_spatialdata()
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    out_path = Path(out_path)
    if keys.SPATIAL not in adata.obsm:
        raise InputError(
            "the AnnData has no obsm['spatial'] to place the spots.", "add (x, y) per spot.", code="no_coordinates"
        )

    def to_global(factor: float, axes: tuple[str, str]):
        return Identity() if factor == 1 else Scale([factor, factor], axes=axes)

    coords = np.asarray(adata.obsm[keys.SPATIAL], dtype=float)[:, :2]
    ids = np.arange(adata.n_obs)
    shapes = ShapesModel.parse(
        coords,
        geometry=0,
        radius=np.full(adata.n_obs, float(spot_radius)),
        index=ids,
        transformations={"global": to_global(world_per_coord, ("x", "y"))},
    )

    def linked(table: ad.AnnData) -> ad.AnnData:
        table = table.copy()
        table.uns.pop(ATTRS_KEY, None)
        if table.n_obs != adata.n_obs:
            return TableModel.parse(table)
        table.obs["region"] = pd.Categorical([region] * table.n_obs)
        table.obs["spot_id"] = ids
        return TableModel.parse(table, region=region, region_key="region", instance_key="spot_id")

    tables = {table_name: linked(adata), **{k: linked(v) for k, v in (extra_tables or {}).items()}}
    images = {}
    if image is not None:
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        images["image"] = Image2DModel.parse(
            np.moveaxis(pixels, -1, 0),
            dims=("c", "y", "x"),
            scale_factors=image_scale_factors,
            transformations={"global": to_global(image_scale, ("y", "x"))},
        )
    sdata = sd.SpatialData(images=images, shapes={region: shapes}, tables=tables)
    with _building(out_path) as built, _quiet_zarr():
        sdata.write(built)
    return out_path
