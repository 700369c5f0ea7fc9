"""Issue 17, goals: knockouts on the olfactory-bulb model in seconds.

On a trained model folder (format 3), in fresh processes:

* cold ``spatial-deconv perturb run MODEL --gene G --output x.h5ad`` (whole process: start-up, load, 4-step
  knockout, vector field, write): wall, CPU (user + sys) and peak RSS from ``/usr/bin/time -v``;
* the same steps timed inside one process (imports, ``load_model``, knockout, write);
* the Knockout dock's API path: *Load model* (``import perturb_api`` + ``perturb_api.load_model``, what the
  button runs) and then knockouts as the dock runs them (``run_perturbation(model, [gene], 0.0, steps=4,
  adata=slide, on_step=...)``), the first and each further one;
* optionally (``--csv-copy``) the same on a copy of the folder in the format 2 layout (one CSV per target, as
  training wrote before), and the largest |Δ difference| between the layouts over the genes knocked out.

    python benchmarks/bench_knockout_goals.py --model /tmp/knock/model300 --slide /tmp/knock/ob_lognorm.h5ad \
        --work /tmp/knock/bench300 --csv-copy --repeats 3

Prints one JSON object (``--json PATH`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PHASES_SNIPPET = r"""
import json, resource, sys, time
t0 = time.perf_counter(); c0 = time.process_time()
from spatial_deconv_gui import perturb_api as api
from spatial_deconv_gui.io.write import write_h5ad_atomic
t1 = time.perf_counter(); c1 = time.process_time()
model = api.load_model(sys.argv[1])
t2 = time.perf_counter(); c2 = time.process_time()
res = api.run_perturbation(model, [sys.argv[2]], 0.0, steps=4)
t3 = time.perf_counter(); c3 = time.process_time()
write_h5ad_atomic(res, sys.argv[3])
t4 = time.perf_counter(); c4 = time.process_time()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "knockout_s": t3 - t2, "write_s": t4 - t3,
                  "import_cpu_s": c1 - c0, "load_cpu_s": c2 - c1, "knockout_cpu_s": c3 - c2, "write_cpu_s": c4 - c3,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

