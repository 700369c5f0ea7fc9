"""`spatial-deconv validate`: every bad input exits 2 with a message naming the problem; good pairs exit 0."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_deconv_gui.cli import main


def _write(adata, path):
    adata.write_h5ad(path)
    return str(path)


def _validate(capsys, *args):
    code = main(["validate", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def pair(small_pair):
    spatial, reference = small_pair
    return spatial.copy(), reference.copy()


def test_good_pair_exits_zero(pair, tmp_path, capsys):
    s, r = pair
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 0, text
    assert "no problems" in text


def test_missing_coordinates(pair, tmp_path, capsys):
    s, r = pair
    del s.obsm["spatial"]
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert "no spot coordinates" in text and "obsm['spatial']" in text


def test_coordinates_from_obs_columns_are_found(pair, tmp_path, capsys):
    s, r = pair
    s.obs["x"], s.obs["y"] = s.obsm["spatial"][:, 0], s.obsm["spatial"][:, 1]
    del s.obsm["spatial"]
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 0, text


def test_shape_mismatch_of_coordinates(pair, tmp_path, capsys):
    s, r = pair
    s.obsm["spatial"] = s.obsm["spatial"][:, :1]
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert "shape" in text and "(300, 1)" in text


def test_few_shared_genes_reports_the_count(pair, tmp_path, capsys):
    s, r = pair
    r.var_names = [f"Other{i}" if i >= 5 else g for i, g in enumerate(r.var_names)]
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert "only 5 gene(s) are shared" in text


@pytest.mark.parametrize(
    "value, phrase",
    [(-3.0, "negative"), (2.5, "non-integer"), (np.nan, "NaN"), (np.inf, "infinite")],
)
def test_bad_count_values(pair, tmp_path, capsys, value, phrase):
    s, r = pair
    x = s.X.astype(np.float64).tocsr()
    x.data[7] = value
    s.X = x
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert phrase in text
    assert "Fix:" in text


def test_bad_counts_in_reference_name_the_reference(pair, tmp_path, capsys):
    s, r = pair
    x = r.X.astype(np.float64).tocsr()
    x.data[:10] = np.log1p(x.data[:10]) + 0.1
    r.X = x
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "ref.h5ad"))
    assert code == 2
    assert "[ref.h5ad]" in text and "non-integer" in text


def test_empty_spots(pair, tmp_path, capsys):
    s, r = pair
    x = s.X.tolil()
    x[[3, 9], :] = 0
    s.X = sp.csr_matrix(x)
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    # a warning: the runs leave them out and keep them as NaN rows (tests/test_robustness.py runs each method)
    assert code == 0, text
    assert text.startswith("OK with warnings:")
    assert "2 of 300 spot(s) have no counts" in text and "NaN rows" in text


def test_slide_with_zero_spots_is_refused(pair, tmp_path, capsys):
    s, r = pair
    code, text = _validate(capsys, _write(s[:0].copy(), tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 2, text
    assert "no problems" not in text and "the file has no spots (0 x 120)" in text


def test_slide_with_zero_genes_is_refused(pair, tmp_path, capsys):
    s, r = pair
    code, text = _validate(capsys, _write(s[:, :0].copy(), tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 2, text
    assert "the file has no genes (300 x 0)" in text


def test_slide_whose_spots_are_all_empty_is_refused(pair, tmp_path, capsys):
    s, r = pair
    s.X = sp.csr_matrix(s.shape, dtype=np.float32)
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert "all 300 spot(s) have no counts" in text


def test_huge_count_is_refused(pair, tmp_path, capsys):
    s, r = pair
    x = s.X.astype(np.float64).tocsr()
    x.data[4] = 2.0**40
    s.X = x
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert "1 value(s) above 16,777,216 (largest 1.1e+12)" in text


def test_infinite_coordinates(pair, tmp_path, capsys):
    s, r = pair
    s.obsm["spatial"] = s.obsm["spatial"].astype(float)
    s.obsm["spatial"][[2, 5], 1] = [np.inf, np.nan]
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert "2 spot(s) have NaN or infinite coordinates (in obsm['spatial'])" in text


@pytest.mark.parametrize("fill", [np.nan, "", "  "])
def test_cell_type_column_without_labels(pair, tmp_path, capsys, fill):
    s, r = pair
    r.obs["cell_type"] = np.nan if isinstance(fill, float) else pd.Categorical([fill] * r.n_obs)
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert "'cell_type' holds no cell types: all 120 value(s) are missing or blank" in text


def test_some_unlabelled_cells_are_a_warning(pair, tmp_path, capsys):
    s, r = pair
    labels = r.obs["cell_type"].astype(object).to_numpy()
    labels[:3] = None
    r.obs["cell_type"] = pd.Categorical(labels)
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"), "--cell-min", "20")
    assert code == 0, text
    assert "3 of 120 cell(s) have a missing or blank 'cell_type'" in text


@pytest.mark.parametrize("value", [np.nan, 0.0, -5.0])
def test_bad_numi_column(pair, tmp_path, capsys, value):
    s, r = pair
    s.obs["nUMI"] = np.asarray(s.X.sum(axis=1)).ravel().astype(float)
    s.obs.iloc[7, s.obs.columns.get_loc("nUMI")] = value
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert "obs['nUMI'] (the total UMI per observation) is missing, infinite or not positive for 1" in text


def test_missing_numi_on_a_spot_without_counts_is_no_problem(pair, tmp_path, capsys):
    """Such a spot is left out of the fit, so its library size is never used."""
    s, r = pair
    x = s.X.toarray() if hasattr(s.X, "toarray") else np.array(s.X)
    x[7] = 0
    s.X = x
    s.obs["nUMI"] = np.asarray(s.X.sum(axis=1)).ravel().astype(float)
    s.obs.iloc[7, s.obs.columns.get_loc("nUMI")] = np.nan
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 0, text
    assert "nUMI" not in text


def test_truncated_h5ad(pair, tmp_path, capsys):
    s, r = pair
    good = _write(s, tmp_path / "full.h5ad")
    data = open(good, "rb").read()
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(data[: len(data) // 2])
    code, text = _validate(capsys, cut, _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert "cut.h5ad is an HDF5 file but not a readable AnnData" in text and "Traceback" not in text


def test_unknown_cell_type_column_lists_columns(pair, tmp_path, capsys):
    s, r = pair
    code, text = _validate(
        capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"), "--cell-type-col", "celltype"
    )
    assert code == 2
    assert "no obs column 'celltype'" in text and "'cell_type'" in text and "'nUMI'" in text


def test_small_cell_types_are_named(pair, tmp_path, capsys):
    s, r = pair
    labels = r.obs["cell_type"].astype(str).to_numpy()
    first = np.flatnonzero(labels == labels[0])
    labels[first[:25]] = "Rare"  # the original type keeps 5 cells, "Rare" gets 25
    r.obs["cell_type"] = pd.Categorical(labels)
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert f"{labels[first[-1]]} (5)" in text and "Rare" not in text.split("fewer than")[1].split("Fix")[0]


@pytest.mark.parametrize("axis", ["obs", "var"])
def test_duplicated_names(pair, tmp_path, capsys, axis):
    s, r = pair
    names = list(getattr(s, f"{axis}_names"))
    names[1] = names[0]
    setattr(s, f"{axis}_names", names)
    code, text = _validate(capsys, _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert f"duplicated {axis} name" in text and f"{axis}_names_make_unique" in text


def test_not_an_h5ad_file(pair, tmp_path, capsys):
    s, r = pair
    bogus = tmp_path / "counts.h5ad"
    bogus.write_text("gene,spot1\nA,1\n")
    code, text = _validate(capsys, bogus, _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert "not an .h5ad (HDF5) file" in text


def test_reference_passed_as_slide_is_recognised(pair, tmp_path, capsys):
    _, r = pair
    code, text = _validate(capsys, _write(r, tmp_path / "r.h5ad"))
    assert code == 2
    assert "looks like a reference" in text


def test_json_report(pair, tmp_path, capsys):
    import json

    s, r = pair
    del s.obsm["spatial"]
    code = main(["validate", _write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 2 and report["ok"] is False
    assert [p["code"] for p in report["problems"]] == ["missing_coordinates"]
    assert report["summary"]["shared_genes"] == 120


def test_validation_never_modifies_inputs(pair, tmp_path, capsys):
    s, r = pair
    paths = [_write(s, tmp_path / "s.h5ad"), _write(r, tmp_path / "r.h5ad")]
    before = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]
    _validate(capsys, *paths)
    assert [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths] == before


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["slideseq_cerebellum", "visium_hippocampus", "visium_lymphnode_human"])
def test_shared_pairs_are_valid(shared_data, capsys, name):
    code, text = _validate(
        capsys, shared_data / f"spacexr_{name}_spatial.h5ad", shared_data / f"spacexr_{name}_reference.h5ad"
    )
    assert code == 0, text


def test_info_json(capsys):
    import json

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cuda_available"] in (True, False)
    assert info["torch"].startswith("2.")
    assert set(info) >= {"spatial_deconv_gui", "numpy", "anndata", "napari", "cuda_devices", "methods"}


def test_run_unknown_method_lists_known(small_pair_files, capsys):
    s, r = small_pair_files
    code = main(["run", str(s), str(r), "--method", "nope"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown method 'nope'" in err and "use one of" in err
