"""Jobs run in a child process (how the GUI trains): same results, progress, errors and cancellation."""

from __future__ import annotations

import json
import threading

import pandas as pd
import pytest

from spatial_deconv_gui import perturb_api
from spatial_deconv_gui.engines.base import Cancelled, RunControl
from spatial_deconv_gui.engines.perturb.model_dir import finished_genes
from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue, write_simulated_priors
from spatial_deconv_gui.io.errors import InputError
from spatial_deconv_gui.isolated import run_isolated

TRAIN = "spatial_deconv_gui.perturb_api:train_model"


@pytest.fixture(scope="module")
def tissue(tmp_path_factory):
    d = tmp_path_factory.mktemp("iso")
    a = simulate_grn_tissue(n_cells=400, seed=3)
    a.write_h5ad(d / "sim.h5ad")
    pr = write_simulated_priors(a, d)
    s = a.uns["perturb_sim"]
    kw = dict(
        spatial=str(d / "sim.h5ad"),
        grn=str(pr["grn_prior"]),
        lr=str(pr["lr_prior"]),
        cluster_col="cluster",
        radius=s["radius"],
        contact_radius=s["contact_radius"],
        scale_factor=s["scale_factor"],
    )
    return d, kw


def test_child_training_equals_in_process_training(tissue):
    d, kw = tissue
    events = []
    child = run_isolated(TRAIN, {**kw, "out": str(d / "child")}, RunControl(events.append, max_rate=0), threads=1)
    here = perturb_api.train_model(**{**kw, "out": str(d / "here")})
    assert child.targets == here.targets and len(child.targets) > 10
    for gene in here.targets:
        pd.testing.assert_frame_equal(
            child.coef_tables[gene], here.coef_tables[gene], check_exact=False, rtol=0, atol=1e-9
        )
    # the child's progress arrives in the parent, per gene, ending at 100 %
    per_gene = [e for e in events if e.stage == events[-1].stage]
    assert len(per_gene) >= 2 and per_gene[-1].fraction == 1.0
    assert all(b.fraction >= a.fraction for a, b in zip(per_gene, per_gene[1:]))


def test_child_input_error_comes_back_whole(tissue):
    d, kw = tissue
    with pytest.raises(InputError) as info:
        run_isolated(TRAIN, {**kw, "cluster_col": "no_such_column", "out": str(d / "bad")}, threads=1)
    assert "no_such_column" in info.value.problem and info.value.fix and info.value.code


def test_cancel_reaches_the_child_and_leaves_a_resumable_folder(tissue):
    d, kw = tissue
    cancel = threading.Event()
    seen = []

    def on_progress(ev):
        seen.append(ev)
        if ev.stage not in ("priors", "expression") and 0 < ev.fraction < 1:
            cancel.set()

    job = {**kw, "out": str(d / "cancelled"), "problems_per_batch": 2}
    out = d / "cancelled"
    with pytest.raises(Cancelled):
        run_isolated(TRAIN, job, RunControl(on_progress, cancel, max_rate=0), threads=1)
    assert cancel.is_set() and (out / "manifest.json").exists()
    targets = json.loads((out / "manifest.json").read_text())["targets"]
    assert 0 < len(finished_genes(out, targets)) < len(targets)
    resumed = perturb_api.train_model(**job)
    assert resumed.manifest["status"] == "complete"
