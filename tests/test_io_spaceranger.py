"""Space Ranger outs/ folders: write_visium_folder / write_visium_hd_folder -> read_slide round trips in every layout,
the µm world frame, images under their spots in napari, RCTD equal to the .h5ad's, and bad inputs named plainly."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from spatial_deconv_gui.cli import main
from spatial_deconv_gui.io.errors import InputError
from spatial_deconv_gui.io.slide import detect_format, read_slide
from spatial_deconv_gui.io.spaceranger import (
    IMAGE_FILES,
    POSITION_LAYOUTS,
    visium_scalefactors,
    write_visium_folder,
    write_visium_hd_folder,
)

PLUGIN = "spatial-deconv-gui"
N_SPOTS, N_GENES, OUT_OF_TISSUE = 120, 30, 7
PX_PER_UM = 1.6  # full-resolution pixels per µm of the simulated layout: Visium's 55 µm spot is 88 px
DUPLICATED = (3, 7)  # gene 7 gets gene 3's symbol, as real annotations repeat some symbols
RED = np.array([255, 0, 0], np.uint8)
HD_MICRONS_PER_PIXEL = 0.2738
HD_HIRES_SCALEF = 0.1
RCTD_FAST = ["--mode", "full", "--sigma-override", "0.84", "--quiet"]

pytestmark = pytest.mark.filterwarnings("ignore:Variable names are not unique:UserWarning")  # the repeated symbol


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _barcodes(n: int, rng: np.random.Generator) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(list("ACGT"), 16)) + "-1")
    return sorted(out, key=lambda _: rng.random())


def _visium_adata() -> ad.AnnData:
    """A simulated slide dressed as Space Ranger output: real-looking barcodes, a repeated symbol, Ensembl ids and
    fractional full-resolution pixels (Space Ranger >= 2.1 writes them so)."""
    from spatial_deconv_gui.simulate import simulate_dataset

    spatial, _ = simulate_dataset(n_spots=N_SPOTS, n_genes=N_GENES, n_types=3, cells_per_type=10, seed=5)
    rng = np.random.default_rng(11)
    adata = ad.AnnData(X=spatial.X.copy(), obs=pd.DataFrame(index=_barcodes(N_SPOTS, rng)))
    symbols = [f"Sym{j}" for j in range(N_GENES)]
    symbols[DUPLICATED[1]] = symbols[DUPLICATED[0]]
    adata.var = pd.DataFrame({"gene_ids": [f"ENSMUSG{j + 1:011d}" for j in range(N_GENES)]}, index=pd.Index(symbols))
    adata.obsm["spatial"] = spatial.obsm["spatial"] * PX_PER_UM + rng.uniform(0, 1, (N_SPOTS, 2))
    return adata


def _unique_symbols() -> list[str]:
    symbols = [f"Sym{j}" for j in range(N_GENES)]
    symbols[DUPLICATED[1]] = f"Sym{DUPLICATED[0]}-1"
    return symbols


def _hires_pixels(coords: np.ndarray, scalef: float) -> np.ndarray:
    """(row, col) of each spot in an image at ``scalef``, scanpy's convention: round(coords * scalef)."""
    return np.rint(coords[:, ::-1] * scalef).astype(int)


def _image_with_red_spots(coords: np.ndarray, scalef: float, margin_px: float) -> np.ndarray:
    """Dim RGB noise (never pure red) with one pure-red pixel under each spot."""
    shape = np.ceil((coords.max(axis=0) + margin_px) * scalef).astype(int)[::-1] + 1
    image = np.random.default_rng(2).integers(0, 200, size=(*shape, 3)).astype(np.uint8)
    rows, cols = _hires_pixels(coords, scalef).T
    image[rows, cols] = RED
    return image


@pytest.fixture(scope="module")
def visium_adata() -> ad.AnnData:
    return _visium_adata()


@pytest.fixture(scope="module")
def factors() -> dict:
    """Space Ranger's keys with a small hires image (about 500 px): 40 hires pixels between neighbouring spots."""
    spot = 55 * PX_PER_UM
    return {
        "spot_diameter_fullres": spot,
        "fiducial_diameter_fullres": spot * 1.6154,
        "tissue_hires_scalef": 0.25,
        "tissue_lowres_scalef": 0.075,
    }


