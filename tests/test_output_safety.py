"""Outputs are whole or absent (issue #20, items 2 and 6): a `spatial-deconv run` killed with SIGKILL at any point
leaves nothing at the output path and no litter a rerun trips over; two runs writing one output leave one whole
file; an output that is an input, or in a folder that cannot be written, is refused before any work.

The kills are real SIGKILLs of a child process, sent by the child itself at chosen points (after reading the
inputs, inside the engine, after the temporary file is written but before its rename, half-way through writing
it), so each point is hit every time rather than by timing luck.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from test_input_faults import make_pair

from spatial_deconv_gui import api
from spatial_deconv_gui.cli import main
from spatial_deconv_gui.figures import result_figure
from spatial_deconv_gui.io import InputError
from spatial_deconv_gui.io import sdata as sdata_io
from spatial_deconv_gui.io.sdata import read_spatialdata, write_spatialdata_fixture, write_spatialdata_result
from spatial_deconv_gui.io.write import sweep_litter, temp_name, write_h5ad_atomic, write_text_atomic

SRC = Path(__file__).resolve().parents[1] / "src"

# Runs the CLI in a child that SIGKILLs itself at POINT: "validated" (inputs read and checked), "engine" (first
# progress event of the fit), "written" (temporary file complete, rename not yet done), "half" (temporary file
# half written), "csv" (the .h5ad is in place, the CSV's temporary is written). "sleep-written" waits 1.5 s
# between writing the temporary and renaming it (for two runs to overlap), "none" runs normally.
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    point, argv = sys.argv[1], sys.argv[2:]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    import anndata as ad
    from spatial_deconv_gui import api
    from spatial_deconv_gui.engines import base
    from spatial_deconv_gui.io import write

    if point == "validated":
        real_validate = api.validate
        def validate(*a, **k):
            report = real_validate(*a, **k)
            die()
        api.validate = validate
    if point == "engine":
        real_report = base.RunControl.report
        def report(self, stage, fraction, *a, **k):
            die()
        base.RunControl.report = report
    real_write = ad.AnnData.write_h5ad
    def write_h5ad(self, path, *a, **k):
        real_write(self, path, *a, **k)
        if point == "written":
            die()
        if point == "half":
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
            die()
        if point == "sleep-written":
            time.sleep(1.5)
    ad.AnnData.write_h5ad = write_h5ad
    if point == "csv":
        real_text = write.write_text_atomic
        def write_text_atomic(text, path):
            with write.atomic_path(path) as tmp:
                tmp.write_text(text)
                die()
        write.write_text_atomic = write_text_atomic

    from spatial_deconv_gui.cli import main
    sys.exit(main(argv))
    """
)


def run_child(point: str, *argv, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, point, *map(str, argv)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def run_args(spatial, reference, out, *extra):
    return ["run", spatial, reference, "--method", "flash", "--output", out, "--quiet", "--n-threads", "1", *extra]


def litter(folder: Path, out: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("point", ["validated", "engine", "written", "half"])
def test_sigkill_leaves_nothing_at_the_output_and_a_rerun_succeeds(small_pair_files, tmp_path, point):
    s, r = small_pair_files
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (s, r)]
    out = tmp_path / "res" / "out.h5ad"
    code, _, err = run_child(point, *run_args(s, r, out))
    assert code == -signal.SIGKILL, err
    assert not out.exists()
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in (s, r)] == digests  # inputs untouched
    if point in ("validated", "engine"):  # killed before writing: nothing to trip over
        assert not out.parent.exists() or litter(out.parent, out) == []
        return
    assert len(litter(out.parent, out)) == 1  # a killed writer cannot clean up after itself ...
    code, _, err = run_child("none", *run_args(s, r, out))
    assert code == 0, err
    back = ad.read_h5ad(out)
    props = back.obsm["flash_proportions"].to_numpy()
    np.testing.assert_allclose(props.sum(axis=1), 1.0, atol=1e-9)
    assert litter(out.parent, out) == []  # ... the next writer of the same output sweeps its temporary


def test_sigkill_while_writing_the_csv_keeps_the_previous_csv(small_pair_files, tmp_path):
    s, r = small_pair_files
    out, csv = tmp_path / "out.h5ad", tmp_path / "props.csv"
    csv.write_text("previous\n")
    code, _, err = run_child("csv", *run_args(s, r, out, "--csv", csv))
    assert code == -signal.SIGKILL, err
    assert csv.read_text() == "previous\n" and len(litter(tmp_path, csv)) == 1
    code, _, err = run_child("none", *run_args(s, r, out, "--csv", csv))
    assert code == 0, err
    assert csv.read_text().startswith(",") and litter(tmp_path, csv) == []


