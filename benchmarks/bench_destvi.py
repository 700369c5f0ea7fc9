"""Side-by-side benchmark of our DestVI engine and scvi-tools 1.4.2's CondSCVI + DestVI, same data and epochs.

Each engine runs in its own subprocess (peak RSS per engine; the peer from its own venv) on the genes shared by
slide and reference, with scvi-tools' defaults otherwise. The peer needs two workarounds on 1.4.2 (see
../shared/peers/README.md): CondSCVI(prior="normal") and the VampPrior arrays handed over as tensors.

    # speed (un-niced; alternate ours / peer three times, keep each side's fastest per-epoch time)
    .venv/bin/python benchmarks/bench_destvi.py --data hippocampus --sc-epochs 20 --epochs 20 --repeats 3
    # agreement at scvi-tools' defaults (CondSCVI 300 epochs, DestVI 2000), two seeds of each side, run together
    nice -n 5 .venv/bin/python benchmarks/bench_destvi.py --data hippocampus --sc-epochs 300 --epochs 2000 \
        --peer-seeds 2 --ours-seeds 2 --jobs 4 --save-dir /tmp/destvi_hippo

Per-epoch times are medians over epochs 2.. of a run (ours: per-epoch times; the peer: gaps between epoch
ends), for the single-cell (CondSCVI) stage and the spatial (DestVI) stage separately, wall and CPU time of the
process. ``--peer-seeds 2`` / ``--ours-seeds 2`` also run each side with a second seed, giving its agreement
with itself (its own seed-to-seed noise). ``--jobs`` runs the workers concurrently: for agreement runs only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PEER_PY = Path(os.environ.get("PEERS_DIR", REPO / ".peers")) / "venv" / "bin" / "python"


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _ckpt_writer(a, kind):
    """Proportions every ``--ckpt-every`` epochs, appended as JSON lines to CKPT_DIR/<kind>_seed<seed>.jsonl (so
    that long agreement runs leave results behind even when stopped). Evaluation mode: no augmentation draws
    (ours draws nothing; the peer's data loader takes one seed from torch's generator per checkpoint)."""
    if not (a.ckpt_dir and a.ckpt_every):
        return None
    path = Path(a.ckpt_dir) / f"{kind}_seed{a.seed}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")

    def write(epoch, props):
        with open(path, "a") as f:
            f.write(
                json.dumps({"epoch": int(epoch), "proportions": np.asarray(props).tolist(), "t": time.time()}) + "\n"
            )

    return write


def worker_ours(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import anndata as ad

    from spatial_deconv_gui.engines.destvi import DestVIConfig, run_destvi
    from spatial_deconv_gui.io.read import reference_input, spatial_input

    genes = json.loads(Path(a.genes_file).read_text())
    s = spatial_input(ad.read_h5ad(a.spatial)[:, genes].copy())
    r = reference_input(ad.read_h5ad(a.reference)[:, genes].copy())
    from spatial_deconv_gui.engines.base import RunControl

    ckpt = _ckpt_writer(a, "ours")
    state = {"epoch": 0}

    def on_event(ev):
        if ev.stage == "spatial" and ev.message.startswith("epoch "):
            state["epoch"] = int(ev.message.split()[1].split("/")[0].rstrip(","))
        if ckpt is not None and ev.partial is not None:
            ckpt(state["epoch"], ev.partial.proportions)

    t0 = time.perf_counter()
    res = run_destvi(
        s,
        r,
        DestVIConfig(
            sc_epochs=a.sc_epochs,
            max_epochs=a.epochs,
            seed=a.seed,
            device="cpu",
            report_every=a.ckpt_every or 10**9,
            n_threads=a.threads,
        ),
        RunControl(on_event, max_rate=0) if ckpt is not None else None,
    )
    total = time.perf_counter() - t0
    tr = res.uns["destvi_training"]
    if ckpt is not None:
        ckpt(a.epochs, res.proportions)
    return dict(
        types=list(res.cell_types),
        proportions=res.proportions.tolist(),
        total_s=total,
        spatial_s=tr["spatial_seconds"],
        per_epoch_s=float(np.median(tr["epoch_seconds"][1:])),
        per_epoch_cpu_s=float(np.median(tr["epoch_cpu_seconds"][1:])),
        sc_s=tr["sc_seconds"],
        sc_per_epoch_s=float(np.median(tr["sc_epoch_seconds"][1:])),
        sc_per_epoch_cpu_s=float(np.median(tr["sc_epoch_cpu_seconds"][1:])),
        gamma={t: res.obsm[f"destvi_gamma_{t}"].values.tolist() for t in res.cell_types},
        peak_rss_gb=_rss_gb(),
        process_cpu_s=time.process_time(),  # the whole worker: imports, data, both stages
        epochs_run=int(tr["epochs_run"]),
    )


def worker_peer(a) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(a.threads)
    import anndata as ad
    import lightning.pytorch as pl
    import scvi
    from _peer_timing import epoch_timer
    from scvi.model import CondSCVI, DestVI

    scvi.settings.seed = a.seed
    genes = json.loads(Path(a.genes_file).read_text())
    st = ad.read_h5ad(a.spatial)[:, genes].copy()
    ref = ad.read_h5ad(a.reference)[:, genes].copy()
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str).astype("category")
    t0 = time.perf_counter()
    CondSCVI.setup_anndata(ref, labels_key="cell_type")
    sc = CondSCVI(ref, prior="normal")  # workaround 1: from_rna_model reads module_kwargs["prior"]
    sc_timer = epoch_timer()
    sc.train(max_epochs=a.sc_epochs, accelerator="cpu", enable_progress_bar=False, callbacks=[sc_timer])
    sc_s = time.perf_counter() - t0
    orig = sc.get_vamp_prior

    def vamp_as_tensors(adata=None, p=10):  # workaround 2: numpy buffers raise TypeError in register_buffer
        return {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in orig(adata, p=p).items()}

    sc.get_vamp_prior = vamp_as_tensors
    timer = epoch_timer()
    DestVI.setup_anndata(st)
    model = DestVI.from_rna_model(st, sc)
    ckpt = _ckpt_writer(a, "peer")

    class Checkpoint(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            epoch = trainer.current_epoch + 1
            if epoch % a.ckpt_every == 0 and epoch < a.epochs:
                model.module.eval()  # no augmentation draws
                with torch.no_grad():
                    p = model.get_proportions()
                model.module.train()
                ckpt(epoch, p[sorted(p.columns)].values)

    callbacks = [timer] + ([Checkpoint()] if ckpt is not None else [])
    t1 = time.perf_counter()
    model.train(max_epochs=a.epochs, accelerator="cpu", callbacks=callbacks, enable_progress_bar=False)
    spatial_s = time.perf_counter() - t1
    props = model.get_proportions()
    gamma = model.get_gamma()
    types = sorted(props.columns)
    if ckpt is not None:
        ckpt(a.epochs, props[types].values)
    total = time.perf_counter() - t0
    gaps = np.diff(timer.t)
    cgaps = np.diff(timer.c)
    sgaps, scgaps = np.diff(sc_timer.t), np.diff(sc_timer.c)
    return dict(
        types=types,
        proportions=props[types].values.tolist(),
        total_s=total,
        spatial_s=spatial_s,
        per_epoch_s=float(np.median(gaps)) if len(gaps) else spatial_s / a.epochs,
        per_epoch_cpu_s=float(np.median(cgaps)) if len(cgaps) else float("nan"),
        sc_s=sc_s,
        sc_per_epoch_s=float(np.median(sgaps)) if len(sgaps) else float("nan"),
        sc_per_epoch_cpu_s=float(np.median(scgaps)) if len(scgaps) else float("nan"),
        gamma={t: np.asarray(gamma[t]).tolist() for t in types},
        peak_rss_gb=_rss_gb(),
        process_cpu_s=time.process_time(),  # the whole worker: imports, data, both stages
        epochs_run=int(a.epochs),  # the peer trains every epoch asked for
    )


def load_data(a, tmp: Path):
    import anndata as ad

    truth = None
    if a.data == "sim":
        from spatial_deconv_gui.simulate import simulate_dataset

        spatial, reference = simulate_dataset(
            n_spots=a.spots, n_genes=a.genes_sim, n_types=a.types, cells_per_type=a.cells_per_type, seed=a.seed
        )
        truth = spatial.obsm["true_proportions"]
        del spatial.obsm["true_proportions"]
    else:
        name = {"hippocampus": "spacexr_visium_hippocampus", "lymphnode": "spacexr_visium_lymphnode_human"}[a.data]
        spatial = ad.read_h5ad(DATA / f"{name}_spatial.h5ad")
        reference = ad.read_h5ad(DATA / f"{name}_reference.h5ad")
    sp_path, ref_path = tmp / "spatial.h5ad", tmp / "reference.h5ad"
    spatial.write_h5ad(sp_path)
    reference.write_h5ad(ref_path)
    genes = [g for g in spatial.var_names if g in set(reference.var_names)]
    return sp_path, ref_path, truth, genes


def _worker_cmd(python, kind, a, sp_path, ref_path, genes_path, out: Path, seed: int):
    cmd = [
        python,
        __file__,
        "--worker",
        kind,
        "--spatial",
        str(sp_path),
        "--reference",
        str(ref_path),
        "--genes-file",
        str(genes_path),
        "--out",
        str(out),
        "--epochs",
        str(a.epochs),
        "--sc-epochs",
        str(a.sc_epochs),
        "--threads",
        str(a.threads),
        "--seed",
        str(seed),
    ]
    if a.ckpt_dir and a.ckpt_every:
        cmd += ["--ckpt-dir", str(a.ckpt_dir), "--ckpt-every", str(a.ckpt_every)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")} if kind == "ours" else dict(os.environ)
    return cmd, env


def run_worker(python, kind, a, sp_path, ref_path, genes_path, out: Path, seed: int) -> dict:
    cmd, env = _worker_cmd(python, kind, a, sp_path, ref_path, genes_path, out, seed)
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{p.stderr[-4000:]}")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t
    return res


def run_workers_concurrently(specs, a, sp_path, ref_path, genes_path, jobs: int) -> list[dict]:
    """Run (python, kind, out, seed) specs, ``jobs`` at a time (for agreement runs; their timings are not
    comparable with each other)."""
    results, running, queue = [None] * len(specs), [], list(enumerate(specs))
    while queue or running:
        while queue and len(running) < jobs:
            i, (python, kind, out, seed) = queue.pop(0)
            cmd, env = _worker_cmd(python, kind, a, sp_path, ref_path, genes_path, out, seed)
            err = open(str(out) + ".err", "w")
            running.append(
                (
                    i,
                    kind,
                    out,
                    subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err),
                    time.perf_counter(),
                    err,
                )
            )
        time.sleep(1.0)
        for item in list(running):
            i, kind, out, proc, t, err = item
            if proc.poll() is None:
                continue
            running.remove(item)
            err.close()
            if proc.returncode != 0:
                raise RuntimeError(f"{kind} worker failed:\n{Path(str(out) + '.err').read_text()[-4000:]}")
            results[i] = json.loads(Path(out).read_text())
            results[i]["wall_s"] = time.perf_counter() - t
    return results


_TIME_KEYS = (
    "total_s",
    "sc_s",
    "spatial_s",
    "per_epoch_s",
    "per_epoch_cpu_s",
    "sc_per_epoch_s",
    "sc_per_epoch_cpu_s",
    "peak_rss_gb",
    "wall_s",
    "process_cpu_s",
    "epochs_run",
    "per_epoch_runs",
    "per_epoch_cpu_runs",
)


def corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def agreement(p1, p2) -> dict:
    from spatial_deconv_gui.engines.bayes import pearson_rows

    rows = pearson_rows(np.asarray(p1), np.asarray(p2))
    return {
        "prop_corr_all": corr(p1, p2),
        "per_spot_corr_median": float(np.nanmedian(rows)),
        "per_spot_corr_mean": float(np.nanmean(rows)),
        "dominant_type_agreement": float(np.mean(np.argmax(p1, 1) == np.argmax(p2, 1))),
    }


def ckpt_report(d: Path) -> dict:
    """Agreement between every pair of runs in a checkpoint directory, at each epoch both reached."""
    sys.path.insert(0, str(REPO / "src"))
    runs = {}
    for f in sorted(d.glob("*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        runs[f.stem] = {r["epoch"]: np.asarray(r["proportions"]) for r in rows}
    names = sorted(runs)
    out = {}
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            for ep in sorted(set(runs[x]) & set(runs[y])):
                ag = agreement(runs[x][ep], runs[y][ep])
                out.setdefault(f"{x} vs {y}", {})[ep] = {k: round(v, 4) for k, v in ag.items()}
    # seed noise removed: the mean over each side's seeds (ours_seed*, peer_seed*) at each common epoch, and the
    # mean over those epochs from 1,000 on (DestVI's proportions keep fluctuating between checkpoints)
    sides = {side: [n for n in names if n.startswith(f"{side}_seed")] for side in ("ours", "peer")}
    seed_means = {}
    if all(len(v) >= 2 for v in sides.values()):
        epochs = sorted(set.intersection(*[set(runs[n]) for v in sides.values() for n in v]))
        mean = {side: {ep: np.mean([runs[n][ep] for n in v], axis=0) for ep in epochs} for side, v in sides.items()}
        for ep in epochs:
            ag = agreement(mean["ours"][ep], mean["peer"][ep])
            seed_means[ep] = {k: round(v, 4) for k, v in ag.items()}
        late = [ep for ep in epochs if ep >= 1000]
        if late:
            ag = agreement(
                np.mean([mean["ours"][ep] for ep in late], axis=0), np.mean([mean["peer"][ep] for ep in late], axis=0)
            )
            seed_means[f"mean over epochs {late[0]}-{late[-1]}"] = {k: round(v, 4) for k, v in ag.items()}
    return {
        "epochs_reached": {k: max(v) if v else 0 for k, v in runs.items()},
        "agreement": out,
        "seed_means_ours_vs_peer": seed_means,
        "late_summary": late_summary(runs, sides),
    }


def late_summary(runs: dict, sides: dict, first_epoch: int = 1000) -> dict:
    """Self- and cross-agreement from ``first_epoch`` on, when each side has two seeds or more.

    A single run of a stochastic method is its expected output plus seed noise, so its correlation with a run of
    another method is limited by both sides' noise: ``r_cross / sqrt(r_ours_self * r_peer_self)`` (the correlation
    corrected for attenuation) is ~1 when the two methods have the same expected output. The same comparison is
    made for each run's proportions averaged over its checkpoints from ``first_epoch`` on (late iterates averaged)."""
    if not all(len(v) >= 2 for v in sides.values()):
        return {}
    names = sides["ours"] + sides["peer"]
    epochs = sorted(set.intersection(*[set(runs[n]) for n in names]))
    late = [ep for ep in epochs if ep >= first_epoch]
    if not late:
        return {}

    def pairs(get):
        o, p = sides["ours"], sides["peer"]
        within = {
            side: [agreement(get(x), get(y)) for i, x in enumerate(v) for y in v[i + 1 :]]
            for side, v in (("ours", o), ("peer", p))
        }
        cross = [agreement(get(x), get(y)) for x in o for y in p]
        res = {}
        for key in ("prop_corr_all", "per_spot_corr_median"):
            oo = float(np.mean([a[key] for a in within["ours"]]))
            pp = float(np.mean([a[key] for a in within["peer"]]))
            op = [a[key] for a in cross]
            res[key] = {
                "ours_vs_ours": round(oo, 4),
                "peer_vs_peer": round(pp, 4),
                "ours_vs_peer": round(float(np.mean(op)), 4),
                "ours_vs_peer_min_max": [round(min(op), 4), round(max(op), 4)],
                "disattenuated": round(float(np.mean(op)) / np.sqrt(oo * pp), 4),
            }
        return res

    per_ckpt = [pairs(lambda n, ep=ep: runs[n][ep]) for ep in late]
    mean_over_ckpts = {
        key: {
            k: round(float(np.mean([c[key][k] for c in per_ckpt])), 4)
            for k in ("ours_vs_ours", "peer_vs_peer", "ours_vs_peer", "disattenuated")
        }
        for key in ("prop_corr_all", "per_spot_corr_median")
    }
    averaged = {n: np.mean([runs[n][ep] for ep in late], axis=0) for n in names}
    return {
        "epochs": f"{late[0]}-{late[-1]} ({len(late)} checkpoints)",
        "single_checkpoints_mean": mean_over_ckpts,
        "at_last_common_epoch": per_ckpt[-1],
        "late_iterates_averaged": pairs(lambda n: averaged[n]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["ours", "peer"])
    ap.add_argument("--spatial"), ap.add_argument("--reference"), ap.add_argument("--genes-file")
    ap.add_argument("--out")
    ap.add_argument("--data", default="sim", choices=["sim", "hippocampus", "lymphnode"])
    ap.add_argument("--spots", type=int, default=1000)
    ap.add_argument("--genes-sim", type=int, default=300)
    ap.add_argument("--types", type=int, default=6)
    ap.add_argument("--cells-per-type", type=int, default=60)
    ap.add_argument("--sc-epochs", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer-seeds", type=int, default=1)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="alternate ours/peer this many times for timing")
    ap.add_argument("--ours-seeds", type=int, default=1, help="also run ours with further seeds (its own noise)")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run the workers this many at a time (agreement runs only: timings then not comparable)",
    )
    ap.add_argument("--save-dir", help="keep each worker's output (proportions, gamma, timings) here")
    ap.add_argument("--ckpt-dir", help="write each worker's proportions every --ckpt-every epochs here (JSON lines)")
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--ckpt-report", help="only summarise the checkpoints in this directory (agreement per epoch)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.worker:
        Path(a.out).write_text(json.dumps((worker_ours if a.worker == "ours" else worker_peer)(a)))
        return
    if a.ckpt_report:
        print(json.dumps(ckpt_report(Path(a.ckpt_report)), indent=1))
        return
    sys.path.insert(0, str(REPO / "src"))
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        sp_path, ref_path, truth, genes = load_data(a, tmp)
        genes_path = tmp / "genes.json"
        genes_path.write_text(json.dumps([str(g) for g in genes]))
        specs = [(sys.executable, "ours", tmp / f"ours{i}.json", a.seed + i) for i in range(a.ours_seeds)]
        specs += (
            []
            if a.skip_peer
            else [(str(PEER_PY), "peer", tmp / f"peer{i}.json", a.seed + i) for i in range(a.peer_seeds)]
        )
        if a.jobs > 1:
            res = run_workers_concurrently(specs, a, sp_path, ref_path, genes_path, a.jobs)
        else:
            res = [run_worker(py, kind, a, sp_path, ref_path, genes_path, out, seed) for py, kind, out, seed in specs]
        ours, ours_more, peers = res[0], res[1 : a.ours_seeds], res[a.ours_seeds :]
        if a.save_dir:
            Path(a.save_dir).mkdir(parents=True, exist_ok=True)
            for (_, kind, _out, seed), r in zip(specs, res):
                Path(a.save_dir, f"{kind}_seed{seed}.json").write_text(json.dumps(r))
        # further alternating runs for timing only (the machine is shared: keep each side's fastest epoch time)
        for i in range(1, a.repeats):
            for kind, res, py in (("ours", ours, sys.executable), ("peer", peers[0] if peers else None, str(PEER_PY))):
                if res is None:
                    continue
                o = run_worker(py, kind, a, sp_path, ref_path, genes_path, tmp / f"{kind}_r{i}.json", a.seed)
                res["per_epoch_runs"] = res.get("per_epoch_runs", [res["per_epoch_s"]]) + [o["per_epoch_s"]]
                res["per_epoch_cpu_runs"] = res.get("per_epoch_cpu_runs", [res["per_epoch_cpu_s"]]) + [
                    o["per_epoch_cpu_s"]
                ]
                res["per_epoch_s"] = min(res["per_epoch_s"], o["per_epoch_s"])
                res["per_epoch_cpu_s"] = min(res["per_epoch_cpu_s"], o["per_epoch_cpu_s"])
                for k in ("sc_per_epoch_s", "sc_per_epoch_cpu_s"):
                    res[k] = min(res[k], o[k])
                res["peak_rss_gb"] = max(res["peak_rss_gb"], o["peak_rss_gb"])
    p_o = np.asarray(ours["proportions"])
    summary = {
        "data": a.data,
        "spots": len(p_o),
        "genes": len(genes),
        "sc_epochs": a.sc_epochs,
        "epochs": a.epochs,
        "threads": a.threads,
        "ours": {k: ours[k] for k in _TIME_KEYS if k in ours},
    }
    if truth is not None:
        t = truth[ours["types"]].to_numpy()
        summary["ours"]["prop_corr_truth"] = corr(p_o, t)
        summary["ours"]["prop_rmse_truth"] = float(np.sqrt(np.mean((p_o - t) ** 2)))
    for i, peer in enumerate(peers):
        assert peer["types"] == ours["types"], (peer["types"], ours["types"])
        p_p = np.asarray(peer["proportions"])
        key = "peer" if i == 0 else f"peer_seed{i}"
        summary[key] = {k: peer[k] for k in _TIME_KEYS if k in peer}
        if truth is not None:
            t = truth[peer["types"]].to_numpy()
            summary[key]["prop_corr_truth"] = corr(p_p, t)
            summary[key]["prop_rmse_truth"] = float(np.sqrt(np.mean((p_p - t) ** 2)))
        summary[f"agreement_ours_vs_{key}"] = {
            **agreement(p_o, p_p),
            "speedup_per_epoch": peer["per_epoch_s"] / ours["per_epoch_s"],
            "speedup_per_epoch_cpu": peer["per_epoch_cpu_s"] / ours["per_epoch_cpu_s"],
            "sc_speedup_per_epoch": peer["sc_per_epoch_s"] / ours["sc_per_epoch_s"],
            "sc_speedup_per_epoch_cpu": peer["sc_per_epoch_cpu_s"] / ours["sc_per_epoch_cpu_s"],
            "speedup_total": peer["total_s"] / ours["total_s"],
            "rss_ratio_ours_over_peer": ours["peak_rss_gb"] / peer["peak_rss_gb"],
        }
    if len(peers) > 1:
        summary["agreement_peer_vs_peer_seed1"] = agreement(peers[0]["proportions"], peers[1]["proportions"])
    for i, o in enumerate(ours_more, 1):
        summary[f"agreement_ours_vs_ours_seed{i}"] = agreement(p_o, o["proportions"])
        for j, peer in enumerate(peers):
            summary[f"agreement_ours_seed{i}_vs_peer_seed{j}"] = agreement(o["proportions"], peer["proportions"])
    text = json.dumps(summary, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
