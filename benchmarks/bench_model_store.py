"""Issue 17: loading a model folder, CSV-per-target layout (format 2) vs the coefficient store (format 3).

Trains (once) a model of N targets on the mouse olfactory bulb with the current code (format 3), writes a copy
in the format 2 layout (one CSV per target, as training wrote before), checks that both give the same
coefficients and knockout, then times in fresh processes (median of ``--repeats``):

* ``load_model`` (after the imports) and the part of it that is not the coefficients (``data.h5ad`` and the
  received ligands), to extrapolate per target to the full 4,266 targets;
* a cold ``spatial-deconv perturb run MODEL --gene TF --output x.h5ad`` (whole process).

    python benchmarks/bench_model_store.py --model /tmp/ob/bench/model300 --work /tmp/ob/bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
N_FULL = 4266  # GRN (confidence A-C) targets measured on the slide

LOAD_SNIPPET = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
from spatial_deconv_gui.engines.perturb.perturb import load_model
from spatial_deconv_gui.engines.perturb import model_dir as md
from spatial_deconv_gui.io.read import read_h5ad
import numpy as np
t0 = time.perf_counter(); m = load_model(sys.argv[1]); t_load = time.perf_counter() - t0
t0 = time.perf_counter(); read_h5ad(f"{sys.argv[1]}/{md.DATA}"); np.load(f"{sys.argv[1]}/{md.RECEIVED}")
t_fixed = time.perf_counter() - t0
print(json.dumps({"load_s": t_load, "data_s": t_fixed, "n_targets": len(m.coef_tables)}))
"""


def write_old_layout(new_dir: Path, old_dir: Path) -> None:
    """``new_dir`` as training wrote it before the store: one CSV per target, format 2."""
    from spatial_deconv_gui.engines.perturb import model_dir as md
    from spatial_deconv_gui.engines.perturb.perturb import load_model

    shutil.rmtree(old_dir, ignore_errors=True)
    shutil.copytree(new_dir, old_dir)
    model = load_model(new_dir)
    for p in md.shard_paths(old_dir):
        p.unlink()
    for t, df in model.coef_tables.items():
        bcols = [c for c in df.columns if c.startswith("beta_")]
        md.write_coefs_csv(
            old_dir,
            t,
            df["cluster"],
            df["n_cells"],
            df["r2"],
            df["gated"],
            df["intercept"],
            df[bcols].to_numpy(),
            [c[5:] for c in bcols],
        )
    man = md.read_manifest(old_dir)
    man.pop(md.STORE_CHECKSUMS)
    man["format_version"] = 2
    md.write_manifest(old_dir, man)


def check_same(new_dir: Path, old_dir: Path, gene: str) -> float:
    import warnings

    from spatial_deconv_gui.engines.perturb.perturb import load_model, simulate_perturbation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = load_model(new_dir), load_model(old_dir)
    assert a.lr_pairs == b.lr_pairs and a.tfl_pairs == b.tfl_pairs
    for xs, ys in ((a.B_tf, b.B_tf), (a.B_lr, b.B_lr), (a.B_tfl, b.B_tfl)):
        for x, y in zip(xs, ys):
            assert (x != y).nnz == 0
    return float(
        np.abs(simulate_perturbation(a, gene, 0.0, n_steps=4) - simulate_perturbation(b, gene, 0.0, n_steps=4)).max()
    )


def most_used_tf(model_dir: Path) -> str:
    from spatial_deconv_gui.engines.perturb import model_dir as md

    store = md.concat_stores([md.read_shard(p) for p in md.shard_paths(model_dir)])
    genes = set(md.read_manifest(model_dir)["genes"])
    names, counts = np.unique(store.mod_names, return_counts=True)
    tfs = [(c, str(n)) for n, c in zip(names, counts) if "$" not in n and "#" not in n and n in genes]
    return max(tfs)[1]


def timed(cmd: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
    return out


def load_runs(model_dir: Path, repeats: int) -> list[dict]:
    return [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", LOAD_SNIPPET, str(model_dir)], check=True, capture_output=True, text=True
            ).stdout
        )
        for _ in range(repeats)
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/ob/bench/model300")
    ap.add_argument("--work", default="/tmp/ob/bench")
    ap.add_argument("--targets", default="/tmp/ob/targets300.txt")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    new_dir, work = Path(args.model), Path(args.work)
    cli = str(Path(sys.executable).parent / "spatial-deconv")
    if not (new_dir / "manifest.json").exists():
        subprocess.run(
            [
                cli,
                "perturb",
                "train",
                "/tmp/ob/ob_lognorm.h5ad",
                "--grn",
                "/tmp/ob/grn_abc.parquet",
                "--lr",
                str(SHARED / "lr_cellchatdb_mouse.parquet"),
                "--cluster-col",
                "layer",
                "--out",
                str(new_dir),
                "--targets",
                args.targets,
                "--quiet",
            ],
            check=True,
        )
    old_dir = work / (new_dir.name + "_csv")
    write_old_layout(new_dir, old_dir)
    tf = most_used_tf(new_dir)
    max_diff = check_same(new_dir, old_dir, tf)
    size = {
        name: sum(p.stat().st_size for p in (d / "coefs").iterdir() if p.is_file())
        for name, d in (("csv", old_dir), ("store", new_dir))
    }
    n_files = {
        name: sum(1 for p in (d / "coefs").iterdir() if p.is_file())
        for name, d in (("csv", old_dir), ("store", new_dir))
    }
    loads = {name: load_runs(d, args.repeats) for name, d in (("csv", old_dir), ("store", new_dir))}
    runs = {
        name: timed(
            [cli, "perturb", "run", str(d), "--gene", tf, "--output", str(work / f"ko_{name}.h5ad"), "--quiet"],
            args.repeats,
        )
        for name, d in (("csv", old_dir), ("store", new_dir))
    }
    n = loads["store"][0]["n_targets"]
    res = {"n_targets": n, "tf": tf, "max_abs_delta_diff": max_diff, "coef_bytes": size, "coef_files": n_files}
    for name in ("csv", "store"):
        load = statistics.median(r["load_s"] for r in loads[name])
        fixed = statistics.median(r["data_s"] for r in loads[name])
        per_target = max(load - fixed, 0.0) / n
        res[name] = {
            "load_s": [round(r["load_s"], 3) for r in loads[name]],
            "load_median_s": round(load, 3),
            "data_part_s": round(fixed, 3),
            "coef_per_target_ms": round(1e3 * per_target, 3),
            f"coef_part_at_{N_FULL}_s": round(per_target * N_FULL, 1),
            "coef_bytes_per_target": round(size[name] / n),
            f"coef_bytes_at_{N_FULL}_MB": round(size[name] / n * N_FULL / 1e6, 1),
            "perturb_run_s": [round(t, 2) for t in runs[name]],
            "perturb_run_median_s": round(statistics.median(runs[name]), 2),
        }
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
