"""Xenium bundles: write_xenium_bundle -> read_xenium round trips, the lazy morphology pyramid, outlines, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_deconv_gui.io import xenium
from spatial_deconv_gui.io.errors import InputError

N_CELLS, N_GENES = 200, 30
PIXEL_SIZE = 0.5  # not the Xenium default, so a reader that ignored experiment.xenium would be caught
IMAGE_SHAPE = (900, 1000)  # (rows, cols) at PIXEL_SIZE: 450 x 500 µm
BRIGHT_CELL = 17


def _cells() -> ad.AnnData:
    rng = np.random.default_rng(7)
    counts = sp.csr_matrix(rng.poisson(1.5, size=(N_CELLS, N_GENES)).astype(np.int32))
    ids = [f"cell{i:04d}{chr(97 + i % 26)}-1" for i in range(N_CELLS)]
    adata = ad.AnnData(
        X=counts,
        obs=pd.DataFrame({"cell_area": rng.uniform(40, 160, N_CELLS)}, index=ids),
        var=pd.DataFrame(
            {"gene_ids": [f"ENSG{j:011d}" for j in range(N_GENES)]}, index=[f"Gene{j:02d}" for j in range(N_GENES)]
        ),
    )
    # inside the image, away from its edges, with sub-pixel fractions
    adata.obsm["spatial"] = np.column_stack([rng.uniform(20, 480, N_CELLS), rng.uniform(20, 430, N_CELLS)])
    return adata


def _image(adata: ad.AnnData, cell: int = BRIGHT_CELL) -> np.ndarray:
    """Dim noise with one bright pixel: the one holding the cell's centroid (pixel (r, c) covers [c, c+1) * size)."""
    image = np.random.default_rng(3).integers(100, 200, size=IMAGE_SHAPE).astype(np.uint16)
    x, y = adata.obsm["spatial"][cell]
    image[int(y // PIXEL_SIZE), int(x // PIXEL_SIZE)] = 60000
    return image


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    return _cells()


@pytest.fixture()
def bundle(tmp_path, cells) -> Path:
    return xenium.write_xenium_bundle(cells, tmp_path / "region1", pixel_size=PIXEL_SIZE, image=_image(cells))


def _bright_world_yx(image, level0) -> np.ndarray:
    pixels = np.asarray(level0)
    row, col = np.unravel_index(int(np.argmax(pixels)), pixels.shape)
    return np.asarray(image.translate) + np.array([row, col]) * image.scale


@pytest.mark.parametrize(
    "cells_format, matrix_format, layout",
    [
        ("parquet", "h5", "2.0"),
        ("csv.gz", "mex", "1.0"),
        ("parquet", "mex", "1.0"),
        ("csv.gz", "h5", "2.0"),
    ],
)
def test_round_trip(tmp_path, cells, cells_format, matrix_format, layout):
    folder = xenium.write_xenium_bundle(
        cells,
        tmp_path / "b",
        pixel_size=PIXEL_SIZE,
        image=_image(cells),
        layout=layout,
        cells_format=cells_format,
        matrix_format=matrix_format,
    )
    slide = xenium.read_xenium(folder)
    adata = slide.adata
    assert slide.format == "xenium" and slide.unit == "µm" and slide.world_per_coord == 1.0
    assert list(adata.obs_names) == list(cells.obs_names)
    assert list(adata.var_names) == list(cells.var_names)  # the three negative controls are gone
    assert list(adata.var["gene_ids"]) == list(cells.var["gene_ids"])
    np.testing.assert_array_equal(adata.X.toarray(), cells.X.toarray())
    np.testing.assert_array_equal(adata.obsm["spatial"], cells.obsm["spatial"])  # exact, csv.gz included
    np.testing.assert_array_equal(adata.obs["cell_area"].to_numpy(), cells.obs["cell_area"].to_numpy())
    np.testing.assert_array_equal(adata.obs["transcript_counts"].to_numpy(), np.asarray(cells.X.sum(axis=1)).ravel())
    assert {"nucleus_area", "total_counts"} <= set(adata.obs.columns)
    assert not {"cell_id", "x_centroid", "y_centroid"} & set(adata.obs.columns)
    expected_diameter = np.median(2 * np.sqrt(cells.obs["cell_area"].to_numpy() / np.pi))
    assert slide.spot_diameter == pytest.approx(expected_diameter, rel=1e-12)
    assert adata.uns["xenium"]["pixel_size"] == PIXEL_SIZE
    assert slide.notices == []
    [image] = slide.images
    assert image.scale == PIXEL_SIZE and image.shape == IMAGE_SHAPE
    np.testing.assert_allclose(_bright_world_yx(image, image.levels[0]), slide.world_yx()[BRIGHT_CELL], atol=PIXEL_SIZE)


def test_negative_controls_are_in_the_file_and_dropped_on_read(bundle):
    import h5py

    with h5py.File(bundle / "cell_feature_matrix.h5", "r") as f:
        types = [t.decode() for t in f["matrix/features/feature_type"][:]]
    assert types.count("Negative Control Probe") == 2 and types.count("Negative Control Codeword") == 1
    adata = xenium.read_xenium(bundle, images=False).adata
    assert adata.n_vars == N_GENES and set(adata.var["feature_types"]) == {"Gene Expression"}


def test_image_is_a_lazy_pyramid_in_world_um(bundle, cells):
    slide = xenium.read_xenium(bundle)
    [image] = slide.images
    assert not isinstance(image.levels[0], np.ndarray)
    assert [tuple(level.shape) for level in image.levels] == [(900, 1000), (450, 500), (225, 250)]
    assert image.multiscale and not image.rgb and image.channel_axis is None
    assert image.scale == PIXEL_SIZE and image.translate == (PIXEL_SIZE / 2, PIXEL_SIZE / 2)
    lo, hi = image.contrast_limits
    assert 100 <= lo < hi <= 60000
    # The bright pixel sits at the cell's centroid: within half a pixel under the corner-origin convention.
    np.testing.assert_allclose(
        _bright_world_yx(image, image.levels[0]), slide.world_yx()[BRIGHT_CELL], atol=PIXEL_SIZE / 2 + 1e-12
    )
    kwargs = image.layer_kwargs()
    assert kwargs["multiscale"] and kwargs["scale"] == (PIXEL_SIZE, PIXEL_SIZE)


def test_several_stain_files_stack_into_channels(tmp_path, cells):
    stains = np.stack([_image(cells, 3), _image(cells, 40) // 2, _image(cells, BRIGHT_CELL) // 3])
    folder = xenium.write_xenium_bundle(cells, tmp_path / "b", pixel_size=PIXEL_SIZE, image=stains)
    assert sorted(p.name for p in (folder / "morphology_focus").iterdir()) == [
        f"morphology_focus_{i:04d}.ome.tif" for i in range(3)
    ]
    slide = xenium.read_xenium(folder)
    [image] = slide.images
    assert image.channel_axis == 0 and image.channel_names == ["DAPI", "ATP1A1/CD45/E-Cadherin", "18S"]
    assert not isinstance(image.levels[0], np.ndarray)
    assert [tuple(level.shape) for level in image.levels] == [(3, 900, 1000), (3, 450, 500), (3, 225, 250)]
    assert len(image.contrast_limits) == 3
    for channel, cell in enumerate((3, 40, BRIGHT_CELL)):
        np.testing.assert_allclose(
            _bright_world_yx(image, image.levels[0][channel]), slide.world_yx()[cell], atol=PIXEL_SIZE
        )
    # A damaged stain file costs that channel only.
    (folder / "morphology_focus" / "morphology_focus_0001.ome.tif").write_bytes(b"II*\x00garbage")
    slide = xenium.read_xenium(folder)
    [image] = slide.images
    assert image.channel_names == ["DAPI", "18S"] and image.shape == (2, 900, 1000)
    assert len(slide.notices) == 1 and "morphology_focus_0001.ome.tif" in slide.notices[0]


def test_boundaries_follow_obs_order(bundle, cells):
    # Shuffle the outlines cell by cell and drop one cell's: the reader must sort them back by obs_names.
    outlines = pd.read_parquet(bundle / "cell_boundaries.parquet")
    order = np.random.default_rng(0).permutation(N_CELLS)
    block = {cell: i for i, cell in enumerate(np.asarray(cells.obs_names)[order])}
    outlines = outlines.iloc[np.argsort(outlines["cell_id"].map(block).to_numpy(), kind="stable")]
    outlines = outlines[outlines["cell_id"] != cells.obs_names[5]]
    outlines.to_parquet(bundle / "cell_boundaries.parquet", index=False)

    slide = xenium.read_xenium(bundle, images=False, boundaries=True)
    assert len(slide.boundaries) == N_CELLS
    assert slide.boundaries[5].shape == (0, 2)
    assert any("1 cells have no outline" in n for n in slide.notices)
    world = slide.world_yx()
    area = cells.obs["cell_area"].to_numpy()
    for i, polygon in enumerate(slide.boundaries):
        if i == 5:
            continue
        assert polygon.shape == (6, 2)  # the closing repeat of the first vertex is dropped
        np.testing.assert_allclose(polygon.mean(axis=0), world[i], rtol=0, atol=1e-9)
        # each hexagon is the one drawn around this cell: its circumradius gives back the cell's area
        radius = np.linalg.norm(polygon[0] - world[i])
        assert 1.5 * np.sqrt(3) * radius**2 == pytest.approx(area[i], rel=1e-9)


def test_boundaries_file_absent_is_a_notice(bundle):
    (bundle / "cell_boundaries.parquet").unlink()
    slide = xenium.read_xenium(bundle, images=False, boundaries=True)
    assert slide.boundaries is None and any("cell_boundaries.parquet" in n for n in slide.notices)


def test_cells_table_in_another_order_or_with_extra_cells(bundle, cells):
    table = pd.read_parquet(bundle / "cells.parquet")
    extra = table.iloc[:3].assign(cell_id=["extra-1", "extra-2", "extra-3"])
    pd.concat([table.iloc[::-1], extra]).to_parquet(bundle / "cells.parquet", index=False)
    slide = xenium.read_xenium(bundle, images=False)
    assert list(slide.adata.obs_names) == list(cells.obs_names)
    np.testing.assert_array_equal(slide.adata.obsm["spatial"], cells.obsm["spatial"])
    np.testing.assert_array_equal(slide.adata.obs["cell_area"], cells.obs["cell_area"])
    assert len(slide.notices) == 1 and "3 cells" in slide.notices[0]


def test_mismatched_cell_ids(bundle, cells):
    table = pd.read_parquet(bundle / "cells.parquet")
    table.iloc[10:].to_parquet(bundle / "cells.parquet", index=False)
    with pytest.raises(InputError) as caught:
        xenium.read_xenium(bundle)
    message = str(caught.value)
    assert caught.value.code == "mismatched_cells"
    assert "200 cells" in message and "table 190" in message and "10 matrix cells" in message
    assert repr(cells.obs_names[0]) in message


def test_missing_matrix_or_cells_table(bundle):
    (bundle / "cell_feature_matrix.h5").unlink()
    with pytest.raises(InputError) as caught:
        xenium.read_xenium(bundle)
    assert caught.value.code == "missing_matrix"
    assert "cell_feature_matrix.h5" in caught.value.problem and "cell_feature_matrix/" in caught.value.problem
    other = xenium.write_xenium_bundle(_cells(), bundle.parent / "other")
    (other / "cells.parquet").unlink()
    with pytest.raises(InputError) as caught:
        xenium.read_xenium(other)
    assert caught.value.code == "missing_positions"
    assert "cells.parquet" in caught.value.problem and "cells.csv.gz" in caught.value.problem


def test_unreadable_matrix_is_tenx_error(bundle):
    (bundle / "cell_feature_matrix.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputError) as caught:
        xenium.read_xenium(bundle)
    assert caught.value.code == "bad_matrix"


def test_missing_image_opens_with_a_notice(bundle):
    shutil.rmtree(bundle / "morphology_focus")
    slide = xenium.read_xenium(bundle)
    assert slide.images == [] and slide.adata.n_obs == N_CELLS
    assert len(slide.notices) == 1 and "morphology_focus/morphology_focus_0000.ome.tif" in slide.notices[0]


def test_corrupt_image_opens_with_a_notice(bundle):
    path = bundle / "morphology_focus" / "morphology_focus_0000.ome.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated mid-way: the directory reads, the pixels do not
    slide = xenium.read_xenium(bundle)
    assert slide.images == [] and slide.adata.n_obs == N_CELLS
    assert len(slide.notices) == 1 and "morphology_focus_0000.ome.tif could not be read" in slide.notices[0]
    path.write_bytes(b"this is not a TIFF")
    slide = xenium.read_xenium(bundle)
    assert slide.images == [] and "morphology_focus_0000.ome.tif could not be read" in slide.notices[0]


def test_image_codec_not_installed_names_the_package(tmp_path, cells):
    import importlib.util

    import tifffile

    folder = xenium.write_xenium_bundle(cells, tmp_path / "b", pixel_size=PIXEL_SIZE, image=_image(cells), layout="1.0")
    # Relabel the tiles as JPEG 2000, as XOA writes them: without imagecodecs (or with it, on zlib bytes) no decode.
    with tifffile.TiffFile(folder / "morphology_focus.ome.tif", mode="r+") as tif:
        tif.pages[0].tags["Compression"].overwrite(34712)
    slide = xenium.read_xenium(folder)
    assert slide.images == [] and "morphology_focus.ome.tif could not be read" in slide.notices[0]
    if importlib.util.find_spec("imagecodecs") is None:
        assert "pip install imagecodecs" in slide.notices[0]


def test_pixel_size_from_specs_or_default(bundle):
    specs = json.loads((bundle / "experiment.xenium").read_text())
    del specs["pixel_size"]
    (bundle / "experiment.xenium").write_text(json.dumps(specs))
    slide = xenium.read_xenium(bundle / "experiment.xenium")  # the manifest itself is a valid path too
    assert slide.images[0].scale == xenium.DEFAULT_PIXEL_SIZE_UM
    assert len(slide.notices) == 1 and "0.2125" in slide.notices[0]
    assert xenium.read_xenium(bundle, images=False).notices == []  # no image, nothing placed by the default


def test_looks_like_xenium(bundle, tmp_path):
    assert xenium.looks_like_xenium(bundle) and xenium.looks_like_xenium(bundle / "experiment.xenium")
    (bundle / "experiment.xenium").unlink()
    assert xenium.looks_like_xenium(bundle)  # matrix + cells table are enough
    assert xenium.read_xenium(bundle, images=False).adata.n_obs == N_CELLS
    (bundle / "cells.parquet").unlink()
    assert not xenium.looks_like_xenium(bundle)
    assert not xenium.looks_like_xenium(tmp_path / "nowhere")
    visium = tmp_path / "outs"
    visium.mkdir()
    (visium / "filtered_feature_bc_matrix.h5").write_bytes(b"")
    assert not xenium.looks_like_xenium(visium)


def test_dispatcher_reads_xenium(bundle):
    from spatial_deconv_gui.io import slide as slide_module

    try:
        from spatial_deconv_gui.io import sdata, spaceranger
    except ImportError as exc:
        pytest.skip(f"the dispatcher's other readers are not importable yet: {exc}")
    if not (hasattr(sdata, "looks_like_spatialdata") and hasattr(spaceranger, "looks_like_visium")):
        pytest.skip("the dispatcher's other readers (io/sdata.py, io/spaceranger.py) are not complete yet")
    assert slide_module.detect_format(bundle) == "xenium"
    assert slide_module.detect_format(bundle / "experiment.xenium") == "xenium"
    slide = slide_module.read_slide(bundle, boundaries=True)
    assert slide.format == "xenium" and slide.adata.n_obs == N_CELLS and len(slide.boundaries) == N_CELLS
    assert len(slide.images) == 1
