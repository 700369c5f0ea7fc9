"""Our engines with libgomp's default spin-wait vs a shorter one and vs none, on a quiet and on a busy machine.

numba's parallel loops and torch's intra-op threads run on libgomp, whose idle threads spin (by default for
300,000 rounds) at the end of every parallel region before they sleep. When another process holds a core, a
spinning thread takes the time slices its busy sibling needs, so a run with 2 threads on a loaded 2-core machine
can be much slower than it need be. ``spatial_deconv_gui`` sets ``GOMP_SPINCOUNT=10000`` on import unless the user
set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``; this script measures what each choice costs on a quiet machine and
saves on a busy one.

Each case runs in a fresh process (libgomp reads the variables once, when it loads), alternating the
``--policies`` ``--repeats`` times and keeping each one's fastest; the speed-ups printed are against the first
policy. ``--load K`` adds K busy-looping processes for the whole measurement.

    P="default OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=10000 GOMP_SPINCOUNT=100000"
    .venv/bin/python benchmarks/bench_omp_wait.py --repeats 2 --policies $P            # quiet machine
    .venv/bin/python benchmarks/bench_omp_wait.py --repeats 2 --policies $P --load 2   # two busy processes beside
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

REPO = Path(__file__).resolve().parents[1]

# The script imports torch before our package, so libgomp (torch's copy, which numba's pool shares: one library
# per soname) loads before our setdefault and keeps the policy the process started with.
WORKLOADS = {
    "rctd_doublet": """
import numpy as np
from spatial_deconv_gui.simulate import simulate_dataset
from spatial_deconv_gui.io.read import reference_input, spatial_input
from spatial_deconv_gui.engines.rctd import RCTDConfig, run_rctd
sp, ref = simulate_dataset(n_spots=1500, n_genes=400, n_types=8, cells_per_type=60, seed=0)
run_rctd(spatial_input(sp), reference_input(ref), RCTDConfig(mode="doublet", n_threads=THREADS))
""",
    "destvi_20_epochs": """
from spatial_deconv_gui.simulate import simulate_dataset
from spatial_deconv_gui.io.read import reference_input, spatial_input
from spatial_deconv_gui.engines.destvi import DestVIConfig, run_destvi
sp, ref = simulate_dataset(n_spots=1000, n_genes=300, n_types=6, cells_per_type=60, seed=0)
run_destvi(spatial_input(sp), reference_input(ref), DestVIConfig(sc_epochs=10, max_epochs=20, n_threads=THREADS,
                                                                  device="cpu"))
""",
}


def run_case(code: str, threads: int, policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(REPO / "src")
    if policy != "default":
        name, value = policy.split("=", 1)
        env[name] = value
    script = (
        "import torch, time\nt0 = time.perf_counter()\n"
        + code.replace("THREADS", str(threads))
        + "\nprint('WALL', time.perf_counter() - t0)\n"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    wall = float([ln for ln in p.stdout.splitlines() if ln.startswith("WALL")][-1].split()[1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--policies",
        nargs="+",
        default=["default", "GOMP_SPINCOUNT=10000"],
        help="'default' (libgomp's own) or NAME=VALUE environment settings to compare",
    )
    ap.add_argument("--load", type=int, default=0, help="busy-looping processes to run alongside")
    ap.add_argument("--json")
    a = ap.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.load)]
    try:
        time.sleep(1.0 if hogs else 0.0)
        out = {"threads": a.threads, "load_processes": a.load, "loadavg_start": os.getloadavg()[0], "results": {}}
        for name in a.workloads:
            runs = {policy: [] for policy in a.policies}
            for _ in range(a.repeats):
                for policy in a.policies:
                    runs[policy].append(run_case(WORKLOADS[name], a.threads, policy))
            best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
            out["results"][name] = {"runs": runs, "best": best}
            base = best[a.policies[0]]["wall_s"]
            cells = "   ".join(
                f"{k}: {b['wall_s']:.2f} s (CPU {b['cpu_s']:.1f}, {base / b['wall_s']:.2f}x)" for k, b in best.items()
            )
            print(f"{name:18s} {cells}", flush=True)
    finally:
        for h in hogs:
            h.kill()
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
