"""Training at scale (issue 16): working-set solves equal full-width ones, batches equal single targets, the
modulator screen keeps the knockout, bad inputs are named before training, and ``train_model`` keeps what it
built (issue 17) instead of reading its folder back."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spatial_deconv_gui import perturb_api as api
from spatial_deconv_gui.engines.perturb import priors
from spatial_deconv_gui.engines.perturb.lasso import fit_sgl_batch, sgl_objective
from spatial_deconv_gui.engines.perturb.perturb import load_model, simulate_perturbation
from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue, write_simulated_priors
from spatial_deconv_gui.engines.perturb.solve import cluster_design, fit_cluster_targets
from spatial_deconv_gui.engines.perturb.train import TrainConfig, train
from spatial_deconv_gui.io.errors import InputError
from spatial_deconv_gui.perturb_cli import main as perturb_main


def _p_greater_than_n(seed=0, n=40, F=300, T=12):
    """A cluster as on a real slide: more features than cells, three groups, a constant column."""
    rng = np.random.default_rng(seed)
    Phi = rng.standard_normal((n, F)) * rng.uniform(0.2, 3.0, F)
    Phi[:, 7] = 2.0
    col_group = np.r_[np.zeros(8, int), np.ones(F - 20, int), np.full(12, 2)]
    beta = np.zeros((F, T))
    for t in range(T):
        beta[rng.choice(F, 5, replace=False), t] = rng.standard_normal(5)
    Y = Phi @ beta + 0.3 * rng.standard_normal((n, T))
    allowed = rng.uniform(size=(T, F)) < 0.9
    return Phi, Y - Y.mean(0), allowed, col_group


@pytest.mark.parametrize("standardize", [True, False])
def test_working_sets_solve_the_full_problem(standardize):
    """Each target's working-set solution is the full-width solution of ``lasso.fit_sgl_batch`` (the solver
    training used before): objective within 1e-9 relative, coefficients within 1e-5 of max(|coef|, 1) at a tight
    tolerance (the remaining difference is where each FISTA run stops)."""
    Phi, Yc, allowed, col_group = _p_greater_than_n()
    n = Phi.shape[0]
    design = cluster_design(Phi, standardize)
    fit = fit_cluster_targets(design, Yc, allowed, col_group, 0.05, 0.05, max_iter=50_000, tol=1e-10)
    assert fit.converged.all() and fit.rounds >= 2  # the working sets grew: not one full-width solve
    assert fit.max_width < Phi.shape[1] / 2
    for t in range(Yc.shape[1]):
        cols = np.flatnonzero(allowed[t])
        Xc = Phi[:, cols] - Phi[:, cols].mean(0)
        ref = fit_sgl_batch(
            None,
            (Xc.T @ Yc[:, t])[None],
            np.array([n]),
            col_group[cols][None],
            0.05,
            0.05,
            standardize=standardize,
            max_iter=50_000,
            tol=1e-10,
            X=Xc[None],
        ).coef[0]
        ours = fit.coef[t, cols]
        assert np.all(fit.coef[t, ~allowed[t]] == 0)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))
        if not standardize:
            o_ref = sgl_objective(Xc, Yc[:, t], ref, 0.0, col_group[cols], 0.05, 0.05)
            o_ours = sgl_objective(Xc, Yc[:, t], ours, 0.0, col_group[cols], 0.05, 0.05)
            assert abs(o_ours - o_ref) <= 1e-9 * abs(o_ref)


def test_batched_solves_equal_per_target_solves():
    """All targets at once give what each target alone gives (problems never share state; only the rounding of
    the shared matrix products differs, ~1e-14)."""
    Phi, Yc, allowed, col_group = _p_greater_than_n(seed=1)
    design = cluster_design(Phi)
    together = fit_cluster_targets(design, Yc, allowed, col_group, 0.05, 0.05, n_threads=2).coef
    for t in range(Yc.shape[1]):
        alone = fit_cluster_targets(design, Yc[:, [t]], allowed[[t]], col_group, 0.05, 0.05, n_threads=1).coef[0]
        np.testing.assert_allclose(together[t], alone, rtol=0, atol=1e-12 * max(1.0, np.abs(alone).max()))


@pytest.fixture(scope="module")
def sim():
    return simulate_grn_tissue(seed=0)


def _train(sim, out, **cfg_kw):
    s = sim.uns["perturb_sim"]
    grn, _ = priors.load_grn(s["grn_prior"])
    lr, _ = priors.load_lr(s["lr_prior"])
    cfg = TrainConfig(radius=s["radius"], contact_radius=s["contact_radius"], scale_factor=s["scale_factor"], **cfg_kw)
    X = np.asarray(sim.X)
    return train(
        X, sim.var_names, sim.obsm["spatial"], sim.obs["cluster"].astype(str).to_numpy(), grn, lr, out, config=cfg
    )


def test_training_batches_equal_one_target_per_batch(sim, tmp_path):
    _train(sim, tmp_path / "big", problems_per_batch=3 * 100)
    _train(sim, tmp_path / "one", problems_per_batch=3)
    a, b = load_model(tmp_path / "big"), load_model(tmp_path / "one")
    assert a.targets == b.targets
    for t in a.targets:
        pd.testing.assert_frame_equal(a.coef_tables[t], b.coef_tables[t], check_exact=False, rtol=1e-9, atol=1e-12)


def _with_decoy_ligands(sim, n_decoys=12, seed=3):
    """The simulated tissue plus weakly expressed ligands (mostly zero, a few low counts), each paired with the
    tissue's receptors: genome-wide LR tables bring many such ligands to a real slide."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    n = sim.n_obs
    decoy = np.where(rng.uniform(size=(n, n_decoys)) < 0.03, rng.uniform(0.05, 0.3, (n, n_decoys)), 0.0)
    names = [f"Weak{i}" for i in range(n_decoys)]
    b = ad.AnnData(
        X=np.hstack([np.asarray(sim.X), decoy]),
        obs=sim.obs.copy(),
        var=pd.DataFrame(index=list(sim.var_names) + names),
    )
    b.obsm["spatial"] = sim.obsm["spatial"]
    s = dict(sim.uns["perturb_sim"])
    recs = [g for g in sim.var_names if g.startswith("Rec")]
    extra = pd.DataFrame(
        [(w, recs[i % len(recs)], "Secreted Signaling") for i, w in enumerate(names)],
        columns=["ligand", "receptor", "annotation"],
    )
    s["lr_prior"] = pd.concat([pd.DataFrame(s["lr_prior"]), extra], ignore_index=True)
    b.uns["perturb_sim"] = s
    return b


