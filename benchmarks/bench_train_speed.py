"""Perturbation training speed on a real slide with real priors, and on a simulated 10,000-cell tissue (issue 16).

    python benchmarks/bench_train_speed.py prepare --work /tmp/train/ob    # the olfactory-bulb inputs
    python benchmarks/bench_train_speed.py ob --work /tmp/train/ob          # `perturb train`, all targets
    python benchmarks/bench_train_speed.py sim --work /tmp/train/sim        # 10,000 cells x 2,000 targets
    python benchmarks/bench_train_speed.py screen --work /tmp/train/sim     # knockout Δ, screened vs unscreened

``prepare`` writes, from the shared data: ``ob_lognorm.h5ad`` (``st_mouse_olfactory_bulb.h5ad``, the 260 spots
with ``obs['layer']`` not NaN, X = log1p(counts / rowsum x 1e4)) and ``grn_abc.parquet``
(``grn_dorothea_mouse.parquet``, confidence A-C). ``ob`` runs the whole ``spatial-deconv perturb train``
command on them with ``lr_cellchatdb_mouse.parquet`` in a fresh process (wall, CPU time and load recorded).
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
SHARED = REPO.parent / "shared" / "data"
if not SHARED.exists():
    SHARED = Path("/work/shared/data")


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def prepare(work: Path) -> dict:
    import anndata as ad
    import scipy.sparse as sp

    work.mkdir(parents=True, exist_ok=True)
    a = ad.read_h5ad(SHARED / "st_mouse_olfactory_bulb.h5ad")
    a = a[~a.obs["layer"].isna()].copy()
    counts = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    counts = counts.astype(np.float64)
    a.X = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    a.obs["layer"] = a.obs["layer"].astype(str)
    a.write_h5ad(work / "ob_lognorm.h5ad")
    grn = pd.read_parquet(SHARED / "grn_dorothea_mouse.parquet")
    grn = grn[grn.confidence.isin(["A", "B", "C"])].reset_index(drop=True)
    grn.to_parquet(work / "grn_abc.parquet")
    return {"spots": int(a.n_obs), "genes": int(a.n_vars), "grn_edges": int(len(grn))}


def run_cli(args: list[str], env_extra: dict | None = None) -> dict:
    """One CLI process; wall and CPU time of the child (user + system)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env_extra or {})}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = load_average()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "spatial_deconv_gui.cli", *args], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "load_before": load0,
        "load_after": load_average(),
        "stdout": proc.stdout[-4000:],
        "stderr": proc.stderr[-2000:],
    }


def ob_inputs(work: Path) -> dict:
    if not (work / "ob_lognorm.h5ad").exists():
        prepare(work)
    return {
        "slide": str(work / "ob_lognorm.h5ad"),
        "grn": str(work / "grn_abc.parquet"),
        "lr": str(SHARED / "lr_cellchatdb_mouse.parquet"),
    }


