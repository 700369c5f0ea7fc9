"""Side-by-side benchmark of our RCTD engine and rctd-py (the GPL peer, run from its own venv).

Simulates a reference (10 types x 100 cells) and a slide (NB counts, per-gene platform effect), writes them
as h5ad, then runs each engine in its own subprocess (so peak RSS is per engine) and compares the results.

    .venv/bin/python benchmarks/bench_rctd.py --spots 20000 --mode full
    .venv/bin/python benchmarks/bench_rctd.py --spots 5000 --mode doublet
    .venv/bin/python benchmarks/bench_rctd.py --dataset hippocampus --mode full     # a shared Visium pair

``--dataset hippocampus|lymphnode|cerebellum`` runs both engines on a pair from ../shared/data (spacexr's
vignette files) instead of simulated data.

The peer is found at $PEERS_DIR (default .peers/) as venv/bin/python with its likelihood tables at
rctd_q/q_matrices.npz. rctd-py runs on CPU with compile=False (see the peers README). Both engines estimate
sigma themselves; when the two estimates differ, our engine is re-run with rctd-py's sigma for the agreement
numbers (``--same-sigma`` forces that comparison run in any case).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_PAIRS = {
    "hippocampus": "visium_hippocampus",
    "lymphnode": "visium_lymphnode_human",
    "cerebellum": "slideseq_cerebellum",
}


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------


def simulate(n_spots: int, mode: str, n_types: int = 10, n_genes: int = 2000, n_cells: int = 100, seed: int = 0):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    base = rng.gamma(0.5, 1.0, n_genes)
    logfc = rng.normal(0, 1.0, (n_genes, n_types))
    block = n_genes // (2 * n_types)
    for t in range(n_types):
        logfc[t * block : (t + 1) * block, t] += 2.0
    prof = base[:, None] * np.exp(logfc)
    prof /= prof.sum(axis=0, keepdims=True)

    def nb(mean, disp=5.0):
        return rng.poisson(rng.gamma(disp, mean / disp)).astype(np.int32)

    types = np.repeat(np.arange(n_types), n_cells)
    cell_umi = rng.integers(1000, 4000, len(types))
    ref_x = sp.csr_matrix(nb(cell_umi[:, None] * prof[:, types].T))
    ref = ad.AnnData(
        ref_x,
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical([f"ct{t:02d}" for t in types])}, index=[f"c{i}" for i in range(len(types))]
        ),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
    )
    props = np.zeros((n_spots, n_types))
    if mode == "doublet":
        single = rng.uniform(size=n_spots) < 0.5
        a = rng.integers(0, n_types, n_spots)
        b = (a + rng.integers(1, n_types, n_spots)) % n_types
        f = rng.uniform(0.3, 0.7, n_spots)
        props[np.arange(n_spots), a] = np.where(single, 1.0, f)
        props[np.arange(n_spots), b] += np.where(single, 0.0, 1 - f)
    else:
        for i in range(n_spots):
            k = rng.integers(1, 5)
            props[i, rng.choice(n_types, k, replace=False)] = rng.dirichlet(np.full(k, 1.5))
    platform = np.exp(rng.normal(0, 0.3, n_genes))
    umi = rng.integers(300, 3000, n_spots)
    chunks = []
    for lo in range(0, n_spots, 5000):
        mean = umi[lo : lo + 5000, None] * (props[lo : lo + 5000] @ prof.T) * platform
        chunks.append(sp.csr_matrix(nb(mean)))
    sx = sp.vstack(chunks).tocsr()
    spatial = ad.AnnData(sx, obs=pd.DataFrame(index=[f"s{i}" for i in range(n_spots)]), var=ref.var.copy())
    spatial.obsm["spatial"] = rng.uniform(0, 1000, (n_spots, 2))
    return ref, spatial, props


# ---------------------------------------------------------------------------------------------------
# workers (each in its own process)
# ---------------------------------------------------------------------------------------------------


def _maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _cpu_s() -> float:
    # CPU seconds of this process over all its threads: less sensitive than wall time to other jobs
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker_ours(
    data: Path,
    out: Path,
    mode: str,
    sigma: float | None,
    cache_dir: str | None,
    batch: int | None,
    threads: int | None = None,
):
    import anndata as ad
    import scipy.sparse as sp

    sys.path.insert(0, str(REPO / "src"))
    from spatial_deconv_gui.engines.rctd import RCTDConfig, run_rctd
    from spatial_deconv_gui.io.inputs import ReferenceInput, SpatialInput

    s = ad.read_h5ad(data / "spatial.h5ad")
    r = ad.read_h5ad(data / "reference.h5ad")
    sx, rx = sp.csr_matrix(s.X), sp.csr_matrix(r.X)
    # rctd-py takes nUMI as row sums on both sides; do the same so the comparison is like for like
    spatial = SpatialInput(
        sx,
        np.asarray(s.var_names),
        np.asarray(s.obs_names),
        s.obsm["spatial"],
        np.asarray(sx.sum(axis=1)).ravel().astype(float),
    )
    reference = ReferenceInput(
        rx,
        np.asarray(r.var_names),
        r.obs["cell_type"].astype(str).to_numpy(),
        np.asarray(rx.sum(axis=1)).ravel().astype(float),
    )
    cfg = RCTDConfig(
        mode=mode, sigma_override=sigma, cache_dir=cache_dir, batch_size=batch, device="cpu", n_threads=threads
    )
    t0, c0 = time.perf_counter(), _cpu_s()
    res = run_rctd(spatial, reference, cfg)
    elapsed, cpu = time.perf_counter() - t0, _cpu_s() - c0
    save = {"weights": res.obsm["rctd_weights"].to_numpy(), "fitted": res.fitted}
    if mode == "doublet":
        names = res.cell_types
        save["spot_class"] = np.asarray(res.obs["rctd_spot_class"]).astype(str)
        save["first_type"] = np.array([names.index(t) if t in names else -1 for t in res.obs["rctd_first_type"]])
        save["weights_doublet"] = res.obsm["rctd_weights_doublet"].to_numpy()
    np.savez(out.with_suffix(".npz"), **save)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "time_s": elapsed,
                "cpu_s": cpu,
                "sigma": res.params["sigma"],
                "maxrss_gb": _maxrss_gb(),
                "types": res.cell_types,
            }
        )
    )


def worker_peer(data: Path, out: Path, mode: str, sigma: float | None, batch: int | None):
    import anndata as ad
    from rctd import SPOT_CLASS_NAMES, RCTDConfig, Reference, run_rctd

    s = ad.read_h5ad(data / "spatial.h5ad")
    r = ad.read_h5ad(data / "reference.h5ad")
    t0, c0 = time.perf_counter(), _cpu_s()
    ref = Reference(r, cell_type_col="cell_type")
    kw = {}
    if sigma is not None:
        kw["sigma_override"] = int(round(sigma * 100))
    res = run_rctd(s, ref, mode=mode, config=RCTDConfig(device="cpu", compile=False), batch_size=batch or "auto", **kw)
    elapsed, cpu = time.perf_counter() - t0, _cpu_s() - c0
    n = s.n_obs
    mask = np.asarray(res.pixel_mask, dtype=bool)
    w = np.full((n, len(res.cell_type_names)), np.nan)
    w[mask] = res.weights
    save = {"weights": w, "fitted": mask}
    if mode == "doublet":
        sc = np.full(n, "filtered", dtype=object)
        sc[mask] = np.array(SPOT_CLASS_NAMES, dtype=object)[np.asarray(res.spot_class)]
        ft = np.full(n, -1)
        ft[mask] = res.first_type
        wd = np.full((n, 2), np.nan)
        wd[mask] = res.weights_doublet
        save.update(spot_class=sc.astype(str), first_type=ft, weights_doublet=wd)
    np.savez(out.with_suffix(".npz"), **save)
    # rctd-py does not return sigma from run_rctd; it prints "Chosen sigma" (parsed by the caller)
    out.with_suffix(".json").write_text(
        json.dumps({"time_s": elapsed, "cpu_s": cpu, "maxrss_gb": _maxrss_gb(), "types": list(res.cell_type_names)})
    )


# ---------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------


def _run(cmd: list[str], env=None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def _load(out: Path):
    return dict(np.load(out.with_suffix(".npz"), allow_pickle=False)), json.loads(out.with_suffix(".json").read_text())


def compare(ours, peer, mode: str) -> dict:
    both = ours["fitted"] & peer["fitted"]
    wa, wb = ours["weights"][both], peer["weights"][both]
    na = wa / wa.sum(1, keepdims=True)
    nb = wb / wb.sum(1, keepdims=True)
    res = {
        "n_compared": int(both.sum()),
        "fitted_mask_agreement": float((ours["fitted"] == peer["fitted"]).mean()),
        "dominant_type_agreement": float((wa.argmax(1) == wb.argmax(1)).mean()),
        "max_abs_weight_diff": float(np.abs(wa - wb).max()),
        "max_abs_proportion_diff": float(np.abs(na - nb).max()),
    }
    if mode == "doublet":
        res["spot_class_agreement"] = float((ours["spot_class"][both] == peer["spot_class"][both]).mean())
        res["first_type_agreement"] = float((ours["first_type"][both] == peer["first_type"][both]).mean())
        res["max_abs_doublet_weight_diff"] = float(
            np.abs(ours["weights_doublet"][both] - peer["weights_doublet"][both]).max()
        )
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spots", type=int, default=20000)
    ap.add_argument(
        "--dataset",
        default="sim",
        choices=["sim", *SHARED_PAIRS],
        help="simulated data (default) or a shared spacexr pair from --shared-dir",
    )
    ap.add_argument("--shared-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--mode", default="full", choices=["full", "doublet", "multi"])
    ap.add_argument("--types", type=int, default=10)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--no-peer", action="store_true", help="run only our engine")
    ap.add_argument("--threads", type=int, default=None, help="cap our engine's threads (RCTDConfig.n_threads)")
    ap.add_argument("--same-sigma", action="store_true")
    ap.add_argument(
        "--warm-tables",
        action="store_true",
        help="also time ours a second time, with the likelihood tables the first run cached",
    )
    ap.add_argument("--peers-dir", default=os.environ.get("PEERS_DIR", str(REPO / ".peers")))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--worker", choices=["ours", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--sigma", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker == "ours":
        return worker_ours(Path(a.data), Path(a.out), a.mode, a.sigma, a.cache_dir, a.batch, a.threads)
    if a.worker == "peer":
        return worker_peer(Path(a.data), Path(a.out), a.mode, a.sigma, a.batch)

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_rctd_"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    print(f"load average at start: {os.getloadavg()}")
    if a.dataset == "sim":
        ref, spatial, _ = simulate(a.spots, a.mode, a.types, a.genes, seed=a.seed)
        ref.write_h5ad(work / "reference.h5ad")
        spatial.write_h5ad(work / "spatial.h5ad")
        print(
            f"simulated {a.spots} spots x {a.genes} genes, {a.types} types ({a.mode}) in "
            f"{time.perf_counter() - t:.1f}s -> {work}"
        )
    else:
        import anndata as ad

        stem = Path(a.shared_dir) / f"spacexr_{SHARED_PAIRS[a.dataset]}"
        for part in ("spatial", "reference"):
            src = Path(f"{stem}_{part}.h5ad")
            if not src.exists():
                sys.exit(f"{src} not found: point --shared-dir at the shared data folder")
            shutil.copyfile(src, work / f"{part}.h5ad")
        s, r = ad.read_h5ad(work / "spatial.h5ad"), ad.read_h5ad(work / "reference.h5ad")
        a.spots, a.genes, a.types = s.n_obs, s.n_vars, r.obs["cell_type"].nunique()
        print(f"{a.dataset}: {s.n_obs} spots x {s.n_vars} genes; reference {r.n_obs} cells, {a.types} types")
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--data", str(work), "--mode", a.mode] + (["--batch", str(a.batch)] if a.batch else [])
    mine = ["--threads", str(a.threads)] if a.threads else []
    cold = work / "table_cache"  # fresh: our timing includes building the likelihood tables
    _run(me + ["--worker", "ours", "--out", str(work / "ours"), "--cache-dir", str(cold)] + common + mine)
    ours, ours_meta = _load(work / "ours")
    print(
        f"ours    : {ours_meta['time_s']:8.1f} s  (CPU {ours_meta['cpu_s']:.1f} s)  sigma {ours_meta['sigma']:.2f}  "
        f"peak RSS {ours_meta['maxrss_gb']:.2f} GB"
    )
    if a.warm_tables:
        _run(me + ["--worker", "ours", "--out", str(work / "ours_warm"), "--cache-dir", str(cold)] + common + mine)
        _, warm_meta = _load(work / "ours_warm")
        print(f"ours, tables cached: {warm_meta['time_s']:8.1f} s  (CPU {warm_meta['cpu_s']:.1f} s)")
    summary = {
        "dataset": a.dataset,
        "spots": a.spots,
        "mode": a.mode,
        "types": a.types,
        "genes": a.genes,
        "ours": ours_meta,
        **({"ours_tables_cached": warm_meta} if a.warm_tables else {}),
    }
    if not a.no_peer:
        peer_py = Path(a.peers_dir) / "venv" / "bin" / "python"
        env = dict(os.environ, RCTD_Q_MATRICES=str(Path(a.peers_dir) / "rctd_q" / "q_matrices.npz"))
        stdout = _run(
            [str(peer_py), str(Path(__file__).resolve()), "--worker", "peer", "--out", str(work / "peer")] + common,
            env=env,
        )
        peer, peer_meta = _load(work / "peer")
        sig = [ln for ln in stdout.splitlines() if "Chosen sigma" in ln]
        peer_sigma = float(sig[-1].split(":")[1].split()[0]) if sig else None
        peer_meta["sigma"] = peer_sigma
        print(
            f"rctd-py : {peer_meta['time_s']:8.1f} s  (CPU {peer_meta['cpu_s']:.1f} s)  sigma {peer_sigma}  "
            f"peak RSS {peer_meta['maxrss_gb']:.2f} GB"
        )
        print(f"speed-up: {peer_meta['time_s'] / ours_meta['time_s']:.1f}x")
        summary["peer"] = peer_meta
        summary["speedup"] = peer_meta["time_s"] / ours_meta["time_s"]
        if a.same_sigma or (peer_sigma is not None and abs(peer_sigma - ours_meta["sigma"]) > 1e-9):
            _run(
                me
                + [
                    "--worker",
                    "ours",
                    "--out",
                    str(work / "ours_same"),
                    "--cache-dir",
                    str(cold),
                    "--sigma",
                    str(peer_sigma),
                ]
                + common
                + mine
            )
            ours, same_meta = _load(work / "ours_same")
            print(f"ours at rctd-py's sigma {peer_sigma}: {same_meta['time_s']:.1f} s")
            summary["ours_same_sigma"] = same_meta
        if peer_meta["types"] != ours_meta["types"]:  # align the peer's columns to ours by name
            order = [peer_meta["types"].index(t) for t in ours_meta["types"]]
            peer["weights"] = peer["weights"][:, order]
            if "first_type" in peer:
                remap = np.array(order).argsort()
                peer["first_type"] = np.where(peer["first_type"] >= 0, remap[peer["first_type"]], -1)
        agreement = compare(ours, peer, a.mode)
        summary["agreement"] = agreement
        for k, v in agreement.items():
            print(f"  {k}: {v}")
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