# The screen changes the design, so its tolerance is on the knockout: after a 4-step knockout of the upstream TF
# the screened model's Δ differs from the unscreened one by at most 2 % of the largest |Δ|, and every gene that
# moves by more than 5 % of it moves the same way in both.
SCREEN_TOL = 0.02


@pytest.mark.parametrize("screen", [{"max_ligands": 4}, {"min_expressed_fraction": 0.1}])
def test_screened_model_gives_the_same_knockout(sim, tmp_path, screen):
    b = _with_decoy_ligands(sim)
    s = b.uns["perturb_sim"]
    man_full = _train(b, tmp_path / "full")
    man_scr = _train(b, tmp_path / "screened", **screen)
    full, scr = load_model(tmp_path / "full"), load_model(tmp_path / "screened")
    if "max_ligands" in screen:  # the weak ligands are gone from the design
        assert not any(a.startswith("Weak") for a, _ in scr.lr_pairs)
        assert any(a.startswith("Weak") for a, _ in full.lr_pairs)
        assert max(man_scr["n_modulators"].values()) < max(man_full["n_modulators"].values())
    else:  # the weak ligands are received nearly everywhere: the screen keeps their terms, the Δ stays
        assert len(scr.modulator_table()) <= len(full.modulator_table()) + 5
    d_full = simulate_perturbation(full, s["upstream_tf"], 0.0, n_steps=4)
    d_scr = simulate_perturbation(scr, s["upstream_tf"], 0.0, n_steps=4)
    assert full.genes == scr.genes or set(scr.genes) <= set(full.genes)
    cols = [full.genes.index(g) for g in scr.genes]
    d_full = d_full[:, cols]
    scale = np.abs(d_full).max()
    assert np.abs(d_scr - d_full).max() <= SCREEN_TOL * scale
    moved = np.abs(d_full).mean(0) > 0.05 * np.abs(d_full).mean(0).max()
    assert moved.sum() >= 10
    assert np.all(np.sign(d_scr.mean(0)[moved]) == np.sign(d_full.mean(0)[moved]))