def train_args(inp: dict, out: Path, *extra: str) -> list[str]:
    """A fresh training into ``out`` (removed first: a folder of the same settings would only resume)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return [
        "perturb", "train", inp["slide"], "--grn", inp["grn"], "--lr", inp["lr"], "--cluster-col", "layer",
        "--out", str(out), "--overwrite", "--quiet", "--json", *extra,
    ]  # fmt: skip


def most_connected_tf(model_dir: Path, grn_path: str) -> tuple[str, int]:
    man = json.loads((model_dir / "manifest.json").read_text())
    targets = set(man["targets"])
    genes = set(man["genes"])
    grn = pd.read_parquet(grn_path)
    grn = grn[grn.target.isin(targets) & grn.tf.isin(genes)]
    counts = grn.groupby("tf").target.nunique().sort_values(ascending=False)
    return str(counts.index[0]), int(counts.iloc[0])


def bench_ob(work: Path, old_src: str | None, n_old: int) -> dict:
    """The whole `perturb train` on every target, then a knockout of the most connected TF from that model;
    with ``old_src`` (a checkout of the code before issue 16) also the old and new code on the same first
    ``n_old`` targets, their coefficients compared."""
    inp = ob_inputs(work)
    res: dict = {"inputs": inp}
    out = work / "model_all"
    r = run_cli(train_args(inp, out))
    man = json.loads((out / "manifest.json").read_text())
    res["train_all"] = {k: v for k, v in r.items() if k not in ("stdout", "stderr")}
    res["train_all"].update(
        n_targets=len(man["targets"]),
        timings=man.get("timings"),
        train_time_s=man.get("train_time_s"),
        modulators_per_target_median=float(np.median(list(man["n_modulators"].values()))),
    )
    tf, n_t = most_connected_tf(out, inp["grn"])
    r = run_cli(["perturb", "run", str(out), "--gene", tf, "--output", str(work / "ko.h5ad"), "--quiet", "--json"])
    res["knockout"] = {"tf": tf, "tf_targets": n_t, **{k: v for k, v in r.items() if k not in ("stderr",)}}
    if old_src:
        import anndata as ad

        a = ad.read_h5ad(inp["slide"], backed="r")
        vs = set(a.var_names)
        grn = pd.read_parquet(inp["grn"])
        targets = [t for t in dict.fromkeys(grn.target) if t in vs][:n_old]
        tfile = work / f"targets{n_old}.txt"
        tfile.write_text("\n".join(targets))
        both = {}
        for name, src in (("new", str(REPO / "src")), ("old", old_src)):
            mdir = work / f"model{n_old}_{name}"
            r = run_cli(train_args(inp, mdir, "--targets", str(tfile)), {"PYTHONPATH": src})
            m = json.loads((mdir / "manifest.json").read_text())
            both[name] = {
                **{k: v for k, v in r.items() if k not in ("stdout", "stderr")},
                "train_time_s": m.get("train_time_s"),
                "timings": m.get("timings"),
            }
        both["speedup_training_time"] = round(both["old"]["train_time_s"] / both["new"]["train_time_s"], 1)
        both["speedup_lasso_time"] = round(
            both["old"]["timings"]["lasso_s"] / max(both["new"]["timings"]["lasso_s"], 1e-9), 1
        )
        both["agreement"] = compare_models(work / f"model{n_old}_new", work / f"model{n_old}_old")
        both["objectives"] = objective_agreement(work / f"model{n_old}_new", work / f"model{n_old}_old")
        both["knockouts"] = knockout_agreement(work / f"model{n_old}_new", work / f"model{n_old}_old")
        res[f"old_vs_new_{n_old}_targets"] = both
    return res


def compare_models(a_dir: Path, b_dir: Path) -> dict:
    sys.path.insert(0, str(REPO / "src"))
    from spatial_deconv_gui.engines.perturb.perturb import load_model, simulate_perturbation

    a, b = load_model(a_dir), load_model(b_dir)
    worst = 0.0
    gated_same = True
    for t in a.targets:
        x, y = a.coef_tables[t], b.coef_tables[t]
        bc = [c for c in x.columns if c.startswith("beta_")]
        xv, yv = x[bc].to_numpy(), y[bc].reindex(columns=bc).to_numpy()
        worst = max(worst, float(np.abs(xv - yv).max() / max(1.0, np.abs(yv).max())))
        gated_same &= bool((x.gated.to_numpy() == y.gated.to_numpy()).all())
    out = {"max_coef_diff_rel": worst, "gating_identical": gated_same}
    tfs = [g for g in a.genes if any(g in set(a.coef_tables[t].columns.str[5:]) for t in a.targets[:50])]
    if tfs:
        tf = tfs[0]
        da = simulate_perturbation(a, tf, 0.0, n_steps=4)
        db = simulate_perturbation(b, tf, 0.0, n_steps=4)
        out.update(knockout=tf, max_abs_delta=float(np.abs(db).max()), max_delta_diff=float(np.abs(da - db).max()))
    return out


def objective_agreement(new_dir: Path, old_dir: Path, l1: float = 0.05, group_reg: float = 0.05) -> dict:
    """For every (target, cluster) whose coefficients differ by more than 1e-3 of max(|β|, 1) between two models
    of the same slide and settings: the sparse-group-lasso objective of each (standardised features, as trained),
    recomputed from the model's training expression and received ligands. TF and LR terms (no TF-ligand table)."""
    sys.path.insert(0, str(REPO / "src"))
    from spatial_deconv_gui.engines.perturb.lasso import sgl_objective
    from spatial_deconv_gui.engines.perturb.modulators import TF, parse_modulator
    from spatial_deconv_gui.engines.perturb.perturb import load_model
    from spatial_deconv_gui.engines.perturb.train import filtered

    new, old = load_model(new_dir), load_model(old_dir)
    gi = {g: i for i, g in enumerate(new.genes)}
    W = new.received_cache[1]
    chan = {f"{a}${b}": c for (a, b), c in zip(new.lr_pairs, new.lr_channel)}
    F = filtered(new.expr)
    rows = []
    for t in new.targets:
        x, y = new.coef_tables[t], old.coef_tables[t]
        bc = [c for c in x.columns if c.startswith("beta_")]
        cols, grp = [], []
        for name in (c[5:] for c in bc):
            kind, gs = parse_modulator(name)
            if kind == TF:
                cols.append(new.expr[:, gi[gs[0]]])
                grp.append(0)
            else:
                cols.append(W[:, chan[name]] * F[:, gi[gs[1]]])
                grp.append(1)
        Phi, grp, yv = np.stack(cols, 1), np.array(grp), new.expr[:, gi[t]]
        for k, c in enumerate(new.cluster_names):
            a, b = x[bc].to_numpy()[k], y[bc].reindex(columns=bc).to_numpy()[k]
            diff = float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))
            if diff < 1e-3:
                continue
            m = new.clusters == c
            Xc = Phi[m] - Phi[m].mean(0)
            yc = yv[m] - yv[m].mean()
            ss = (Xc**2).sum(0)
            act = ss > 1e-12 * ss.max()
            sd = np.where(ss > 0, np.sqrt(ss / m.sum()), 1.0)
            Xs = Xc / sd
            on = sgl_objective(Xs[:, act], yc, (a * sd)[act], 0, grp[act], l1, group_reg)
            oo = sgl_objective(Xs[:, act], yc, (b * sd)[act], 0, grp[act], l1, group_reg)
            rows.append((diff, on, oo))
    rel = [(oo - on) / oo for _, on, oo in rows]
    return {
        "problems": len(new.targets) * len(new.cluster_names),
        "differing_by_1e-3": len(rows),
        "largest_coef_difference": max((r[0] for r in rows), default=0.0),
        "new_objective_lower_or_equal": int(sum(r >= -1e-12 for r in rel)),
        "largest_relative_objective_excess_of_new": float(max([-r for r in rel] + [0.0])),
        "largest_relative_objective_excess_of_old": float(max(rel + [0.0])),
    }


