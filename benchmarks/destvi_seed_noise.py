"""Where DestVI's seed-to-seed spread comes from: re-seed only the spatial stage, holding the single-cell model and
its empirical prior fixed (trained once, with seed 0), and compare the two runs' proportions every 100 epochs.

Compare with two runs re-seeding both stages (`bench_destvi.py --ours-seeds 2 --ckpt-dir ...`): the difference is
the part of the spread that the single-cell stage contributes.

    .venv/bin/python benchmarks/destvi_seed_noise.py --data hippocampus --out /tmp/destvi_spatial_seeds.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PAIRS = {"hippocampus": "spacexr_visium_hippocampus", "lymphnode": "spacexr_visium_lymphnode_human"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="hippocampus", choices=list(PAIRS))
    ap.add_argument("--epochs", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    import anndata as ad
    import torch

    torch.set_num_threads(1)
    from spatial_deconv_gui.engines.base import RunControl
    from spatial_deconv_gui.engines.destvi import DestVIConfig, engine
    from spatial_deconv_gui.io.read import reference_input, spatial_input

    sp = ad.read_h5ad(DATA / f"{PAIRS[a.data]}_spatial.h5ad")
    ref = ad.read_h5ad(DATA / f"{PAIRS[a.data]}_reference.h5ad")
    genes = [g for g in sp.var_names if g in set(ref.var_names)]
    spatial, reference = spatial_input(sp[:, genes].copy()), reference_input(ref[:, genes].copy())

    # the first run trains the single-cell model and prior; later runs get copies of them
    cache, fit_single_cell, vamp_prior = {}, engine.fit_single_cell, engine.vamp_prior

    def fit_once(*args, **kw):
        if "sc" not in cache:
            cache["sc"] = fit_single_cell(*args, **kw)
        return copy.deepcopy(cache["sc"][0]), cache["sc"][1]

    def prior_once(*args, **kw):
        if "prior" not in cache:
            cache["prior"] = vamp_prior(*args, **kw)
        return cache["prior"]

    engine.fit_single_cell, engine.vamp_prior = fit_once, prior_once
    runs: dict[int, dict[int, np.ndarray]] = {}
    with open(a.out, "w") as f:
        for seed in a.seeds:
            runs[seed] = {}
            epoch = {"now": 0}

            def on_event(ev, seed=seed, epoch=epoch):
                if ev.stage == "spatial" and ev.message.startswith("epoch "):
                    epoch["now"] = int(ev.message.split()[1].split("/")[0].rstrip(","))
                if ev.partial is not None:
                    runs[seed][epoch["now"]] = ev.partial.proportions
                    f.write(
                        json.dumps(
                            {"seed": seed, "epoch": epoch["now"], "proportions": ev.partial.proportions.tolist()}
                        )
                        + "\n"
                    )

            res = engine.run_destvi(
                spatial,
                reference,
                DestVIConfig(max_epochs=a.epochs, seed=seed, device="cpu", report_every=100, n_threads=1),
                RunControl(on_event, max_rate=0),
            )
            runs[seed][a.epochs] = res.proportions
            f.write(json.dumps({"seed": seed, "epoch": a.epochs, "proportions": res.proportions.tolist()}) + "\n")
    first, second = a.seeds[:2]
    # checkpoints from epoch 1,000 on (a shorter run: its end only)
    late = [e for e in sorted(set(runs[first]) & set(runs[second])) if e >= min(1000, a.epochs)]
    r = [float(np.corrcoef(runs[first][e].ravel(), runs[second][e].ravel())[0, 1]) for e in late]
    print(
        json.dumps(
            {
                "epochs": late,
                "r_all": [round(x, 4) for x in r],
                "mean_r_from_epoch_1000": round(float(np.mean(r)), 4),
                "r_at_end": round(r[-1], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
