"""CPU cost of one cell2location spatial-model epoch (full batch) on a shared Visium pair, 1 torch thread.

Times the forward pass, forward + backward, a whole Adam step, the NB likelihood's forward + backward alone and
the guide's draw, as CPU milliseconds per call (``time.process_time``; steady state after 10 warm-up calls). The
signatures are the reference regression's (1,000 epochs, as a default run). To compare two versions of the code,
run it with each on ``PYTHONPATH``, alternating, and keep each side's numbers from the same load (``--ab N``: the
autograd -ELBO and the fused one that training uses, in alternating blocks within one process):

    git archive b20ccd4 src | tar -x -C /tmp/old
    for i in 1 2; do for src in /tmp/old/src src; do PYTHONPATH=$src python benchmarks/bench_c2l_epoch.py; done; done
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="lymphnode", choices=["lymphnode", "hippocampus"])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument(
        "--ab",
        type=int,
        default=0,
        help="instead: this many alternating blocks of --calls Adam steps with the autograd -ELBO and the fused one "
        "(same process, same model), their median CPU ms per step",
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import bench_early_stop as b

    import spatial_deconv_gui
    from spatial_deconv_gui.engines.bayes import CountData, nb_loglik
    from spatial_deconv_gui.engines.c2l import engine as E
    from spatial_deconv_gui.engines.c2l.model import SpatialModel, SpatialPriors, detection_mean_for

    spatial, reference = b.load(a.data)
    config = b.make_config("c2l", a.data)
    s_cols, r_cols, genes, _ = E.select_genes(spatial, reference, config)
    labels = np.asarray(reference.cell_types).astype(str)
    ref_counts = sp.csr_matrix(reference.counts)[:, r_cols]
    signatures, _ = E.fit_reference_signatures(ref_counts, labels, reference.type_names, 1000)
    counts = sp.csr_matrix(spatial.counts)[:, s_cols]
    totals = np.asarray(counts.sum(1)).ravel()
    priors = SpatialPriors(detection_mean=detection_mean_for(totals, signatures, config.n_cells_per_location))
    data = CountData(counts)
    model = SpatialModel(signatures, counts.shape[0], priors)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    mu = (torch.rand(counts.shape, generator=gen) + 0.1).requires_grad_()
    alpha = (torch.rand(1, counts.shape[1], generator=gen) + 1).requires_grad_()

    # what training calls: the fused -ELBO where the code has it (issue 21), else the autograd one
    negative_elbo = getattr(model, "fused_negative_elbo", model.negative_elbo)

    def forward():
        with torch.no_grad():
            negative_elbo(data, gen)

    def forward_backward():
        opt.zero_grad(set_to_none=True)
        negative_elbo(data, gen).backward()

    def step():
        forward_backward()
        opt.step()

    def likelihood():
        nb_loglik(mu, alpha, data).backward()

    def draw():
        with torch.no_grad():
            model.guide.sample(gen)

    def cpu_ms(f) -> float:
        for _ in range(10):
            f()
        c = time.process_time()
        for _ in range(a.calls):
            f()
        return round((time.process_time() - c) / a.calls * 1e3, 3)

    out = {"code": str(Path(spatial_deconv_gui.__file__).parents[1]), "data": a.data, "spots_x_genes": counts.shape}
    out["threads"] = torch.get_num_threads()
    out["load_before"] = [round(x, 2) for x in os.getloadavg()]
    if a.ab:
        # load drifts over seconds on a shared machine: blocks of the two alternate, so each pair sees the same load
        blocks: dict[str, list[float]] = {"autograd": [], "fused": []}
        for _ in range(a.ab):
            for name, f in (("autograd", model.negative_elbo), ("fused", model.fused_negative_elbo)):

                def ab_step(f=f):
                    opt.zero_grad(set_to_none=True)
                    f(data, gen).backward()
                    opt.step()

                blocks[name].append(cpu_ms(ab_step))
        for name, times in blocks.items():
            out[f"{name}_step_cpu_ms_median"] = round(float(np.median(times)), 3)
            out[f"{name}_step_cpu_ms_blocks"] = times
        ratios = np.array(blocks["autograd"]) / np.array(blocks["fused"])
        out["ratio_median"], out["ratio_min_max"] = (
            round(float(np.median(ratios)), 2),
            [
                round(float(ratios.min()), 2),
                round(float(ratios.max()), 2),
            ],
        )
        out["load_after"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(out))
        return
    for name, f in (("forward", forward), ("forward_backward", forward_backward), ("step", step)):
        out[f"{name}_cpu_ms"] = cpu_ms(f)
    out["nb_likelihood_fwd_bwd_cpu_ms"] = cpu_ms(likelihood)
    out["guide_draw_cpu_ms"] = cpu_ms(draw)
    out["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
