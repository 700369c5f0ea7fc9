"""Per-cell coefficients (issue 16 item 2, ``perturb train --mode seed|full|hybrid``): held-out R² of seed, full
and hybrid on a simulated tissue whose coefficients vary within clusters and on the mouse olfactory bulb, the time
full mode takes, and agreement with spacetravlr's own per-cell (CNN) coefficients.

    python benchmarks/bench_percell.py sim  --work /tmp/cnn/bsim                   # simulated, seed / full / hybrid
    python benchmarks/bench_percell.py ob   --work /tmp/cnn/bob --inputs /tmp/knock \\
        --targets /tmp/knock/targets300.txt
    PEER_PYTHON=/tmp/train/peers/venv-stl/bin/python \\
    python benchmarks/bench_percell.py peer --work /tmp/cnn/bpeer --inputs /tmp/knock \\
        --peer-inputs /tmp/train/ob/peer --genes Fos,Cyp1b1,Cyp1a1 --ko Ahr --epochs 100

``--inputs`` holds ``ob_lognorm.h5ad`` and ``grn_abc.parquet`` (``bench_train_speed.py prepare``); ``--peer-inputs``
the peer's copy of the slide (``peer.h5ad``, ``cellchat.csv``, ``regs.json``, from ``bench_train_speed.py peer``).

Hybrid's numbers come from the full run: hybrid trains the same split and the same networks (same seed, same
batches) and keeps, per target, the network's coefficients when they cut the held-out squared error by at least
``hybrid_min_gain`` of the seed's, else the seed (the test suite checks that hybrid's stored held-out R² equal full's).
Its held-out R² per target is therefore the network's where kept, the seed's elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = Path("/work/shared/data")


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def run_cli(args: list[str]) -> dict:
    """One ``spatial-deconv`` process: wall and CPU (user + sys) time, load before and after."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = load_average()
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "spatial_deconv_gui.cli", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_before": load0, "load_after": load_average()}


def summary(man: dict, min_gain: float) -> dict:
    """Held-out R² of seed / full / hybrid over the targets with a model (from a full run's manifest)."""
    sys.path.insert(0, str(REPO / "src"))
    from spatial_deconv_gui.engines.perturb.percell import heldout_gain

    pc = man["percell"]
    ts = [t for t in pc["kept"] if pc["heldout_r2_seed"][t] is not None and pc["heldout_r2_cnn"][t] is not None]
    s = np.array([pc["heldout_r2_seed"][t] for t in ts])
    c = np.array([pc["heldout_r2_cnn"][t] for t in ts])
    keep = heldout_gain(s, c) >= min_gain
    h = np.where(keep, c, s)
    q = lambda a: [round(float(x), 3) for x in np.percentile(a, [10, 50, 90])]  # noqa: E731
    return {
        "targets_scored": len(ts),
        "heldout_r2_seed_mean": round(float(s.mean()), 4),
        "heldout_r2_full_mean": round(float(c.mean()), 4),
        "heldout_r2_hybrid_mean": round(float(h.mean()), 4),
        "heldout_r2_seed_p10_50_90": q(s),
        "heldout_r2_full_p10_50_90": q(c),
        "heldout_r2_hybrid_p10_50_90": q(h),
        "full_better_share": round(float((c > s).mean()), 3),
        "hybrid_keeps_cnn": int(keep.sum()),
        "hybrid_min_gain": min_gain,
        "per_target": {t: (float(a), float(b)) for t, a, b in zip(ts, s, c)},
    }


# ------------------------------------------------------------------------------------------------- simulated
def bench_sim(work: Path, cells: int, genes: int, variation: float, epochs: int, reg: float) -> dict:
    sys.path.insert(0, str(REPO / "src"))
    from spatial_deconv_gui import keys
    from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue, write_simulated_priors

    work.mkdir(parents=True, exist_ok=True)
    t = simulate_grn_tissue(n_cells=cells, n_genes=genes, seed=0, beta_variation=variation)
    sim = t.uns[keys.PERTURB_SIM]
    varying = [str(x) for x in sim["varying_targets"]]
    priors = write_simulated_priors(t, work)
    slide = work / "sim.h5ad"
    keep = t.copy()
    keep.uns = {}
    keep.write_h5ad(slide)
    base = [
        "perturb",
        "train",
        str(slide),
        "--grn",
        priors["grn_prior"],
        "--lr",
        priors["lr_prior"],
        "--cluster-col",
        "cluster",
        "--radius",
        str(sim["radius"]),
        "--contact-radius",
        str(sim["contact_radius"]),
        "--scale-factor",
        str(sim["scale_factor"]),
        "--l1-reg",
        str(reg),
        "--group-reg",
        str(reg),
        "--overwrite",
        "--quiet",
    ]
    out = {"cells": cells, "genes": genes, "beta_variation": variation, "reg": reg, "epochs": epochs}
    out["varying_targets"] = varying
    out["seed_run"] = run_cli([*base, "--out", str(work / "seed")])
    out["full_run"] = run_cli([*base, "--out", str(work / "full"), "--mode", "full", "--epochs", str(epochs)])
    man = json.loads((work / "full" / "manifest.json").read_text())
    out["full_timings"] = man["timings"]
    s = summary(man, 0.1)
    per = s.pop("per_target")
    out["all_targets"] = s
    vs = [per[t] for t in varying if t in per]
    other = [per[t] for t in per if t not in varying]
    out["varying_heldout_r2_seed_full_mean"] = [
        round(float(np.mean([a for a, _ in vs])), 4),
        round(float(np.mean([b for _, b in vs])), 4),
    ]
    out["other_heldout_r2_seed_full_mean"] = [
        round(float(np.mean([a for a, _ in other])), 4),
        round(float(np.mean([b for _, b in other])), 4),
    ]
    out["beta_vs_truth"] = beta_agreement(t, work)
    return out


