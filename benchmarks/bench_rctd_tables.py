"""RCTD likelihood tables: time to compute them (cold), to load them from the cache, and their distance from
spacexr's published tables (the 400 MB download rctd-py and spacexr use; ../shared/peers builds the same file).

    .venv/bin/python benchmarks/bench_rctd_tables.py                 # all 126 sigmas, counts 0..1000
    .venv/bin/python benchmarks/bench_rctd_tables.py --threads 2

Cold = a fresh cache folder, so every table is computed from its defining integral; cached = the same call again
(tables read from the cache); one sigma = what a run with ``sigma_override`` needs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-count", type=int, default=1000)
    ap.add_argument(
        "--peer-tables", default=os.environ.get("RCTD_Q_MATRICES", str(REPO / ".peers" / "rctd_q" / "q_matrices.npz"))
    )
    a = ap.parse_args(argv)

    import torch

    from spatial_deconv_gui.engines.base import thread_cap
    from spatial_deconv_gui.engines.rctd.likelihood import SIGMA_GRID, build_tables, lambda_grid

    sigmas = [s / 100.0 for s in SIGMA_GRID]
    print(f"load average at start: {os.getloadavg()}; torch threads {a.threads or torch.get_num_threads()}")
    with thread_cap(a.threads), tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        build_tables(sigmas[:1], a.max_count, cache=False)
        one = time.perf_counter() - t
        t = time.perf_counter()
        tables = build_tables(sigmas, a.max_count, cache_dir=cache)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        build_tables(sigmas, a.max_count, cache_dir=cache)
        cached = time.perf_counter() - t
        size = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
    print(f"one sigma, computed: {one:.2f} s")
    print(
        f"all {len(sigmas)} sigmas x {a.max_count + 1} counts x {len(lambda_grid())} lambdas: "
        f"cold {cold:.2f} s, cached {cached:.3f} s, cache on disk {size / 1e6:.0f} MB"
    )

    peer = Path(a.peer_tables)
    if not peer.exists():
        print(f"({peer} not found: no comparison with spacexr's tables)")
        return
    z = np.load(peer)
    x = lambda_grid()
    if not np.allclose(z["X_vals"], x, rtol=1e-12, atol=0):
        print("spacexr's lambda grid differs from ours: no comparison")
        return
    worst, worst_p = 0.0, 0.0
    for s, tab in zip(SIGMA_GRID, tables):
        logq = z[f"Q_{s}"][: a.max_count + 1]  # spacexr stores log P(k | lambda)
        diff = np.abs(tab.logq[: logq.shape[0]] - logq)
        worst = max(worst, float(diff.max()))
        worst_p = max(worst_p, float(np.abs(np.exp(tab.logq[: logq.shape[0]]) - np.exp(logq)).max()))
    print(
        f"vs spacexr's tables ({peer.name}), counts 0..{a.max_count}, all {len(SIGMA_GRID)} sigmas: "
        f"max |log P diff| {worst:.2e}, max |P diff| {worst_p:.2e}"
    )


if __name__ == "__main__":
    main()
