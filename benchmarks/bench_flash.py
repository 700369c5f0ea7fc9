"""Benchmarks of the flash engine against FlashDeconv 0.2.0 (run through its own interpreter).

    .venv/bin/python benchmarks/bench_flash.py equivalence   # ≥5k simulated spots + the shared Visium pairs
    .venv/bin/python benchmarks/bench_flash.py accuracy      # per-spot Pearson vs truth, structured domains
    .venv/bin/python benchmarks/bench_flash.py speed         # 100k simulated spots: time and peak RSS
    .venv/bin/python benchmarks/bench_flash.py scale         # 1M spots x 2000 genes, ~1% dense (ours only)
    .venv/bin/python benchmarks/bench_flash.py all

Every engine run happens in a fresh subprocess (ours: this interpreter; FlashDeconv: ``--peer-python``,
default ``.peers/venv/bin/python``) with ``NUMBA_NUM_THREADS`` / BLAS threads set to ``--threads`` (2), so
peak RSS (``VmHWM``) is per run. Both read the same arrays from a folder of ``.npy`` files; each first fits a
300-spot slice so JIT loading is not timed, then times ``fit``. Our package never imports FlashDeconv.
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

REPO = Path(__file__).resolve().parents[1]
PEER_PY = REPO / ".peers" / "venv" / "bin" / "python"
DATA = REPO.parent / "shared" / "data"
OPTION_NAMES = (
    "sketch_dim",
    "lambda_spatial",
    "rho_sparsity",
    "n_hvg",
    "n_markers_per_type",
    "spatial_method",
    "k_neighbors",
    "radius",
    "max_iter",
    "tol",
    "preprocess",
    "gene_weighting",
)


# ----------------------------------------------------------------------------------------------- data


def save_arrays(path: Path, Y, X, coords, truth=None, types=None):
    """One ``.npy`` per array in the folder ``path`` (loading an .npy never holds a second copy)."""
    import scipy.sparse as sp

    Y = sp.csr_matrix(Y)
    path.mkdir(parents=True, exist_ok=True)
    arrays = dict(
        data=Y.data,
        indices=Y.indices,
        indptr=Y.indptr,
        shape=np.array(Y.shape),
        X=X,
        coords=coords,
        types=np.array(types if types is not None else [], dtype=str),
    )
    if truth is not None:
        arrays["truth"] = truth
    for k, v in arrays.items():
        np.save(path / f"{k}.npy", v)
    (path / "done").write_text("ok")


def load_arrays(path):
    import scipy.sparse as sp

    path = Path(path)
    d = {f.stem: np.load(f) for f in path.glob("*.npy")}
    Y = sp.csr_matrix((d["data"], d["indices"], d["indptr"]), shape=tuple(d["shape"]), copy=False)
    return Y, d["X"], d["coords"], d.get("truth")


def arrays_from_anndata(spatial, reference):
    """FlashDeconv's own input convention: sorted shared genes, per-type mean counts (sorted types)."""
    import scipy.sparse as sp

    common = np.intersect1d(np.asarray(spatial.var_names), np.asarray(reference.var_names))
    si = {g: i for i, g in reversed(list(enumerate(spatial.var_names)))}
    ri = {g: i for i, g in reversed(list(enumerate(reference.var_names)))}
    Y = sp.csr_matrix(spatial.X)[:, [si[g] for g in common]].tocsr()
    labels = np.asarray(reference.obs["cell_type"]).astype(str)
    types = np.unique(labels)
    R = sp.csr_matrix(reference.X)[:, [ri[g] for g in common]]
    X = np.vstack([np.asarray(R[labels == t].mean(axis=0)).ravel() for t in types])
    truth = spatial.obsm["true_proportions"][list(types)].to_numpy() if "true_proportions" in spatial.obsm else None
    return Y, X, np.asarray(spatial.obsm["spatial"], dtype=float), truth, types