def beta_agreement(tissue, work: Path) -> dict:
    """Correlation and RMSE of the fitted per-cell coefficients with the true ones, over (cell, true modulator) of
    the varying targets: seed (cluster coefficients) vs full (per-cell)."""
    from spatial_deconv_gui import keys
    from spatial_deconv_gui.engines.perturb.lens import LensIndex, term_coefficients
    from spatial_deconv_gui.engines.perturb.modulators import LR, TF
    from spatial_deconv_gui.engines.perturb.perturb import load_model

    sim = tissue.uns[keys.PERTURB_SIM]
    truth, mult = sim["true_modulators"], np.asarray(sim["cell_multiplier"])
    varying = {str(x) for x in sim["varying_targets"]}
    res = {}
    for mode in ("seed", "full"):
        m = load_model(work / mode)
        idx = LensIndex(m)
        cl = np.asarray(m.clusters)
        tb_all, est_all = [], []
        for (t, mod), g in truth[truth.target.isin(varying & set(m.targets))].groupby(["target", "modulator"]):
            tb = np.zeros(cl.size)
            for c, v in zip(g.cluster, g.coef):
                tb[cl == c] = v
            tb *= mult
            pair = tuple(mod.split("$")) if "$" in mod else None
            kind, row = (LR, m.lr_pairs.index(pair) if pair in m.lr_pairs else None) if pair else (TF, idx.gi[mod])
            est = np.zeros(cl.size)
            if row is not None:
                cols, beta = term_coefficients(idx, kind, row)
                j = np.flatnonzero(cols == idx.gi[t])
                if j.size:
                    est = beta[:, j[0]]
            tb_all.append(tb)
            est_all.append(est)
        tb, est = np.concatenate(tb_all), np.concatenate(est_all)
        res[mode] = {
            "corr": round(float(np.corrcoef(tb, est)[0, 1]), 4),
            "rmse": round(float(np.sqrt(np.mean((tb - est) ** 2))), 4),
        }
    return res


