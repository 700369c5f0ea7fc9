"""DestVI spatial epochs with the frozen decoder's products in float32 vs bfloat16 (``decoder_precision``), same
model, same process, alternating: CPU seconds per epoch (process time, one torch and one numba thread).

    python benchmarks/bench_destvi_precision.py --data lymphnode --epochs 3 --rounds 3
    # the answer: float32 vs bfloat16 (and averaged) on the engine tests' simulated slide with known truth
    python benchmarks/bench_destvi_precision.py --truth

The single-cell model is trained for ``--sc-epochs`` only (its weights do not change the cost of an epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="lymphnode", choices=("lymphnode", "hippocampus", "sim1k", "sim5k"))
    p.add_argument("--epochs", type=int, default=3, help="spatial epochs per precision and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sc-epochs", type=int, default=5)
    p.add_argument("--profile", choices=("float32", "bfloat16"), help="instead: torch's profile of 2 epochs")
    p.add_argument("--truth", action="store_true", help="instead: the answer vs known truth, per precision")
    a = p.parse_args(argv)
    if a.truth:
        return truth()
    import scipy.sparse as sp
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_early_stop import load

    from spatial_deconv_gui.engines.base import RunControl
    from spatial_deconv_gui.engines.destvi import DestVIConfig
    from spatial_deconv_gui.engines.destvi.engine import _adam, _batches, fit_single_cell, shared_genes
    from spatial_deconv_gui.engines.destvi.model import SpatialDeconv, vamp_prior

    torch.set_num_threads(1)
    torch.manual_seed(0)
    spatial, reference = load(a.data)
    config = DestVIConfig(sc_epochs=a.sc_epochs, n_threads=1, device="cpu")
    s_cols, r_cols, _ = shared_genes(spatial, reference)
    types = list(reference.type_names)
    labels = np.array([types.index(t) for t in np.asarray(reference.cell_types).astype(str)])
    xr = torch.as_tensor(sp.csr_matrix(reference.counts)[:, r_cols].toarray(), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    sc, _ = fit_single_cell(xr, torch.as_tensor(labels), len(types), config, RunControl(), gen)
    vamp = vamp_prior(sc, xr, labels, p=config.vamp_prior_p, n_init=3)
    xs = torch.as_tensor(sp.csr_matrix(spatial.counts)[:, s_cols].toarray(), dtype=torch.float32)
    model = SpatialDeconv(sc, vamp)
    opt = _adam(model.parameters(), config.lr)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        model.decoder_precision = a.profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                model.train()
                for idx in _batches(len(xs), config.batch_size, gen, "cpu"):
                    opt.zero_grad(set_to_none=True)
                    model.loss(xs[idx], 1.0).backward()
                    opt.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(a.rounds):
        for precision in times:
            model.decoder_precision = precision
            for _ in range(a.epochs):
                c0 = time.process_time()
                model.train()
                for idx in _batches(len(xs), config.batch_size, gen, "cpu"):
                    opt.zero_grad(set_to_none=True)
                    model.loss(xs[idx], 1.0).backward()
                    opt.step()
                times[precision].append(time.process_time() - c0)
    med = {k: float(np.median(v[1:])) for k, v in times.items()}
    out = {"data": a.data, "spots_genes": list(xs.shape), "types": len(types), "cpu_s_per_epoch_median": med}
    out.update(ratio=round(med["float32"] / med["bfloat16"], 2), load=[round(x, 2) for x in os.getloadavg()])
    out["all"] = {k: [round(x, 3) for x in v] for k, v in times.items()}
    print(json.dumps(out))


def truth():
    """CondSCVI 50 + DestVI 100 epochs on tests/test_destvi_engine.py's slide (types A/B/C, two sub-states of A):
    proportions vs truth, gamma_A vs the sub-state, agreement with the float32 seed-0 answer."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(repo, "tests"))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_early_stop import agreement
    from test_destvi_engine import simulate_substates

    from spatial_deconv_gui.engines.destvi import DestVIConfig, run_destvi

    s, r, props, state = simulate_substates()
    runs = [
        ("fp32", dict(decoder_precision="float32", average_epochs=0)),
        ("bf16", dict(decoder_precision="bfloat16", average_epochs=0)),
        ("fp32_avg", dict(decoder_precision="float32")),
        ("bf16_avg", dict(decoder_precision="bfloat16")),
        ("fp32_seed1", dict(decoder_precision="float32", average_epochs=0, seed=1)),
    ]
    first = None
    for name, kw in runs:
        c = time.process_time()
        out = run_destvi(s, r, DestVIConfig(**{"sc_epochs": 50, "max_epochs": 100, "seed": 0, "n_threads": 1, **kw}))
        g = out.obsm["destvi_gamma_A"].to_numpy()
        sel = props[:, 0] > 0.2
        gc = g[sel] - g[sel].mean(0)
        pc1 = gc @ np.linalg.svd(gc, full_matrices=False)[2][0]
        thr = np.median(pc1)
        acc = max(np.mean((pc1 > thr) == state[sel]), np.mean((pc1 <= thr) == state[sel]))
        row = {
            "run": name,
            "cpu_s": round(time.process_time() - c, 1),
            "truth_r": round(float(np.corrcoef(out.proportions.ravel(), props.ravel())[0, 1]), 4),
            "gamma_r": round(abs(float(np.corrcoef(pc1, state[sel])[0, 1])), 4),
            "split_acc": round(float(acc), 4),
        }
        if first is None:
            first = out.proportions
        else:
            agree = agreement(out.proportions, first)
            row["vs_fp32"] = {k: round(agree[k], 4) for k in ("per_spot_r_median", "r_all", "dominant_same")}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
