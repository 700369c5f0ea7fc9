"""The CLI on a SpatialData store: the table question, results written back as a store, refusals before any work."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from spatial_deconv_gui.cli import main

sd = pytest.importorskip("spatialdata")

FAST_RCTD = ["--method", "rctd", "--mode", "full", "--sigma-override", "0.84", "--quiet"]


@pytest.fixture
def two_table_store(small_pair, tmp_path):
    from spatial_deconv_gui.io.sdata import write_spatialdata_fixture

    spatial, reference = small_pair
    shuffled = spatial.copy()
    shuffled.X = shuffled.X[:, ::-1]  # another table over the same spots
    store = write_spatialdata_fixture(spatial, tmp_path / "slide.zarr", extra_tables={"other": shuffled})
    ref = tmp_path / "reference.h5ad"
    reference.write_h5ad(ref)
    return store, ref


def test_several_tables_need_table_then_zarr_output_round_trips(two_table_store, small_pair, tmp_path, capsys):
    store, ref = two_table_store
    out = tmp_path / "result.zarr"
    assert main(["run", str(store), str(ref), *FAST_RCTD, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 tables: other, table" in err and "--table" in err
    assert not out.exists()
    assert main(["validate", str(store), str(ref), "--table", "table"]) == 0
    assert main(["run", str(store), str(ref), *FAST_RCTD, "--table", "table", "--output", str(out)]) == 0
    written = sd.read_zarr(out)
    table = written.tables["table"]
    spatial, _ = small_pair
    assert list(table.obs_names) == list(spatial.obs_names)
    direct = tmp_path / "direct.h5ad"
    spatial.write_h5ad(tmp_path / "slide.h5ad")
    assert main(["run", str(tmp_path / "slide.h5ad"), str(ref), *FAST_RCTD, "--output", str(direct)]) == 0
    np.testing.assert_allclose(
        table.obsm["rctd_proportions"].to_numpy(), ad.read_h5ad(direct).obsm["rctd_proportions"].to_numpy(), atol=1e-12
    )
    assert set(written.shapes) == set(sd.read_zarr(store).shapes)  # the store's elements come along


def test_zarr_output_needs_a_zarr_input_and_is_refused_before_work(small_pair_files, tmp_path, capsys):
    s, r = small_pair_files
    out = tmp_path / "result.zarr"
    assert main(["run", str(s), str(r), *FAST_RCTD, "--output", str(out)]) == 2
    assert "for a SpatialData .zarr input only" in capsys.readouterr().err
    assert not out.exists()
    assert main(["run", str(s), str(r), *FAST_RCTD, "--output", str(tmp_path / "result.csv")]) == 2
    assert "neither an .h5ad nor a .zarr" in capsys.readouterr().err


def test_output_inside_the_input_store_is_refused(two_table_store, capsys):
    store, ref = two_table_store
    assert (
        main(["run", str(store), str(ref), *FAST_RCTD, "--table", "table", "--output", str(store / "nested.zarr")]) == 2
    )
    assert "inside" in capsys.readouterr().err
