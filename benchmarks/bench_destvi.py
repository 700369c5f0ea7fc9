"""Side-by-side benchmark of our DestVI engine and scvi-tools 1.4.2's CondSCVI + DestVI, same data and epochs.

Each engine runs in its own subprocess (peak RSS per engine; the peer from its own venv) on the genes shared by
slide and reference, with scvi-tools' defaults otherwise. The peer needs two workarounds on 1.4.2 (see
../shared/peers/README.md): CondSCVI(prior="normal") and the VampPrior arrays handed over as tensors.

    .venv/bin/python benchmarks/bench_destvi.py --data sim --spots 1000 --sc-epochs 100 --epochs 200
    .venv/bin/python benchmarks/bench_destvi.py --data hippocampus --sc-epochs 100 --epochs 200
    .venv/bin/python benchmarks/bench_destvi.py --data sim --spots 5000 --sc-epochs 5 --epochs 5   # speed

Per-epoch times are medians over spatial epochs (ours: per-epoch wall times; the peer: gaps between epoch ends).
``--peer-seeds 2`` also runs the peer with a second seed, giving the peer-vs-peer agreement (its own noise).
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def worker_ours(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    import anndata as ad
    from spatial_deconv_gui.engines.destvi import DestVIConfig, run_destvi
    from spatial_deconv_gui.io.read import reference_input, spatial_input

    genes = json.loads(Path(a.genes_file).read_text())
    s = spatial_input(ad.read_h5ad(a.spatial)[:, genes].copy())
    r = reference_input(ad.read_h5ad(a.reference)[:, genes].copy())
    t0 = time.perf_counter()
    res = run_destvi(s, r, DestVIConfig(sc_epochs=a.sc_epochs, max_epochs=a.epochs, seed=a.seed, device="cpu",
                                        report_every=10 ** 9))
    total = time.perf_counter() - t0
    tr = res.uns["destvi_training"]
    return dict(types=list(res.cell_types), proportions=res.proportions.tolist(), total_s=total,
                spatial_s=tr["spatial_seconds"], per_epoch_s=float(np.median(tr["epoch_seconds"])), per_epoch_cpu_s=float(np.median(tr["epoch_cpu_seconds"])),
                gamma={t: res.obsm[f"destvi_gamma_{t}"].values.tolist() for t in res.cell_types},
                peak_rss_gb=_rss_gb())


def worker_peer(a) -> dict:
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(a.threads)
    import anndata as ad
    import lightning.pytorch as pl
    import scvi
    from scvi.model import CondSCVI, DestVI

    scvi.settings.seed = a.seed
    genes = json.loads(Path(a.genes_file).read_text())
    st = ad.read_h5ad(a.spatial)[:, genes].copy()
    ref = ad.read_h5ad(a.reference)[:, genes].copy()
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str).astype("category")
    t0 = time.perf_counter()
    CondSCVI.setup_anndata(ref, labels_key="cell_type")
    sc = CondSCVI(ref, prior="normal")  # workaround 1: from_rna_model reads module_kwargs["prior"]
    sc.train(max_epochs=a.sc_epochs, accelerator="cpu", enable_progress_bar=False)
    orig = sc.get_vamp_prior

    def vamp_as_tensors(adata=None, p=10):  # workaround 2: numpy buffers raise TypeError in register_buffer
        return {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in orig(adata, p=p).items()}

    sc.get_vamp_prior = vamp_as_tensors

    class Timer(pl.Callback):
        def __init__(self):
            self.t, self.c = [], []

        def on_train_epoch_end(self, trainer, module):
            self.t.append(time.perf_counter())
            self.c.append(time.process_time())

    timer = Timer()
    DestVI.setup_anndata(st)
    model = DestVI.from_rna_model(st, sc)
    t1 = time.perf_counter()
    model.train(max_epochs=a.epochs, accelerator="cpu", callbacks=[timer], enable_progress_bar=False)
    spatial_s = time.perf_counter() - t1
    props = model.get_proportions()
    gamma = model.get_gamma()
    types = sorted(props.columns)
    total = time.perf_counter() - t0
    gaps = np.diff(timer.t)
    cgaps = np.diff(timer.c)
    return dict(types=types, proportions=props[types].values.tolist(), total_s=total, spatial_s=spatial_s,
                per_epoch_s=float(np.median(gaps)) if len(gaps) else spatial_s / a.epochs,
                per_epoch_cpu_s=float(np.median(cgaps)) if len(cgaps) else float("nan"),
                gamma={t: np.asarray(gamma[t]).tolist() for t in types}, peak_rss_gb=_rss_gb())


def load_data(a, tmp: Path):
    import anndata as ad
    truth = None
    if a.data == "sim":
        from spatial_deconv_gui.simulate import simulate_dataset
        spatial, reference = simulate_dataset(n_spots=a.spots, n_genes=a.genes_sim, n_types=a.types,
                                              cells_per_type=a.cells_per_type, seed=a.seed)
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


def run_worker(python, kind, a, sp_path, ref_path, genes_path, out: Path, seed: int) -> dict:
    cmd = [python, __file__, "--worker", kind, "--spatial", str(sp_path), "--reference", str(ref_path),
           "--genes-file", str(genes_path), "--out", str(out), "--epochs", str(a.epochs),
           "--sc-epochs", str(a.sc_epochs), "--threads", str(a.threads), "--seed", str(seed)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")} if kind == "ours" else dict(os.environ)
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{p.stderr[-4000:]}")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t
    return res


def corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def agreement(p1, p2) -> dict:
    from spatial_deconv_gui.engines.bayes import pearson_rows
    rows = pearson_rows(np.asarray(p1), np.asarray(p2))
    return {"prop_corr_all": corr(p1, p2), "per_spot_corr_median": float(np.nanmedian(rows)),
            "per_spot_corr_mean": float(np.nanmean(rows)),
            "dominant_type_agreement": float(np.mean(np.argmax(p1, 1) == np.argmax(p2, 1)))}


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
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.worker:
        Path(a.out).write_text(json.dumps((worker_ours if a.worker == "ours" else worker_peer)(a)))
        return
    sys.path.insert(0, str(REPO / "src"))
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        sp_path, ref_path, truth, genes = load_data(a, tmp)
        genes_path = tmp / "genes.json"
        genes_path.write_text(json.dumps([str(g) for g in genes]))
        ours = run_worker(sys.executable, "ours", a, sp_path, ref_path, genes_path, tmp / "ours.json", a.seed)
        peers = [] if a.skip_peer else [
            run_worker(str(PEER_PY), "peer", a, sp_path, ref_path, genes_path, tmp / f"peer{i}.json", a.seed + i)
            for i in range(a.peer_seeds)]
        # further alternating runs for timing only (the machine is shared: keep each side's fastest epoch time)
        for i in range(1, a.repeats):
            for kind, res, py in (("ours", ours, sys.executable), ("peer", peers[0] if peers else None, str(PEER_PY))):
                if res is None:
                    continue
                o = run_worker(py, kind, a, sp_path, ref_path, genes_path, tmp / f"{kind}_r{i}.json", a.seed)
                res["per_epoch_runs"] = res.get("per_epoch_runs", [res["per_epoch_s"]]) + [o["per_epoch_s"]]
                res["per_epoch_s"] = min(res["per_epoch_s"], o["per_epoch_s"])
                res["per_epoch_cpu_s"] = min(res["per_epoch_cpu_s"], o["per_epoch_cpu_s"])
                res["peak_rss_gb"] = max(res["peak_rss_gb"], o["peak_rss_gb"])
    p_o = np.asarray(ours["proportions"])
    summary = {"data": a.data, "spots": len(p_o), "genes": len(genes), "sc_epochs": a.sc_epochs,
               "epochs": a.epochs, "threads": a.threads,
               "ours": {k: ours[k] for k in ("total_s", "spatial_s", "per_epoch_s", "per_epoch_cpu_s", "peak_rss_gb", "wall_s",
                                             "per_epoch_runs") if k in ours}}
    if truth is not None:
        t = truth[ours["types"]].to_numpy()
        summary["ours"]["prop_corr_truth"] = corr(p_o, t)
        summary["ours"]["prop_rmse_truth"] = float(np.sqrt(np.mean((p_o - t) ** 2)))
    for i, peer in enumerate(peers):
        assert peer["types"] == ours["types"], (peer["types"], ours["types"])
        p_p = np.asarray(peer["proportions"])
        key = "peer" if i == 0 else f"peer_seed{i}"
        summary[key] = {k: peer[k] for k in ("total_s", "spatial_s", "per_epoch_s", "per_epoch_cpu_s", "peak_rss_gb", "wall_s",
                                             "per_epoch_runs") if k in peer}
        if truth is not None:
            t = truth[peer["types"]].to_numpy()
            summary[key]["prop_corr_truth"] = corr(p_p, t)
            summary[key]["prop_rmse_truth"] = float(np.sqrt(np.mean((p_p - t) ** 2)))
        summary[f"agreement_ours_vs_{key}"] = {
            **agreement(p_o, p_p),
            "speedup_per_epoch": peer["per_epoch_s"] / ours["per_epoch_s"],
            "speedup_per_epoch_cpu": peer["per_epoch_cpu_s"] / ours["per_epoch_cpu_s"],
            "speedup_total": peer["total_s"] / ours["total_s"],
            "rss_ratio_ours_over_peer": ours["peak_rss_gb"] / peer["peak_rss_gb"]}
    if len(peers) > 1:
        summary["agreement_peer_vs_peer_seed1"] = agreement(peers[0]["proportions"], peers[1]["proportions"])
    text = json.dumps(summary, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