@pytest.fixture(scope="module")
def hires_image(visium_adata, factors) -> np.ndarray:
    return _image_with_red_spots(
        visium_adata.obsm["spatial"], factors["tissue_hires_scalef"], factors["spot_diameter_fullres"] * 2
    )


@pytest.fixture()
def outs(tmp_path, visium_adata, factors, hires_image) -> Path:
    return write_visium_folder(
        visium_adata, tmp_path / "run1" / "outs", image=hires_image, scalefactors=factors, out_of_tissue=OUT_OF_TISSUE
    )


@pytest.mark.parametrize("layout", list(POSITION_LAYOUTS))
@pytest.mark.parametrize("matrix", ["h5", "mex"])
def test_round_trip(tmp_path, visium_adata, layout, matrix):
    outs = write_visium_folder(
        visium_adata, tmp_path / "run1" / "outs", layout=layout, matrix=matrix, out_of_tissue=OUT_OF_TISSUE
    )
    run = outs.parent
    assert detect_format(outs) == detect_format(run) == "visium"
    positions_file = outs / "spatial" / POSITION_LAYOUTS[layout]
    assert sorted(p.name for p in (outs / "spatial").iterdir()) == sorted(
        [positions_file.name, "scalefactors_json.json"]
    )
    slide = read_slide(run)  # the run folder above outs/ is the same slide
    adata = slide.adata
    assert slide.format == "visium" and slide.path == outs and slide.library_id == "run1"
    assert list(adata.obs_names) == list(visium_adata.obs_names)  # matrix order, not the positions' order
    assert list(adata.var_names) == _unique_symbols()
    assert list(adata.var["gene_ids"]) == list(visium_adata.var["gene_ids"])
    assert adata.X.dtype == np.int32
    np.testing.assert_array_equal(adata.X.toarray(), visium_adata.X.toarray())
    np.testing.assert_array_equal(adata.obsm["spatial"], visium_adata.obsm["spatial"])  # exact, CSV included
    assert (adata.obs["in_tissue"] == 1).all()

    # The positions list 7 more spots (off tissue) in another order; the reader keeps the matrix's in-tissue ones.
    if layout == "parquet":
        table = pd.read_parquet(positions_file)
    else:
        table = pd.read_csv(positions_file, header=0 if layout == "2.x" else None)
        if layout == "1.x":
            assert table.columns[0] == 0  # headerless, as Space Ranger 1.x writes it
            table.columns = [
                "barcode",
                "in_tissue",
                "array_row",
                "array_col",
                "pxl_row_in_fullres",
                "pxl_col_in_fullres",
            ]
    assert len(table) == N_SPOTS + OUT_OF_TISSUE and int(table["in_tissue"].sum()) == N_SPOTS
    listed = list(table.loc[table["in_tissue"] == 1, "barcode"])
    assert sorted(listed) == sorted(visium_adata.obs_names) and listed != list(visium_adata.obs_names)
    assert not set(table.loc[table["in_tissue"] == 0, "barcode"]) & set(adata.obs_names)
    table = table.set_index("barcode").loc[adata.obs_names]
    np.testing.assert_array_equal(adata.obs["array_row"], table["array_row"])
    np.testing.assert_array_equal(adata.obs["array_col"], table["array_col"])

    defaults = visium_scalefactors(visium_adata.obsm["spatial"])
    assert json.loads((outs / "spatial" / "scalefactors_json.json").read_text()) == defaults
    assert slide.world_per_coord == 55 / defaults["spot_diameter_fullres"]
    assert slide.spot_diameter == pytest.approx(55.0, rel=1e-12) and slide.unit == "µm"
    from_outs = read_slide(outs)
    assert list(from_outs.adata.obs_names) == list(adata.obs_names) and from_outs.library_id == "run1"


