"""The model directory: ``manifest.json``, ``data.h5ad`` (the expression the model was trained on) and one
coefficient table per target gene under ``coefs/``.

A coefficient table is a CSV with one row per cluster and the columns ``cluster, n_cells, r2, gated,
intercept`` followed by ``beta_<modulator>`` (modulators spelled as in SpaceTravLR: ``TF``, ``L$R``, ``L#TF``).
A gene whose table exists is finished; training resumes by skipping it.

Received ligands (format 2): ``manifest['radius_rule']`` ('pair' or 'ligand'), ``lr_radius`` (radius of each
LR feature, keyed ``L$R``), ``tfl_radius`` (keyed ``L#TF``), ``received_channels`` (the distinct
``[ligand, radius]`` received values, the column order of ``received_ligands.npy``) and ``ligand_radius``
(each ligand's first-pair radius). Format 1 folders have only ``ligand_radius``: every feature of a ligand used
that radius (the 'ligand' rule), and they load as such.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ...io.errors import InputError
from ...io.write import write_text_atomic

MANIFEST = "manifest.json"
DATA = "data.h5ad"
COEFS = "coefs"
RECEIVED = "received_ligands.npy"  # cells x manifest["received_channels"] (format 1: x manifest["ligands"])
FORMAT_VERSION = 2
# obs column of data.h5ad (and of the simulated GRN tissue) holding each cell's cluster; not in keys.py yet
CLUSTER_OBS = "cluster"
META_COLUMNS = ("cluster", "n_cells", "r2", "gated", "intercept")


def gene_filename(gene: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", gene)
    if safe != gene:
        safe = f"{safe}-{hashlib.sha1(gene.encode()).hexdigest()[:8]}"
    return f"{safe}.csv"


def coef_path(model_dir, gene: str) -> Path:
    return Path(model_dir) / COEFS / gene_filename(gene)


def write_manifest(model_dir, manifest: dict) -> Path:
    return write_text_atomic(json.dumps(manifest, indent=1, default=_json_default), Path(model_dir) / MANIFEST)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def read_manifest(model_dir) -> dict:
    p = Path(model_dir) / MANIFEST
    if not p.exists():
        raise InputError(f"{model_dir} is not a perturbation model folder (no {MANIFEST}).",
                         "train one with 'spatial-deconv perturb train'.", code="not_model_dir")
    try:
        return json.loads(p.read_text())
    except Exception as exc:
        raise InputError(f"{p} is damaged ({exc}).", "train the model again.", code="bad_model_dir") from exc


def write_coefs(model_dir, gene: str, clusters, n_cells, r2, gated, intercept, coef: np.ndarray,
                modulators: list[str]) -> Path:
    df = pd.DataFrame({"cluster": list(map(str, clusters)), "n_cells": np.asarray(n_cells, dtype=int),
                       "r2": np.asarray(r2, dtype=float), "gated": np.asarray(gated, dtype=bool),
                       "intercept": np.asarray(intercept, dtype=float)})
    betas = pd.DataFrame(np.asarray(coef, dtype=float).reshape(len(df), len(modulators)),
                         columns=[f"beta_{m}" for m in modulators])
    df = pd.concat([df, betas], axis=1)
    return write_text_atomic(df.to_csv(index=False, float_format="%.17g"), coef_path(model_dir, gene))


def read_coefs(model_dir, gene: str) -> pd.DataFrame:
    return pd.read_csv(coef_path(model_dir, gene), dtype={"cluster": str})


def finished_genes(model_dir, genes) -> set[str]:
    d = Path(model_dir) / COEFS
    if not d.exists():
        return set()
    present = {p.name for p in d.iterdir()}
    return {g for g in genes if gene_filename(g) in present}