def test_two_runs_writing_one_output_leave_one_whole_file(small_pair_files, tmp_path):
    s, r = small_pair_files
    out = tmp_path / "out.h5ad"
    # two different answers, so the file shows whose it is; both hold their temporary for 1.5 s before renaming
    runs = [
        run_child("sleep-written", *run_args(s, r, out, "--rho-sparsity", rho), wait=False) for rho in ("0.01", "0.2")
    ]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(litter(tmp_path, out)) < 2 and all(p.poll() is None for p in runs):
        time.sleep(0.05)
    overlapped = len(litter(tmp_path, out)) == 2  # both temporaries were there at once (and neither was swept)
    results = [p.communicate(timeout=600) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [e for _, e in results]
    assert overlapped
    back = ad.read_h5ad(out)
    assert float(back.uns["flash"]["parameters"]["rho_sparsity"]) in (0.01, 0.2)
    np.testing.assert_allclose(back.obsm["flash_proportions"].to_numpy().sum(axis=1), 1.0, atol=1e-9)
    assert litter(tmp_path, out) == []


def test_sweep_spares_a_live_writer_and_restores_an_output_set_aside(tmp_path):
    out = tmp_path / "store.zarr"
    live = temp_name(out)  # ours: this process is alive
    live.mkdir()
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead_pid.stdout)
    dead = tmp_path / f".{out.name}.{pid}-deadbeef.sdgtmp"
    dead.mkdir()
    aside = tmp_path / f".{out.name}.{pid}-cafecafe.sdgtmp.old"  # a killed writer had moved the old output aside
    aside.mkdir()
    (aside / "marker").write_text("previous output")
    removed = sweep_litter(out)
    assert removed == [dead] and live.exists()
    assert (out / "marker").read_text() == "previous output" and not aside.exists()