def test_whole_pixel_coordinates_are_written_as_integers(tmp_path, visium_adata):
    whole = visium_adata.copy()
    whole.obsm["spatial"] = np.rint(whole.obsm["spatial"])
    outs = write_visium_folder(whole, tmp_path / "outs", layout="1.x")
    first = (outs / "spatial" / "tissue_positions_list.csv").read_text().splitlines()[0].split(",")
    assert len(first) == 6 and all(v.lstrip("-").isdigit() for v in first[1:])
    np.testing.assert_array_equal(read_slide(outs, images=False).adata.obsm["spatial"], whole.obsm["spatial"])


def test_world_frame_is_micrometres(outs, factors):
    slide = read_slide(outs)
    spot_px = factors["spot_diameter_fullres"]
    assert slide.world_per_coord == 55 / spot_px == 1 / PX_PER_UM
    assert slide.unit == "µm" and slide.spot_diameter == pytest.approx(55.0, rel=1e-12)
    np.testing.assert_allclose(
        slide.world_yx(), slide.adata.obsm["spatial"][:, ::-1] * 55 / spot_px, rtol=0, atol=1e-12
    )
    assert json.loads((outs / "spatial" / "scalefactors_json.json").read_text()) == factors


def test_default_scalefactors_follow_the_spot_pitch(visium_adata):
    from scipy.spatial import cKDTree

    coords = visium_adata.obsm["spatial"]
    pitch = np.median(cKDTree(coords).query(coords, k=2)[0][:, 1])
    assert pitch == pytest.approx(100 * PX_PER_UM, abs=1.0)  # 100 µm apart, give or take the sub-pixel jitter
    defaults = visium_scalefactors(coords)
    assert defaults["spot_diameter_fullres"] == pytest.approx(0.55 * pitch, rel=1e-12)
    assert defaults["fiducial_diameter_fullres"] / defaults["spot_diameter_fullres"] == pytest.approx(
        144.45982486939 / 89.42751063343188, rel=1e-12
    )
    extent = coords.max() + pitch
    assert defaults["tissue_hires_scalef"] == pytest.approx(2000 / extent, rel=1e-12)
    assert defaults["tissue_lowres_scalef"] == pytest.approx(600 / extent, rel=1e-12)


def test_images_hires_shown_lowres_when_hires_is_missing(outs, factors, hires_image):
    slide = read_slide(outs)
    assert slide.notices == []
    [image] = slide.images
    assert image.name == "hires" and image.rgb and image.translate == (0.0, 0.0)
    assert image.scale == slide.world_per_coord / factors["tissue_hires_scalef"]
    np.testing.assert_array_equal(image.levels[0], hires_image)
    stored = slide.adata.uns["spatial"]["run1"]
    lowres_shape = np.rint(np.array(hires_image.shape[:2]) * 0.3).astype(int)  # lowres / hires scalef = 600 / 2000
    assert stored["images"]["lowres"].shape == (*lowres_shape, 3)
    assert stored["scalefactors"] == factors

    (outs / "spatial" / IMAGE_FILES["hires"]).unlink()
    slide = read_slide(outs)
    [image] = slide.images
    assert image.name == "lowres" and image.shape == (*lowres_shape, 3) and slide.notices == []
    assert image.scale == slide.world_per_coord / factors["tissue_lowres_scalef"]
    assert read_slide(outs, images=False).images == []


def test_blank_hires_placeholder_falls_back_to_lowres(outs, factors):
    from PIL import Image

    hires = outs / "spatial" / IMAGE_FILES["hires"]
    Image.fromarray(np.zeros((50, 40, 4), np.uint8) + np.uint8([0, 0, 0, 255])).save(
        hires
    )  # as in scanpy's 1.0.0 slide
    slide = read_slide(outs)
    [image] = slide.images
    assert image.name == "lowres" and image.scale == slide.world_per_coord / factors["tissue_lowres_scalef"]
    assert slide.notices == [f"{IMAGE_FILES['hires']} is blank (one colour); showing {IMAGE_FILES['lowres']}."]


