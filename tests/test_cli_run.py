"""`spatial-deconv run` and the main job's headless mode, end to end on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from spatial_deconv_gui.cli import main

pytest.importorskip("spatial_deconv_gui.engines.rctd")


def test_run_rctd_full_writes_slots_and_json(small_pair_files, tmp_path, capsys):
    s, r = small_pair_files
    out = tmp_path / "out" / "result.h5ad"
    csv = tmp_path / "props.csv"
    code = main(
        [
            "run",
            str(s),
            str(r),
            "--method",
            "rctd",
            "--mode",
            "full",
            "--output",
            str(out),
            "--csv",
            str(csv),
            "--json",
            "--quiet",
            "--sigma-override",
            "0.84",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""  # --quiet: no progress output
    summary = json.loads(captured.out)
    assert summary["mode"] == "full" and summary["output"] == str(out)
    res = ad.read_h5ad(out)
    props = res.obsm["rctd_proportions"]
    fitted = ~props.isna().any(axis=1).to_numpy()
    assert summary["n_fitted"] == int(fitted.sum()) > 0
    np.testing.assert_allclose(props[fitted].sum(axis=1), 1.0, atol=1e-9)
    truth = ad.read_h5ad(s).obsm["true_proportions"].to_numpy()[fitted]
    agree = np.mean(props.to_numpy()[fitted].argmax(1) == truth.argmax(1))
    assert agree > 0.8, agree
    assert res.uns["rctd"]["mode"] == "full" and res.uns["rctd"]["device"] == "cpu"
    assert "rctd_weights" in res.obsm
    import pandas as pd

    np.testing.assert_allclose(pd.read_csv(csv, index_col=0).to_numpy(), props.to_numpy())


def test_run_progress_goes_to_stderr(small_pair_files, tmp_path, capsys):
    s, r = small_pair_files
    code = main(
        [
            "run",
            str(s),
            str(r),
            "--method",
            "rctd",
            "--mode",
            "full",
            "-o",
            str(tmp_path / "o.h5ad"),
            "--sigma-override",
            "0.84",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out == ""
    assert "pixels" in captured.err and "100%" in captured.err and "spots fitted" in captured.err


def test_run_bad_option_value_is_a_clear_error(small_pair_files, tmp_path, capsys):
    s, r = small_pair_files
    with pytest.raises(SystemExit) as exc:
        main(["run", str(s), str(r), "--method", "rctd", "--mode", "quadruplet"])
    assert exc.value.code == 2
    assert "invalid choice: 'quadruplet'" in capsys.readouterr().err


def test_demo_headless_writes_result_and_screenshot(tmp_path):
    exe = Path(sys.executable).with_name("spatial-deconv")
    env = {**os.environ}
    proc = subprocess.run(
        [str(exe), "demo", "--headless", str(tmp_path)], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    res = ad.read_h5ad(tmp_path / "sample_rctd.h5ad")
    assert summary["n_fitted"] == res.n_obs == 1200
    truth = res.obsm["true_proportions"].to_numpy()
    agree = np.mean(res.obsm["rctd_proportions"].to_numpy().argmax(1) == truth.argmax(1))
    assert agree > 0.85, agree
    assert (tmp_path / "sample_rctd_map.png").stat().st_size > 20_000
    if summary["rendering"]:
        from matplotlib.image import imread

        shot = imread(tmp_path / "screenshot.png")
        assert shot.shape[0] > 600 and shot.shape[1] > 900
        assert len(np.unique((shot[..., :3] * 255).astype(int).reshape(-1, 3), axis=0)) > 50


def test_run_flash_from_the_cli(small_pair_files, tmp_path, capsys):
    s, r = small_pair_files
    out = tmp_path / "flash.h5ad"
    code = main(
        [
            "run",
            str(s),
            str(r),
            "--method",
            "flash",
            "--lambda-spatial",
            "auto",
            "--k-neighbors",
            "6",
            "-o",
            str(out),
            "--json",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    res = ad.read_h5ad(out)
    props = res.obsm["flash_proportions"].to_numpy()
    truth = res.obsm["true_proportions"][list(res.obsm["flash_proportions"].columns)].to_numpy()
    r_mean = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(props, truth)])
    assert r_mean > 0.9, r_mean
    assert res.uns["flash"]["parameters"]["k_neighbors"] == 6


@pytest.mark.shared_data
def test_cerebellum_puck_matches_r_from_the_cli(shared_data, tmp_path, capsys):
    """R's published doublet results were made with reference nUMI = row sums: --ref-numi-col none."""
    out = tmp_path / "puck.h5ad"
    code = main(
        [
            "run",
            str(shared_data / "spacexr_slideseq_cerebellum_spatial.h5ad"),
            str(shared_data / "spacexr_slideseq_cerebellum_reference.h5ad"),
            "--method",
            "rctd",
            "--mode",
            "doublet",
            "--ref-numi-col",
            "none",
            "-o",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    res = ad.read_h5ad(out)
    fitted = res.obs["rctd_R_fitted"].astype(bool).to_numpy()
    assert (res.obs["rctd_spot_class"].astype(str) != "filtered").to_numpy().tolist() == fitted.tolist()
    ours = res.obs["rctd_first_type"].astype(str).to_numpy()[fitted]
    r = res.obs["rctd_R_first_type"].astype(str).to_numpy()[fitted]
    assert (ours == r).all()
    assert (
        res.obs["rctd_spot_class"].astype(str).to_numpy()[fitted]
        == res.obs["rctd_R_spot_class"].astype(str).to_numpy()[fitted]
    ).mean() >= 0.985


@pytest.mark.parametrize(
    "method, options, slot",
    [
        ("c2l", ["--max-epochs", "600", "--signatures", "means", "--n-cells-per-location", "6"], "c2l_abundances"),
        ("destvi", ["--sc-epochs", "20", "--max-epochs", "60"], "destvi_gamma_Astrocyte"),
    ],
)
def test_bayesian_methods_from_the_cli(small_pair_files, tmp_path, capsys, method, options, slot):
    s, r = small_pair_files
    out = tmp_path / f"{method}.h5ad"
    code = main(["run", str(s), str(r), "--method", method, *options, "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    res = ad.read_h5ad(out)
    props = res.obsm[f"{method}_proportions"]
    truth = res.obsm["true_proportions"][list(props.columns)].to_numpy()
    agree = np.mean(props.to_numpy().argmax(1) == truth.argmax(1))
    print(method, "dominant-type agreement with the truth", agree)
    assert agree > 0.7, agree
    assert slot in res.obsm


def test_c2l_reference_batches_from_the_cli(tmp_path, capsys):
    from spatial_deconv_gui.engines.c2l.simulate import simulate_batched_reference
    from spatial_deconv_gui.simulate import simulate_dataset

    ref, truth = simulate_batched_reference(n_genes=120, n_types=4, n_batches=2, cells_per_type=40, seed=1)
    spatial, _ = simulate_dataset(n_spots=60, n_genes=120, n_types=4, seed=1)
    spatial.var_names = ref.var_names
    s, r = tmp_path / "s.h5ad", tmp_path / "r.h5ad"
    spatial.write_h5ad(s)
    ref.write_h5ad(r)
    out = tmp_path / "c2l.h5ad"
    base = [
        "run",
        str(s),
        str(r),
        "--method",
        "c2l",
        "--max-epochs",
        "50",
        "--reference-epochs",
        "300",
        "-o",
        str(out),
        "--quiet",
    ]
    assert main(base + ["--reference-batch-col", "no_such"]) == 2
    assert "no_such" in capsys.readouterr().err
    assert main(base + ["--reference-batch-col", "batch"]) == 0, capsys.readouterr().err
    fit = ad.read_h5ad(out).uns["c2l_training"]
    assert sorted(fit["reference_batches"]) == sorted(map(str, ref.obs["batch"].unique()))
    assert sum(fit["reference_batch_sizes"]) == ref.n_obs
    # the batch with the higher true detection efficiency is fitted as the more efficient one
    det = dict(zip(fit["reference_batches"], fit["reference_detection"]))
    lo, hi = sorted(truth.batches, key=dict(zip(truth.batches, truth.detection)).get)
    assert det[str(hi)] > det[str(lo)], det