def test_expressed_fraction_screen_drops_unexpressed_receptors(sim, tmp_path):
    """A receptor off in most of a cluster's cells takes its LR terms out of that cluster's model."""
    b = sim.copy()
    X = np.asarray(b.X).copy()
    cl = b.obs["cluster"].astype(str).to_numpy()
    rec = list(b.var_names).index("Rec1")
    in0 = np.flatnonzero(cl == "domain_0")
    X[in0[: int(0.95 * in0.size)], rec] = 0.0  # Rec1 expressed in 5 % of domain_0
    b.X = X
    _train(b, tmp_path / "scr", min_expressed_fraction=0.1)
    m = load_model(tmp_path / "scr").modulator_table()
    lr_rec1 = m[(m.kind == "lr") & m.modulator.str.endswith("$Rec1")]
    assert len(lr_rec1) and not (lr_rec1.cluster == "domain_0").any()


# ------------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def sim_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("simf")
    a = simulate_grn_tissue(n_cells=400, seed=1)
    a.write_h5ad(d / "sim.h5ad")
    return a, d, write_simulated_priors(a, d)


def _cli_train(path, grn, lr, out, *extra):
    return perturb_main(
        ["perturb", "train", str(path), "--grn", str(grn), "--lr", str(lr), "--cluster-col", "cluster"]
        + ["--out", str(out), "--quiet", *extra]
    )


@pytest.mark.parametrize(
    "rename, cause",
    [
        (lambda g: g.upper(), "another species"),
        (lambda g: f"ENSMUSG{abs(hash(g)) % 10**11:011d}", "Ensembl"),
    ],
)
def test_priors_that_barely_match_the_slide_are_refused(sim_files, tmp_path, capsys, rename, cause):
    a, d, pr = sim_files
    grn = pd.read_csv(pr["grn_prior"])
    lr = pd.read_csv(pr["lr_prior"])
    for df, cols in ((grn, ["tf", "target"]), (lr, ["ligand", "receptor"])):
        for c in cols:
            df[c] = df[c].map(rename)
    grn.to_csv(tmp_path / "grn.csv", index=False)
    lr.to_csv(tmp_path / "lr.csv", index=False)
    out = tmp_path / "m"
    rc = _cli_train(d / "sim.h5ad", tmp_path / "grn.csv", tmp_path / "lr.csv", out)
    err = capsys.readouterr().err
    assert rc == 2
    n_grn = len(set(grn.tf) | set(grn.target))
    assert f"GRN: 0 of its {n_grn} genes are measured" in err
    assert cause in err and "likely cause" in err
    assert not out.exists()  # refused before anything is written