def _assert_spots_on_red(viewer, n_spots: int, size_um: float):
    image_layer, points = viewer.layers
    assert image_layer.rgb and points.data.shape == (n_spots, 2)
    np.testing.assert_array_equal(points.size, np.full(n_spots, size_um))
    assert [str(u) for u in points.units] == ["micrometer", "micrometer"]
    assert [str(u) for u in image_layer.units] == ["micrometer", "micrometer"]
    pixels = np.asarray(image_layer.data)
    for p in points.data:
        where = np.asarray(image_layer.world_to_data(points.data_to_world(p)), dtype=float)
        index = tuple(np.rint(where).astype(int))
        assert (pixels[index] == RED).all(), (p, where)
    return pixels


def test_spots_sit_on_their_pixels_in_napari(make_napari_viewer, outs, visium_adata, factors):
    viewer = make_napari_viewer()
    viewer.open(str(outs.parent), plugin=PLUGIN)
    pixels = _assert_spots_on_red(viewer, N_SPOTS, 55.0)
    # the red pixel each spot lands on is its own (round(coords * scalef)), not a neighbour's
    expected = _hires_pixels(visium_adata.obsm["spatial"], factors["tissue_hires_scalef"])
    image_layer, points = viewer.layers
    landed = np.array([image_layer.world_to_data(points.data_to_world(p)) for p in points.data])
    assert np.abs(landed - expected).max() <= 1.0
    assert int((pixels == RED).all(axis=2).sum()) == len({tuple(e) for e in expected})


def _hd_bins(bin_um: int, n_bins: int, seed: int) -> ad.AnnData:
    """Square bins of ``bin_um`` µm, their centres in full-resolution pixels, barcodes as Space Ranger names them."""
    from spatial_deconv_gui.simulate import simulate_dataset

    spatial, _ = simulate_dataset(
        n_spots=n_bins, n_genes=N_GENES, n_types=3, cells_per_type=10, grid="square", seed=seed
    )
    grid = np.rint((spatial.obsm["spatial"] - 50.0) / 100.0).astype(int)  # simulate: 100 µm pitch from 50 µm
    centres_um = 300.0 + (grid + 0.5) * bin_um
    barcodes = [f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for c, r in grid]
    adata = ad.AnnData(
        X=spatial.X.copy(),
        obs=pd.DataFrame(index=barcodes),
        var=pd.DataFrame(index=[f"Sym{j}" for j in range(N_GENES)]),
    )
    adata.obsm["spatial"] = centres_um / HD_MICRONS_PER_PIXEL
    return adata


@pytest.fixture(scope="module")
def hd_bins() -> dict[int, ad.AnnData]:
    return {8: _hd_bins(8, 150, 1), 16: _hd_bins(16, 60, 2)}


@pytest.fixture()
def hd_outs(tmp_path, hd_bins) -> Path:
    coords = np.vstack([a.obsm["spatial"] for a in hd_bins.values()])
    image = _image_with_red_spots(coords, HD_HIRES_SCALEF, 16 / HD_MICRONS_PER_PIXEL)
    return write_visium_hd_folder(
        hd_bins,
        tmp_path / "hd" / "outs",
        image=image,
        microns_per_pixel=HD_MICRONS_PER_PIXEL,
        hires_scalef=HD_HIRES_SCALEF,
    )


def test_visium_hd_round_trip(hd_outs, hd_bins):
    assert detect_format(hd_outs) == detect_format(hd_outs.parent) == "visium_hd"
    for size, bins in hd_bins.items():
        folder = hd_outs / "binned_outputs" / f"square_{size:03d}um"
        assert detect_format(folder) == "visium_hd"
        for path, options in ((hd_outs, {"bin_size": size}), (folder, {})):
            slide = read_slide(path, **options)
            assert slide.format == "visium_hd" and slide.path == folder and slide.notices == []
            assert list(slide.adata.obs_names) == list(bins.obs_names)
            assert list(slide.adata.var_names) == list(bins.var_names)
            np.testing.assert_array_equal(slide.adata.X.toarray(), bins.X.toarray())
            np.testing.assert_array_equal(slide.adata.obsm["spatial"], bins.obsm["spatial"])
            assert slide.world_per_coord == HD_MICRONS_PER_PIXEL and slide.unit == "µm"
            assert slide.spot_diameter == size
            [image] = slide.images
            assert image.name == "hires" and image.scale == HD_MICRONS_PER_PIXEL / HD_HIRES_SCALEF
        factors = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
        assert factors["bin_size_um"] == size and factors["microns_per_pixel"] == HD_MICRONS_PER_PIXEL
        assert factors["spot_diameter_fullres"] == pytest.approx(size / HD_MICRONS_PER_PIXEL, rel=1e-12)
    # the 8 µm bins by default; their world pitch is 8 µm
    slide = read_slide(hd_outs)
    assert slide.adata.n_obs == 150
    step = np.diff(np.unique(slide.world_yx()[:, 1]))
    np.testing.assert_allclose(step, 8.0, rtol=0, atol=1e-9)


