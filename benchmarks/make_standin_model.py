"""A full-size stand-in of the olfactory-bulb model for timing loads and knockouts, built from a trained subset.

Training the full model (4,266 targets) takes about an hour of CPU with today's code. Loading and propagation
costs depend on the sizes - targets, genes, modulators per target, non-zero coefficients, received-ligand
channels - not on which numbers the coefficients hold. This script gives every one of the slide's GRN
targets (DoRothEA A-C, measured) the fit of trained target ``j mod n`` of a trained subset model (its
modulators, minus any that involve the new target itself, and their coefficients), over the gene set a full
training would keep, and writes a complete format 3 folder (shards of the subset's batch size, manifest with
checksums). Its knockouts are NOT the biology of the full model: use it for timings and memory only.

    python benchmarks/make_standin_model.py --subset /tmp/knock/model300 --slide /tmp/knock/ob_lognorm.h5ad \
        --grn /tmp/knock/grn_abc.parquet --lr ../shared/data/lr_cellchatdb_mouse.parquet --out /tmp/knock/standin
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from spatial_deconv_gui.engines.perturb import model_dir as md  # noqa: E402
from spatial_deconv_gui.engines.perturb import priors  # noqa: E402
from spatial_deconv_gui.engines.perturb.modulators import parse_modulator  # noqa: E402
from spatial_deconv_gui.io.write import write_h5ad_atomic  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subset", required=True, help="a trained format 3 model folder (a subset of the targets)")
    ap.add_argument("--slide", required=True, help="the log-normalised slide it was trained on")
    ap.add_argument("--grn", required=True)
    ap.add_argument("--lr", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sub, out = Path(args.subset), Path(args.out)
    man = md.read_manifest(sub)
    store = md.read_store(sub, man)
    slide = ad.read_h5ad(args.slide)
    var = list(map(str, slide.var_names))
    vset = set(var)
    grn, _ = priors.load_grn(args.grn)
    lr, _ = priors.load_lr(args.lr)
    targets = [g for g in dict.fromkeys(grn.target) if g in vset]
    needed = set(grn.tf) | set(grn.target) | set(lr.ligand) | set(lr.receptor)
    genes = [g for g in var if g in needed]  # what a full training keeps
    gset = set(genes)
    n_sub = len(store.targets)
    per_shard = int(np.ceil(n_sub / len(man[md.STORE_CHECKSUMS])))
    C = len(store.clusters)
    shutil.rmtree(out, ignore_errors=True)
    (out / md.COEFS).mkdir(parents=True)
    sums, n_mods, fits = {}, {}, []
    for j, t in enumerate(targets):
        row = j % n_sub
        names = store.mod_vocab[store.mod_code[store.mod_ptr[row] : store.mod_ptr[row + 1]]].tolist()
        coef = np.zeros((C, len(names)))
        lo, hi = np.searchsorted(store.nz_target, [row, row + 1])
        coef[store.nz_cluster[lo:hi], store.nz_mod[lo:hi]] = store.nz_value[lo:hi]
        keep = [k for k, n in enumerate(names) if t not in parse_modulator(n)[1] and set(parse_modulator(n)[1]) <= gset]
        fits.append(
            (
                t,
                store.n_cells[row],
                store.r2[row],
                store.gated[row],
                store.intercept[row],
                coef[:, keep],
                [names[k] for k in keep],
            )
        )
        n_mods[t] = len(keep)
        if len(fits) == per_shard or j == len(targets) - 1:
            key, sha = md.write_shard(out, md.store_from_fits(store.clusters.tolist(), fits))
            sums[key] = sha
            fits = []
    data = ad.read_h5ad(sub / md.DATA)
    cols = slide.var_names.get_indexer(genes)
    X = slide.X[:, cols]
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    assert list(map(str, data.obs_names)) == list(map(str, slide.obs_names))
    full = ad.AnnData(X=np.asarray(X, dtype=np.float64), obs=data.obs.copy(), var=pd.DataFrame(index=genes))
    for k, v in data.obsm.items():
        full.obsm[k] = v
    write_h5ad_atomic(full, out / md.DATA, compression=None)
    shutil.copy(sub / md.RECEIVED, out / md.RECEIVED)  # same LR pairs and radii: the same received channels
    new = dict(man)
    new.update(
        genes=genes,
        targets=targets,
        orphans=[],
        n_modulators=n_mods,
        status="complete",
        standin_of=str(sub),
        data_fingerprint="stand-in",
    )
    new[md.STORE_CHECKSUMS] = sums
    new.pop(md.FILE_CHECKSUMS, None)
    md.write_manifest(out, new)
    print(json.dumps({"out": str(out), "targets": len(targets), "genes": len(genes), "shards": len(sums)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
