"""Early stopping of the Bayesian engines (cell2location, DestVI): the answer at the stop vs the answer at the
full default epoch count, same seed.

``full`` trains to the default epoch cap with early stopping off and keeps the proportions at every convergence
check (the progress stream's partial results) and the loss, in ``/tmp/bayes/<method>_<data>_full.npz``, so the
expensive run is done once. The checks draw no random numbers, so a run with early stopping on follows the same
trajectory up to its stop: the answer at the stop is the snapshot at that epoch, and ``rule`` replays the
convergence rule over the saved snapshots (no training). ``stop`` runs with the defaults (early stopping on) and
compares its answer with the saved full-length one.

    nice -n 5 python benchmarks/bench_early_stop.py full --method c2l --data lymphnode
    python benchmarks/bench_early_stop.py rule --method c2l --data lymphnode
    python benchmarks/bench_early_stop.py stop --method c2l --data lymphnode
    python benchmarks/bench_early_stop.py cli --method c2l --data lymphnode   # whole process, CLI defaults
    python benchmarks/bench_early_stop.py cli --method c2l --data lymphnode --threads 2   # ... with --n-threads 2
    python benchmarks/bench_early_stop.py table          # every saved pair, as RESULTS.md shows them
    # DestVI with a final learning-rate anneal: full length and a stopped run (trajectories kept), then compared
    python benchmarks/bench_early_stop.py full --method destvi --data hippocampus --set lr_anneal_epochs=200 \
        --tag _anneal200
    python benchmarks/bench_early_stop.py stop --method destvi --data hippocampus --set lr_anneal_epochs=200 \
        --set average_epochs=0 --set report_every=10 --against _anneal200
    python benchmarks/bench_early_stop.py compare --run A.npz --run B.npz --average 200
    # cell2location: a learning-rate schedule of phases EPOCHS:LR_START:LR_END (linear within a phase)
    python benchmarks/bench_early_stop.py schedule --phase 1500:0.02:0.02 --phase 2500:0.01:0.01 --phase 1300:0.01:0.002
    # ... several schedules in one process (they share the training of their common start), any data set, and
    # the epoch of the full trajectory each answer is nearest to
    python benchmarks/bench_early_stop.py schedule --data hippocampus --nearest \
        --schedule 5200:0.01:0.01,1300:0.01:0.002 --schedule 3886:0.01:0.01,3886:0.01:0.001
    # cell2location, lymph node: how far the Poisson maximum-likelihood (NNLS-like) answer is from the full one
    python benchmarks/bench_early_stop.py ml

Data: ``lymphnode`` / ``hippocampus`` (the shared spacexr Visium pairs), ``sim1k`` / ``sim5k`` / ``sim20k``
(``simulate.simulate_dataset``, seed 0, 6 types, 300 genes). One torch and one numba thread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SHARED_DATA", "/work/shared/data"))
OUT = Path(os.environ.get("BAYES_DIR", "/tmp/bayes"))
SIM_SPOTS = {"sim1k": 1000, "sim5k": 5000, "sim20k": 20000}


def load(data: str):
    import anndata as ad

    from spatial_deconv_gui.io.read import reference_input, spatial_input

    if data in SIM_SPOTS:
        from spatial_deconv_gui.simulate import simulate_dataset

        spatial, reference = simulate_dataset(n_spots=SIM_SPOTS[data], seed=0)
    else:
        name = {"lymphnode": "lymphnode_human", "hippocampus": "hippocampus"}[data]
        spatial = ad.read_h5ad(DATA / f"spacexr_visium_{name}_spatial.h5ad")
        reference = ad.read_h5ad(DATA / f"spacexr_visium_{name}_reference.h5ad")
    return spatial_input(spatial), reference_input(reference)


def make_config(method: str, data: str, **overrides):
    import dataclasses

    if method == "c2l":
        from spatial_deconv_gui.engines.c2l import C2LConfig as cls

        base = {"n_cells_per_location": 6.0} if data in SIM_SPOTS else {}
    else:
        from spatial_deconv_gui.engines.destvi import DestVIConfig as cls

        base = {}
    names = {f.name for f in dataclasses.fields(cls)}
    base.update({k: v for k, v in overrides.items() if k in names})
    return cls(n_threads=1, device="cpu", **base)


def run(method: str, data: str, **overrides):
    """(result, snapshots {epoch: proportions}, messages, wall s, CPU s) of one engine run."""
    from spatial_deconv_gui.engines.base import RunControl

    spatial, reference = load(data)
    config = make_config(method, data, **overrides)
    if method == "c2l":
        from spatial_deconv_gui.engines.c2l import run_c2l as runner
    else:
        from spatial_deconv_gui.engines.destvi import run_destvi as runner
    snaps: dict[int, np.ndarray] = {}
    messages: list[str] = []

    def on_event(ev):
        if ev.stage == "spatial" and ev.partial is not None:
            epoch = int(ev.message.split()[1].split("/")[0].rstrip(","))
            snaps[epoch] = np.asarray(ev.partial.proportions, np.float32).copy()
        if ev.message:
            messages.append(f"{ev.stage}: {ev.message}")

    t0, c0 = time.perf_counter(), time.process_time()
    result = runner(spatial, reference, config, RunControl(on_event, max_rate=0))
    return result, snaps, messages, time.perf_counter() - t0, time.process_time() - c0


def full_path(method: str, data: str, tag: str = "") -> Path:
    return OUT / f"{method}_{data}_full{tag}.npz"


def cmd_full(a):
    OUT.mkdir(parents=True, exist_ok=True)
    every = a.every or (100 if a.method == "c2l" else 10)
    # the references' own schedules: cell2location 30,000 epochs at lr 0.002, DestVI 2,000 at 0.003
    # DestVI: the final epoch's answer alone (average_epochs 0); averages are taken from the snapshots
    package = {"lr": 0.002, "max_epochs": 30000, "lr_anneal": 0.0} if a.method == "c2l" else {"average_epochs": 0}
    package.update(_parse_sets(a.set))
    result, snaps, _, wall, cpu = run(a.method, a.data, early_stop=False, report_every=every, **package)
    training = result.uns[f"{result.key}_training"]
    epochs = np.array(sorted(snaps))
    np.savez_compressed(
        full_path(a.method, a.data, a.tag),
        proportions=result.proportions,
        snap_epochs=epochs,
        snaps=np.stack([snaps[e] for e in epochs]) if len(epochs) else np.zeros((0,) + result.proportions.shape),
        loss=np.asarray(training["loss"], np.float64),
        cell_types=np.asarray(result.cell_types, dtype=str),
        wall_s=wall,
        cpu_s=cpu,
        load=os.getloadavg()[0],
    )
    print(
        json.dumps(
            {"saved": str(full_path(a.method, a.data, a.tag)), "wall_s": wall, "cpu_s": cpu, "load": os.getloadavg()}
        )
    )


def agreement(p: np.ndarray, q: np.ndarray) -> dict:
    from spatial_deconv_gui.engines.bayes import pearson_rows

    r = pearson_rows(np.asarray(p, np.float64), np.asarray(q, np.float64))
    r = r[np.isfinite(r)]
    return {
        "per_spot_r_median": float(np.median(r)),
        "per_spot_r_p05": float(np.quantile(r, 0.05)),
        "per_spot_r_min": float(r.min()),
        "share_spots_r_ge_099": float((r >= 0.99).mean()),
        "r_all": float(np.corrcoef(np.ravel(p), np.ravel(q))[0, 1]),
        "dominant_same": float((np.argmax(p, 1) == np.argmax(q, 1)).mean()),
    }


def replay(z, rule) -> tuple[int | None, list]:
    """The epoch the rule stops at on a saved trajectory (None: it runs to the cap) and its trace."""
    from spatial_deconv_gui.engines.convergence import ConvergenceMonitor

    monitor = ConvergenceMonitor(rule, len(z["loss"]))
    for epoch, props in zip(z["snap_epochs"], z["snaps"]):
        if epoch % rule.check_every:
            continue
        if monitor.update(int(epoch), props):
            return int(epoch), monitor.trace
    return None, monitor.trace


def averaged(z, epoch: int, span: int, every: int) -> np.ndarray:
    """DestVI's averaged answer (``average_epochs``) replayed on a saved trajectory: the mean of the snapshots at
    the checks (every ``every`` epochs) of the last ``span`` epochs up to ``epoch``, ``epoch`` included (the last
    epoch's answer is the saved final one)."""
    epochs = [int(e) for e in z["snap_epochs"]]
    cap = len(z["loss"])
    span = min(span, epoch // 4)
    out = []
    for e in range(epoch, epoch - span, -every):
        out.append(z["proportions"] if e == cap else z["snaps"][epochs.index(e)])
    return np.mean(out, axis=0)


def cmd_rule(a):
    """Replay the default rule (or ``--tol`` / ``--window`` / ``--smooth`` variants) on the saved trajectory."""
    import dataclasses

    if a.method == "c2l":
        from spatial_deconv_gui.engines.c2l.config import convergence_rule
    else:
        from spatial_deconv_gui.engines.destvi.config import convergence_rule

    z = np.load(full_path(a.method, a.data))
    base = convergence_rule(make_config(a.method, a.data))
    tols = a.tol or [base.tol]
    for window in a.window or [base.window]:
        for smooth in a.smooth or [base.smooth]:
            for tol, ratio in [(t, q) for t in tols for q in (a.noise_ratio or [base.noise_ratio])]:
                extra = {} if a.method == "c2l" else {"min_epochs": base.min_epochs - 3 * base.window + 3 * window}
                rule = dataclasses.replace(
                    base, tol=tol, window=window, check_every=window // 10, smooth=smooth, noise_ratio=ratio, **extra
                )
                stop, trace = replay(z, rule)
                out = {"method": a.method, "data": a.data, "tol": tol, "window": window, "smooth": smooth}
                out["noise_ratio"] = ratio
                out.update(stop_epoch=stop, cap=int(len(z["loss"])))
                if stop is not None:
                    i = list(z["snap_epochs"]).index(stop)
                    out.update({k: round(v, 4) for k, v in agreement(z["snaps"][i], z["proportions"]).items()})
                if stop is not None and a.method == "destvi":
                    for span in a.average or []:
                        cap, every = int(len(z["loss"])), rule.check_every
                        both = averaged(z, stop, span, every), averaged(z, cap, span, every)
                        out[f"averaged_{span}"] = {k: round(v, 4) for k, v in agreement(*both).items()}
                if a.trace:
                    out["trace"] = [(e, round(c, 4)) for e, c in trace[:: max(1, len(trace) // 30)]]
                print(json.dumps(out))


def _parse_sets(sets) -> dict:
    out = {}
    for item in sets or []:
        k, v = item.split("=", 1)
        out[k] = {"true": True, "false": False}.get(v.lower(), v)
        for cast in (int, float):
            try:
                out[k] = cast(v)
                break
            except ValueError:
                pass
    return out


def cmd_stop(a):
    OUT.mkdir(parents=True, exist_ok=True)
    overrides = _parse_sets(a.set)
    result, snaps, messages, wall, cpu = run(a.method, a.data, **overrides)
    z = np.load(full_path(a.method, a.data, a.against))
    info = result.uns[f"{result.key}_training"]
    out = {
        "method": a.method,
        "data": a.data,
        "settings": overrides,
        "stopped": info.get("stopped"),
        "epochs_run": int(info.get("epochs_run", len(info["loss"]))),
        "cap": int(len(z["loss"])),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "full_wall_s": round(float(z["wall_s"]), 1),
        "full_cpu_s": round(float(z["cpu_s"]), 1),
        "load": [round(x, 2) for x in os.getloadavg()],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "last_message": [m for m in messages if m.startswith("spatial")][-1],
        **agreement(result.proportions, z["proportions"]),
    }
    if a.method == "destvi":
        out["converged_at"] = int(info["converged_at"])
        out["answer_epochs"] = [int(e) for e in info["answer_epochs"]]
    tag = "".join(f"_{k}{v}" for k, v in overrides.items()) + (f"_vs{a.against}" if a.against else "")
    if snaps:  # the trajectory too (--set report_every=10), for answers averaged other ways (`compare`)
        epochs = np.array(sorted(snaps))
        np.savez_compressed(
            OUT / f"{a.method}_{a.data}_stop{tag}.npz",
            proportions=result.proportions,
            snap_epochs=epochs,
            snaps=np.stack([snaps[e] for e in epochs]),
            loss=np.asarray(info["loss"], np.float64),
            converged_at=int(info.get("converged_at", 0)),
            wall_s=wall,
            cpu_s=cpu,
        )
    (OUT / f"{a.method}_{a.data}_stop{tag}.json").write_text(json.dumps(out))
    print(json.dumps(out))


def cmd_cli(a):
    """Whole process with the defaults: ``spatial-deconv run`` under /usr/bin/time, its answer vs the full one."""
    import subprocess
    import tempfile

    import anndata as ad

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        tmp = Path(tmp)
        if a.data in SIM_SPOTS:
            from spatial_deconv_gui.simulate import simulate_dataset

            spatial, reference = simulate_dataset(n_spots=SIM_SPOTS[a.data], seed=0)
            sp_path, ref_path = tmp / "spatial.h5ad", tmp / "reference.h5ad"
            spatial.write_h5ad(sp_path)
            reference.write_h5ad(ref_path)
            extra = ["--n-cells-per-location", "6"] if a.method == "c2l" else []
        else:
            name = {"lymphnode": "lymphnode_human", "hippocampus": "hippocampus"}[a.data]
            sp_path = DATA / f"spacexr_visium_{name}_spatial.h5ad"
            ref_path = DATA / f"spacexr_visium_{name}_reference.h5ad"
            extra = []
        out = tmp / "out.h5ad"
        cmd = [sys.executable, "-m", "spatial_deconv_gui.cli", "run", str(sp_path), str(ref_path)]
        cmd += ["--method", a.method, *extra, "-o", str(out), "--device", "cpu"]
        if a.threads:
            cmd += ["--n-threads", str(a.threads)]
        load_before = os.getloadavg()
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        stats = dict(
            line.strip().split(": ", 1) for line in proc.stderr.splitlines() if ": " in line and line.startswith("\t")
        )
        res = ad.read_h5ad(out)
        props = res.obsm[f"{a.method}_proportions"].to_numpy()
        info = res.uns[a.method]
    wall = stats["Elapsed (wall clock) time (h:mm:ss or m:ss)"]
    parts = [float(x) for x in wall.split(":")]
    wall_s = sum(x * 60**i for i, x in enumerate(reversed(parts)))
    row = {
        "method": a.method,
        "data": a.data,
        "command": " ".join(cmd[1:]),
        "wall_s": round(wall_s, 1),
        "cpu_s": round(float(stats["User time (seconds)"]) + float(stats["System time (seconds)"]), 1),
        "peak_rss_gb": round(int(stats["Maximum resident set size (kbytes)"]) / 1024**2, 2),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "stop_reason": str(info.get("stop_reason")),
        "epochs_run": int(info.get("epochs_run", -1)),
        "last_progress": [ln for ln in proc.stderr.splitlines() if "epoch" in ln][-1:],
    }
    if full_path(a.method, a.data).exists():
        row.update(agreement(props, np.load(full_path(a.method, a.data))["proportions"]))
    tag = f"_threads{a.threads}" if a.threads else ""
    (OUT / f"{a.method}_{a.data}_cli{tag}.json").write_text(json.dumps(row))
    print(json.dumps(row))


def cmd_compare(a):
    """DestVI: two saved trajectories (``--run`` A ``--run`` B: npz files of `full` / `stop` with the final epoch's
    answer as ``proportions``) compared at their ends: the final epochs' answers and answers averaged over the
    checks (every ``--every`` epochs) of the last ``--average`` epochs of each."""
    za, zb = (np.load(path) for path in a.run)
    out = {"a": a.run[0], "b": a.run[1], "epochs": [int(len(za["loss"])), int(len(zb["loss"]))]}
    out["final"] = {k: round(v, 4) for k, v in agreement(za["proportions"], zb["proportions"]).items()}
    for span in a.average or []:
        both = (averaged(z, int(len(z["loss"])), span, a.every or 20) for z in (za, zb))
        out[f"averaged_{span}"] = {k: round(v, 4) for k, v in agreement(*both).items()}
    print(json.dumps(out))


def cmd_table(a):
    rows = []
    for path in sorted(OUT.glob("*_stop.json")):
        d = json.loads(path.read_text())
        rows.append(
            f"| {d['method']} | {d['data']} | {d['epochs_run']} / {d['cap']} | {d['per_spot_r_median']:.4f} "
            f"({d['per_spot_r_p05']:.4f}) | {d['share_spots_r_ge_099']:.3f} | {d['dominant_same']:.3f} | "
            f"{d['cpu_s']} ({d['wall_s']}) | {d['full_cpu_s']} ({d['full_wall_s']}) |"
        )
    print(
        "| method | data | epochs stop / cap | per-spot r median (p05) | spots r ≥ 0.99 | dominant same |"
        " stop CPU s (wall) | full CPU s (wall) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


def _c2l_setup(data: str = "lymphnode"):
    """The cell2location spatial model of a data set as a default run builds it (seed 0, regression signatures
    over the package heuristic's epochs): (model, count data, slide counts, signatures)."""
    import scipy.sparse as sp
    import torch

    from spatial_deconv_gui.engines.bayes import CountData
    from spatial_deconv_gui.engines.c2l import engine as E
    from spatial_deconv_gui.engines.c2l.model import (
        SpatialModel,
        SpatialPriors,
        default_reference_epochs,
        detection_mean_for,
    )

    spatial, reference = load(data)
    config = make_config("c2l", data)
    s_cols, r_cols, _, _ = E.select_genes(spatial, reference, config)
    torch.manual_seed(config.seed)
    labels = np.asarray(reference.cell_types).astype(str)
    ref_counts = sp.csr_matrix(reference.counts)[:, r_cols]
    epochs = default_reference_epochs(ref_counts.shape[0])
    signatures, _ = E.fit_reference_signatures(ref_counts, labels, reference.type_names, epochs, seed=config.seed)
    counts = sp.csr_matrix(spatial.counts)[:, s_cols]
    totals = np.asarray(counts.sum(1)).ravel()
    priors = SpatialPriors(
        n_cells_per_location=config.n_cells_per_location,
        detection_alpha=config.detection_alpha,
        detection_mean=detection_mean_for(totals, signatures, config.n_cells_per_location),
        n_groups=config.n_groups,
    )
    return SpatialModel(signatures, counts.shape[0], priors), CountData(counts), counts, signatures


def _schedule_rates(phases: list[str]) -> np.ndarray:
    """Per-epoch learning rates of phases EPOCHS:LR_START:LR_END, linear within a phase and reaching LR_END at
    its last epoch (the engine's anneal is such a phase)."""
    lrs: list[float] = []
    for phase in phases:
        n, start, end = phase.split(":")
        n, start, end = int(n), float(start), float(end)
        lrs += [start + (end - start) * (i + 1) / n for i in range(n)]
    return np.asarray(lrs, np.float64)


def cmd_schedule(a):
    """cell2location with learning-rate schedules of phases, each vs the saved full answer of ``--data``.

    Every ``--schedule`` (comma-separated phases; or the ``--phase`` list as one schedule) trains the same model
    with the engine's step (the hand-differentiated ELBO, full batch, seed 0); schedules that share their first
    epochs' rates share that training: the state (parameters, Adam's moments, the random generator) is kept at
    each epoch where two schedules part and restored for the later one, which continues bit for bit as a
    separate run would."""
    import copy

    import torch

    schedules = [p.split(",") for p in a.schedule or []] + ([a.phase] if a.phase else [])
    rates = [_schedule_rates(s) for s in schedules]

    def common(x, y):
        n = min(len(x), len(y))
        differ = np.flatnonzero(x[:n] != y[:n])
        return int(differ[0]) if len(differ) else n

    model, data, _, _ = _c2l_setup(a.data)
    z = np.load(full_path("c2l", a.data))
    full = z["proportions"]
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=float(rates[0][0]))
    start_state = copy.deepcopy((model.state_dict(), opt.state_dict(), gen.get_state()))
    saved = {}  # (epoch, rates before it) -> state there
    order = sorted(range(len(rates)), key=lambda i: tuple(rates[i]))
    for rank, i in enumerate(order):
        lrs = rates[i]
        keep = {common(lrs, rates[j]) for j in order[rank + 1 :]}
        begin, state = 0, start_state
        for (epoch, prefix), st in saved.items():
            if begin < epoch <= len(lrs) and lrs[:epoch].tobytes() == prefix:
                begin, state = epoch, st
        model.load_state_dict(state[0])
        opt.load_state_dict(copy.deepcopy(state[1]))  # Adam would update the kept moments in place
        gen.set_state(state[2])
        t0, c0 = time.perf_counter(), time.process_time()
        for epoch in range(begin, len(lrs)):
            if epoch in keep:
                saved[(epoch, lrs[:epoch].tobytes())] = copy.deepcopy(
                    (model.state_dict(), opt.state_dict(), gen.get_state())
                )
            opt.param_groups[0]["lr"] = float(lrs[epoch])
            opt.zero_grad(set_to_none=True)
            model.fused_negative_elbo(data, gen).backward()
            opt.step()
        if len(lrs) in keep:
            saved[(len(lrs), lrs.tobytes())] = copy.deepcopy((model.state_dict(), opt.state_dict(), gen.get_state()))
        ab = model.abundance_mean().double().numpy()
        out = {"data": a.data, "phases": schedules[i], "epochs": len(lrs), "lr_sum": round(float(lrs.sum()), 2)}
        out.update(epochs_trained=len(lrs) - begin, cpu_s=round(time.process_time() - c0, 1))
        out.update(wall_s=round(time.perf_counter() - t0, 1), load=[round(x, 2) for x in os.getloadavg()])
        props = ab / ab.sum(1, keepdims=True)
        out.update({k: round(v, 5) for k, v in agreement(props, full).items()})
        if a.nearest:
            # which epoch of the package schedule's own trajectory this answer is closest to (ahead or behind)
            near = [
                (agreement(props, snap)["per_spot_r_median"], int(e)) for e, snap in zip(z["snap_epochs"], z["snaps"])
            ]
            r_best, e_best = max(near)
            snap = z["snaps"][list(z["snap_epochs"]).index(e_best)]
            out.update(nearest_full_epoch=e_best, nearest_r_median=round(r_best, 5))
            out.update(nearest_dominant_same=round(agreement(props, snap)["dominant_same"], 5))
        print(json.dumps(out), flush=True)


def cmd_ml(a):
    """The Poisson maximum-likelihood abundances with the signatures fixed (multiplicative updates: what an
    NNLS-style start would give) against the saved full-length cell2location answer and its snapshots."""
    _, _, counts, signatures = _c2l_setup("lymphnode")
    x = counts.toarray().astype(np.float64)
    z = np.load(full_path("c2l", "lymphnode"))
    w = np.full((x.shape[0], signatures.shape[0]), x.sum(1).mean() / signatures.sum())
    for _ in range(1000):
        w *= (x / np.maximum(w @ signatures, 1e-12)) @ signatures.T / signatures.sum(1)
    ml = w / w.sum(1, keepdims=True)
    out = {"ml_vs_full": agreement(ml, z["proportions"]), "mean_largest_share_ml": float(ml.max(1).mean())}
    out["mean_largest_share_full"] = float(z["proportions"].max(1).mean())
    snaps = {}
    for epoch in (1000, 5000, 10000, 20000, 30000):
        if epoch in z["snap_epochs"]:
            snap = z["snaps"][list(z["snap_epochs"]).index(epoch)]
            snaps[epoch] = round(agreement(snap, ml)["per_spot_r_median"], 3)
    out["snapshot_vs_ml_per_spot_r_median"] = snaps
    print(json.dumps(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=("full", "rule", "stop", "cli", "table", "schedule", "ml", "compare"))
    p.add_argument("--method", choices=("c2l", "destvi"), default="c2l")
    p.add_argument("--data", choices=("lymphnode", "hippocampus", *SIM_SPOTS), default="lymphnode")
    p.add_argument("--every", type=int, default=0, help="full: snapshot every this many epochs")
    p.add_argument("--tol", type=float, action="append", help="rule: tolerance(s) to replay")
    p.add_argument("--window", type=int, action="append", help="rule: window(s) to replay")
    p.add_argument("--smooth", type=int, action="append", help="rule: smoothing(s) to replay")
    p.add_argument("--noise-ratio", type=float, action="append", help="rule: DestVI noise ratio(s) to replay")
    p.add_argument("--trace", action="store_true", help="rule: print the change at the checks")
    p.add_argument(
        "--average", type=int, action="append", help="rule, DestVI: also compare answers averaged over this many epochs"
    )
    p.add_argument("--set", action="append", help="stop, full: a config field, e.g. --set lr=0.01 (repeatable)")
    p.add_argument("--tag", default="", help="full: suffix of the saved file (<method>_<data>_full<tag>.npz)")
    p.add_argument(
        "--nearest", action="store_true", help="schedule: also the full trajectory's snapshot nearest each answer"
    )
    p.add_argument("--against", default="", help="stop: compare with <method>_<data>_full<AGAINST>.npz")
    p.add_argument("--run", action="append", help="compare: two saved .npz trajectories (full / stop)")
    p.add_argument("--threads", type=int, default=0, help="cli: pass --n-threads N (0: the CLI's default)")
    p.add_argument("--phase", action="append", help="schedule: EPOCHS:LR_START:LR_END (repeatable, in order)")
    p.add_argument(
        "--schedule", action="append", help="schedule: comma-separated phases, one schedule (repeatable; shared starts)"
    )
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    commands = {"full": cmd_full, "rule": cmd_rule, "stop": cmd_stop, "cli": cmd_cli, "table": cmd_table}
    commands.update(schedule=cmd_schedule, ml=cmd_ml, compare=cmd_compare)
    commands[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