# --------------------------------------------------------------------------------------------------- OB slide
def train_args(inputs: Path, out: Path, *extra) -> list[str]:
    return [
        "perturb",
        "train",
        str(inputs / "ob_lognorm.h5ad"),
        "--grn",
        str(inputs / "grn_abc.parquet"),
        "--lr",
        str(SHARED / "lr_cellchatdb_mouse.parquet"),
        "--cluster-col",
        "layer",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def bench_ob(work: Path, inputs: Path, targets: Path, epochs: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    out = {"targets_file": str(targets), "epochs": epochs}
    out["seed_run"] = run_cli(train_args(inputs, work / "seed", "--targets", str(targets)))
    out["full_run"] = run_cli(
        train_args(inputs, work / "full", "--targets", str(targets), "--mode", "full", "--epochs", str(epochs))
    )
    man = json.loads((work / "full" / "manifest.json").read_text())
    seed_man = json.loads((work / "seed" / "manifest.json").read_text())
    out["seed_timings"] = seed_man["timings"]
    out["full_timings"] = man["timings"]
    out["full_train_time_s"] = man["train_time_s"]
    s = summary(man, 0.1)
    s.pop("per_target")
    out["heldout"] = s
    out["store_bytes"] = {
        mode: sum(p.stat().st_size for p in (work / mode / "coefs").glob("*.npz")) for mode in ("seed", "full")
    }
    # a knockout with per-cell coefficients vs the seed model (same slide, same TF), whole process
    ko = "Rxra"
    out["knockout"] = {
        mode: run_cli(["perturb", "run", str(work / mode), "--gene", ko, "--output", str(work / f"ko_{mode}.h5ad")])
        for mode in ("seed", "full")
    }
    out["knockout_gene"] = ko
    return out


# ------------------------------------------------------------------------------------------- spacetravlr
PEER_SCRIPT = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, pandas as pd, anndata as ad
args = json.loads(sys.argv[1])
wd, pin = args["wd"], args["peer_inputs"]
lr_tab = pd.read_csv(f"{pin}/cellchat.csv")
import SpaceTravLR.tools.network as net
net.get_cellchat_db = lambda species: lr_tab.copy()
import SpaceTravLR.models.parallel_estimators as pe
pe.get_cellchat_db = net.get_cellchat_db
import torch
torch.manual_seed(0); np.random.seed(0)
out = {}
adata = ad.read_h5ad(f"{pin}/peer.h5ad")
if args["task"] == "train":
    regs = json.load(open(f"{pin}/regs.json"))
    tfl = pd.DataFrame(0.0, index=sorted({r for v in regs.values() for r in v}), columns=["__none__"])
    per_gene = []
    import os
    os.makedirs(f"{wd}/betas", exist_ok=True)
    for gene in args["genes"]:
        t = time.perf_counter(); c = time.process_time()
        est = pe.SpatialCellularProgramsEstimator(
            adata, target_gene=gene, cluster_annot="cell_type_int", layer="imputed_count",
            radius=args["radius"], contact_distance=args["contact"], regulators=regs[gene], tflinks=tfl,
            scale_factor=args["scale"])
        t_init = time.perf_counter() - t
        t = time.perf_counter()
        est.fit(num_epochs=args["epochs"], estimator="lasso", use_pbar=False)
        t_fit = time.perf_counter() - t
        b = est.get_betas()
        b.to_parquet(f"{wd}/betas/{gene}_betadata.parquet")
        per_gene.append({"gene": gene, "init_s": t_init, "fit_s": t_fit, "cpu_s": time.process_time() - c,
                         "n_modulators": len(est.modulators),
                         "scores": {str(k): float(v) for k, v in est.scores.items()}})
        print("done", gene, t_init, t_fit, flush=True)
    out["per_gene"] = per_gene
elif args["task"] == "perturb":
    import SpaceTravLR.gene_factory as gfm
    gfm.get_cellchat_db = net.get_cellchat_db
    t = time.perf_counter()
    gf = gfm.GeneFactory(adata, models_dir=f"{wd}/betas", annot="cell_type_int", radius=args["radius"],
                         contact_distance=args["contact"], scale_factor=args["scale"])
    gf.load_betas()
    out["setup_s"] = time.perf_counter() - t
    t = time.perf_counter()
    res = gf.perturb(target=args["ko"], gene_expr=0.0, n_propagation=1)
    out["perturb_s"] = time.perf_counter() - t
    d = res - pd.DataFrame(adata.layers["imputed_count"], index=adata.obs_names, columns=adata.var_names)[res.columns]
    d[args["genes"]].to_parquet(f"{wd}/peer_delta.parquet")
print("PEER_JSON" + json.dumps(out))
"""


def run_peer(args: dict) -> dict:
    py = os.environ.get("PEER_PYTHON", "/tmp/train/peers/venv-stl/bin/python")
    t = time.perf_counter()
    p = subprocess.run([py, "-c", PEER_SCRIPT, json.dumps(args)], capture_output=True, text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("PEER_JSON")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"peer failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    res = json.loads(line[len("PEER_JSON") :])
    res["process_wall_s"] = round(time.perf_counter() - t, 1)
    return res


def bench_peer(work: Path, inputs: Path, peer_inputs: Path, genes: list[str], ko: str, epochs: int, step: str) -> dict:
    """spacetravlr 0.1.21's full mode (``fit(num_epochs, estimator='lasso')``, its CNN) and ours (``--mode full
    --holdout-fraction 0``: every cell trains, as the peer's) on the same OB targets; per-cell coefficient
    agreement over the (cell, modulator) pairs both keep, and the first-step knockout Δ of those targets."""
    sys.path.insert(0, str(REPO / "src"))
    work.mkdir(parents=True, exist_ok=True)
    ref = json.loads((inputs / "model_full" / "manifest.json").read_text()) if (inputs / "model_full").exists() else {}
    radius = float(ref.get("radius", 0)) or None
    out = {"genes": genes, "ko": ko, "epochs": epochs}
    tfile = work / "targets.txt"
    tfile.write_text("\n".join(genes))
    if step in ("all", "ours"):
        out["ours_run"] = run_cli(
            train_args(
                inputs,
                work / "ours",
                "--targets",
                str(tfile),
                "--mode",
                "full",
                "--holdout-fraction",
                "0",
                "--epochs",
                "300",
                "--overwrite",
            )
        )
    man = json.loads((work / "ours" / "manifest.json").read_text())
    radius, contact = man["radius"], man["contact_radius"]
    pargs = {
        "wd": str(work),
        "peer_inputs": str(peer_inputs),
        "genes": genes,
        "radius": radius,
        "contact": contact,
        "scale": 1.0,
        "epochs": epochs,
        "ko": ko,
    }
    if step in ("all", "peer"):
        out["peer_train"] = run_peer({**pargs, "task": "train"})
    if step in ("all", "peer", "ko"):
        out["peer_perturb"] = run_peer({**pargs, "task": "perturb"})
    out.update(compare(work, genes, ko))
    return out


def compare(work: Path, genes: list[str], ko: str) -> dict:
    from spatial_deconv_gui.engines.perturb.lens import LensIndex, cell_coefficients
    from spatial_deconv_gui.engines.perturb.modulators import LR, PAIR_SEP_LR, TF
    from spatial_deconv_gui.engines.perturb.perturb import load_model, simulate_perturbation

    m = load_model(work / "ours")
    idx = LensIndex(m)
    res = {}
    genes = [g for g in genes if (work / "betas" / f"{g}_betadata.parquet").exists()]  # what the peer finished
    res["genes_compared"] = genes
    for g in genes:
        pb = pd.read_parquet(work / "betas" / f"{g}_betadata.parquet")
        ours = np.zeros((m.expr.shape[0], pb.shape[1] - 1))
        col = {c[5:]: j for j, c in enumerate(pb.columns[1:])}
        for i in range(m.expr.shape[0]):
            for kind, r, b in cell_coefficients(idx, i, g):
                name = m.genes[r] if kind == TF else (PAIR_SEP_LR.join(m.lr_pairs[r]) if kind == LR else None)
                if name in col:
                    ours[i, col[name]] = b
        peer = pb.iloc[:, 1:].to_numpy()
        both = (ours != 0).any(0) & (np.abs(peer) > 0).any(0)
        either = (ours != 0).any(0) | (np.abs(peer) > 0).any(0)
        per_mod = [
            float(np.corrcoef(ours[:, j], peer[:, j])[0, 1])
            for j in np.flatnonzero(both)
            if ours[:, j].std() > 0 and peer[:, j].std() > 0
        ]
        res[g] = {
            "modulators_ours_nonzero": int((ours != 0).any(0).sum()),
            "modulators_peer_nonzero": int((np.abs(peer) > 0).any(0).sum()),
            "modulators_both": int(both.sum()),
            "corr_all_cells_union": round(float(np.corrcoef(ours[:, either].ravel(), peer[:, either].ravel())[0, 1]), 3)
            if either.any()
            else None,
            "corr_within_modulator_median": round(float(np.median(per_mod)), 3) if per_mod else None,
            "n_within": len(per_mod),
        }
    if (work / "peer_delta.parquet").exists():
        pd_ = pd.read_parquet(work / "peer_delta.parquet")
        d = simulate_perturbation(m, ko, 0.0, n_steps=1)
        ours_d = pd.DataFrame(d, columns=m.genes)[genes].to_numpy()
        peer_d = pd_[genes].to_numpy()
        res["knockout_first_step"] = {
            g: {
                "corr": round(float(np.corrcoef(ours_d[:, j], peer_d[:, j])[0, 1]), 3)
                if ours_d[:, j].std() > 0 and peer_d[:, j].std() > 0
                else None,
                "max_abs_ours": float(np.abs(ours_d[:, j]).max()),
                "max_abs_peer": float(np.abs(peer_d[:, j]).max()),
            }
            for j, g in enumerate(genes)
        }
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["sim", "ob", "peer"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--inputs", type=Path, default=Path("/tmp/knock"))
    ap.add_argument("--peer-inputs", type=Path, default=Path("/tmp/train/ob/peer"))
    ap.add_argument("--targets", type=Path, default=Path("/tmp/knock/targets300.txt"))
    ap.add_argument("--cells", type=int, default=1500)
    ap.add_argument("--genes", default="60")
    ap.add_argument("--variation", type=float, default=0.8)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--reg", type=float, default=0.05)
    ap.add_argument("--ko", default="Ahr")
    ap.add_argument("--step", default="all", choices=["all", "ours", "peer", "ko", "compare"])
    a = ap.parse_args()
    t0 = time.perf_counter()
    res = {"load_start": load_average(), "cpu_count": os.cpu_count()}
    if a.what == "sim":
        res.update(bench_sim(a.work, a.cells, int(a.genes), a.variation, a.epochs, a.reg))
    elif a.what == "ob":
        res.update(bench_ob(a.work, a.inputs, a.targets, a.epochs))
    else:
        res.update(bench_peer(a.work, a.inputs, a.peer_inputs, a.genes.split(","), a.ko, a.epochs, a.step))
    res["load_end"] = load_average()
    res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
