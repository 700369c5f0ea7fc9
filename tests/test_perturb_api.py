"""Perturbation API, CLI handler and prior-table reading (simulated tissue; real priors when shared data exist)."""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from spatial_deconv_gui import perturb_api as api
from spatial_deconv_gui.engines.perturb import priors
from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue, write_simulated_priors
from spatial_deconv_gui.io.errors import InputError


@pytest.fixture(scope="module")
def sim_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    a = simulate_grn_tissue(n_cells=600, seed=2)
    rng = np.random.default_rng(0)
    a.obsm["X_umap"] = rng.standard_normal((a.n_obs, 2))
    a.write_h5ad(d / "sim.h5ad")
    paths = write_simulated_priors(a, d)
    return a, d / "sim.h5ad", paths


@pytest.fixture(scope="module")
def model(sim_files, tmp_path_factory):
    a, path, pr = sim_files
    s = a.uns["perturb_sim"]
    return api.train_model(
        path,
        pr["grn_prior"],
        pr["lr_prior"],
        "cluster",
        tmp_path_factory.mktemp("m") / "model",
        radius=s["radius"],
        contact_radius=s["contact_radius"],
        scale_factor=s["scale_factor"],
    )


def test_prior_columns_recognised():
    cc = pd.DataFrame(
        {
            "interaction_name": ["x", "y"],
            "ligand": ["TGFb", "Cd"],
            "receptor": ["R", "Q"],
            "ligand_genes": ["Tgfb1", "Cdh1"],
            "receptor_genes": ["Tgfbr1_Tgfbr2", "Cdh1"],
            "annotation": ["Secreted Signaling", "Cell-Cell Contact"],
        }
    )
    lr, _ = priors.load_lr(cc)
    assert list(map(tuple, lr[["ligand", "receptor", "signaling"]].to_numpy())) == [
        ("Tgfb1", "Tgfbr1", "secreted"),
        ("Tgfb1", "Tgfbr2", "secreted"),
    ]  # Cdh1-Cdh1 self pair dropped
    li = pd.DataFrame(
        {
            "source": ["P1"],
            "target": ["P2"],
            "source_genesymbol": ["A"],
            "target_genesymbol": ["B_C"],
            "resource": ["mouseconsensus"],
        }
    )
    lr2, _ = priors.load_lr(li, resource="mouseconsensus")
    assert set(zip(lr2.ligand, lr2.receptor)) == {("A", "B"), ("A", "C")}
    assert set(lr2.signaling) == {"secreted"}
    g, _ = priors.load_grn(pd.DataFrame({"source": ["T"], "target": ["G"], "weight": [1]}))
    assert list(g.tf) == ["T"]
    with pytest.raises(InputError, match="columns found"):
        priors.load_grn(pd.DataFrame({"a": [1], "b": [2]}))
    with pytest.raises(InputError, match="no column 'tfx'"):
        priors.load_grn(pd.DataFrame({"tf": ["T"], "target": ["G"]}), tf_col="tfx")


def test_prior_file_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        priors.read_table(tmp_path / "nope.csv")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(InputError, match="could not read"):
        priors.read_table(bad)
    csv = tmp_path / "g.tsv"
    csv.write_text("regulator\ttarget_gene\nA\tB\n")
    g, checksum = priors.load_grn(csv)
    assert list(zip(g.tf, g.target)) == [("A", "B")] and len(checksum) == 64


def test_train_model_writes_manifest_and_tables(model):
    man = model.manifest
    assert man["status"] == "complete"
    assert {"config", "radius", "contact_radius", "scale_factor", "genes", "checksums", "targets"} <= set(man)
    assert man["checksums"]["grn"] and man["checksums"]["lr"]
    assert "X_umap" in model.obsm
    assert len(model.coef_tables) == len(man["targets"])