def test_visium_hd_images_only_in_outs_spatial(tmp_path, hd_bins):
    image = np.zeros((400, 400, 3), np.uint8)
    outs = write_visium_hd_folder(
        hd_bins, tmp_path / "outs", image=image, hires_scalef=HD_HIRES_SCALEF, images_in="outs", matrix="mex"
    )
    assert not (outs / "binned_outputs" / "square_016um" / "spatial" / IMAGE_FILES["hires"]).exists()
    slide = read_slide(outs, bin_size=16)
    assert [im.name for im in slide.images] == ["hires"] and slide.images[0].shape == (400, 400, 3)
    np.testing.assert_array_equal(slide.adata.X.toarray(), hd_bins[16].X.toarray())


def test_visium_hd_bins_sit_on_their_pixels_in_napari(make_napari_viewer, hd_outs, hd_bins):
    viewer = make_napari_viewer()
    viewer.open(str(hd_outs), plugin=PLUGIN)
    _assert_spots_on_red(viewer, hd_bins[8].n_obs, 8.0)
    viewer.layers.clear()
    viewer.open(str(hd_outs / "binned_outputs" / "square_016um"), plugin=PLUGIN)
    _assert_spots_on_red(viewer, hd_bins[16].n_obs, 16.0)


def test_rctd_on_the_folder_equals_rctd_on_the_h5ad(small_pair, tmp_path, capsys):
    spatial, reference = small_pair
    h5ad, ref = tmp_path / "slide.h5ad", tmp_path / "reference.h5ad"
    spatial.write_h5ad(h5ad)
    reference.write_h5ad(ref)
    # simulate's nUMI is the row sum, which is what the folder (no nUMI column) gives RCTD
    np.testing.assert_array_equal(spatial.obs["nUMI"], np.asarray(spatial.X.sum(axis=1)).ravel())
    outs = write_visium_folder(spatial, tmp_path / "run" / "outs", layout="2.x", out_of_tissue=OUT_OF_TISSUE)
    before = _tree_digest(outs.parent)
    results = {}
    for name, source in (("h5ad", h5ad), ("folder", outs.parent)):
        out = tmp_path / f"{name}_rctd.h5ad"
        code = main(["run", str(source), str(ref), "--method", "rctd", "--output", str(out), *RCTD_FAST])
        assert code == 0, capsys.readouterr().err
        results[name] = ad.read_h5ad(out)
    assert _tree_digest(outs.parent) == before  # the run wrote beside the input, never into it
    a, b = results["h5ad"].obsm["rctd_proportions"], results["folder"].obsm["rctd_proportions"]
    assert list(a.index) == list(b.index) == list(spatial.obs_names) and list(a.columns) == list(b.columns)
    fitted = ~a.isna().any(axis=1).to_numpy()
    assert fitted.sum() > 0.9 * spatial.n_obs
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(results["folder"].obsm["spatial"], spatial.obsm["spatial"])


# --- bad inputs ------------------------------------------------------------------------------------------------


def _read_error(path, **options) -> InputError:
    with pytest.raises(InputError) as caught:
        read_slide(path, **options)
    return caught.value