def knockout_agreement(a_dir: Path, b_dir: Path, n_tfs: int = 4) -> list[dict]:
    """4-step knockouts of the TFs with the largest total |β| in model a: Δ of the other genes compared."""
    sys.path.insert(0, str(REPO / "src"))
    from spatial_deconv_gui.engines.perturb.perturb import load_model, simulate_perturbation

    a, b = load_model(a_dir), load_model(b_dir)
    mt = a.modulator_table()
    tot = mt[mt.kind == "tf"].groupby("modulator").coef.apply(lambda s: s.abs().sum()).sort_values(ascending=False)
    out = []
    cols = [a.genes.index(g) for g in b.genes]
    for tf in list(tot.index[:n_tfs]):
        da = simulate_perturbation(a, tf, 0.0, n_steps=4)[:, cols]
        db = simulate_perturbation(b, tf, 0.0, n_steps=4)
        i = b.genes.index(tf)
        da[:, i] = db[:, i] = 0.0  # the pinned gene itself
        out.append(
            {
                "tf": tf,
                "max_abs_delta": float(np.abs(db).max()),
                "max_delta_diff": float(np.abs(da - db).max()),
                "genes_moved_a": int((np.abs(da).max(0) > 1e-6).sum()),
                "genes_moved_b": int((np.abs(db).max(0) > 1e-6).sum()),
            }
        )
    return out