def test_run_perturbation_outputs(model, sim_files):
    a, _, _ = sim_files
    steps = []
    out = api.run_perturbation(model, "Tf0", 0.0, steps=3, on_step=steps.append)
    assert [s.step for s in steps] == [1, 2, 3]
    assert out is not model and out.n_obs == a.n_obs
    d = out.layers["perturb_delta"]
    assert d.shape == out.shape
    gi = list(out.var_names).index("Tf0")
    np.testing.assert_allclose(d[:, gi].toarray().ravel(), -model.expr[:, model.genes.index("Tf0")])
    assert out.obsm["perturb_vectors"].shape == (a.n_obs, 2)
    assert out.obsm["perturb_grid_vectors"].shape == (a.n_obs, 2)
    u = out.uns["perturb"]
    assert u["genes"] == ["Tf0"] and u["values"] == [0.0] and u["steps"] == 3 and u["scope"]["kind"] == "all"
    assert np.isfinite(out.obsm["perturb_vectors"]).all()
    # onto the user's slide, a cluster scope, UMAP embedding
    res = api.run_perturbation(model, ["Tf0"], [0.0], cluster=model.cluster_names[0], adata=a, embedding="X_umap")
    assert res.uns["perturb"]["scope"]["n_cells"] == int((model.clusters == model.cluster_names[0]).sum())
    assert "lognorm" in res.layers and res.layers["perturb_delta"].shape == a.shape
    with pytest.raises(InputError):
        api.run_perturbation(model, "NotAGene", 0.0)
    with pytest.raises(InputError):
        api.run_perturbation(model, "Tf0", 0.0, cluster="nope")


def test_perturbation_steps_stream(model):
    it = api.perturbation_steps(model, "Tf0", steps=2)
    first = next(it)
    assert first.step == 1 and first.delta.shape == model.expr.shape


def test_vector_points_towards_shift():
    from spatial_deconv_gui.engines.perturb.vectors import transition_vectors

    # expression increases along x; a positive shift should point to +x
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 10, (400, 2))
    X = np.column_stack([xy[:, 0], 2 * xy[:, 0], rng.normal(0, 0.01, 400)])
    delta = np.tile([1.0, 2.0, 0.0], (400, 1))
    v = transition_vectors(X, delta, xy, k=15)
    assert (v[:, 0] > 0).mean() > 0.95
    assert v[:, 0].mean() > 5 * abs(v[:, 1].mean())


def _cli(argv):
    from spatial_deconv_gui.perturb_cli import main

    return main(argv)


def test_cli_train_and_run(sim_files, tmp_path, capsys):
    a, path, pr = sim_files
    s = a.uns["perturb_sim"]
    out = tmp_path / "model"
    rc = _cli(
        [
            "perturb",
            "train",
            str(path),
            "--grn",
            pr["grn_prior"],
            "--lr",
            pr["lr_prior"],
            "--cluster-col",
            "cluster",
            "--out",
            str(out),
            "--radius",
            str(s["radius"]),
            "--contact-radius",
            str(s["contact_radius"]),
            "--scale-factor",
            str(s["scale_factor"]),
            "--quiet",
            "--json",
        ]
    )
    assert rc == 0
    cells = tmp_path / "cells.txt"
    cells.write_text("\n".join(a.obs_names[:50]))
    res = tmp_path / "ko.h5ad"
    rc = _cli(
        [
            "perturb",
            "run",
            str(out),
            "--gene",
            "Tf0",
            "--gene",
            "Tf2",
            "--value",
            "0",
            "--cells",
            str(cells),
            "--steps",
            "2",
            "--output",
            str(res),
            "--quiet",
        ]
    )
    assert rc == 0
    r = ad.read_h5ad(res)
    assert list(r.uns["perturb"]["genes"]) == ["Tf0", "Tf2"] and r.uns["perturb"]["scope"]["n_cells"] == 50
    rc = _cli(["perturb", "run", str(out), "--gene", "Nope", "--output", str(tmp_path / "x.h5ad"), "--quiet"])
    assert rc == 2
    assert "not in the model" in capsys.readouterr().err


def test_cli_parser_hooks_into_a_main_parser():
    from spatial_deconv_gui.perturb_cli import add_perturb_parser

    p = argparse.ArgumentParser()
    add_perturb_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["perturb", "run", "M", "--gene", "G", "--output", "o.h5ad", "--cell-type", "T"])
    assert args.command == "perturb" and args.perturb_command == "run" and args.cell_type == "T"


