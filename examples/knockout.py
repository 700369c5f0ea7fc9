"""Train the spatial GRN model of the simulated tissue and knock out its upstream TF.

python examples/knockout.py [MODEL_DIR] [OUT.h5ad]
"""

import sys
from pathlib import Path

import numpy as np

from spatial_deconv_gui import perturb_api
from spatial_deconv_gui.io.read import read_h5ad
from spatial_deconv_gui.sample_data import grn_sample_paths

paths = grn_sample_paths()  # the tissue (.h5ad), its TF -> target and ligand-receptor priors (CSV)
model_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "grn_model")
out = Path(sys.argv[2] if len(sys.argv) > 2 else "knockout.h5ad")

tissue = read_h5ad(paths["spatial"])
sim = tissue.uns["perturb_sim"]
model = perturb_api.train_model(
    tissue,
    paths["grn"],
    paths["lr"],
    "cluster",
    model_dir,
    radius=float(sim["radius"]),
    contact_radius=float(sim["contact_radius"]),
)
tf = str(sim["upstream_tf"])
result = perturb_api.run_perturbation(model, [tf], 0.0, steps=4, adata=tissue)
result.write_h5ad(out)

delta = result.layers["perturb_delta"]
mean_abs = np.abs(delta.toarray() if hasattr(delta, "toarray") else np.asarray(delta)).mean(axis=0)
top = sorted(zip(result.var_names, mean_abs), key=lambda t: -t[1])[:5]
print(f"knocked out {tf}: genes that moved most (mean |Δ|):", ", ".join(f"{g} {v:.3f}" for g, v in top))
print(f"wrote {out} (layers['perturb_delta'], obsm['perturb_vectors'])")