def test_missing_matrix(outs):
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    error = _read_error(outs.parent)
    assert error.code == "missing_matrix"
    assert "filtered_feature_bc_matrix.h5" in error.problem and "filtered_feature_bc_matrix/" in error.problem
    assert str(outs) in error.problem


def test_missing_positions(outs):
    (outs / "spatial" / "tissue_positions.csv").unlink()
    error = _read_error(outs)
    assert error.code == "missing_positions"
    for name in ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv"):
        assert f"spatial/{name}" in error.problem


def test_missing_scalefactors(outs):
    (outs / "spatial" / "scalefactors_json.json").unlink()
    error = _read_error(outs)
    assert error.code == "missing_scalefactors" and "spatial/scalefactors_json.json" in error.problem


def test_barcodes_that_do_not_match(outs, visium_adata):
    positions = outs / "spatial" / "tissue_positions.csv"
    table = pd.read_csv(positions)
    dropped = list(visium_adata.obs_names[[4, 9, 30]])
    table[~table["barcode"].isin(dropped)].to_csv(positions, index=False)
    error = _read_error(outs)
    assert error.code == "barcode_mismatch"
    total = N_SPOTS + OUT_OF_TISSUE - 3
    assert f"({N_SPOTS:,}, e.g. {dropped[0]})" in error.problem  # the example is a barcode with no position
    assert f"({total:,}, {N_SPOTS - 3:,} in tissue, e.g. " in error.problem
    assert "3 barcodes of the matrix have no position" in error.problem
    example = error.problem.split(f"{N_SPOTS - 3:,} in tissue, e.g. ")[1].split(")")[0]
    assert example in set(table["barcode"]) and example not in dropped


def test_absent_images_open_with_a_notice(outs):
    for name in IMAGE_FILES.values():
        (outs / "spatial" / name).unlink()
    slide = read_slide(outs)
    assert slide.images == [] and slide.adata.n_obs == N_SPOTS
    assert slide.adata.uns["spatial"]["run1"]["images"] == {}
    [notice] = slide.notices
    assert "tissue_hires_image.png" in notice and "tissue_lowres_image.png" in notice and "without" in notice