@pytest.mark.shared_data
def test_real_mouse_priors_on_olfactory_bulb(shared_data, tmp_path):
    a = ad.read_h5ad(shared_data / "st_mouse_olfactory_bulb.h5ad")
    a = a[~a.obs["layer"].isna()].copy()
    grn = pd.read_parquet(shared_data / "grn_dorothea_mouse.parquet")
    grn = grn[grn.confidence.isin(["A", "B"])]
    targets = ["Gad1", "Slc17a7", "Pcp4", "Nrgn", "Penk"]
    targets = [t for t in targets if t in set(a.var_names) and t in set(grn.target)]
    assert targets
    lr = pd.read_parquet(shared_data / "lr_cellchatdb_mouse.parquet")
    lr = lr[lr.pathway_name.isin(["WNT", "BMP", "SEMA3", "NRXN", "EPHA", "CXCL"])]  # keep the test fast
    m = api.train_model(a, grn, lr, "layer", tmp_path / "mob", targets=targets)
    assert set(m.manifest["targets"]) | set(m.manifest["orphans"]) == set(targets)
    assert m.manifest["expression"].startswith("log1p")
    assert len(m.manifest["ligands"]) > 0
    tf = next(g for g in m.genes if g in set(grn.tf))
    out = api.run_perturbation(m, tf, 0.0, steps=2)
    assert np.isfinite(out.layers["perturb_delta"].toarray()).all()


def test_impute_expression_and_train_with_imputation(sim_files, tmp_path):
    a, _, pr = sim_files
    b = a.copy()
    api.impute_expression(b, "cluster", key="imputed", k=10, t=2)
    assert b.layers["imputed"].shape == b.shape and "imputed" in b.layers
    s = a.uns["perturb_sim"]
    m = api.train_model(
        b,
        pr["grn_prior"],
        pr["lr_prior"],
        "cluster",
        tmp_path / "mi",
        targets=["Gene0", "Gene1"],
        radius=s["radius"],
        contact_radius=s["contact_radius"],
        scale_factor=s["scale_factor"],
    )
    assert m.manifest["expression"] == "layers['imputed']"  # an imputed layer is preferred when present
    assert set(m.manifest["targets"]) == {"Gene0", "Gene1"}


def test_radius_rule_through_api_and_cli(sim_files, tmp_path):
    a, path, pr = sim_files
    s = a.uns["perturb_sim"]
    # a ligand with a secreted and a contact pair: received at two radii by default, at one with 'ligand'
    lr = pd.read_csv(pr["lr_prior"])
    lr = pd.concat(
        [lr, pd.DataFrame({"ligand": ["Lig1"], "receptor": ["Rec3"], "annotation": ["Cell-Cell Contact"]})],
        ignore_index=True,
    )
    kw = dict(
        radius=s["radius"],
        contact_radius=s["contact_radius"],
        scale_factor=s["scale_factor"],
        targets=["Gene2", "Gene5", "Gene8"],
    )
    m = api.train_model(path, pr["grn_prior"], lr, "cluster", tmp_path / "pair", **kw)
    assert m.radius_rule == "pair" and m.manifest["lr_radius"]["Lig1$Rec3"] == s["contact_radius"]
    assert {("Lig1", s["radius"]), ("Lig1", s["contact_radius"])} <= set(m.channels)
    out = api.run_perturbation(m, "Lig1", 0.0, steps=2)
    assert out.uns["perturb"]["parameters"]["radius_rule"] == "pair"
    lr_csv = tmp_path / "lr.csv"
    lr.to_csv(lr_csv, index=False)
    rc = _cli(
        [
            "perturb",
            "train",
            str(path),
            "--grn",
            pr["grn_prior"],
            "--lr",
            str(lr_csv),
            "--cluster-col",
            "cluster",
            "--out",
            str(tmp_path / "lig"),
            "--radius",
            str(s["radius"]),
            "--contact-radius",
            str(s["contact_radius"]),
            "--scale-factor",
            str(s["scale_factor"]),
            "--radius-rule",
            "ligand",
            "--quiet",
        ]
    )
    assert rc == 0
    m2 = api.load_model(tmp_path / "lig")
    assert m2.radius_rule == "ligand" and m2.manifest["lr_radius"]["Lig1$Rec3"] == s["radius"]
    assert [c for c in m2.channels if c[0] == "Lig1"] == [("Lig1", s["radius"])]
