"""Before and across knockouts: which targets use a gene (hand-derived counts), a screen of separate knockouts
with one loaded model (same numbers as single runs), and the CLI's notices and summary table."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from spatial_deconv_gui import perturb_api as api
from spatial_deconv_gui.engines.perturb import model_dir as md
from spatial_deconv_gui.engines.perturb import priors
from spatial_deconv_gui.engines.perturb.perturb import (
    StoreTables,
    coefficients_from_store,
    model_from_coefficients,
    model_from_tables,
)
from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue
from spatial_deconv_gui.engines.perturb.train import TrainConfig, train
from spatial_deconv_gui.io.errors import InputError
from spatial_deconv_gui.perturb_cli import main as perturb_main

GENES = ["T1", "T2", "T3", "Lg", "Ra", "Tg1", "Tg2", "Tg3"]
CLUSTERS = ["c0", "c1"]
# target -> {modulator: coefficient in c0, c1}; zeros are modulators the lasso zeroed
COEFS = {
    "Tg1": {"T1": (0.5, -0.2), "T2": (0.0, 0.0), "Lg$Ra": (0.0, 0.3)},
    "Tg2": {"T1": (0.0, 0.0), "Lg#T2": (0.1, 0.0)},
    "Tg3": {"T2": (0.0, 0.0), "T3": (0.0, 0.0), "Lg$Ra": (-0.4, 0.0)},
}
# by hand from COEFS: (n_targets, total |beta|, as TF, as ligand, as receptor, candidate targets)
WANT = {
    "T1": (1, 0.7, 1, 0, 0, 2),  # Tg1 (0.5 + 0.2); zeroed in Tg2
    "T2": (1, 0.1, 1, 0, 0, 3),  # only as the TF of Lg#T2 in Tg2; zeroed as a TF in Tg1 and Tg3
    "T3": (0, 0.0, 0, 0, 0, 1),  # a candidate of Tg3, zeroed
    "Lg": (3, 0.8, 0, 3, 0, 3),  # Lg$Ra in Tg1 (0.3) and Tg3 (0.4), Lg#T2 in Tg2 (0.1)
    "Ra": (2, 0.7, 0, 0, 2, 2),  # Lg$Ra in Tg1 and Tg3
    "Tg1": (0, 0.0, 0, 0, 0, 0),  # a target, no one's modulator
}


def _tables():
    out = {}
    for t, mods in COEFS.items():
        df = pd.DataFrame(
            {"cluster": CLUSTERS, "n_cells": [1, 1], "r2": [0.5, 0.5], "gated": [False, False], "intercept": [0.0, 0.0]}
        )
        for m, v in mods.items():
            df[f"beta_{m}"] = list(v)
        out[t] = df
    return out


def _hand_models():
    man = {"clusters": CLUSTERS, "targets": list(COEFS), "scale_factor": 1.0, "ligand_radius": {"Lg": 5.0}}
    X = np.arange(1.0, 1.0 + 2 * len(GENES)).reshape(2, len(GENES))
    xy = np.array([[0.0, 0.0], [3.0, 4.0]])
    cl = np.array(CLUSTERS)
    from_tables = model_from_tables(man, GENES, X, xy, cl, _tables())
    fits = [
        (t, [1, 1], [0.5, 0.5], [False, False], [0.0, 0.0], np.array(list(m.values())).T, list(m))
        for t, m in COEFS.items()
    ]
    store = md.store_from_fits(CLUSTERS, fits)
    coefs = coefficients_from_store(GENES, CLUSTERS, list(COEFS), store)
    from_store = model_from_coefficients(man, GENES, X, xy, cl, coefs, StoreTables(store, list(COEFS)))
    from_store.store = store
    return from_tables, from_store


@pytest.mark.parametrize("which", ["tables", "store"])
def test_gene_usage_hand_derived_counts(which):
    model = _hand_models()[0 if which == "tables" else 1]
    u = api.gene_usage(model, [*WANT, "Nope"]).set_index("gene")
    for g, (n, total, as_tf, as_lig, as_rec, cand) in WANT.items():
        row = u.loc[g]
        assert bool(row.in_model)
        assert (row.n_targets, row.n_targets_as_tf, row.n_targets_as_ligand, row.n_targets_as_receptor) == (
            n,
            as_tf,
            as_lig,
            as_rec,
        ), g
        assert row.total_abs_beta == pytest.approx(total, abs=1e-15) and row.n_candidate_targets == cand, g
    assert not u.loc["Nope", "in_model"] and u.loc["Nope", "n_targets"] == 0
    notes = dict(zip(["T1", "T3", "Tg1", "Nope"], api.usage_notices(model, ["T1", "T3", "Tg1", "Nope"])))
    assert "used by 1 of the model's targets (total |beta| 0.7" in notes["T1"]
    assert "used by no target's model" in notes["T3"] and "candidate modulator of 1 targets" in notes["T3"]
    assert "lasso set all its coefficients to 0" in notes["T3"]
    assert "no target has it as a modulator" in notes["Tg1"]
    assert "not in the model" in notes["Nope"]


# ------------------------------------------------------------------------------------------- screens


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    sim = simulate_grn_tissue(seed=0)
    s = sim.uns["perturb_sim"]
    grn, _ = priors.load_grn(s["grn_prior"])
    lr, _ = priors.load_lr(s["lr_prior"])
    out = tmp_path_factory.mktemp("screen") / "m"
    cfg = TrainConfig(radius=s["radius"], contact_radius=s["contact_radius"], scale_factor=s["scale_factor"])
    train(
        sim.X, sim.var_names, sim.obsm["spatial"], sim.obs["cluster"].astype(str).to_numpy(), grn, lr, out, config=cfg
    )
    return out


def _expected_row(model, gene, delta, tol=1e-6):
    """The screen's numbers recomputed from one knockout's Δ by a plain loop over genes."""
    total, moved, per_gene, mx = 0.0, 0, {}, 0.0
    for j, g in enumerate(model.genes):
        if g == gene:
            continue
        col = np.abs(delta[:, j])
        per_gene[g] = col.sum()
        total += col.sum()
        mx = max(mx, col.max())
        moved += int(col.max() > tol)
    return total, mx, moved, max(per_gene, key=per_gene.get)


def test_screen_equals_single_knockouts_run_one_by_one(trained):
    model = api.load_model(trained)
    genes = ["Tf0", "Tf1", "Tf2", model.targets[-1]]
    cells = np.arange(0, model.expr.shape[0], 3)
    table = api.knockout_screen(model, genes, 0.0, cells=cells, steps=3)
    assert list(table.columns) == list(api.SCREEN_COLUMNS) and sorted(table.gene) == sorted(genes)
    assert np.all(np.diff(table.total_abs_delta) <= 0) and list(table["rank"]) == [1, 2, 3, 4]
    usage = api.gene_usage(model, genes).set_index("gene")
    for gene in genes:
        fresh = api.load_model(trained)  # a separate process's worth of state: nothing shared with the screen
        single = api.run_perturbation(fresh, [gene], 0.0, cells=cells, steps=3)
        d = single.layers["perturb_delta"].toarray()  # same genes and order as the model's own cells
        assert list(single.var_names) == model.genes
        total, mx, moved, top = _expected_row(model, gene, d)
        row = table.set_index("gene").loc[gene]
        assert row.total_abs_delta == pytest.approx(total, rel=1e-12, abs=1e-300)
        assert row.mean_abs_delta_per_cell == pytest.approx(total / model.expr.shape[0], rel=1e-12, abs=1e-300)
        assert row.max_abs_delta == pytest.approx(mx, rel=1e-12, abs=1e-300)
        assert row.n_genes_moved == moved and row.n_cells == cells.size
        assert row.n_targets == usage.loc[gene, "n_targets"]
        if total > 0:
            assert row.top_genes.split(";")[0].split(":")[0] == top
    top = table.iloc[0]
    assert top.total_abs_delta > 1.0 and top.gene.startswith("Tf")
    last_target = table.set_index("gene").loc[model.targets[-1]]
    assert last_target.n_targets == usage.loc[model.targets[-1], "n_targets"]
    with pytest.raises(InputError, match="not in the model"):
        api.knockout_screen(model, ["Tf0", "Nope"])


def test_cli_separately_writes_the_ranked_table_and_tells_usage_first(trained, tmp_path, capsys):
    out = tmp_path / "screen.csv"
    rc = perturb_main(
        [
            "perturb",
            "run",
            str(trained),
            "--gene",
            "Tf0",
            "--gene",
            "Tf2",
            "--separately",
            "--steps",
            "2",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "Tf0 is used by" in err and "Tf2 is used by" in err and "separate knockouts" in err
    table = pd.read_csv(out, float_precision="round_trip")  # written with 17 digits
    model = api.load_model(trained)
    want = api.knockout_screen(model, ["Tf0", "Tf2"], steps=2)
    pd.testing.assert_frame_equal(
        table.drop(columns="runtime_s"), want.drop(columns="runtime_s"), check_exact=True, check_dtype=False
    )
    # the default is one joint run: an .h5ad; a table output asks for --separately, and the reverse
    assert perturb_main(["perturb", "run", str(trained), "--gene", "Tf0", "-o", str(tmp_path / "x.csv")]) == 2
    assert "--separately" in capsys.readouterr().err
    assert (
        perturb_main(["perturb", "run", str(trained), "--gene", "Tf0", "--separately", "-o", str(tmp_path / "x.h5ad")])
        == 2
    )
    assert ".csv or .tsv" in capsys.readouterr().err
    joint = tmp_path / "joint.h5ad"
    rc = perturb_main(
        ["perturb", "run", str(trained), "--gene", "Tf0", "--gene", "Tf2", "--steps", "2", "-o", str(joint), "--json"]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["notices"]) == 2 and list(ad.read_h5ad(joint).uns["perturb"]["genes"]) == ["Tf0", "Tf2"]


@pytest.mark.parametrize("command", ["run", "screen"])
def test_cli_separately_computes_gene_usage_once(trained, tmp_path, capsys, monkeypatch, command):
    """The notices and the screen's n_targets / total_abs_beta come from one gene_usage table; the output is what
    the screen and the notices give on their own."""
    model = api.load_model(trained)
    genes = ["Tf0", "Tf2", "Tf1"]
    want = api.knockout_screen(model, genes, steps=2)
    want_notices = api.usage_notices(model, genes)
    calls = []
    real = api._gene_usage

    def counted(m, g):
        calls.append(list(g))
        return real(m, g)

    monkeypatch.setattr(api, "_gene_usage", counted)
    out = tmp_path / "screen.csv"
    extra = ["--separately"] if command == "run" else []
    argv = ["perturb", command, str(trained), *[a for g in genes for a in ("--gene", g)], *extra]
    rc = perturb_main([*argv, "--steps", "2", "-o", str(out), "--json"])
    assert rc == 0
    assert calls == [genes]
    summary = json.loads(capsys.readouterr().out)
    assert summary["notices"] == want_notices and summary["model_mode"] == "seed"
    table = pd.read_csv(out, float_precision="round_trip")
    pd.testing.assert_frame_equal(
        table.drop(columns="runtime_s"), want.drop(columns="runtime_s"), check_exact=True, check_dtype=False
    )
    # a usage table given to the screen is the one its n_targets / total_abs_beta come from
    calls.clear()
    usage = api.gene_usage(model, genes)
    again = api.knockout_screen(model, genes, steps=2, usage=usage)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(again.drop(columns="runtime_s"), want.drop(columns="runtime_s"), check_exact=True)


def test_a_cpu_knockout_process_does_not_import_torch(trained):
    """torch costs 1-2 s of a cold `perturb run` and a knockout does not need it on the CPU."""
    import subprocess
    import sys

    from spatial_deconv_gui.engines.devices import gpu_driver_visible

    if gpu_driver_visible():
        pytest.skip("a GPU driver is present: auto asks torch for the device")
    code = (
        "import sys; from spatial_deconv_gui import perturb_api as api; "
        f"r = api.run_perturbation({str(trained)!r}, ['Tf0'], 0.0, steps=2); "
        "assert abs(r.layers['perturb_delta']).max() > 0; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_training_and_propagation_share_what_counts_as_expressed():
    from spatial_deconv_gui.engines.perturb import expression, train

    assert train.FILTER_MIN == expression.FILTER_MIN
    x = np.array([0.0, 1e-10, 1e-9, 2e-9, 3.0])
    np.testing.assert_array_equal(train.filtered(x), expression.filtered(x))
    np.testing.assert_array_equal(expression.filtered(x), [0.0, 0.0, 0.0, 2e-9, 3.0])


def test_a_loaded_model_pickles_without_its_propagators(trained):
    """The Train dock gets its model back from a child process: a loaded model must pickle."""
    import pickle

    model = api.load_model(trained)
    before = api.run_perturbation(model, ["Tf0"], 0.0, steps=2).layers["perturb_delta"].toarray()
    assert model.propagators
    copy = pickle.loads(pickle.dumps(model))
    assert copy.propagators == {} and list(copy.coef_tables) == list(model.coef_tables)
    pd.testing.assert_frame_equal(copy.coef_tables[copy.targets[0]], model.coef_tables[model.targets[0]])
    after = api.run_perturbation(copy, ["Tf0"], 0.0, steps=2).layers["perturb_delta"].toarray()
    np.testing.assert_array_equal(before, after)
