"""The coefficient store (model format 3): same answers as the CSV layout, upgrade in place, resume by shard,
and one InputError for each kind of bad folder."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from spatial_deconv_gui.engines.base import RunControl
from spatial_deconv_gui.engines.perturb import model_dir as md
from spatial_deconv_gui.engines.perturb import priors
from spatial_deconv_gui.engines.perturb.perturb import load_model, simulate_perturbation
from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue
from spatial_deconv_gui.engines.perturb.train import TrainConfig, train
from spatial_deconv_gui.io.errors import InputError
from spatial_deconv_gui.perturb_cli import main as perturb_main


@pytest.fixture(scope="module")
def sim():
    return simulate_grn_tissue(seed=0)


def _train(sim, out, targets_per_batch=None, control=None):
    s = sim.uns["perturb_sim"]
    grn, _ = priors.load_grn(s["grn_prior"])
    lr, _ = priors.load_lr(s["lr_prior"])
    n_clusters = sim.obs["cluster"].nunique()
    extra = {"problems_per_batch": targets_per_batch * n_clusters} if targets_per_batch else {}
    cfg = TrainConfig(radius=s["radius"], contact_radius=s["contact_radius"], scale_factor=s["scale_factor"], **extra)
    return train(
        sim.X,
        sim.var_names,
        sim.obsm["spatial"],
        sim.obs["cluster"].astype(str).to_numpy(),
        grn,
        lr,
        out,
        config=cfg,
        control=control,
    )


@pytest.fixture(scope="module")
def trained(sim, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "m"
    _train(sim, out, targets_per_batch=5)
    return out


def _write_old_layout(new_dir, old_dir, version=2):
    """A copy of ``new_dir`` in the format 1-2 layout: one CSV per target, no store."""
    shutil.copytree(new_dir, old_dir)
    model = load_model(new_dir)
    for p in md.shard_paths(old_dir):
        p.unlink()
    for t, df in model.coef_tables.items():
        bcols = [c for c in df.columns if c.startswith("beta_")]
        md.write_coefs_csv(
            old_dir,
            t,
            df["cluster"],
            df["n_cells"],
            df["r2"],
            df["gated"],
            df["intercept"],
            df[bcols].to_numpy(),
            [c[5:] for c in bcols],
        )
    man = json.loads((old_dir / md.MANIFEST).read_text())
    man.pop(md.STORE_CHECKSUMS)
    man["format_version"] = version
    (old_dir / md.MANIFEST).write_text(json.dumps(man))


def _assert_same_model(a, b, atol=0.0):
    """Same pairs and sparsity; coefficients exactly equal, or to ``atol`` for a refit (a resumed run solves
    the refitted targets in other batches: BLAS rounding differs in the last bits)."""
    assert a.genes == b.genes and a.lr_pairs == b.lr_pairs and a.tfl_pairs == b.tfl_pairs
    assert a.channels == b.channels and list(a.coef_tables) == list(b.coef_tables)
    for mats_a, mats_b in ((a.B_tf, b.B_tf), (a.B_lr, b.B_lr), (a.B_tfl, b.B_tfl)):
        assert len(mats_a) == len(mats_b)
        for x, y in zip(mats_a, mats_b):
            assert x.shape == y.shape
            np.testing.assert_array_equal(x.indptr, y.indptr)
            np.testing.assert_array_equal(x.indices, y.indices)
            np.testing.assert_allclose(x.data, y.data, rtol=0, atol=atol)  # atol 0: the CSVs have 17 digits


def test_store_layout_and_manifest(trained):
    man = md.read_manifest(trained)
    # a seed model keeps format 3 (format 4 is for per-cell coefficients)
    assert man["format_version"] == md.STORE_VERSION == 3 and man["status"] == "complete"
    shards = md.shard_paths(trained)
    n_targets = len(man["targets"])
    assert len(shards) == -(-n_targets // 5)  # one shard per batch of 5 targets
    assert sorted(man[md.STORE_CHECKSUMS]) == [md.shard_key(trained, p) for p in shards]
    for p in shards:
        assert man[md.STORE_CHECKSUMS][md.shard_key(trained, p)] == md.file_sha256(p)
    assert not list((trained / md.COEFS).glob("*.csv"))
    store = md.concat_stores([md.read_shard(p) for p in shards])
    assert sorted(store.targets.tolist()) == sorted(man["targets"])
    assert store.n_cells.shape == (n_targets, len(man["clusters"]))
    assert np.all(store.nz_value != 0)  # only non-zeros are stored
    assert np.array_equal(np.diff(store.mod_ptr), [man["n_modulators"][t] for t in store.targets])


def test_old_layout_gives_the_same_model_and_knockout_then_upgrades(trained, tmp_path, capsys):
    old = tmp_path / "old"
    _write_old_layout(trained, old)
    assert len(list((old / md.COEFS).glob("*.csv"))) == len(md.read_manifest(old)["targets"])
    new_m = load_model(trained)
    with pytest.warns(UserWarning, match="perturb upgrade"):
        old_m = load_model(old)
    _assert_same_model(new_m, old_m)
    for t in new_m.targets:  # (the CSV reader gives an all-zero beta column as integers: values, not dtypes)
        pd.testing.assert_frame_equal(new_m.coef_tables[t], old_m.coef_tables[t], check_dtype=False, check_exact=True)
    d_new = simulate_perturbation(new_m, "Tf0", 0.0, n_steps=4)
    d_old = simulate_perturbation(old_m, "Tf0", 0.0, n_steps=4)
    assert np.abs(d_new).max() > 0.1
    np.testing.assert_allclose(d_new, d_old, rtol=0, atol=1e-12)

    assert perturb_main(["perturb", "upgrade", str(old), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["upgraded"] and summary["from_format"] == 2 and summary["n_targets"] == len(new_m.targets)
    man = md.read_manifest(old)
    assert man["format_version"] == 3 and len(man[md.STORE_CHECKSUMS]) == 1
    assert not list((old / md.COEFS).glob("*.csv")) and not list((old / md.COEFS).glob(".*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no old-layout notice any more
        up_m = load_model(old)
    _assert_same_model(new_m, up_m)
    np.testing.assert_allclose(simulate_perturbation(up_m, "Tf0", 0.0, n_steps=4), d_new, rtol=0, atol=1e-12)
    # a second upgrade has nothing to do
    assert perturb_main(["perturb", "upgrade", str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["upgraded"] is False


def test_resume_refits_only_the_targets_of_a_lost_shard(sim, trained, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(trained, out)
    shards = md.shard_paths(out)
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    victim = shards[1]
    lost = md.read_shard(victim).targets.tolist()
    victim.unlink()
    with pytest.raises(InputError) as info:  # the manifest names it: the folder does not load
        load_model(out)
    assert info.value.code == "bad_model_dir" and "missing" in info.value.problem
    assert "perturb train" in info.value.fix and "resumes" in info.value.fix
    events = []
    _train(sim, out, targets_per_batch=5, control=RunControl(events.append, max_rate=0))
    refit = [e.message.split(" (")[0] for e in events if e.stage == "training" and e.message not in ("", "done")]
    assert refit == lost and len(lost) == 5
    for p in shards:
        if p != victim:
            assert p.stat().st_mtime_ns == before[p.name]
    _assert_same_model(load_model(trained), load_model(out), atol=1e-12)


def test_half_trained_folder_is_refused_and_resumable(sim, trained, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(trained, out)
    man = md.read_manifest(out)
    # killed after the last shard's rename, before the manifest named it
    last = md.shard_key(out, md.shard_paths(out)[-1])
    man[md.STORE_CHECKSUMS].pop(last)
    man["status"] = "training"
    md.write_manifest(out, man)
    with pytest.raises(InputError) as info:
        load_model(out)
    n = len(man["targets"])
    assert info.value.code == "model_incomplete"
    assert f"{n} of {n} targets written" in info.value.problem and "resumes" in info.value.fix
    events = []
    _train(sim, out, targets_per_batch=5, control=RunControl(events.append, max_rate=0))
    assert [e.message.split(" (")[0] for e in events if e.stage == "training" and e.message not in ("", "done")] == []
    assert last in md.read_manifest(out)[md.STORE_CHECKSUMS]  # the whole shard was adopted
    _assert_same_model(load_model(trained), load_model(out))


def test_newer_format_is_refused(trained, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(trained, out)
    man = md.read_manifest(out)
    man["format_version"] = md.FORMAT_VERSION + 1
    md.write_manifest(out, man)
    with pytest.raises(InputError) as info:
        load_model(out)
    assert info.value.code == "model_too_new" and f"format {md.FORMAT_VERSION + 1}" in info.value.problem
    assert "cannot resume" in info.value.fix
    with pytest.raises(InputError):
        md.upgrade(out)


def test_store_not_matching_the_manifest_is_refused_then_repaired_by_resume(sim, trained, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(trained, out)
    shard = md.shard_paths(out)[0]
    raw = bytearray(shard.read_bytes())
    raw[-30] ^= 0xFF  # one flipped byte
    shard.write_bytes(bytes(raw))
    with pytest.raises(InputError) as info:
        load_model(out)
    assert info.value.code == "bad_model_dir" and "checksum" in info.value.problem
    assert shard.name in info.value.problem and "perturb train" in info.value.fix
    events = []
    _train(sim, out, targets_per_batch=5, control=RunControl(events.append, max_rate=0))
    refit = [e.message.split(" (")[0] for e in events if e.stage == "training" and e.message not in ("", "done")]
    assert len(refit) == 5
    _assert_same_model(load_model(trained), load_model(out), atol=1e-12)


def test_old_layout_half_trained_folder_resumes_into_the_store(sim, trained, tmp_path):
    old = tmp_path / "old"
    _write_old_layout(trained, old)
    man = md.read_manifest(old)
    gone = man["targets"][-3:]
    for t in gone:
        md.csv_path(old, t).unlink()
    man["status"] = "training"
    md.write_manifest(old, man)
    events = []
    _train(sim, old, targets_per_batch=5, control=RunControl(events.append, max_rate=0))
    assert [e.message.split(" (")[0] for e in events if e.stage == "training" and e.message not in ("", "done")] == gone
    assert md.read_manifest(old)["format_version"] == 3 and not list((old / md.COEFS).glob("*.csv"))
    _assert_same_model(load_model(trained), load_model(old), atol=1e-12)


def test_complete_manifest_records_file_checksums_and_a_changed_file_is_named(sim, trained, tmp_path):
    man = md.read_manifest(trained)
    assert set(man[md.FILE_CHECKSUMS]) == {md.DATA, md.RECEIVED}
    for name, sha in man[md.FILE_CHECKSUMS].items():
        assert sha == md.file_sha256(trained / name)
    want = simulate_perturbation(load_model(trained), "Tf0", 0.0, n_steps=2)
    # the received-ligand cache changed: named, and deleting it is enough (knockouts recompute it)
    out = tmp_path / "m"
    shutil.copytree(trained, out)
    W = np.load(out / md.RECEIVED)
    np.save(out / md.RECEIVED, W * 1.5)
    with pytest.raises(InputError) as info:
        load_model(out)
    assert info.value.code == "bad_model_dir" and md.RECEIVED in info.value.problem
    assert "checksum" in info.value.problem and f"delete {out / md.RECEIVED}" in info.value.fix
    (out / md.RECEIVED).unlink()
    m = load_model(out)
    assert m.received_cache is None
    np.testing.assert_allclose(simulate_perturbation(m, "Tf0", 0.0, n_steps=2), want, rtol=0, atol=1e-12)
    # data.h5ad changed after training: named; the fix (delete it, train again) resumes without refitting
    out2 = tmp_path / "m2"
    shutil.copytree(trained, out2)
    with open(out2 / md.DATA, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(InputError) as info:
        load_model(out2)
    assert md.DATA in info.value.problem and "checksum" in info.value.problem
    assert f"delete {out2 / md.DATA}" in info.value.fix and "keeps the fitted targets" in info.value.fix
    (out2 / md.DATA).unlink()
    with pytest.raises(InputError) as info:  # missing altogether
        load_model(out2)
    assert f"no {md.DATA}" in info.value.problem and "resumes" in info.value.fix
    events = []
    _train(sim, out2, targets_per_batch=5, control=RunControl(events.append, max_rate=0))
    assert [e.message for e in events if e.stage == "training" and e.message not in ("", "done")] == []
    np.testing.assert_array_equal(simulate_perturbation(load_model(out2), "Tf0", 0.0, n_steps=2), want)


def test_folder_killed_before_its_manifest_is_named_half_written_and_resumes(sim, trained, tmp_path, capsys):
    out = tmp_path / "m"
    shutil.copytree(trained, out)
    kept = md.shard_paths(out)[:2]
    for p in md.shard_paths(out)[2:]:
        p.unlink()
    (out / md.MANIFEST).unlink()
    with pytest.raises(InputError) as info:
        load_model(out)
    assert info.value.code == "model_incomplete" and "half-written" in info.value.problem
    assert "no manifest.json" in info.value.problem and "resumes" in info.value.fix
    # through the CLI: exit 2 and the same words
    assert perturb_main(["perturb", "run", str(out), "--gene", "Tf0", "-o", str(tmp_path / "x.h5ad")]) == 2
    err = capsys.readouterr().err
    assert "half-written" in err and "perturb train" in err
    n_kept = sum(len(md.read_shard(p).targets) for p in kept)
    events = []
    _train(sim, out, targets_per_batch=5, control=RunControl(events.append, max_rate=0))
    refit = [e.message for e in events if e.stage == "training" and e.message not in ("", "done")]
    assert len(refit) == len(md.read_manifest(trained)["targets"]) - n_kept
    _assert_same_model(load_model(trained), load_model(out), atol=1e-12)


def test_cli_reports_each_bad_folder_with_exit_2(trained, tmp_path, capsys):
    newer = tmp_path / "newer"
    shutil.copytree(trained, newer)
    man = md.read_manifest(newer)
    man["format_version"] = md.FORMAT_VERSION + 1
    md.write_manifest(newer, man)
    half = tmp_path / "half"
    shutil.copytree(trained, half)
    man = md.read_manifest(half)
    man["status"] = "training"
    md.write_manifest(half, man)
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    md.shard_paths(bad)[0].write_bytes(b"not a shard")
    for folder, words in (
        (newer, [f"model format {md.FORMAT_VERSION + 1}", "cannot resume"]),
        (half, ["half-trained model", "resumes the folder"]),
        (bad, ["does not match the manifest's checksum", "resumes the folder"]),
    ):
        assert perturb_main(["perturb", "run", str(folder), "--gene", "Tf0", "-o", str(tmp_path / "x.h5ad")]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), (folder.name, err)
    assert not (tmp_path / "x.h5ad").exists()


def test_cli_old_layout_notice_is_one_line(trained, tmp_path, capsys):
    old = tmp_path / "old"
    _write_old_layout(trained, old)
    assert (
        perturb_main(["perturb", "run", str(old), "--gene", "Tf0", "--steps", "1", "-o", str(tmp_path / "x.h5ad")]) == 0
    )
    err = capsys.readouterr().err
    notice = [ln for ln in err.splitlines() if "perturb upgrade" in ln]
    assert len(notice) == 1 and notice[0].startswith("notice: ") and "format 2 model folder" in notice[0]
    assert "UserWarning" not in err


def test_resuming_into_a_folder_of_other_data_or_settings_names_what_differs(sim, trained, tmp_path):
    s = sim.uns["perturb_sim"]
    grn, _ = priors.load_grn(s["grn_prior"])
    lr, _ = priors.load_lr(s["lr_prior"])
    clusters = sim.obs["cluster"].astype(str).to_numpy()
    base = dict(radius=s["radius"], contact_radius=s["contact_radius"], scale_factor=s["scale_factor"])
    n_clusters = sim.obs["cluster"].nunique()
    base["problems_per_batch"] = 5 * n_clusters  # as the folder was trained
    manifest = json.loads((trained / md.MANIFEST).read_text())
    cases = [
        ({**base, "l1_reg": 0.123}, sim.X, f"l1_reg was {manifest['config']['l1_reg']!r}, now 0.123"),
        ({**base, "radius": s["radius"] * 2}, sim.X, f"radius was {manifest['radius']!r}, now {s['radius'] * 2!r}"),
        (base, sim.X * 1.5, "the data differ"),
    ]
    for i, (options, expr, said) in enumerate(cases):
        out = tmp_path / f"m{i}"
        shutil.copytree(trained, out)
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        with pytest.raises(InputError) as info:
            train(expr, sim.var_names, sim.obsm["spatial"], clusters, grn, lr, out, config=TrainConfig(**options))
        assert info.value.code == "model_dir_mismatch" and said in info.value.problem, info.value.problem
        assert "l1_reg" in info.value.problem if i == 0 else "l1_reg" not in info.value.problem
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the folder is untouched