def bench_sim(work: Path, n_cells: int, n_targets: int, seed: int = 0) -> dict:
    sys.path.insert(0, str(REPO / "src"))
    from spatial_deconv_gui.engines.perturb.simulate import simulate_grn_tissue, write_simulated_priors

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    a = simulate_grn_tissue(n_cells=n_cells, n_genes=n_targets + 16, seed=seed, side=1500.0 * (n_cells / 10_000) ** 0.5)
    s = a.uns["perturb_sim"]
    pr = write_simulated_priors(a, work)
    a.uns = {}
    a.write_h5ad(work / "sim.h5ad")
    sim_s = time.perf_counter() - t0
    out = work / "model"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    args = [
        "perturb", "train", str(work / "sim.h5ad"), "--grn", pr["grn_prior"], "--lr", pr["lr_prior"],
        "--cluster-col", "cluster", "--out", str(out), "--overwrite", "--quiet", "--json",
        "--radius", str(s["radius"]), "--contact-radius", str(s["contact_radius"]),
        "--scale-factor", str(s["scale_factor"]),
    ]  # fmt: skip
    r = run_cli(args)
    man = json.loads((out / "manifest.json").read_text())
    return {
        "n_cells": n_cells,
        "n_targets": len(man["targets"]),
        "simulate_and_write_s": round(sim_s, 1),
        "train": {k: v for k, v in r.items() if k not in ("stdout", "stderr")},
        "timings": man.get("timings"),
        "train_time_s": man.get("train_time_s"),
        "modulators_per_target_median": float(np.median(list(man["n_modulators"].values()))),
    }


def bench_screen(work: Path, max_ligands: int) -> dict:
    """The OB slide trained with SpaceTravLR's ligand screen (``--max-ligands``) against the unscreened model
    of ``ob``: time, and the knockout of the most connected TF compared."""
    sys.path.insert(0, str(REPO / "src"))
    from spatial_deconv_gui.engines.perturb.perturb import load_model, simulate_perturbation

    inp = ob_inputs(work)
    full_dir = work / "model_all"
    out = work / f"model_screen{max_ligands}"
    r = run_cli(train_args(inp, out, "--max-ligands", str(max_ligands)))
    man = json.loads((out / "manifest.json").read_text())
    tf, _ = most_connected_tf(full_dir, inp["grn"])
    full, scr = load_model(full_dir), load_model(out)
    cols = [full.genes.index(g) for g in scr.genes]
    kos = []
    for g in dict.fromkeys([tf, "Zfp263"]):
        d_full = simulate_perturbation(full, g, 0.0, n_steps=4)[:, cols]
        d_scr = simulate_perturbation(scr, g, 0.0, n_steps=4)
        i = scr.genes.index(g)
        d_full[:, i] = d_scr[:, i] = 0.0  # the pinned gene itself
        kos.append(
            {
                "knockout": g,
                "max_abs_delta_unscreened": float(np.abs(d_full).max()),
                "max_abs_delta_screened": float(np.abs(d_scr).max()),
                "max_abs_delta_diff": float(np.abs(d_scr - d_full).max()),
                "genes_moved_unscreened": int((np.abs(d_full).max(0) > 1e-6).sum()),
                "genes_moved_screened": int((np.abs(d_scr).max(0) > 1e-6).sum()),
                "corr_mean_delta": float(np.corrcoef(d_full.mean(0), d_scr.mean(0))[0, 1]),
            }
        )
    return {
        "max_ligands": max_ligands,
        "train": {k: v for k, v in r.items() if k not in ("stdout", "stderr")},
        "train_time_s": man.get("train_time_s"),
        "modulators_per_target_median": float(np.median(list(man["n_modulators"].values()))),
        "knockouts": kos,
    }