def test_truncated_png_opens_with_a_notice(outs, factors):
    hires = outs / "spatial" / IMAGE_FILES["hires"]
    data = hires.read_bytes()
    hires.write_bytes(data[: len(data) // 2])
    slide = read_slide(outs)
    [image] = slide.images  # the lowres copy stands in
    assert image.name == "lowres" and image.scale == slide.world_per_coord / factors["tissue_lowres_scalef"]
    [notice] = slide.notices
    assert "tissue_hires_image.png could not be read" in notice
    lowres = outs / "spatial" / IMAGE_FILES["lowres"]
    lowres.write_bytes(lowres.read_bytes()[:100])
    slide = read_slide(outs)
    assert slide.images == [] and slide.adata.n_obs == N_SPOTS
    assert len(slide.notices) == 2  # one per damaged file, no claim that the folder has no image
    assert "tissue_hires_image.png could not be read" in slide.notices[0]
    assert "tissue_lowres_image.png could not be read" in slide.notices[1]


def test_visium_hd_bin_size_not_there(hd_outs):
    error = _read_error(hd_outs, bin_size=2)
    assert error.code == "unknown_bin_size"
    assert "002 µm" in error.problem and "8 µm, 16 µm" in error.problem and "--bin-size 8" in error.fix
    shutil.rmtree(hd_outs / "binned_outputs" / "square_008um")
    error = _read_error(hd_outs.parent)  # the default 8 µm is gone too
    assert error.code == "unknown_bin_size" and "(it has 16 µm)" in error.problem


def test_random_folder_is_not_a_slide(tmp_path):
    folder = tmp_path / "holiday_photos"
    folder.mkdir()
    (folder / "notes.txt").write_text("nothing here")
    assert detect_format(folder) is None
    error = _read_error(folder)
    assert error.code == "unknown_format" and "is not a slide this tool reads" in error.problem


def test_bad_folder_through_the_cli(outs, small_pair_files, tmp_path, capsys):
    _, ref = small_pair_files
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    before = _tree_digest(outs)
    assert main(["validate", str(outs.parent), str(ref)]) == 2
    err = capsys.readouterr().err
    assert "has no count matrix" in err and "filtered_feature_bc_matrix.h5" in err
    out = tmp_path / "result.h5ad"
    assert main(["run", str(outs.parent), str(ref), "--method", "rctd", "--output", str(out), *RCTD_FAST]) == 2
    err = capsys.readouterr().err
    assert "has no count matrix" in err and "filtered_feature_bc_matrix/" in err
    assert not out.exists() and _tree_digest(outs) == before


def test_h5ad_with_scanpy_images_reopens_the_same(outs, tmp_path):
    slide = read_slide(outs)
    path = tmp_path / "from_space_ranger.h5ad"
    slide.adata.write_h5ad(path)
    again = read_slide(path)
    assert again.format == "h5ad" and again.library_id == "run1" and again.notices == []
    [image], [first] = again.images, slide.images
    assert image.name == "hires" and image.scale == first.scale and image.translate == first.translate
    np.testing.assert_array_equal(image.levels[0], first.levels[0])
    assert again.world_per_coord == slide.world_per_coord and again.unit == slide.unit
    assert again.spot_diameter == slide.spot_diameter == pytest.approx(55.0)
    np.testing.assert_array_equal(again.world_yx(), slide.world_yx())


@pytest.mark.shared_data
def test_shared_visium_as_a_space_ranger_folder(shared_data, tmp_path, capsys):
    """The spacexr hippocampus spots are whole full-resolution pixels 137 px apart (Visium's 100 µm pitch, so
    0.73 µm / px): written as a Space Ranger 2.x folder, RCTD doublet gives the .h5ad's weights. The folder carries
    no obs['nUMI'] (the origin's whole-transcriptome count), so both runs use the row sums (--numi-col none)."""
    from scipy.spatial import cKDTree

    h5ad = shared_data / "spacexr_visium_hippocampus_spatial.h5ad"
    ref = shared_data / "spacexr_visium_hippocampus_reference.h5ad"
    spatial = ad.read_h5ad(h5ad)
    coords = spatial.obsm["spatial"]
    assert np.array_equal(coords, np.rint(coords))
    pitch = np.median(cKDTree(coords).query(coords, k=2)[0][:, 1])
    assert pitch == 137.0
    outs = write_visium_folder(spatial, tmp_path / "hippocampus" / "outs", layout="2.x")
    slide = read_slide(outs.parent)
    np.testing.assert_array_equal(slide.adata.X.toarray(), spatial.X.toarray())
    np.testing.assert_array_equal(slide.adata.obsm["spatial"], coords)
    assert list(slide.adata.obs_names) == list(spatial.obs_names)
    assert list(slide.adata.var_names) == list(spatial.var_names)
    assert slide.world_per_coord == pytest.approx(100 / 137, rel=1e-12) and slide.spot_diameter == pytest.approx(55)

    results = {}
    for name, source in (("h5ad", h5ad), ("folder", outs.parent)):
        out = tmp_path / f"{name}_doublet.h5ad"
        code = main(
            [
                "run",
                str(source),
                str(ref),
                "--method",
                "rctd",
                "--mode",
                "doublet",
                "--numi-col",
                "none",
                "--output",
                str(out),
                "--quiet",
            ]
        )
        assert code == 0, capsys.readouterr().err
        results[name] = ad.read_h5ad(out)
    a, b = results["h5ad"], results["folder"]
    assert list(a.obs_names) == list(b.obs_names)
    for key in ("rctd_weights", "rctd_weights_doublet"):
        assert list(a.obsm[key].columns) == list(b.obsm[key].columns)
        np.testing.assert_allclose(b.obsm[key].to_numpy(), a.obsm[key].to_numpy(), rtol=0, atol=1e-12)
    for col in ("rctd_spot_class", "rctd_first_type", "rctd_second_type"):
        assert list(b.obs[col].astype(str)) == list(a.obs[col].astype(str))
    assert (a.obs["rctd_spot_class"].astype(str) != "reject").sum() > 250
