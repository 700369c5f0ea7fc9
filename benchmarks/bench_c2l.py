"""Side-by-side benchmark of our cell2location-model engine and cell2location 0.1.5 (pyro), same data and epochs.

Each engine runs in its own subprocess (peak RSS per engine; the peer from its own venv), with the same genes
(our copy of cell2location's reference gene filter, tutorial cutoffs), the same priors and the same epochs:
NB-regression reference signatures, then the spatial model (full batch, Adam lr 0.002). The peer exports
posterior means from 1,000 posterior samples as in its tutorial; ours are the closed-form posterior means.

    .venv/bin/python benchmarks/bench_c2l.py --data sim --spots 1500 --epochs 3000 --ref-epochs 300
    .venv/bin/python benchmarks/bench_c2l.py --data hippocampus --epochs 3000 --ref-epochs 300
    .venv/bin/python benchmarks/bench_c2l.py --data sim --spots 5000 --epochs 200 --ref-epochs 20   # speed
    # each side at its own defaults, whole worker processes (ours: 6,500 epochs, lr 0.01 annealed; the peer:
    # 30,000 at 0.002; reference regression 1,000 epochs = both packages' heuristic for the lymph node's cells)
    .venv/bin/python benchmarks/bench_c2l.py --data lymphnode --epochs 6500 --peer-epochs 30000 --ref-epochs 1000

Reference regression with batches (cell2location's RegressionModel with batch_key) on a simulated multi-batch
reference (batches with different detection efficiencies and backgrounds, types spread unevenly over them),
both sides on the same counts, epochs, batch size 2500 and lr 0.002; signatures compared with each other and
with the true profiles (``engines.c2l.simulate.signature_error``, up to one global scale):

    .venv/bin/python benchmarks/bench_c2l.py --reference-only --batches 3 --ref-epochs 2000

Per-epoch times: ours = the mean over epochs 2..n-1 (the first excluded); the peer's = the median gap between
consecutive training-epoch ends (lightning callback), so neither side's setup is counted.
The peer's venv is $PEERS_DIR/venv-c2l (default .peers/venv-c2l).
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
PEER_PY = Path(os.environ.get("PEERS_DIR", REPO / ".peers")) / "venv-c2l" / "bin" / "python"


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# ---------------------------------------------------------------------------------------------------
# workers (run in subprocesses)
# ---------------------------------------------------------------------------------------------------


def worker_ours(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import anndata as ad

    from spatial_deconv_gui.engines.c2l import C2LConfig, run_c2l
    from spatial_deconv_gui.io.read import reference_input, spatial_input

    s = spatial_input(ad.read_h5ad(a.spatial))
    r = reference_input(ad.read_h5ad(a.reference))
    cfg = C2LConfig(
        n_cells_per_location=a.n_cells,
        detection_alpha=a.detection_alpha,
        max_epochs=a.epochs,
        # same epochs as the peer: its schedule (constant lr 0.002, every epoch); --peer-epochs: our own defaults
        **({} if a.peer_epochs else {"lr": 0.002, "lr_anneal": 0.0, "early_stop": False}),
        reference_epochs=a.ref_epochs,
        signatures=a.signatures,
        seed=a.seed,
        device="cpu",
        report_every=10**9,
    )
    t0 = time.perf_counter()
    res = run_c2l(s, r, cfg)
    total = time.perf_counter() - t0
    tr = res.uns["c2l_training"]
    return dict(
        types=list(res.cell_types),
        abundances=res.obsm["c2l_abundances"].values.tolist(),
        q05=res.obsm["c2l_abundances_q05"].values.tolist(),
        genes=tr["genes"],
        signatures=np.asarray(tr["signatures"]).tolist(),
        total_s=total,
        spatial_s=tr["spatial_seconds"],
        per_epoch_s=tr["seconds_per_epoch"],
        per_epoch_cpu_s=tr["cpu_seconds_per_epoch"],
        loss_last=float(tr["loss"][-1]),
        peak_rss_gb=_rss_gb(),
    )


def worker_peer(a) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(a.threads)
    import anndata as ad
    from _peer_timing import epoch_timer
    from cell2location.models import Cell2location, RegressionModel

    genes = json.loads(Path(a.genes_file).read_text())
    sp_ = ad.read_h5ad(a.spatial)[:, genes].copy()
    ref = ad.read_h5ad(a.reference)[:, genes].copy()
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str).astype("category")
    types = sorted(ref.obs["cell_type"].cat.categories)
    t0 = time.perf_counter()
    if a.signatures == "regression":
        RegressionModel.setup_anndata(ref, labels_key="cell_type")
        rm = RegressionModel(ref)
        rm.train(max_epochs=a.ref_epochs, batch_size=2500, lr=0.002, accelerator="cpu", enable_progress_bar=False)
        ref = rm.export_posterior(ref, sample_kwargs={"num_samples": 1000, "batch_size": 2500})
        sig = ref.varm["means_per_cluster_mu_fg"].copy()
        sig.columns = [c.replace("means_per_cluster_mu_fg_", "") for c in sig.columns]
    else:
        import pandas as pd

        x = ref.X.toarray()
        sig = pd.DataFrame({t: x[(ref.obs["cell_type"] == t).to_numpy()].mean(0) for t in types}, index=genes)
    sig = sig[types]
    t_ref = time.perf_counter() - t0

    timer = epoch_timer()
    Cell2location.setup_anndata(sp_)
    mod = Cell2location(sp_, cell_state_df=sig, N_cells_per_location=a.n_cells, detection_alpha=a.detection_alpha)
    t1 = time.perf_counter()
    mod.train(
        max_epochs=a.epochs,
        batch_size=None,
        train_size=1,
        accelerator="cpu",
        callbacks=[timer],
        enable_progress_bar=False,
    )
    spatial_s = time.perf_counter() - t1
    sp_ = mod.export_posterior(sp_, sample_kwargs={"num_samples": 1000, "batch_size": mod.adata.n_obs})
    total = time.perf_counter() - t0
    ab = sp_.obsm["means_cell_abundance_w_sf"].copy()
    ab.columns = [c.replace("meanscell_abundance_w_sf_", "") for c in ab.columns]
    q05 = sp_.obsm["q05_cell_abundance_w_sf"].copy()
    q05.columns = [c.replace("q05cell_abundance_w_sf_", "") for c in q05.columns]
    gaps = np.diff(timer.t)
    cgaps = np.diff(timer.c)
    hist = mod.history["elbo_train"].values.ravel()
    return dict(
        types=types,
        abundances=ab[types].values.tolist(),
        q05=q05[types].values.tolist(),
        signatures=sig.values.T.tolist(),
        total_s=total,
        reference_s=t_ref,
        spatial_s=spatial_s,
        per_epoch_s=float(np.median(gaps)) if len(gaps) else spatial_s / a.epochs,
        per_epoch_cpu_s=float(np.median(cgaps)) if len(cgaps) else float("nan"),
        loss_last=float(hist[-1]),
        peak_rss_gb=_rss_gb(),
    )


def worker_ours_ref(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import anndata as ad

    from spatial_deconv_gui.engines.c2l import fit_reference_signatures

    ref = ad.read_h5ad(a.reference)
    types = sorted(ref.obs["cell_type"].astype(str).unique())
    labels = ref.obs["cell_type"].astype(str).to_numpy()
    batches = ref.obs["batch"].astype(str).to_numpy() if a.batch_key else None
    details: dict = {}
    t0 = time.perf_counter()
    sig, hist = fit_reference_signatures(
        ref.X, labels, types, a.ref_epochs, batch_size=2500, lr=0.002, seed=a.seed, batches=batches, details=details
    )
    total = time.perf_counter() - t0
    return dict(
        types=types,
        signatures=sig.tolist(),
        detection=np.asarray(details["detection"]).tolist(),
        total_s=total,
        per_epoch_s=details["seconds_per_epoch"],
        loss_last=float(hist[-1]),
        peak_rss_gb=_rss_gb(),
    )


def worker_peer_ref(a) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(a.threads)
    import anndata as ad
    from _peer_timing import epoch_timer
    from cell2location.models import RegressionModel

    ref = ad.read_h5ad(a.reference)
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str).astype("category")
    types = sorted(ref.obs["cell_type"].cat.categories)

    timer = epoch_timer()
    t0 = time.perf_counter()
    RegressionModel.setup_anndata(ref, labels_key="cell_type", batch_key="batch" if a.batch_key else None)
    rm = RegressionModel(ref)
    rm.train(
        max_epochs=a.ref_epochs,
        batch_size=2500,
        lr=0.002,
        accelerator="cpu",
        callbacks=[timer],
        enable_progress_bar=False,
    )
    train_s = time.perf_counter() - t0
    ref = rm.export_posterior(ref, sample_kwargs={"num_samples": 1000, "batch_size": 2500})
    sig = ref.varm["means_per_cluster_mu_fg"].copy()
    sig.columns = [c.replace("means_per_cluster_mu_fg_", "") for c in sig.columns]
    det = np.asarray(rm.samples["post_sample_means"]["detection_mean_y_e"]).ravel()
    gaps = np.diff(timer.t)
    hist = rm.history["elbo_train"].values.ravel()
    return dict(
        types=types,
        signatures=sig[types].values.T.tolist(),
        detection=det.tolist(),
        total_s=time.perf_counter() - t0,
        train_s=train_s,
        per_epoch_s=float(np.median(gaps)) if len(gaps) else train_s / a.ref_epochs,
        loss_last=float(hist[-1]),
        peak_rss_gb=_rss_gb(),
    )


def main_reference(a):
    """Reference regression only: ours vs cell2location's RegressionModel on a simulated multi-batch reference."""
    from spatial_deconv_gui.engines.c2l.simulate import signature_error, simulate_batched_reference

    ref, truth = simulate_batched_reference(
        n_genes=a.genes_sim, n_types=a.types, n_batches=a.batches, cells_per_type=a.ref_cells_per_type, seed=a.seed
    )
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        ref_path = tmp / "reference.h5ad"
        ref.write_h5ad(ref_path)
        runs = {}
        for kind, py in (("ours_ref", sys.executable), ("peer_ref", str(PEER_PY))):
            if kind == "peer_ref" and a.skip_peer:
                continue
            for i in range(a.repeats):
                r = run_worker(py, kind, a, "", ref_path, "", tmp / f"{kind}{i}.json")
                if kind in runs:  # timing repeats: keep the fastest epoch time
                    runs[kind]["per_epoch_runs"].append(r["per_epoch_s"])
                    runs[kind]["per_epoch_s"] = min(runs[kind]["per_epoch_s"], r["per_epoch_s"])
                else:
                    runs[kind] = {**r, "per_epoch_runs": [r["per_epoch_s"]]}
    order = [truth.cell_types.index(t) for t in runs["ours_ref"]["types"]]
    true_prof = truth.profiles[order]
    summary = {
        "data": "simulated multi-batch reference",
        "cells": int(ref.n_obs),
        "genes": int(ref.n_vars),
        "types": a.types,
        "batches": a.batches if a.batch_key else 1,
        "ref_epochs": a.ref_epochs,
        "threads": a.threads,
        "true_detection": truth.detection.tolist(),
    }
    for kind, r in runs.items():
        side = "ours" if kind == "ours_ref" else "peer"
        summary[side] = {
            k: r[k]
            for k in ("total_s", "per_epoch_s", "per_epoch_runs", "peak_rss_gb", "wall_s", "loss_last", "detection")
        }
        summary[side]["vs_truth"] = signature_error(np.asarray(r["signatures"]), true_prof)
    if "peer_ref" in runs:
        o, p = np.asarray(runs["ours_ref"]["signatures"]), np.asarray(runs["peer_ref"]["signatures"])
        assert runs["peer_ref"]["types"] == runs["ours_ref"]["types"]
        summary["agreement"] = {
            "signature_corr_log1p": corr(np.log1p(o), np.log1p(p)),
            "signature_corr": corr(o, p),
            "detection_corr_log": corr(np.log(runs["ours_ref"]["detection"]), np.log(runs["peer_ref"]["detection"])),
            "speedup_per_epoch": runs["peer_ref"]["per_epoch_s"] / runs["ours_ref"]["per_epoch_s"],
            "speedup_total": runs["peer_ref"]["total_s"] / runs["ours_ref"]["total_s"],
        }
    text = json.dumps(summary, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


# ---------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------


def load_data(a, tmp: Path):
    import anndata as ad

    truth = n_cells = None
    if a.data == "sim":
        from spatial_deconv_gui.simulate import simulate_dataset

        spatial, reference = simulate_dataset(
            n_spots=a.spots, n_genes=a.genes_sim, n_types=a.types, cells_per_type=a.cells_per_type, seed=a.seed
        )
        truth = spatial.obsm["true_proportions"]
        n_cells = spatial.obs["true_n_cells"].to_numpy()
        del spatial.obsm["true_proportions"]
    else:
        name = {"hippocampus": "spacexr_visium_hippocampus", "lymphnode": "spacexr_visium_lymphnode_human"}[a.data]
        spatial = ad.read_h5ad(DATA / f"{name}_spatial.h5ad")
        reference = ad.read_h5ad(DATA / f"{name}_reference.h5ad")
    sp_path, ref_path = tmp / "spatial.h5ad", tmp / "reference.h5ad"
    spatial.write_h5ad(sp_path)
    reference.write_h5ad(ref_path)
    return sp_path, ref_path, truth, n_cells


def run_worker(python: str, kind: str, a, sp_path, ref_path, genes_path, out: Path) -> dict:
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
        "--ref-epochs",
        str(a.ref_epochs),
        "--n-cells",
        str(a.n_cells),
        "--detection-alpha",
        str(a.detection_alpha),
        "--signatures",
        a.signatures,
        "--threads",
        str(a.threads),
        "--seed",
        str(a.seed),
    ]
    if not a.batch_key:
        cmd.append("--no-batch-key")
    if a.peer_epochs:
        cmd += ["--peer-epochs", str(a.peer_epochs)]
        if kind == "peer":
            cmd[cmd.index("--epochs") + 1] = str(a.peer_epochs)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")} if kind.startswith("ours") else dict(os.environ)
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{p.stderr[-4000:]}")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t
    # the whole worker process, imports and data reading included (workers run one at a time)
    res["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return res


def corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def per_spot_corr(a, b) -> np.ndarray:
    from spatial_deconv_gui.engines.bayes import pearson_rows

    return pearson_rows(np.asarray(a), np.asarray(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["ours", "peer", "ours_ref", "peer_ref"])
    ap.add_argument("--spatial"), ap.add_argument("--reference"), ap.add_argument("--genes-file")
    ap.add_argument("--out")
    ap.add_argument("--data", default="sim", choices=["sim", "hippocampus", "lymphnode"])
    ap.add_argument("--spots", type=int, default=1500)
    ap.add_argument("--genes-sim", type=int, default=300)
    ap.add_argument("--types", type=int, default=6)
    ap.add_argument("--cells-per-type", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=3000)
    ap.add_argument("--ref-epochs", type=int, default=300)
    ap.add_argument(
        "--peer-epochs",
        type=int,
        default=None,
        help="the peer's spatial epochs when they differ from ours (each side at its own defaults: --epochs 6500 "
        "--peer-epochs 30000; ours then also runs its own learning-rate schedule)",
    )
    ap.add_argument("--n-cells", type=float, default=None, help="N_cells_per_location (sim: its mean; else 8)")
    ap.add_argument("--detection-alpha", type=float, default=20.0)
    ap.add_argument("--signatures", default="regression", choices=["regression", "means"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="alternate ours/peer this many times for timing")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument(
        "--reference-only",
        action="store_true",
        help="benchmark the reference regression alone on a simulated multi-batch reference",
    )
    ap.add_argument("--batches", type=int, default=3, help="--reference-only: batches in the simulated reference")
    ap.add_argument("--ref-cells-per-type", type=int, default=150, help="--reference-only: cells per type")
    ap.add_argument(
        "--no-batch-key",
        dest="batch_key",
        action="store_false",
        help="--reference-only: fit both sides as one batch (no batch_key)",
    )
    a = ap.parse_args()

    if a.worker:
        fn = {"ours": worker_ours, "peer": worker_peer, "ours_ref": worker_ours_ref, "peer_ref": worker_peer_ref}
        res = fn[a.worker](a)
        Path(a.out).write_text(json.dumps(res))
        return
    if a.reference_only:
        sys.path.insert(0, str(REPO / "src"))
        a.n_cells = a.n_cells or 8.0  # unused by the reference workers
        main_reference(a)
        return

    sys.path.insert(0, str(REPO / "src"))
    if a.n_cells is None:
        a.n_cells = 6.0 if a.data == "sim" else 8.0
    import anndata as ad

    from spatial_deconv_gui.engines.c2l import C2LConfig, select_genes
    from spatial_deconv_gui.io.read import reference_input, spatial_input

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        sp_path, ref_path, truth, n_cells = load_data(a, tmp)
        _, _, genes, _ = select_genes(
            spatial_input(ad.read_h5ad(sp_path)), reference_input(ad.read_h5ad(ref_path)), C2LConfig()
        )
        genes_path = tmp / "genes.json"
        genes_path.write_text(json.dumps([str(g) for g in genes]))
        ours = run_worker(sys.executable, "ours", a, sp_path, ref_path, genes_path, tmp / "ours.json")
        peer = (
            None
            if a.skip_peer
            else run_worker(str(PEER_PY), "peer", a, sp_path, ref_path, genes_path, tmp / "peer.json")
        )
        # further alternating runs for timing only (the machine is shared: keep each side's fastest epoch time)
        for i in range(1, a.repeats):
            o = run_worker(sys.executable, "ours", a, sp_path, ref_path, genes_path, tmp / f"ours{i}.json")
            ours["per_epoch_runs"] = ours.get("per_epoch_runs", [ours["per_epoch_s"]]) + [o["per_epoch_s"]]
            ours["per_epoch_s"] = min(ours["per_epoch_s"], o["per_epoch_s"])
            ours["per_epoch_cpu_s"] = min(ours["per_epoch_cpu_s"], o["per_epoch_cpu_s"])
            ours["peak_rss_gb"] = max(ours["peak_rss_gb"], o["peak_rss_gb"])
            if peer is not None:
                q = run_worker(str(PEER_PY), "peer", a, sp_path, ref_path, genes_path, tmp / f"peer{i}.json")
                peer["per_epoch_runs"] = peer.get("per_epoch_runs", [peer["per_epoch_s"]]) + [q["per_epoch_s"]]
                peer["per_epoch_s"] = min(peer["per_epoch_s"], q["per_epoch_s"])
                peer["per_epoch_cpu_s"] = min(peer["per_epoch_cpu_s"], q["per_epoch_cpu_s"])
                peer["peak_rss_gb"] = max(peer["peak_rss_gb"], q["peak_rss_gb"])

    summary = {
        "data": a.data,
        "spots": len(ours["abundances"]),
        "genes": len(ours["genes"]),
        "epochs": a.epochs,
        "peer_epochs": a.peer_epochs or a.epochs,
        "ref_epochs": a.ref_epochs,
        "threads": a.threads,
        "signatures": a.signatures,
        "n_cells_per_location": a.n_cells,
    }
    ab_o = np.asarray(ours["abundances"])
    p_o = ab_o / ab_o.sum(1, keepdims=True)
    summary["ours"] = {
        k: ours[k]
        for k in (
            "total_s",
            "spatial_s",
            "per_epoch_s",
            "per_epoch_cpu_s",
            "peak_rss_gb",
            "wall_s",
            "cpu_s",
            "loss_last",
            "per_epoch_runs",
        )
        if k in ours
    }
    if truth is not None:
        t = truth[ours["types"]].to_numpy()
        summary["ours"]["prop_corr_truth"] = corr(p_o, t)
        summary["ours"]["prop_rmse_truth"] = float(np.sqrt(np.mean((p_o - t) ** 2)))
        summary["ours"]["ncells_corr_truth"] = corr(ab_o.sum(1), n_cells)
        summary["ours"]["abund_corr_truth"] = corr(ab_o, t * n_cells[:, None])
    if peer is not None:
        assert peer["types"] == ours["types"], (peer["types"], ours["types"])
        ab_p = np.asarray(peer["abundances"])
        p_p = ab_p / ab_p.sum(1, keepdims=True)
        summary["peer"] = {
            k: peer[k]
            for k in (
                "total_s",
                "reference_s",
                "spatial_s",
                "per_epoch_s",
                "per_epoch_cpu_s",
                "peak_rss_gb",
                "wall_s",
                "cpu_s",
                "loss_last",
                "per_epoch_runs",
            )
            if k in peer
        }
        rows = per_spot_corr(p_o, p_p)
        summary["agreement"] = {
            "prop_corr_all": corr(p_o, p_p),
            "per_spot_corr_median": float(np.nanmedian(rows)),
            "per_spot_corr_mean": float(np.nanmean(rows)),
            "per_spot_corr_p05": float(np.nanpercentile(rows, 5)),
            "abund_corr_all": corr(ab_o, ab_p),
            "q05_corr_all": corr(ours["q05"], peer["q05"]),
            "signature_corr": corr(np.log1p(ours["signatures"]), np.log1p(peer["signatures"])),
            "dominant_type_agreement": float(np.mean(p_o.argmax(1) == p_p.argmax(1))),
            "speedup_per_epoch": peer["per_epoch_s"] / ours["per_epoch_s"],
            "speedup_per_epoch_cpu": peer["per_epoch_cpu_s"] / ours["per_epoch_cpu_s"],
            "speedup_total": peer["total_s"] / ours["total_s"],
            "speedup_process_cpu": peer["cpu_s"] / ours["cpu_s"],
            "rss_ratio_ours_over_peer": ours["peak_rss_gb"] / peer["peak_rss_gb"],
        }
        if truth is not None:
            t = truth[peer["types"]].to_numpy()
            summary["peer"]["prop_corr_truth"] = corr(p_p, t)
            summary["peer"]["prop_rmse_truth"] = float(np.sqrt(np.mean((p_p - t) ** 2)))
            summary["peer"]["ncells_corr_truth"] = corr(ab_p.sum(1), n_cells)
            summary["peer"]["abund_corr_truth"] = corr(ab_p, t * n_cells[:, None])
    text = json.dumps(summary, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