def bench_peer(work: Path, n_genes: int) -> dict:
    """spacetravlr 0.1.21 (lasso only: ``fit(num_epochs=0, estimator='lasso')``, as in bench_perturb.py
    train-speed) on the first ``n_genes`` targets of the OB run, same expression, clusters, GRN regulators, LR
    table, radii; ours on the same targets (a fresh ``perturb train --targets``). The peer runs as a separate
    process in its own venv (PEER_PYTHON)."""
    import anndata as ad

    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO / "src"))
    import bench_perturb as bp

    bp.PEER_PY = os.environ.get("PEER_PYTHON", bp.PEER_PY)
    inp = ob_inputs(work)
    man = json.loads((work / "model_all" / "manifest.json").read_text())
    wd = work / "peer"
    wd.mkdir(exist_ok=True)
    a = ad.read_h5ad(inp["slide"])
    X = np.asarray(a.X, dtype=np.float64)
    layers = a.obs["layer"].astype(str)
    codes = pd.Categorical(layers, categories=sorted(set(layers))).codes.astype(int)
    p = ad.AnnData(
        X=X.copy(), obs=pd.DataFrame({"cell_type_int": codes}, index=a.obs_names), var=pd.DataFrame(index=a.var_names)
    )
    p.layers["normalized_count"] = X.copy()
    p.layers["imputed_count"] = X.copy()
    p.obsm["spatial"] = np.asarray(a.obsm["spatial"], dtype=np.float64)
    p.write_h5ad(wd / "peer.h5ad")
    grn = pd.read_parquet(inp["grn"])
    vs = set(a.var_names)
    grn = grn[grn.tf.isin(vs) & grn.target.isin(vs)]
    genes = list(man["targets"])[:n_genes]
    regs = {g: [t for t in dict.fromkeys(grn[grn.target == g].tf) if t != g] for g in genes}
    (wd / "regs.json").write_text(json.dumps(regs))
    bp.write_peer_lr(pd.read_parquet(inp["lr"]), wd)
    peer = bp.run_peer(
        "train", wd, genes=genes, radius=man["radius"], contact=man["contact_radius"], scale=1.0, epochs=0
    )
    tfile = work / f"peer_targets{n_genes}.txt"
    tfile.write_text("\n".join(genes))
    ours = run_cli(train_args(inp, work / f"model_peer{n_genes}", "--targets", str(tfile)))
    m = json.loads((work / f"model_peer{n_genes}" / "manifest.json").read_text())
    per_gene = peer["per_gene"]
    peer_fit = float(np.mean([g["fit_s"] for g in per_gene]))
    peer_gene = float(np.mean([g["fit_s"] + g["init_s"] for g in per_gene[1:]] or [per_gene[0]["fit_s"]]))
    ours_all = man["timings"]["lasso_s"] / len(man["targets"])
    return {
        "genes": genes,
        "peer": peer,
        "peer_modulators": [g["n_modulators"] for g in per_gene],
        "ours_modulators": [man["n_modulators"][g] for g in genes],
        "ours_same_targets": {k: v for k, v in ours.items() if k not in ("stdout", "stderr")},
        "ours_same_targets_train_time_s": m.get("train_time_s"),
        "ours_same_targets_lasso_s": m["timings"]["lasso_s"],
        "peer_fit_s_per_gene": round(peer_fit, 2),
        "peer_init_plus_fit_s_per_gene_after_first": round(peer_gene, 2),
        "ours_lasso_s_per_target_in_whole_run": round(ours_all, 5),
        "ratio_peer_fit_per_gene_to_ours_per_target_whole_run": round(peer_fit / ours_all, 0),
        "ratio_peer_fit_to_ours_same_targets_lasso": round(
            peer_fit * len(genes) / max(m["timings"]["lasso_s"], 1e-9), 1
        ),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["prepare", "ob", "sim", "screen", "peer"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/train/ob"))
    ap.add_argument("--old-src", default=None, help="src/ of the code before issue 16 (git archive 2f84884 src)")
    ap.add_argument("--n-old", type=int, default=60)
    ap.add_argument("--cells", type=int, default=10_000)
    ap.add_argument("--targets", type=int, default=2_000)
    ap.add_argument("--max-ligands", type=int, default=100)
    ap.add_argument("--peer-genes", type=int, default=5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = {"load_start": load_average(), "cpu_count": os.cpu_count()}
    if args.what == "prepare":
        res.update(prepare(args.work))
    elif args.what == "ob":
        res.update(bench_ob(args.work, args.old_src, args.n_old))
    elif args.what == "sim":
        res.update(bench_sim(args.work, args.cells, args.targets))
    elif args.what == "screen":
        res.update(bench_screen(args.work, args.max_ligands))
    else:
        res.update(bench_peer(args.work, args.peer_genes))
    res["load_end"] = load_average()
    res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