DOCK_SNIPPET = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import anndata as ad
slide = ad.read_h5ad(sys.argv[2])  # the slide layer's AnnData the dock hands over (open before the click)
genes = sys.argv[3].split(",")
t0 = time.perf_counter(); c0 = time.process_time()
from spatial_deconv_gui import perturb_api  # the Load model button imports it on its first click
model = perturb_api.load_model(sys.argv[1])
load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
runs = []
for g in genes:
    t0 = time.perf_counter(); c0 = time.process_time()
    perturb_api.run_perturbation(model, [g], 0.0, steps=4, adata=slide, on_step=lambda st: None)
    runs.append({"gene": g, "s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0})
print(json.dumps({"load_model_s": load_s, "load_model_cpu_s": load_cpu, "knockouts": runs,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

SAME_SNIPPET = r"""
import json, sys, time, warnings
import numpy as np
warnings.simplefilter("ignore")
from spatial_deconv_gui.engines.perturb.perturb import load_model, simulate_perturbation
loads = {}
for name, path in (("store", sys.argv[1]), ("csv", sys.argv[2])):
    t0 = time.perf_counter(); c0 = time.process_time()
    loads[name] = load_model(path)
    loads[name + "_load_s"] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
a, b = loads["store"], loads["csv"]
out = {"load_store": loads["store_load_s"], "load_csv": loads["csv_load_s"], "genes": {}}
for g in sys.argv[3].split(","):
    da, db = simulate_perturbation(a, g, 0.0, n_steps=4), simulate_perturbation(b, g, 0.0, n_steps=4)
    out["genes"][g] = {"max_abs_diff": float(np.abs(da - db).max()), "max_abs_delta": float(np.abs(da).max())}
print(json.dumps(out))
"""


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_json(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True, env=python_env())
    return json.loads(p.stdout.strip().splitlines()[-1])


def time_v(cmd: list[str]) -> dict:
    """Wall, CPU and peak RSS of one process from GNU time."""
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=python_env())
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    err = p.stderr

    def field(name):
        return re.search(rf"{re.escape(name)}: (.+)", err).group(1).strip()

    h, m, s = ([0.0] + [float(x) for x in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")])[-3:]
    return {
        "wall_s": 3600 * h + 60 * m + s,
        "cpu_s": float(field("User time (seconds)")) + float(field("System time (seconds)")),
        "peak_rss_mb": int(field("Maximum resident set size (kbytes)")) / 1024,
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_csv_copy(model_dir: Path, copy_dir: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_model_store import write_old_layout

    write_old_layout(model_dir, copy_dir)


def cold_runs(model_dir: Path, gene: str, work: Path, repeats: int, label: str) -> list[dict]:
    cli = [sys.executable, "-m", "spatial_deconv_gui.cli", "perturb", "run", str(model_dir)]
    return [
        {
            "load_avg": load_average(),
            **time_v([*cli, "--gene", gene, "--output", str(work / f"ko_{label}.h5ad"), "--quiet"]),
        }
        for _ in range(repeats)
    ]


def measure(model_dir: Path, slide: str, genes: list[str], work: Path, repeats: int, label: str) -> dict:
    cli = [sys.executable, "-m", "spatial_deconv_gui.cli", "perturb", "run", str(model_dir)]
    cold = []
    for _ in range(repeats):
        cold.append(
            {
                "load_avg": load_average(),
                **time_v([*cli, "--gene", genes[0], "--output", str(work / f"ko_{label}.h5ad"), "--quiet"]),
            }
        )
    phases = [run_json(["-c", PHASES_SNIPPET, str(model_dir), genes[0], str(work / f"ph_{label}.h5ad")])]
    for _ in range(repeats - 1):
        phases.append(run_json(["-c", PHASES_SNIPPET, str(model_dir), genes[0], str(work / f"ph_{label}.h5ad")]))
    dock = [run_json(["-c", DOCK_SNIPPET, str(model_dir), slide, ",".join(genes)]) for _ in range(repeats)]
    med = statistics.median
    further = [k["s"] for d in dock for k in d["knockouts"][1:]]
    return {
        "cold_perturb_run": cold,
        "cold_perturb_run_median": {k: round(med(r[k] for r in cold), 3) for k in ("wall_s", "cpu_s", "peak_rss_mb")},
        "phases": phases,
        "phases_median": {k: round(med(p[k] for p in phases), 3) for k in phases[0]},
        "dock": dock,
        "dock_load_model_median_s": round(med(d["load_model_s"] for d in dock), 3),
        "dock_first_knockout_median_s": round(med(d["knockouts"][0]["s"] for d in dock), 3),
        "dock_further_knockout_median_s": round(med(further), 3) if further else None,
        "dock_further_knockout_max_s": round(max(further), 3) if further else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a trained format 3 model folder")
    ap.add_argument("--slide", required=True, help="the slide the model was trained on (what the dock has open)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--genes", default=None, help="comma-separated genes to knock out (default: 5 most used TFs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--csv-copy", action="store_true", help="also measure a format 2 copy (one CSV per target)")
    ap.add_argument("--csv-cold-runs", type=int, default=1, help="cold perturb runs on the CSV copy (slow)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model_dir, work = Path(args.model), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    from spatial_deconv_gui.engines.perturb import model_dir as md

    if args.genes:
        genes = args.genes.split(",")
    else:
        from spatial_deconv_gui.engines.perturb.perturb import load_model
        from spatial_deconv_gui.perturb_api import gene_usage

        m = load_model(model_dir)
        tfs = sorted({n for n in m.store.mod_vocab.tolist() if "$" not in n and "#" not in n})
        usage = gene_usage(m, tfs).sort_values("n_targets", ascending=False, kind="stable")
        genes = usage.gene[:5].tolist()
    man = md.read_manifest(model_dir)
    res = {
        "model": str(model_dir),
        "n_targets": len(man["targets"]),
        "n_genes": len(man["genes"]),
        "genes": genes,
        "coef_files": len(md.shard_paths(model_dir)),
        "coef_bytes": sum(p.stat().st_size for p in md.shard_paths(model_dir)),
        "data_bytes": (model_dir / md.DATA).stat().st_size,
        "cpus": os.cpu_count(),
        "load_avg_start": load_average(),
        "store": measure(model_dir, args.slide, genes, work, args.repeats, "store"),
    }
    if args.csv_copy:
        csv_dir = work / (model_dir.name + "_csv")
        t0 = time.perf_counter()
        write_csv_copy(model_dir, csv_dir)
        res["csv_copy_write_s"] = round(time.perf_counter() - t0, 1)
        res["same_delta"] = run_json(["-c", SAME_SNIPPET, str(model_dir), str(csv_dir), ",".join(genes)])
        res["csv_cold_perturb_run"] = cold_runs(csv_dir, genes[0], work, args.csv_cold_runs, "csv")
        shutil.rmtree(csv_dir)
    res["load_avg_end"] = load_average()
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
