"""The common slot scheme and atomic writes: inputs are never modified, readers never see half a file."""

from __future__ import annotations

import hashlib
import os

import anndata as ad
import numpy as np
import pytest

from spatial_deconv_gui import api
from spatial_deconv_gui.engines.base import DeconvResult
from spatial_deconv_gui.io import InputError, attach_result, write_h5ad_atomic


def _result(n, types, filtered=()):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(len(types)), size=n)
    p[list(filtered)] = np.nan
    return DeconvResult(
        key="toy",
        method="toy",
        mode="full",
        cell_types=types,
        proportions=p,
        params={"alpha": 0.5, "sigma_override": None, "genes": ("a", "b")},
        device="cpu",
        runtime_s=1.25,
        obs={"toy_score": np.arange(n, dtype=float)},
    )


def test_attach_result_slots(small_pair):
    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    res = _result(spatial.n_obs, types, filtered=(0, 5))
    before = spatial.copy()
    out = attach_result(spatial, res)

    props = out.obsm["toy_proportions"]
    assert list(props.columns) == types and list(props.index) == list(spatial.obs_names)
    assert np.isnan(props.iloc[[0, 5]].to_numpy()).all()
    fitted = props.drop(index=props.index[[0, 5]]).to_numpy()
    np.testing.assert_allclose(fitted.sum(axis=1), 1.0, atol=1e-12)
    dom = out.obs["toy_dominant_type"]
    assert dom.iloc[0] == "filtered" and dom.iloc[5] == "filtered"
    assert dom.iloc[1] == types[int(np.argmax(res.proportions[1]))]
    assert list(dom.cat.categories) == types + ["filtered"]
    meta = out.uns["toy"]
    assert meta["method"] == "toy" and meta["mode"] == "full" and meta["device"] == "cpu"
    assert meta["runtime_s"] == 1.25 and list(meta["cell_types"]) == types
    assert meta["parameters"]["sigma_override"] == "None" and meta["n_filtered"] == 2
    np.testing.assert_array_equal(out.obs["toy_score"], np.arange(spatial.n_obs))
    assert len(out.uns["cell_type_colors"]) == len(types)
    # the input object is untouched
    assert "toy_proportions" not in spatial.obsm and "toy" not in spatial.uns
    assert list(spatial.obs.columns) == list(before.obs.columns)


def test_user_colours_are_honoured(small_pair):
    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    ref = reference.copy()
    ref.uns["cell_type_colors"] = ["#000001", "#000002", "#000003", "#000004"]
    from spatial_deconv_gui.io.write import known_colors

    out = attach_result(spatial, _result(spatial.n_obs, types), colors=known_colors(ref))
    assert list(out.uns["cell_type_colors"]) == ["#000001", "#000002", "#000003", "#000004"]
    assert list(out.uns["toy_dominant_type_colors"])[-1] == "#808080"


def test_round_trip_through_h5ad(small_pair, tmp_path):
    spatial, reference = small_pair
    types = list(reference.obs["cell_type"].cat.categories)
    out = attach_result(spatial, _result(spatial.n_obs, types, filtered=(2,)))
    path = write_h5ad_atomic(out, tmp_path / "res.h5ad")
    back = ad.read_h5ad(path)
    np.testing.assert_allclose(back.obsm["toy_proportions"].to_numpy(), out.obsm["toy_proportions"].to_numpy())
    assert back.obs["toy_dominant_type"].iloc[2] == "filtered"
    assert [p.name for p in tmp_path.iterdir()] == ["res.h5ad"]  # no temp file left behind


def test_failed_write_keeps_the_old_file(small_pair, tmp_path, monkeypatch):
    spatial, _ = small_pair
    target = tmp_path / "out.h5ad"
    target.write_bytes(b"previous result")

    def boom(self, path, **kw):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", boom)
    with pytest.raises(OSError):
        write_h5ad_atomic(spatial, target)
    assert target.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["out.h5ad"]


def test_save_refuses_to_overwrite_input(small_pair_files):
    s, _ = small_pair_files
    digest = hashlib.sha256(s.read_bytes()).hexdigest()
    with pytest.raises(InputError, match="one of the input files"):
        api.save_result(ad.read_h5ad(s), s, protect=(s,))
    assert hashlib.sha256(s.read_bytes()).hexdigest() == digest