def test_output_equal_to_an_input_is_refused_before_any_work(small_pair_files, capsys, monkeypatch):
    s, r = small_pair_files
    digest = hashlib.sha256(s.read_bytes()).hexdigest()

    def no_work(*a, **k):
        raise AssertionError("the run started")

    monkeypatch.setattr(api, "run_deconvolution", no_work)
    for target in (s, r):
        assert main(["run", str(s), str(r), "--method", "flash", "--output", str(target)]) == 2
        assert "is (inside) one of the inputs" in capsys.readouterr().err
    assert main(["run", str(s), str(r), "--method", "flash", "-o", str(s.with_suffix(".x.h5ad")), "--csv", str(r)]) == 2
    assert "is (inside) one of the inputs" in capsys.readouterr().err
    assert hashlib.sha256(s.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("where", ["unwritable", "under_a_file", "a_folder"])
def test_output_that_cannot_be_written_is_refused_before_any_work(
    small_pair_files, tmp_path, capsys, monkeypatch, where
):
    s, r = small_pair_files
    if where == "unwritable":
        target = Path("/sys/result.h5ad")  # refuses new files even to root, unlike a chmod-ed folder
        if os.access("/sys", os.W_OK) and not Path("/sys/kernel").exists():
            pytest.skip("no read-only /sys here")
        phrase = "is not writable"
    elif where == "under_a_file":
        target = s / "result.h5ad"
        phrase = "is not a folder"
    else:
        target = tmp_path / "folder.h5ad"
        target.mkdir()
        phrase = "is a folder"

    def no_work(*a, **k):
        raise AssertionError("the run started")

    monkeypatch.setattr(api, "run_deconvolution", no_work)
    assert main(["run", str(s), str(r), "--method", "flash", "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Fix:" in err and "Traceback" not in err


def test_save_result_into_an_unwritable_folder_is_an_input_error(small_pair):
    slide, _ = small_pair
    with pytest.raises(InputError) as err:
        api.save_result(slide, "/sys/result.h5ad")
    assert err.value.code == "output_not_writable"


def test_a_failed_write_removes_its_temporary(small_pair, tmp_path, monkeypatch):
    slide, _ = small_pair

    def boom(self, path, **kw):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", boom)
    with pytest.raises(OSError, match="disk full"):
        write_h5ad_atomic(slide, tmp_path / "out.h5ad")
    assert list(tmp_path.iterdir()) == []


def test_names_with_slashes_dots_spaces_and_unicode_stay_inside_the_files(tmp_path):
    # cell types and genes are written as data inside the .h5ad, CSV and PNG, never as file names
    slide, reference = make_pair(3, 20, 24, 3, 10)
    names = {"T0": "../evil", "T1": "a/b", "T2": "T cell ü"}
    reference.obs["cell_type"] = pd.Categorical(reference.obs["cell_type"].map(names))
    genes = ["../g0", "g/1", "ü gene", *slide.var_names[3:]]
    slide.var_names, reference.var_names = genes, genes
    run = api.run_deconvolution(slide, reference, "flash", params={"n_threads": 1})
    folder = tmp_path / "results"
    api.save_result(run.adata, folder / "out.h5ad")
    write_text_atomic(run.adata.obsm["flash_proportions"].to_csv(), folder / "out.csv")
    result_figure(run.adata, "flash", folder / "out.png")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out.csv", "out.h5ad", "out.png", "results"]
    back = ad.read_h5ad(folder / "out.h5ad")
    assert sorted(back.obsm["flash_proportions"].columns) == sorted(names.values())
    assert list(back.var_names[:3]) == genes[:3]
    assert sorted(pd.read_csv(folder / "out.csv", index_col=0).columns) == sorted(names.values())


# A SpatialData output (a folder) killed while it is built, or just after the previous output was set aside.
ZARR_CHILD = textwrap.dedent(
    """
    import os, shutil, signal, sys
    import anndata as ad
    from spatial_deconv_gui.io import sdata, write
    point, result, store, out = sys.argv[1:]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "built":
        real_copytree = shutil.copytree
        def copytree(*a, **k):
            real_copytree(*a, **k)
            die()
        shutil.copytree = copytree
    if point == "aside":
        def replace_folder(built, target):
            os.replace(target, write.temp_name(target, write.ASIDE_SUFFIX))
            die()
        sdata._replace_folder = replace_folder
    sdata.write_spatialdata_result(ad.read_h5ad(result), store, out)
    """
)


@pytest.fixture(scope="module")
def zarr_store(small_pair, tmp_path_factory):
    pytest.importorskip("spatialdata")
    slide, _ = small_pair
    folder = tmp_path_factory.mktemp("zarr")
    store = write_spatialdata_fixture(slide, folder / "slide.zarr")
    result = folder / "result.h5ad"
    table = read_spatialdata(store, images=False).adata
    table.obs["marker"] = np.arange(table.n_obs, dtype=float)
    table.write_h5ad(result)
    return store, result


def _zarr_child(point, result, store, out):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", ZARR_CHILD, point, str(result), str(store), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, proc.stderr


def test_sigkill_while_building_a_zarr_output_leaves_nothing(zarr_store, tmp_path):
    store, result = zarr_store
    out = tmp_path / "out.zarr"
    code, err = _zarr_child("built", result, store, out)
    assert code == -signal.SIGKILL, err
    assert not out.exists() and len(litter(tmp_path, out)) == 1
    write_spatialdata_result(ad.read_h5ad(result), store, out)
    assert litter(tmp_path, out) == []
    np.testing.assert_array_equal(read_spatialdata(out, images=False).adata.obs["marker"], np.arange(300.0))


def test_sigkill_after_setting_the_previous_zarr_aside_gives_it_back(zarr_store, tmp_path):
    store, result = zarr_store
    out = tmp_path / "out.zarr"
    write_spatialdata_result(ad.read_h5ad(result), store, out)
    (out / "previous.txt").write_text("the earlier result")
    code, err = _zarr_child("aside", result, store, out)
    assert code == -signal.SIGKILL, err
    assert not out.exists()  # the killed writer had moved the previous output aside ...
    sweep_litter(out)  # ... and the next writer of this output (or this sweep alone) puts it back
    assert (out / "previous.txt").read_text() == "the earlier result"
    assert litter(tmp_path, out) == []


def test_a_zarr_output_replaced_by_another_run_mid_swap_ends_whole(tmp_path, monkeypatch):
    # two runs writing one .zarr: the other run's store lands at the output between our two renames; ours is then
    # moved aside in turn and the swap tried again (the last writer wins, neither fails, nothing is left over)
    target, built = tmp_path / "out.zarr", tmp_path / "ours"
    for folder, text in ((target, "previous"), (built, "ours")):
        folder.mkdir()
        (folder / "who").write_text(text)
    real_replace = os.replace
    raced = []

    def replace(src, dst):
        if Path(src) == built and not raced:
            raced.append(True)
            Path(dst).mkdir()
            (Path(dst) / "who").write_text("the other run")
        return real_replace(src, dst)

    monkeypatch.setattr(sdata_io.os, "replace", replace)
    sdata_io._replace_folder(built, target)
    assert raced and (target / "who").read_text() == "ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


# -- perturbation model training --------------------------------------------------------------------------------
# Trains a model through the API in a child that SIGKILLs itself at POINT: "data" (data.h5ad's temporary written,
# not renamed), "started" (the first manifest, status 'training', is in place), "received" (received_ligands.npy's
# temporary written), "shard" (a batch's coefficient shard renamed into place, the manifest not yet naming it),
# "batch" (two batches of targets finished), "complete" (the final manifest's temporary written, not renamed);
# "none" trains to the end. The job's keyword arguments come as JSON.
TRAIN_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import numpy as np
    point, job = sys.argv[1], json.loads(sys.argv[2])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    import anndata as ad
    from spatial_deconv_gui import perturb_api
    from spatial_deconv_gui.engines import base
    from spatial_deconv_gui.engines.perturb import model_dir as md
    from spatial_deconv_gui.io import write

    real_write = ad.AnnData.write_h5ad
    def write_h5ad(self, path, *a, **k):
        real_write(self, path, *a, **k)
        if point == "data":
            die()
    ad.AnnData.write_h5ad = write_h5ad
    real_report = base.RunControl.report
    batches = []
    def report(self, stage, fraction, message="", *a, **k):
        if point == "started" and stage == "received ligands":
            die()
        if point == "batch" and stage == "training" and 0 < fraction < 1:
            batches.append(message)
            if len(batches) == 4:  # two batches of two targets
                die()
        return real_report(self, stage, fraction, message, *a, **k)
    base.RunControl.report = report
    real_save = np.save
    def save(path, arr, *a, **k):
        real_save(path, arr, *a, **k)
        if point == "received":
            die()
    np.save = save
    real_shard = md.write_shard
    def write_shard(*a, **k):
        out = real_shard(*a, **k)
        if point == "shard":
            die()
        return out
    md.write_shard = write_shard
    real_text = write.write_text_atomic
    def write_text_atomic(text, path):
        if point == "complete" and '"status": "complete"' in text:
            with write.atomic_path(path) as tmp:
                tmp.write_text(text)
                die()
        return real_text(text, path)
    md.write_text_atomic = write_text_atomic

    model = perturb_api.train_model(**job)
    print(len(model.targets))
    """
)


@pytest.fixture(scope="module")
def training_job(tmp_path_factory):
    from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue, write_simulated_priors

    folder = tmp_path_factory.mktemp("train-kill")
    tissue = simulate_grn_tissue(n_cells=400, seed=3)
    tissue.write_h5ad(folder / "tissue.h5ad")
    priors = write_simulated_priors(tissue, folder)
    sim = tissue.uns["perturb_sim"]
    job = dict(
        spatial=str(folder / "tissue.h5ad"),
        grn=str(priors["grn_prior"]),
        lr=str(priors["lr_prior"]),
        cluster_col="cluster",
        radius=float(sim["radius"]),
        contact_radius=float(sim["contact_radius"]),
        scale_factor=float(sim["scale_factor"]),
        problems_per_batch=2,
    )
    from spatial_deconv_gui import perturb_api

    whole = perturb_api.train_model(**job, out=str(folder / "whole"))  # the answer of an uninterrupted training
    return job, whole


def run_training_child(point: str, job: dict):
    import json

    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_CHILD, point, json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("point", ["data", "started", "received", "shard", "batch", "complete"])
def test_sigkill_during_model_training_leaves_a_refused_or_absent_model_and_a_rerun_resumes(
    training_job, tmp_path, point
):
    from spatial_deconv_gui import perturb_api
    from spatial_deconv_gui.engines.perturb.model_dir import MANIFEST, coef_path, finished_genes

    job, whole = training_job
    out = tmp_path / "model"
    code, _, err = run_training_child(point, {**job, "out": str(out)})
    assert code == -signal.SIGKILL, err
    # never half-written: either no manifest at all (nothing to load) or one that loading refuses in one clear
    # message that says how to resume; every file a manifest names reads back whole
    if (out / MANIFEST).exists():
        with pytest.raises(InputError) as info:
            perturb_api.load_model(out)
        assert info.value.code == "model_incomplete" and "resumes" in info.value.fix
        done = finished_genes(out, whole.targets)
    else:
        with pytest.raises(InputError):
            perturb_api.load_model(out)
        done = set()
    if point in ("batch", "complete"):
        assert len(done) >= 4 if point == "batch" else done == set(whole.targets)
    before = {g: coef_path(out, g).stat().st_mtime_ns for g in done} if done else {}
    code, stdout, err = run_training_child("none", {**job, "out": str(out)})
    assert code == 0, err
    resumed = perturb_api.load_model(out)
    assert resumed.manifest["status"] == "complete" and resumed.targets == whole.targets
    for gene in whole.targets:
        pd.testing.assert_frame_equal(resumed.coef_tables[gene], whole.coef_tables[gene], check_exact=False, atol=1e-9)
    assert all(coef_path(out, g).stat().st_mtime_ns == t for g, t in before.items())  # finished targets kept
    assert not [p.name for p in out.rglob("*") if "sdgtmp" in p.name]  # no litter left for the next run
