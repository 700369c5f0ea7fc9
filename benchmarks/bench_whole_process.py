"""Whole process, side by side: `spatial-deconv run` against a script in the peers' venv doing the same job.

    .venv/bin/python benchmarks/bench_whole_process.py flash --spots 100000 --genes 2000 --repeats 2
    RCTD_Q_MATRICES=/tmp/peers/rctd_q/q_matrices.npz \\
        .venv/bin/python benchmarks/bench_whole_process.py rctd --spots 5000 --repeats 1

Each side is one fresh process started from the shell's point of view: interpreter start, imports, reading the
slide and the reference from .h5ad, the fit, and writing the answer. Ours is the CLI (``python -m
spatial_deconv_gui.cli run S R --method M -o OUT.h5ad -q``: it writes the results .h5ad described in the README).
The peer is a script run by the peers' interpreter (``--peer-python``, default /tmp/peers/venv/bin/python) that
reads both files with anndata, deconvolves (flashdeconv: ``tl.deconvolve`` with its defaults; rctd-py:
``run_rctd`` with ``RCTDConfig(device="cpu", compile=False)``) and saves the proportions with ``np.save`` (the
cheapest save there is, so the peer's writing time is a lower bound). Runs alternate ours / peer; wall time, CPU
time (user + system, from ``os.wait4`` of that child) and peak RSS of each run are printed with the load average,
then the ratios of the medians. RCTD's likelihood tables: ours reads them from its cache (as rctd-py reads its
precomputed Q matrices); the first of our runs fills the cache when it is empty and is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PEER_PY = Path("/tmp/peers/venv/bin/python")

PEER_FLASH = """
import sys, numpy as np, anndata as ad, flashdeconv as fd
s = ad.read_h5ad(sys.argv[1]); r = ad.read_h5ad(sys.argv[2])
fd.tl.deconvolve(s, r, cell_type_key="cell_type")
np.save(sys.argv[3], s.obsm["flashdeconv"].to_numpy())
"""

PEER_RCTD = """
import sys, numpy as np, anndata as ad
from rctd import RCTDConfig, Reference, run_rctd
s = ad.read_h5ad(sys.argv[1]); r = ad.read_h5ad(sys.argv[2])
res = run_rctd(s, Reference(r, cell_type_col="cell_type"), mode="full", config=RCTDConfig(device="cpu", compile=False))
w = np.asarray(res.weights, dtype=float)
props = np.full((s.n_obs, w.shape[1]), np.nan)
props[np.asarray(res.pixel_mask, dtype=bool)] = w / w.sum(axis=1, keepdims=True)
np.save(sys.argv[3], props)
"""


def make_flash_data(work: Path, n_spots: int, n_genes: int) -> tuple[Path, Path]:
    s_path, r_path = work / f"flash_{n_spots}x{n_genes}_spatial.h5ad", work / f"flash_{n_spots}x{n_genes}_ref.h5ad"
    if not (s_path.exists() and r_path.exists()):
        sys.path.insert(0, str(REPO / "src"))
        from spatial_deconv_gui.simulate import simulate_dataset

        s, r = simulate_dataset(n_spots=n_spots, n_genes=n_genes, n_types=10, cells_per_type=50, seed=5)
        s.write_h5ad(s_path)
        r.write_h5ad(r_path)
    return s_path, r_path


def make_rctd_data(work: Path, n_spots: int) -> tuple[Path, Path]:
    s_path, r_path = work / f"rctd_{n_spots}_spatial.h5ad", work / f"rctd_{n_spots}_ref.h5ad"
    if not (s_path.exists() and r_path.exists()):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_rctd import simulate

        ref, spatial, _ = simulate(n_spots, "full")
        spatial.write_h5ad(s_path)
        ref.write_h5ad(r_path)
    return s_path, r_path


def timed(cmd: list[str], env: dict) -> dict:
    """Wall, CPU (user + system of the child and its children) and peak RSS of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_gb": usage.ru_maxrss / 1024**2,
        "load": os.getloadavg()[0],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method", choices=["flash", "rctd"])
    ap.add_argument("--spots", type=int, default=None, help="default 100000 (flash), 5000 (rctd)")
    ap.add_argument("--genes", type=int, default=2000, help="flash slide's genes")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bigslide/whole_process"))
    ap.add_argument("--peer-python", type=Path, default=PEER_PY)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    n_spots = a.spots or (100_000 if a.method == "flash" else 5000)
    if a.method == "flash":
        s_path, r_path = make_flash_data(a.work, n_spots, a.genes)
        peer_code = PEER_FLASH
        ours_extra = []
    else:
        s_path, r_path = make_rctd_data(a.work, n_spots)
        peer_code = PEER_RCTD
        ours_extra = ["--mode", "full", "--numi-col", "none", "--ref-numi-col", "none"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    ours_cmd = [sys.executable, "-m", "spatial_deconv_gui.cli", "run", str(s_path), str(r_path)]
    ours_cmd += ["--method", a.method, "-o", str(a.work / f"ours_{a.method}.h5ad"), "-q", *ours_extra]
    peer_cmd = [str(a.peer_python), "-c", peer_code, str(s_path), str(r_path), str(a.work / f"peer_{a.method}.npy")]
    print(f"slide {s_path.name}: {n_spots} spots; load average at start {os.getloadavg()}", flush=True)
    # one untimed run of ours first: numba's cache and (RCTD) the likelihood tables are filled once per install
    warm = timed(ours_cmd, env)
    print(f"ours, warm-up (fills caches): {warm['wall_s']:.1f} s wall, {warm['cpu_s']:.1f} s CPU", flush=True)
    rows = {"ours": [], "peer": []}
    for rep in range(a.repeats):
        for side, cmd in (("ours", ours_cmd), ("peer", peer_cmd)):
            r = timed(cmd, env)
            rows[side].append(r)
            print(
                f"rep {rep} {side:4s}: {r['wall_s']:7.1f} s wall  {r['cpu_s']:7.1f} s CPU  "
                f"{r['peak_rss_gb']:.2f} GB peak RSS  (load {r['load']:.1f})",
                flush=True,
            )
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in rows.items()}
    ours_p = np.asarray(_ours_props(a.work / f"ours_{a.method}.h5ad", a.method))
    peer_p = np.load(a.work / f"peer_{a.method}.npy")
    both = ~np.isnan(ours_p).any(axis=1) & ~np.isnan(peer_p).any(axis=1)
    summary = {
        "method": a.method,
        "spots": n_spots,
        "median": med,
        "wall_ratio": med["peer"]["wall_s"] / med["ours"]["wall_s"],
        "cpu_ratio": med["peer"]["cpu_s"] / med["ours"]["cpu_s"],
        "max_abs_proportion_diff": float(np.abs(ours_p[both] - peer_p[both]).max()),
        "spots_compared": int(both.sum()),
        "warm_up": warm,
        "runs": rows,
        "load_end": os.getloadavg(),
    }
    print(
        f"peer / ours, medians: wall {summary['wall_ratio']:.2f}x, CPU {summary['cpu_ratio']:.2f}x; "
        f"max |Δ proportions| {summary['max_abs_proportion_diff']:.2e} over {summary['spots_compared']} spots; "
        f"load at end {summary['load_end']}"
    )
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2))


def _ours_props(path: Path, method: str):
    import anndata as ad

    key = "flash" if method == "flash" else "rctd"
    return ad.read_h5ad(path).obsm[f"{key}_proportions"].to_numpy()


if __name__ == "__main__":
    main()