def fast_slide(n_spots: int, n_genes: int, n_types: int = 10, umi_mean: float = 21.0, seed: int = 0):
    """A Visium-HD-like slide, generated directly as CSR: square bins, smooth type domains, ~1% density.

    Each bin draws Poisson(umi_mean) molecules; a molecule picks a type by the bin's proportions (smooth
    random fields, softmax) and a gene from that type's profile. Returns (Y, X signatures, coords, truth).
    """
    import scipy.sparse as sp
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_spots)))
    ii = np.arange(n_spots) // side
    jj = np.arange(n_spots) % side
    coords = np.column_stack([jj, ii]).astype(np.float64) * 2.0  # 2 µm bins
    coarse = max(4, side // 40)
    logits = np.empty((n_spots, n_types), dtype=np.float32)
    for k in range(n_types):
        field = rng.standard_normal((coarse + 3, coarse + 3))
        logits[:, k] = map_coordinates(field, [ii * coarse / side + 1, jj * coarse / side + 1], order=3)
    logits *= 2.5
    logits -= logits.max(axis=1, keepdims=True)
    props = np.exp(logits)
    props /= props.sum(axis=1, keepdims=True)
    base = rng.gamma(0.6, 1.0, n_genes) + 0.02
    prof = base * rng.lognormal(0, 0.3, (n_types, n_genes))
    for k in range(n_types):
        prof[k, rng.choice(n_genes, 30, replace=False)] *= 8
    prof /= prof.sum(axis=1, keepdims=True)
    umi = rng.poisson(umi_mean, n_spots)
    spot = np.repeat(np.arange(n_spots, dtype=np.int64), umi)
    cum = np.cumsum(props, axis=1)
    typ = np.empty(spot.size, dtype=np.int64)
    for s in range(0, spot.size, 1 << 22):
        u = rng.random(min(1 << 22, spot.size - s), dtype=np.float32)
        typ[s : s + u.size] = (u[:, None] > cum[spot[s : s + u.size]]).sum(axis=1)
    typ = np.minimum(typ, n_types - 1)
    gene = np.empty(spot.size, dtype=np.int64)
    cprof = np.cumsum(prof, axis=1)
    for k in range(n_types):
        m = typ == k
        gene[m] = np.minimum(np.searchsorted(cprof[k], rng.random(int(m.sum()))), n_genes - 1)
    Y = sp.csr_matrix((np.ones(spot.size, dtype=np.int32), (spot, gene)), shape=(n_spots, n_genes))
    Y.sum_duplicates()
    truth = np.zeros((n_spots, n_types))
    np.add.at(truth, (spot, typ), 1.0)
    truth /= np.maximum(truth.sum(axis=1, keepdims=True), 1)
    return Y, prof * 1000.0, coords, truth


def simulated(path: Path, n_spots: int, seed: int, n_genes: int = 500, n_types: int = 8):
    if not (path / "done").exists():
        sys.path.insert(0, str(REPO / "src"))
        from spatial_deconv_gui.simulate import simulate_dataset

        s, r = simulate_dataset(n_spots=n_spots, n_genes=n_genes, n_types=n_types, cells_per_type=50, seed=seed)
        Y, X, coords, truth, types = arrays_from_anndata(s, r)
        save_arrays(path, Y, X, coords, truth, types)
    return path


def visium(path: Path, name: str):
    if not (path / "done").exists():
        import anndata as ad

        s = ad.read_h5ad(DATA / f"spacexr_visium_{name}_spatial.h5ad")
        r = ad.read_h5ad(DATA / f"spacexr_visium_{name}_reference.h5ad")
        Y, X, coords, truth, types = arrays_from_anndata(s, r)
        save_arrays(path, Y, X, coords, truth, types)
    return path


# --------------------------------------------------------------------------------------------- worker


def _rss_gb() -> float:
    """Peak resident set of this process (VmHWM: unlike ru_maxrss it does not inherit the parent's peak
    across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def worker_anndata(engine: str, inp: str, out: str):
    """End to end from .h5ad files: FlashDeconv's ``tl.deconvolve`` vs our io + ``run_flash``."""
    import anndata as ad

    s = ad.read_h5ad(Path(inp) / "spatial.h5ad")
    r = ad.read_h5ad(Path(inp) / "reference.h5ad")
    if engine == "peer_tl":
        import flashdeconv as fd

        fd.tl.deconvolve(s, r, cell_type_key="cell_type")
        props = s.obsm["flashdeconv"].to_numpy()
    else:
        sys.path.insert(0, str(REPO / "src"))
        from spatial_deconv_gui.engines.flash import FlashConfig, run_flash
        from spatial_deconv_gui.io import reference_input, spatial_input

        props = run_flash(spatial_input(s), reference_input(r), FlashConfig()).proportions
    np.savez(out, proportions=props)


def worker(engine: str, inp: str, out: str, options: dict, fixed: str | None):
    if engine.endswith("_tl"):
        return worker_anndata(engine, inp, out)
    t_start = time.perf_counter()
    Y, X, coords, _ = load_arrays(inp)
    rss_loaded = _rss_gb()
    t_loaded = time.perf_counter()
    opts = {k: v for k, v in options.items() if k in OPTION_NAMES or k == "seed"}
    warm = min(300, Y.shape[0])
    if engine == "peer":
        from flashdeconv import FlashDeconv

        kw = {k: v for k, v in opts.items() if k != "seed"}
        kw["random_state"] = opts.get("seed", 0)
        FlashDeconv(**{**kw, "max_iter": 3}).fit(Y[:warm], X, coords[:warm])
        t0 = time.perf_counter()
        m = FlashDeconv(**kw)
        m.fit(Y, X, coords)
        fit_s = time.perf_counter() - t0
        res = dict(
            proportions=m.proportions_,
            beta=m.beta_,
            gene_idx=m.gene_idx_,
            lambda_used=m.lambda_used_,
            n_iter=m.info_["n_iterations"],
            converged=m.info_["converged"],
            objective=m.info_["final_objective"],
        )
        if m.gene_weights_ is not None:
            res["gene_weights"] = m.gene_weights_
    else:
        sys.path.insert(0, str(REPO / "src"))
        from spatial_deconv_gui.engines.flash import FlashConfig, fit_arrays

        kw = dict(opts)
        kw["lambda_spatial"] = str(kw.get("lambda_spatial", "auto"))
        cfg = FlashConfig(**kw, objective_every=0)
        fit_arrays(Y[:warm], X, coords[:warm], FlashConfig(**kw, objective_every=0, max_iter=3))
        fx = {}
        if fixed:
            f = np.load(fixed)
            fx = dict(gene_idx=f["gene_idx"], lambda_=float(f["lambda_used"]))
            if "gene_weights" in f.files:
                fx["gene_weights"] = f["gene_weights"]
        t0 = time.perf_counter()
        fit = fit_arrays(Y, X, coords, cfg, **fx)
        fit_s = time.perf_counter() - t0
        res = dict(
            proportions=fit.proportions,
            beta=fit.beta,
            gene_idx=fit.gene_idx,
            lambda_used=fit.lambda_used,
            n_iter=fit.info.n_iter,
            converged=fit.info.converged,
            objective=fit.info.objective,
            timings=json.dumps(fit.timings),
        )
        if fit.gene_weights is not None:
            res["gene_weights"] = fit.gene_weights
    res.update(fit_s=fit_s, load_s=t_loaded - t_start, rss_loaded_gb=rss_loaded, peak_rss_gb=_rss_gb())
    np.savez(out, **res)


def run_worker(
    engine: str, inp: Path, out: Path, options: dict, threads: int, peer_python: str, fixed: Path | None = None
) -> dict:
    env = dict(os.environ)
    for v in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[v] = str(threads)
    py = peer_python if engine.startswith("peer") else sys.executable
    cmd = [py, str(Path(__file__).resolve()), "_worker", engine, str(inp), str(out), json.dumps(options)]
    if fixed is not None:
        cmd.append(str(fixed))
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - t0
    r = dict(np.load(out, allow_pickle=False))
    r["wall_s"] = wall
    return r


# ------------------------------------------------------------------------------------------- benches


def per_spot_pearson(p, q):
    pc = p - p.mean(1, keepdims=True)
    qc = q - q.mean(1, keepdims=True)
    den = np.sqrt((pc**2).sum(1) * (qc**2).sum(1))
    ok = den > 0
    return float(((pc * qc).sum(1)[ok] / den[ok]).mean())


def bench_equivalence(a, work: Path) -> list[dict]:
    cases = [
        ("simulated 6000 spots", simulated(work / "sim6000", 6000, seed=21), {}),
        ("simulated 6000 spots, countsketch", work / "sim6000", {"gene_weighting": "countsketch"}),
        ("simulated 6000 spots, pearson", work / "sim6000", {"preprocess": "pearson"}),
        ("simulated 6000 spots, raw, grid graph", work / "sim6000", {"preprocess": "raw", "spatial_method": "grid"}),
        (
            "simulated 6000 spots, radius graph, lambda=20, rho=0.05",
            work / "sim6000",
            {"spatial_method": "radius", "radius": 180.0, "lambda_spatial": 20.0, "rho_sparsity": 0.05},
        ),
    ]
    for name in ("hippocampus", "lymphnode_human"):
        if (DATA / f"spacexr_visium_{name}_spatial.h5ad").exists():
            cases.append((f"Visium {name}", visium(work / f"visium_{name}", name), {}))
    rows = []
    for label, inp, opts in cases:
        peer = run_worker("peer", inp, work / "peer.npz", opts, a.threads, a.peer_python)
        fixed = work / "fixed.npz"
        np.savez(fixed, **{k: peer[k] for k in ("gene_idx", "lambda_used", "gene_weights") if k in peer})
        same = run_worker("ours", inp, work / "ours_fixed.npz", opts, a.threads, a.peer_python, fixed)
        own = run_worker("ours", inp, work / "ours_own.npz", opts, a.threads, a.peer_python)
        row = {
            "case": label,
            "spots": int(peer["proportions"].shape[0]),
            "types": int(peer["proportions"].shape[1]),
            "max_abs_diff_same_inputs": float(np.abs(same["proportions"] - peer["proportions"]).max()),
            "max_abs_diff_own_selection": float(np.abs(own["proportions"] - peer["proportions"]).max()),
            "same_genes": bool(np.array_equal(own["gene_idx"], peer["gene_idx"])),
            "lambda_rel_diff": float(abs(own["lambda_used"] - peer["lambda_used"]) / peer["lambda_used"]),
            "iters_ours_peer": (int(own["n_iter"]), int(peer["n_iter"])),
        }
        if "gene_weights" in peer:
            row["weights_max_rel_diff"] = float(np.max(np.abs(own["gene_weights"] / peer["gene_weights"] - 1)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows += bench_end_to_end(a, work)
    return rows


def bench_end_to_end(a, work: Path) -> list[dict]:
    """AnnData in, proportions out: gene alignment and signatures included."""
    import shutil

    sys.path.insert(0, str(REPO / "src"))
    from spatial_deconv_gui.simulate import simulate_dataset

    cases = []
    d = work / "e2e_sim6000"
    if not (d / "reference.h5ad").exists():
        d.mkdir(parents=True, exist_ok=True)
        s, r = simulate_dataset(n_spots=6000, n_genes=500, n_types=8, cells_per_type=50, seed=21)
        s.write_h5ad(d / "spatial.h5ad")
        r.write_h5ad(d / "reference.h5ad")
    cases.append(("end to end: simulated 6000 spots", d))
    for name in ("hippocampus", "lymphnode_human"):
        src = DATA / f"spacexr_visium_{name}_spatial.h5ad"
        if src.exists():
            d = work / f"e2e_{name}"
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, d / "spatial.h5ad")
            shutil.copy(DATA / f"spacexr_visium_{name}_reference.h5ad", d / "reference.h5ad")
            cases.append((f"end to end: Visium {name}", d))
    rows = []
    for label, d in cases:
        peer = run_worker("peer_tl", d, work / "peer_tl.npz", {}, a.threads, a.peer_python)
        ours = run_worker("ours_tl", d, work / "ours_tl.npz", {}, a.threads, a.peer_python)
        row = {
            "case": label,
            "spots": int(peer["proportions"].shape[0]),
            "max_abs_diff_end_to_end": float(np.abs(ours["proportions"] - peer["proportions"]).max()),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_accuracy(a, work: Path) -> list[dict]:
    rows = []
    for seed, n_types in ((1, 6), (2, 8), (3, 10)):
        inp = simulated(work / f"acc_{seed}", 4000, seed=seed, n_types=n_types)
        truth = load_arrays(inp)[3]
        peer = run_worker("peer", inp, work / "peer.npz", {}, a.threads, a.peer_python)
        ours = run_worker("ours", inp, work / "ours.npz", {}, a.threads, a.peer_python)
        row = {
            "seed": seed,
            "types": n_types,
            "spots": 4000,
            "pearson_ours": per_spot_pearson(ours["proportions"], truth),
            "pearson_peer": per_spot_pearson(peer["proportions"], truth),
            "rmse_ours": float(np.sqrt(((ours["proportions"] - truth) ** 2).mean())),
            "rmse_peer": float(np.sqrt(((peer["proportions"] - truth) ** 2).mean())),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _speed_rows(a, work: Path, inp: Path, label: str, engines=("ours", "peer")) -> list[dict]:
    rows = []
    for rep in range(a.repeats):
        for eng in engines:
            r = run_worker(eng, inp, work / f"{eng}.npz", {}, a.threads, a.peer_python)
            row = {
                "case": label,
                "engine": eng,
                "rep": rep,
                "fit_s": float(r["fit_s"]),
                "peak_rss_gb": float(r["peak_rss_gb"]),
                "rss_after_load_gb": float(r["rss_loaded_gb"]),
                "wall_s": float(r["wall_s"]),
                "n_iter": int(r["n_iter"]),
            }
            if "timings" in r:
                row["stages"] = json.loads(str(r["timings"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_speed(a, work: Path) -> list[dict]:
    inp = work / f"sim{a.spots}"
    if not (inp / "done").exists():
        t = time.perf_counter()
        simulated(inp, a.spots, seed=5, n_genes=1000, n_types=10)
        print(f"simulated {a.spots} spots in {time.perf_counter() - t:.0f} s", flush=True)
    rows = _speed_rows(a, work, inp, f"simulated {a.spots} spots")
    p = np.load(work / "peer.npz")["proportions"]
    o = np.load(work / "ours.npz")["proportions"]
    print(json.dumps({"max_abs_diff_last_runs": float(np.abs(p - o).max())}), flush=True)
    return rows


def bench_scale(a, work: Path) -> list[dict]:
    inp = work / f"fast{a.big_spots}x{a.big_genes}"
    if not (inp / "done").exists():
        t = time.perf_counter()
        Y, X, coords, truth = fast_slide(a.big_spots, a.big_genes, seed=9)
        save_arrays(inp, Y, X, coords, truth)
        print(
            f"generated {Y.shape} nnz={Y.nnz} density={Y.nnz / np.prod(Y.shape):.4f} "
            f"in {time.perf_counter() - t:.0f} s",
            flush=True,
        )
        del Y, truth
    engines = ("ours", "peer") if a.scale_peer else ("ours",)
    rows = _speed_rows(a, work, inp, f"fast {a.big_spots} x {a.big_genes}", engines)
    truth = load_arrays(inp)[3]
    print(json.dumps({"pearson_ours": per_spot_pearson(np.load(work / "ours.npz")["proportions"], truth)}), flush=True)
    return rows


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_worker":
        worker(argv[1], argv[2], argv[3], json.loads(argv[4]), argv[5] if len(argv) > 5 else None)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=("equivalence", "accuracy", "speed", "scale", "all"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peer-python", default=str(PEER_PY))
    p.add_argument("--workdir", default="/tmp/bench_flash")
    p.add_argument("--spots", type=int, default=100_000)
    p.add_argument("--big-spots", type=int, default=1_000_000)
    p.add_argument("--big-genes", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--scale-peer", action="store_true", help="also run FlashDeconv at the 1M scale")
    p.add_argument("--json", default=None, help="write all rows here")
    a = p.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("equivalence", "accuracy", "speed", "scale"):
        if a.bench in (name, "all"):
            out[name] = globals()[f"bench_{name}"](a, work)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