def test_targets_file_with_unknown_genes_lists_them(sim_files, tmp_path, capsys):
    a, d, pr = sim_files
    unknown = ["NotAGene1", "gene0", "Foo"]  # 'gene0': the slide spells it Gene0
    (tmp_path / "t.txt").write_text("\n".join(["Gene1", "Gene2", *unknown]))
    rc = _cli_train(
        d / "sim.h5ad", pr["grn_prior"], pr["lr_prior"], tmp_path / "m", "--targets", str(tmp_path / "t.txt")
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "3 of the 5 target genes are not measured" in err
    assert all(u in err for u in unknown)
    assert "gene0 (the slide has Gene0)" in err


def test_small_clusters_are_named(sim_files, tmp_path, capsys):
    a, d, pr = sim_files
    b = a.copy()
    lab = b.obs["cluster"].astype(str).to_numpy().copy()
    lab[:6] = "tiny"
    b.obs["cluster"] = lab
    b.write_h5ad(tmp_path / "s.h5ad")
    out = tmp_path / "m"
    rc = _cli_train(tmp_path / "s.h5ad", pr["grn_prior"], pr["lr_prior"], out, "--targets", str(_targets(tmp_path)))
    err = capsys.readouterr().err
    assert rc == 0
    assert "'tiny' (6 cells)" in err and "keeps its cluster mean" in err
    m = load_model(out)
    assert m.manifest["small_clusters"] == {"tiny": 6}
    k = m.cluster_names.index("tiny")
    for t in m.targets:
        tab = m.coef_tables[t]
        assert bool(tab.gated.iloc[k]) and np.all(tab.filter(like="beta_").iloc[k].to_numpy() == 0)
    # every cluster too small: refused
    rc = _cli_train(tmp_path / "s.h5ad", pr["grn_prior"], pr["lr_prior"], tmp_path / "m2", "--min-cells", "1000")
    err = capsys.readouterr().err
    assert rc == 2 and "every 'cluster' cluster has fewer than min_cells = 1000" in err
    assert not (tmp_path / "m2").exists()


def test_small_cluster_notice_counts_the_cells_the_lasso_fits_on(sim_files, tmp_path):
    """Full / hybrid mode holds out ``holdout_fraction`` of each cluster (round(0.2 n), here 2 of 11 and 2 of 12):
    the notice counts the cells the lasso sees. At min_cells = 10 a cluster of 12 (10 fitted) is at the edge and
    fitted; one of 11 (9 fitted) is named, though a seed model fits it whole (11 >= 10)."""
    from spatial_deconv_gui.engines.perturb.percell import holdout_split

    a, _d, pr = sim_files
    b = a.copy()
    lab = b.obs["cluster"].astype(str).to_numpy().copy()
    lab[:12], lab[12:23] = "edge", "under"
    b.obs["cluster"] = lab
    held = holdout_split(lab, 0.2, 0)
    assert [int(held[lab == c].sum()) for c in ("edge", "under")] == [2, 2]
    s = b.uns["perturb_sim"]
    common = dict(radius=s["radius"], contact_radius=s["contact_radius"], scale_factor=s["scale_factor"])
    targets = ["Gene0", "Gene1", "Gene2", "Gene3", "Tf1"]
    with pytest.warns(UserWarning, match="too few for the lasso") as caught:
        m = api.train_model(
            b,
            pr["grn_prior"],
            pr["lr_prior"],
            "cluster",
            tmp_path / "full",
            targets=targets,
            mode="full",
            epochs=1,
            **common,
        )
    notice = " ".join(str(w.message) for w in caught if "too few for the lasso" in str(w.message))
    assert "1 cluster(s)" in notice and "'under' (9 cells fitted, 2 more held out" in notice
    assert "'edge'" not in notice
    assert m.manifest["small_clusters"] == {"under": 9}
    k_under, k_edge = m.cluster_names.index("under"), m.cluster_names.index("edge")
    for t in m.targets:
        tab = m.coef_tables[t]
        assert bool(tab.gated.iloc[k_under]) and np.all(tab.filter(like="beta_").iloc[k_under].to_numpy() == 0)
        assert tab.n_cells.iloc[k_under] == 9 and tab.n_cells.iloc[k_edge] == 10
    # the same slide in seed mode: both clusters fitted whole, none named
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = api.train_model(b, pr["grn_prior"], pr["lr_prior"], "cluster", tmp_path / "seed", targets=targets, **common)
    assert not [w for w in caught if "too few for the lasso" in str(w.message)]
    assert m.manifest["small_clusters"] == {}
    # every cluster under min_cells once the held-out cells are left out: refused before training
    lab3 = np.repeat(["a", "b", "c"], [11, 11, 12])
    api._check_cluster_sizes(lab3, "cluster", TrainConfig(mode="seed"))
    with pytest.raises(InputError, match=r"\(a: 9, b: 9\)") as err:
        api._check_cluster_sizes(lab3[:22], "cluster", TrainConfig(mode="hybrid"))
    assert "fewer than min_cells = 10 cells fitted" in str(err.value)
    api._check_cluster_sizes(lab3, "cluster", TrainConfig(mode="full"))  # c fits 10: at the edge, allowed


def _targets(tmp_path):
    p = tmp_path / "targets.txt"
    p.write_text("Gene0\nGene1\nGene2\nGene3\nTf1")
    return p


# ------------------------------------------------------------------------------------- no reload after training


def test_train_model_keeps_what_it_built(sim_files, tmp_path, monkeypatch):
    a, d, pr = sim_files
    s = a.uns["perturb_sim"]
    import spatial_deconv_gui.engines.perturb.model_dir as md
    import spatial_deconv_gui.engines.perturb.perturb as pmod

    def refuse(*_a, **_k):
        raise AssertionError("the model folder was read back")

    opts = dict(radius=s["radius"], contact_radius=s["contact_radius"], scale_factor=s["scale_factor"])
    with monkeypatch.context() as mp:
        mp.setattr(pmod, "load_model", refuse)
        mp.setattr(api, "_load_model", refuse)
        mp.setattr(md, "read_shard", refuse)
        mp.setattr(md, "read_store", refuse)
        built = api.train_model(d / "sim.h5ad", pr["grn_prior"], pr["lr_prior"], "cluster", tmp_path / "m", **opts)
    read = load_model(tmp_path / "m")
    assert built.genes == read.genes and built.targets == read.targets
    assert built.lr_pairs == read.lr_pairs and built.channels == read.channels
    for name in ("B_tf", "B_lr", "B_tfl"):
        for x, y in zip(getattr(built, name), getattr(read, name)):
            assert (x != y).nnz == 0
    np.testing.assert_array_equal(built.expr, read.expr)
    np.testing.assert_array_equal(built.received_cache[1], read.received_cache[1])
    assert built.received_cache[0] == read.received_cache[0]
    d1 = simulate_perturbation(built, s["upstream_tf"], 0.0, n_steps=3)
    d2 = simulate_perturbation(read, s["upstream_tf"], 0.0, n_steps=3)
    np.testing.assert_array_equal(d1, d2)
    # a resumed run (nothing left to train) reads only its earlier shards, and still gives the same model
    again = api.train_model(d / "sim.h5ad", pr["grn_prior"], pr["lr_prior"], "cluster", tmp_path / "m", **opts)
    np.testing.assert_array_equal(simulate_perturbation(again, s["upstream_tf"], 0.0, n_steps=3), d1)


def test_cli_train_does_not_read_the_model_back(sim_files, tmp_path, monkeypatch, capsys):
    a, d, pr = sim_files
    import spatial_deconv_gui.engines.perturb.perturb as pmod

    monkeypatch.setattr(pmod, "load_model", lambda *_a, **_k: (_ for _ in ()).throw(AssertionError("read back")))
    monkeypatch.setattr(api, "_load_model", pmod.load_model)
    rc = _cli_train(d / "sim.h5ad", pr["grn_prior"], pr["lr_prior"], tmp_path / "m", "--json")
    assert rc == 0
    assert '"n_targets"' in capsys.readouterr().out


def test_progress_reports_an_eta_per_target(sim, tmp_path):
    from spatial_deconv_gui.engines.base import RunControl

    events = []
    s = sim.uns["perturb_sim"]
    grn, _ = priors.load_grn(s["grn_prior"])
    lr, _ = priors.load_lr(s["lr_prior"])
    cfg = TrainConfig(radius=s["radius"], contact_radius=s["contact_radius"], scale_factor=s["scale_factor"])
    man = train(
        np.asarray(sim.X),
        sim.var_names,
        sim.obsm["spatial"],
        sim.obs["cluster"].astype(str).to_numpy(),
        grn,
        lr,
        tmp_path / "m",
        config=TrainConfig(**{**cfg.to_dict(), "problems_per_batch": 30}),
        control=RunControl(events.append, max_rate=0),
    )
    msgs = [e.message for e in events if e.stage == "training" and e.message not in ("", "done")]
    total = len(man["targets"])
    assert len(msgs) == total
    assert msgs[0].endswith(f"(1/{total} targets, ETA " + msgs[0].split("ETA ")[1])
    assert all("ETA" in m and f"/{total} targets" in m for m in msgs)
    assert msgs[-1].endswith("ETA 0 s)")


def test_settings_added_later_keep_old_folders_resumable(sim, tmp_path):
    """A folder trained before the screen options existed resumes: at their defaults they are not part of the
    settings hash."""
    from spatial_deconv_gui.engines.perturb.train import settings_config

    d = settings_config(TrainConfig())
    assert "max_ligands" not in d and "min_expressed_fraction" not in d
    assert settings_config(TrainConfig(max_ligands=10))["max_ligands"] == 10
    with pytest.raises(InputError):
        man = _train(sim, tmp_path / "m")
        assert man["status"] == "complete"
        _train(sim, tmp_path / "m", max_ligands=2)  # other settings: refused in the same folder


def test_resumed_folder_keeps_its_received_ligands(sim, tmp_path):
    """A second run with nothing left to fit keeps the saved received ligands usable (the manifest keeps their
    mode), so the model still starts its knockouts from them."""
    _train(sim, tmp_path / "m")
    first = load_model(tmp_path / "m").received_cache
    man = _train(sim, tmp_path / "m")
    assert man["timings"]["lasso_s"] == 0.0  # nothing refitted
    again = load_model(tmp_path / "m").received_cache
    assert again is not None and again[0] == first[0] and again[2] == first[2]
    np.testing.assert_array_equal(again[1], first[1])


# ------------------------------------------------------------------------------------- one store builder


def test_one_store_builder_batch_and_tables_give_the_same_shard_bytes(sim_files, tmp_path):
    """Training's batch arrays and per-target tables (the CSV migration) go through ``model_dir.build_store``:
    hand-derived columns, and byte-identical shards from both routes, on a hand batch and on a trained seed
    model's own shards."""
    from spatial_deconv_gui.engines.perturb import model_dir as md
    from spatial_deconv_gui.engines.perturb.train import _store_of_batch

    names_of_col = np.array(["Tf1", "Lg$Ra", "Tf0"], dtype=object)
    cols_of = [np.array([2, 1]), np.array([0, 2])]  # target 0: Tf0, Lg$Ra; target 1: Tf1, Tf0
    coefs = [np.array([[0.0, 0.5, -1.0], [0.25, 0.0, 0.0]]), np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0]])]
    stats = dict(
        n_cells=np.array([[5, 6], [5, 6]]), r2=np.full((2, 2), 0.5), gated=np.zeros((2, 2), bool), icpt=np.ones((2, 2))
    )
    batch = _store_of_batch(["A", "B"], cols_of, names_of_col, ["c0", "c1"], *stats.values(), coefs)
    assert batch.mod_vocab.tolist() == ["Lg$Ra", "Tf0", "Tf1"]
    assert batch.mod_ptr.tolist() == [0, 2, 4] and batch.mod_code.tolist() == [1, 0, 2, 1]
    # grouped by target, then cluster, then the modulator's position within the target
    assert batch.nz_target.tolist() == [0, 0, 0, 1, 1] and batch.nz_cluster.tolist() == [0, 0, 1, 0, 1]
    assert batch.nz_mod.tolist() == [0, 1, 0, 0, 1] and batch.nz_value.tolist() == [-1.0, 0.5, 2.0, 0.25, 3.0]
    fits = [
        ("A", [5, 6], [0.5, 0.5], [False, False], [1.0, 1.0], np.array([[-1.0, 0.5], [2.0, 0.0]]), ["Tf0", "Lg$Ra"]),
        ("B", [5, 6], [0.5, 0.5], [False, False], [1.0, 1.0], np.array([[0.25, 0.0], [0.0, 3.0]]), ["Tf1", "Tf0"]),
    ]
    a = tmp_path / "a" / md.COEFS / "part-00000.npz"
    b = tmp_path / "b" / md.COEFS / "part-00000.npz"
    for p in (a, b):
        p.parent.mkdir(parents=True)
    md.write_shard(tmp_path / "a", batch, a)
    md.write_shard(tmp_path / "b", md.store_from_fits(["c0", "c1"], fits), b)
    assert a.read_bytes() == b.read_bytes()

    # a trained seed model: each shard rebuilt from its targets' tables is the same file, byte for byte
    a_, _d, pr = sim_files
    s = a_.uns["perturb_sim"]
    m = api.train_model(
        a_,
        pr["grn_prior"],
        pr["lr_prior"],
        "cluster",
        tmp_path / "m",
        targets=["Gene0", "Gene1", "Gene2", "Tf1"],
        radius=s["radius"],
        contact_radius=s["contact_radius"],
        scale_factor=s["scale_factor"],
        problems_per_batch=8,
    )
    shards = md.shard_paths(m.path)
    assert len(shards) >= 2 and m.manifest["mode"] == "seed"
    for n, path in enumerate(shards):
        store = md.read_shard(path)
        fits = []
        for row, t in enumerate(store.targets.tolist()):
            tab = store.table(row)
            bcols = [c for c in tab.columns if c.startswith("beta_")]
            fits.append(
                (t, tab.n_cells, tab.r2, tab.gated, tab.intercept, tab[bcols].to_numpy(), [c[5:] for c in bcols])
            )
        again = tmp_path / "again" / md.COEFS / f"part-{n:05d}.npz"
        again.parent.mkdir(parents=True, exist_ok=True)
        md.write_shard(tmp_path / "again", md.store_from_fits(store.clusters.tolist(), fits), again)
        assert again.read_bytes() == path.read_bytes(), path.name
