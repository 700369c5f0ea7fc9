"""The engines on Dask (issue 19): the same CLI command in-process, on `--scheduler local --n-workers 2` and on a
scheduler started by hand, on real data; answers compared, wall and CPU time recorded.

    # a cluster started by hand (the workers need this checkout on their path, like any user's install):
    PYTHONPATH=$PWD/src dask scheduler --host 127.0.0.1 --port 8786 --no-dashboard &
    PYTHONPATH=$PWD/src dask worker tcp://127.0.0.1:8786 --nworkers 2 --nthreads 1 --no-dashboard &

    python benchmarks/bench_dask.py rctd --work /tmp/dask/bench --address tcp://127.0.0.1:8786
    python benchmarks/bench_dask.py train --work /tmp/dask/bench --address tcp://127.0.0.1:8786 [--n-targets 800]
    python benchmarks/bench_dask.py compare-models /tmp/dask/bench/model_in-process /tmp/dask/bench/model_local

``rctd``: `spatial-deconv run` of the human lymph node Visium pair (1,000 spots x 2,000 genes, 11 types) in
doublet mode, chunks of 100 spots (10 tasks). ``train``: `perturb train` of the olfactory-bulb slide (260 spots,
DoRothEA A-C, CellChatDB mouse; see bench_train_speed.py) on its first ``--n-targets`` targets. CPU time is the
CLI process and its children (the LocalCluster's workers are its children; the hand-started workers are not, so
their CPU is not counted).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_speed import SHARED, load_average, ob_inputs, run_cli, train_args  # noqa: E402


def _runs(address: str | None) -> list[tuple[str, list[str]]]:
    runs = [("in-process", []), ("local, 2 workers", ["--scheduler", "local", "--n-workers", "2"])]
    if address:
        runs.append((f"hand-started {address}", ["--scheduler", address]))
    return runs


def _clean(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("stdout", "stderr")} | (
        {"stderr": r["stderr"][-600:]} if r["rc"] else {}
    )


def bench_rctd(work: Path, address: str | None) -> dict:
    import anndata as ad

    work.mkdir(parents=True, exist_ok=True)
    slide = SHARED / "spacexr_visium_lymphnode_human_spatial.h5ad"
    ref = SHARED / "spacexr_visium_lymphnode_human_reference.h5ad"
    res: dict = {"slide": slide.name, "reference": ref.name}
    props = {}
    for name, extra in _runs(address):
        out = work / f"rctd_{name.split(' ')[0].strip(',')}.h5ad"
        r = run_cli(
            [
                "run",
                str(slide),
                str(ref),
                "--method",
                "rctd",
                "--mode",
                "doublet",
                "--batch-size",
                "100",
                "-o",
                str(out),
            ]
            + extra
        )
        res[name] = _clean(r)
        if r["rc"] == 0:
            a = ad.read_h5ad(out)
            props[name] = (a.obsm["rctd_proportions"].to_numpy(), np.asarray(a.obs["rctd_spot_class"]).astype(str))
    base = props.get("in-process")
    for name, (p, cls) in props.items():
        if base is not None and name != "in-process":
            res[name]["max_abs_diff_proportions"] = float(np.nanmax(np.abs(p - base[0])))
            res[name]["same_nan_rows"] = bool((np.isnan(p) == np.isnan(base[0])).all())
            res[name]["same_spot_classes"] = bool((cls == base[1]).all())
    return res


def bench_train(work: Path, address: str | None, n_targets: int) -> dict:
    import anndata as ad
    import pandas as pd

    inp = ob_inputs(work / "ob")
    a = ad.read_h5ad(inp["slide"], backed="r")
    vs = set(a.var_names)
    grn = pd.read_parquet(inp["grn"])
    targets = [t for t in dict.fromkeys(grn.target) if t in vs][:n_targets]
    tfile = work / f"targets{n_targets}.txt"
    tfile.write_text("\n".join(targets))
    res: dict = {"n_targets": len(targets)}
    shards = {}
    for name, extra in _runs(address):
        out = work / f"model_{name.split(' ')[0].strip(',')}"
        r = run_cli(train_args(inp, out, "--targets", str(tfile), *extra))
        res[name] = _clean(r)
        if r["rc"] == 0:
            man = json.loads((out / "manifest.json").read_text())
            shards[name] = man["store_checksums"] if "store_checksums" in man else man.get("store")
            res[name]["train_time_s"] = man.get("train_time_s")
            res[name]["n_shards"] = len(shards[name])
    for name, s in shards.items():
        if name != "in-process" and "in-process" in shards:
            # numbered in arrival order on a cluster: the same set of shard checksums
            res[name]["same_shards_byte_for_byte"] = sorted(s.values()) == sorted(shards["in-process"].values())
    return res


def compare_models(a: Path, b: Path) -> dict:
    """Coefficients, intercepts, r² and gates of two model folders, entry by entry."""
    from spatial_deconv_gui.engines.perturb import model_dir as md

    def entries(d: Path):
        st = md.read_store(d, md.read_manifest(d))
        names = st.mod_vocab[st.mod_code]
        coefs = {
            (st.targets[t], int(c), names[st.mod_ptr[t] + m]): v
            for t, c, m, v in zip(st.nz_target, st.nz_cluster, st.nz_mod, st.nz_value)
        }
        order = np.argsort(st.targets)
        return coefs, st.r2[order], st.intercept[order], st.gated[order]

    (ca, ra, ia, ga), (cb, rb, ib, gb) = entries(a), entries(b)
    keys = set(ca) | set(cb)
    return {
        "nonzero_coefficients": [len(ca), len(cb)],
        "in_one_only": len(set(ca) ^ set(cb)),
        "max_abs_diff_coefficient": max(abs(ca.get(k, 0.0) - cb.get(k, 0.0)) for k in keys),
        "max_abs_diff_r2": float(np.nanmax(np.abs(ra - rb))),
        "max_abs_diff_intercept": float(np.max(np.abs(ia - ib))),
        "gates_differ": int((ga != gb).sum()),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["rctd", "train", "compare-models"])
    p.add_argument("models", nargs="*", help="compare-models: two model folders")
    p.add_argument("--work", default="/tmp/dask/bench")
    p.add_argument("--address", default=None, help="a Dask scheduler started by hand")
    p.add_argument("--n-targets", type=int, default=800)
    args = p.parse_args()
    work = Path(args.work)
    if args.what == "compare-models":
        print(json.dumps(compare_models(*map(Path, args.models)), indent=2))
        return
    load0 = load_average()
    res = bench_rctd(work, args.address) if args.what == "rctd" else bench_train(work, args.address, args.n_targets)
    res["load_start_end"] = [load0, load_average()]
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
