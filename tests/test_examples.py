"""The example scripts run as a user would run them, and say what they should."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script: str, *args, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_manifest_at_the_root_is_the_one_the_package_ships():
    assert (ROOT / "napari.yaml").read_bytes() == (ROOT / "src" / "spatial_deconv_gui" / "napari.yaml").read_bytes()


@pytest.mark.slow
def test_deconvolve_sample_example(tmp_path):
    out = _run("deconvolve_sample.py", tmp_path / "res.h5ad", cwd=tmp_path)
    right = float(re.search(r"dominant type right in ([\d.]+)%", out).group(1))
    assert right > 85.0  # the sample is simulated: RCTD recovers its dominant types
    saved = ad.read_h5ad(tmp_path / "res.h5ad")
    np.testing.assert_allclose(saved.obsm["rctd_proportions"].sum(axis=1), 1.0, atol=1e-9)


@pytest.mark.slow
def test_space_ranger_example_matches_the_h5ad_run(tmp_path):
    from spatial_deconv_gui import api
    from spatial_deconv_gui.sample_data import sample_paths

    out = _run("space_ranger_to_result.py", tmp_path / "sr.h5ad", cwd=tmp_path)
    assert "visium; 1,200 spots" in out and "1200/1200 spots fitted" in out
    saved = ad.read_h5ad(tmp_path / "sr.h5ad")
    assert "hires" in next(iter(saved.uns["spatial"].values()))["images"]
    spatial, reference = sample_paths()
    direct = api.run_deconvolution(spatial, reference, method="rctd", params={"mode": "doublet"}).adata
    ours = saved.obsm["rctd_proportions"]
    np.testing.assert_allclose(ours.to_numpy(), direct.obsm["rctd_proportions"].loc[ours.index].to_numpy(), atol=1e-12)


@pytest.mark.slow
def test_knockout_example(tmp_path):
    out = _run("knockout.py", tmp_path / "model", tmp_path / "ko.h5ad", cwd=tmp_path)
    moved = dict((g, float(v)) for g, v in re.findall(r"(\w+) ([\d.]+)", out.split("(mean |Δ|):")[1].splitlines()[0]))
    assert "Tf0" in moved and moved["Tf0"] > 0.5  # the knocked-out TF itself drops most
    assert sum(g.startswith("Gene") for g in moved) >= 3  # and its targets follow
    ko = ad.read_h5ad(tmp_path / "ko.h5ad")
    assert ko.obsm["perturb_vectors"].shape == (ko.n_obs, 2)


def test_the_version_is_written_once():
    import importlib.metadata

    import tomllib

    import spatial_deconv_gui

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("spatial-deconv-gui") == spatial_deconv_gui.__version__
