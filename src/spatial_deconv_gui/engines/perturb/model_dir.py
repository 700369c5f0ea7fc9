"""The model directory: ``manifest.json``, ``data.h5ad`` (the expression the model was trained on) and the
coefficients under ``coefs/``.

Format 3 (the coefficient store): ``coefs/part-NNNNN.npz``, one shard per training batch, each holding its targets'
coefficients in columns - ``targets`` (T), ``clusters`` (C), ``mod_vocab`` (the distinct modulator names, spelled
as in SpaceTravLR: ``TF``, ``L$R``, ``L#TF``), ``mod_ptr`` / ``mod_code`` (the modulators of target t are
``mod_vocab[mod_code[mod_ptr[t]:mod_ptr[t+1]]]``), ``n_cells`` / ``r2`` / ``gated`` / ``intercept`` (T x C) and the
non-zero coefficients as ``nz_target, nz_cluster, nz_mod`` (target row, cluster, modulator position within its
target) with ``nz_value``. Loading concatenates the shards; ``manifest['store_checksums']`` maps each shard (path
relative to the folder) to its sha256. A target in a shard is finished; training resumes by skipping it.

Format 4 (per-cell coefficients, ``manifest['mode']`` 'full' or 'hybrid'; a 'seed' model is still written as
format 3, byte for byte as before): each shard also holds ``PERCELL_KEYS`` - which targets have per-cell
coefficients, their held-out R², the cells' neighbourhood features of the shard's training batch and one head row
per (target, modulator); see :mod:`percell`. ``manifest['percell']`` says per target which was kept ('cnn' or
'seed') and the rule. A reader of format 3 refuses a format 4 folder by its version ("reads up to 3"); this one
refuses a manifest whose mode it does not know, or whose store lacks the per-cell part its mode promises.

Formats 1-2 (still read, ``perturb upgrade`` converts them): one CSV per target under ``coefs/`` with one row per
cluster and the columns ``cluster, n_cells, r2, gated, intercept`` followed by ``beta_<modulator>``.

Received ligands (format 2): ``manifest['radius_rule']`` ('pair' or 'ligand'), ``lr_radius`` (radius of each LR
feature, keyed ``L$R``), ``tfl_radius`` (keyed ``L#TF``), ``received_channels`` (the distinct ``[ligand, radius]``
received values, the column order of ``received_ligands.npy``) and ``ligand_radius`` (each ligand's first-pair
radius). Format 1 folders have only ``ligand_radius``: every feature of a ligand used that radius (the 'ligand'
rule), and they load as such.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...io.errors import InputError
from ...io.write import write_text_atomic

MANIFEST = "manifest.json"
DATA = "data.h5ad"
COEFS = "coefs"
RECEIVED = "received_ligands.npy"  # cells x manifest["received_channels"] (format 1: x manifest["ligands"])
FORMAT_VERSION = 4
STORE_VERSION = 3  # first format with the coefficient store
PERCELL_VERSION = 4  # first format with per-cell coefficients (mode 'full' / 'hybrid'); seed models stay format 3
MODES = ("seed", "full", "hybrid")
STORE_CHECKSUMS = "store_checksums"
FILE_CHECKSUMS = "file_checksums"  # sha256 of data.h5ad and received_ligands.npy, recorded when training finishes
SHARD_PATTERN = "part-*.npz"
# obs column of data.h5ad (and of the simulated GRN tissue) holding each cell's cluster; not in keys.py yet
CLUSTER_OBS = "cluster"
META_COLUMNS = ("cluster", "n_cells", "r2", "gated", "intercept")


def gene_filename(gene: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", gene)
    if safe != gene:
        safe = f"{safe}-{hashlib.sha1(gene.encode()).hexdigest()[:8]}"
    return f"{safe}.csv"


def write_manifest(model_dir, manifest: dict) -> Path:
    """Write the manifest atomically. A complete one (``status`` 'complete') also records the sha256 of the
    folder's other files (``data.h5ad``, ``received_ligands.npy``) in ``manifest['file_checksums']``, checked on
    loading like the store's; a manifest of a folder still training records none (they may still change)."""
    if manifest.get("status", "complete") == "complete":
        manifest[FILE_CHECKSUMS] = {
            name: file_sha256(Path(model_dir) / name)
            for name in (manifest.get("data_file", DATA), RECEIVED)
            if (Path(model_dir) / name).exists()
        }
    return write_text_atomic(json.dumps(manifest, indent=1, default=_json_default), Path(model_dir) / MANIFEST)


def check_files(model_dir, manifest: dict) -> None:
    """One InputError when ``data.h5ad`` or ``received_ligands.npy`` is missing or differs from the checksum
    the manifest recorded when training finished (folders written before checksums were recorded: skipped)."""
    sums = manifest.get(FILE_CHECKSUMS) or {}
    data_name = manifest.get("data_file", DATA)
    fixes = {
        data_name: f"delete {Path(model_dir) / data_name} and run the same 'spatial-deconv perturb train' command "
        "again: it rewrites it from the slide and keeps the fitted targets (training resumes the folder).",
        RECEIVED: f"delete {Path(model_dir) / RECEIVED} (a cache of the received ligands: knockouts then compute "
        "them), or run the same 'spatial-deconv perturb train' command again.",
    }
    if not (Path(model_dir) / data_name).exists():
        raise InputError(
            f"{model_dir} has no {data_name} (the expression the model was trained on): the folder was not "
            "written whole.",
            "run the same 'spatial-deconv perturb train' command again: it rewrites it and keeps the fitted "
            "targets (training resumes the folder).",
            code="bad_model_dir",
        )
    for name, want in sums.items():
        p = Path(model_dir) / name
        if not p.exists():
            if name == RECEIVED:
                continue  # the cache is optional
            raise InputError(
                f"{model_dir}: {name} named in the manifest is missing.", fixes.get(name, ""), code="bad_model_dir"
            )
        got = file_sha256(p)
        if got != want:
            raise InputError(
                f"{model_dir}: {name} does not match the manifest's checksum (sha256 {got[:12]}..., manifest "
                f"{str(want)[:12]}...): it changed or was damaged after training.",
                fixes.get(name, "train the model again."),
                code="bad_model_dir",
            )


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
    if not p.exists() and ((Path(model_dir) / DATA).exists() or shard_paths(model_dir)):
        raise InputError(
            f"{model_dir} is a half-written model folder: it has {DATA} or coefficient parts but no {MANIFEST} "
            "(training was killed before writing it).",
            "run the same 'spatial-deconv perturb train' command again with --out pointing here: it resumes the "
            "folder (whole coefficient parts are kept).",
            code="model_incomplete",
        )
    if not p.exists():
        raise InputError(
            f"{model_dir} is not a perturbation model folder (no {MANIFEST}).",
            "train one with 'spatial-deconv perturb train'.",
            code="not_model_dir",
        )
    try:
        return json.loads(p.read_text())
    except Exception as exc:
        raise InputError(f"{p} is damaged ({exc}).", "train the model again.", code="bad_model_dir") from exc


def write_coefs_csv(
    model_dir, gene: str, clusters, n_cells, r2, gated, intercept, coef: np.ndarray, modulators: list[str]
) -> Path:
    """One target's table in the format 1-2 layout (tests and upgrade checks; training writes the store)."""
    df = pd.DataFrame(
        {
            "cluster": list(map(str, clusters)),
            "n_cells": np.asarray(n_cells, dtype=int),
            "r2": np.asarray(r2, dtype=float),
            "gated": np.asarray(gated, dtype=bool),
            "intercept": np.asarray(intercept, dtype=float),
        }
    )
    betas = pd.DataFrame(
        np.asarray(coef, dtype=float).reshape(len(df), len(modulators)), columns=[f"beta_{m}" for m in modulators]
    )
    df = pd.concat([df, betas], axis=1)
    return write_text_atomic(df.to_csv(index=False, float_format="%.17g"), coef_path(model_dir, gene))


def csv_path(model_dir, gene: str) -> Path:
    return Path(model_dir) / COEFS / gene_filename(gene)


def read_coefs_csv(model_dir, gene: str) -> pd.DataFrame:
    # round_trip: the tables were written with 17 digits; pandas' default parser can be 1 ulp off, and an
    # upgraded folder must hold exactly what training wrote
    return pd.read_csv(csv_path(model_dir, gene), dtype={"cluster": str}, float_precision="round_trip")


read_coefs = read_coefs_csv


def csv_genes(model_dir, genes) -> set[str]:
    """Targets with a format 1-2 CSV table."""
    d = Path(model_dir) / COEFS
    if not d.exists():
        return set()
    present = {p.name for p in d.iterdir()}
    return {g for g in genes if gene_filename(g) in present}


def finished_genes(model_dir, genes) -> set[str]:
    """Targets already trained in the folder: in a readable store shard, or with a CSV table (older layout)."""
    genes = [str(g) for g in genes]
    done = set()
    for _path, shard_targets in scan_shards(model_dir).items():
        done.update(shard_targets)
    return (done & set(genes)) | csv_genes(model_dir, genes)


# ---------------------------------------------------------------------------------------------- the store

_SHARD_KEYS = (
    "targets",
    "clusters",
    "mod_vocab",
    "mod_ptr",
    "mod_code",
    "n_cells",
    "r2",
    "gated",
    "intercept",
    "nz_target",
    "nz_cluster",
    "nz_mod",
    "nz_value",
)


# per-cell coefficients (format 4, modes 'full' / 'hybrid'; see percell.py): ``pc_flag`` (T) whether the target
# has them, ``pc_r2`` (T x 2) held-out R² of the seed and of the per-cell model, ``pc_z`` (S x N x D) the cells'
# neighbourhood features (one block per training batch), ``pc_w`` (R x D) one row per (target, modulator) of a
# per-cell target with ``pc_w_target`` (target row), ``pc_w_mod`` (position within the target's modulators) and
# ``pc_w_block`` (its block of ``pc_z``)
PERCELL_KEYS = ("pc_flag", "pc_r2", "pc_z", "pc_w", "pc_w_target", "pc_w_mod", "pc_w_block")

# what a knockout needs (the sparse coefficients and whose they are) and what only the per-target tables need
PROPAGATION_COLUMNS = (
    "targets",
    "clusters",
    "mod_vocab",
    "mod_ptr",
    "mod_code",
    "nz_target",
    "nz_cluster",
    "nz_mod",
    "nz_value",
    *PERCELL_KEYS,
)
TABLE_COLUMNS = _SHARD_KEYS + PERCELL_KEYS


@dataclass
class CoefStore:
    """The coefficients of many targets in columns (one shard, or several concatenated)."""

    targets: np.ndarray  # (T,) str
    clusters: np.ndarray  # (C,) str, the manifest's cluster order
    mod_vocab: np.ndarray  # (V,) str, sorted: the distinct modulator names (a name repeats over many targets)
    mod_ptr: np.ndarray  # (T+1,) int64: target t's modulators are mod_vocab[mod_code[mod_ptr[t]:mod_ptr[t+1]]]
    mod_code: np.ndarray  # (M,) int32
    n_cells: np.ndarray | None  # (T, C) int64; None when read for propagation only (PROPAGATION_COLUMNS)
    r2: np.ndarray | None  # (T, C) float64
    gated: np.ndarray | None  # (T, C) bool
    intercept: np.ndarray | None  # (T, C) float64
    nz_target: np.ndarray  # (K,) row in targets, non-decreasing
    nz_cluster: np.ndarray  # (K,) int32
    nz_mod: np.ndarray  # (K,) int32 position within the target's modulators
    nz_value: np.ndarray  # (K,) float64
    # per-cell coefficients (PERCELL_KEYS); None in a seed model
    pc_flag: np.ndarray | None = None
    pc_r2: np.ndarray | None = None
    pc_z: np.ndarray | None = None
    pc_w: np.ndarray | None = None
    pc_w_target: np.ndarray | None = None
    pc_w_mod: np.ndarray | None = None
    pc_w_block: np.ndarray | None = None

    def arrays(self) -> dict:
        out = {k: getattr(self, k) for k in _SHARD_KEYS}
        if self.pc_flag is not None:  # a seed shard keeps exactly the format 3 members
            out.update({k: getattr(self, k) for k in PERCELL_KEYS})
        return out

    @property
    def has_percell(self) -> bool:
        return self.pc_flag is not None

    @property
    def mod_names(self) -> np.ndarray:
        return self.mod_vocab[self.mod_code]

    def table(self, row: int) -> pd.DataFrame:
        """Target ``row`` as the format 1-2 table (``cluster, n_cells, r2, gated, intercept, beta_...``)."""
        names = self.mod_vocab[self.mod_code[self.mod_ptr[row] : self.mod_ptr[row + 1]]]
        coef = np.zeros((len(self.clusters), len(names)))
        # non-zeros are grouped by target row (written so, concatenation keeps it): the row's range by bisection
        lo, hi = np.searchsorted(self.nz_target, [row, row + 1])
        sel = slice(int(lo), int(hi))
        coef[self.nz_cluster[sel], self.nz_mod[sel]] = self.nz_value[sel]
        df = pd.DataFrame(
            {
                "cluster": [str(c) for c in self.clusters],
                "n_cells": self.n_cells[row].astype(np.int64),
                "r2": self.r2[row].astype(np.float64),
                "gated": self.gated[row].astype(bool),
                "intercept": self.intercept[row].astype(np.float64),
            }
        )
        betas = pd.DataFrame(coef, columns=[f"beta_{m}" for m in names])
        return pd.concat([df, betas], axis=1)


def build_store(
    targets, clusters, names_of_col, cols_of, n_cells, r2, gated, intercept, nonzeros, percell: dict | None = None
) -> CoefStore:
    """A store (one shard's columns): the one place that lays the format out.

    ``targets`` (T), ``clusters`` (C); target t's modulators are ``names_of_col[cols_of[t]]`` in its order;
    ``n_cells`` / ``r2`` / ``gated`` / ``intercept`` (T x C); ``nonzeros`` = (target row, cluster, position within
    the target's modulators, value) of the non-zero coefficients, in any order (stored grouped by target, then
    cluster, then position); ``percell`` the per-cell columns (``PERCELL_KEYS``) of a full / hybrid shard."""
    names_of_col = np.asarray(names_of_col)
    lengths = np.array([len(c) for c in cols_of], dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(cols_of).astype(np.int64) if len(cols_of) else np.zeros(0, np.int64)
    used = np.unique(flat)
    vocab, inv = np.unique(names_of_col[used].astype(str), return_inverse=True)
    code_of_col = np.zeros(names_of_col.size, dtype=np.int32)
    code_of_col[used] = inv.reshape(-1)
    nzt, nzc, nzm, nzv = (np.asarray(a) for a in nonzeros)
    order = np.lexsort((nzm, nzc, nzt))
    T, C = len(targets), len(clusters)
    return CoefStore(
        np.array([str(t) for t in targets], dtype=str),
        np.array([str(c) for c in clusters], dtype=str),
        vocab,
        ptr,
        code_of_col[flat].astype(np.int32),
        np.asarray(n_cells, dtype=np.int64).reshape(T, C),
        np.asarray(r2, dtype=np.float64).reshape(T, C),
        np.asarray(gated, dtype=bool).reshape(T, C),
        np.asarray(intercept, dtype=np.float64).reshape(T, C),
        nzt[order].astype(np.int32),
        nzc[order].astype(np.int32),
        nzm[order].astype(np.int32),
        nzv[order].astype(np.float64),
        **(percell or {}),
    )


def store_from_fits(clusters, fits) -> CoefStore:
    """A store from ``fits`` = [(target, n_cells, r2, gated, intercept, coef (C x p), modulator names), ...]
    (:func:`build_store` from per-target tables)."""
    C = len(clusters)
    T = len(fits)
    names, cols_of, nzt, nzc, nzm, nzv = [], [], [], [], [], []
    n_cells = np.zeros((T, C), dtype=np.int64)
    r2 = np.zeros((T, C))
    gated = np.zeros((T, C), dtype=bool)
    icpt = np.zeros((T, C))
    for i, (_t, nc, r, g, b0, coef, mods) in enumerate(fits):
        coef = np.asarray(coef, dtype=np.float64).reshape(C, len(mods))
        cols_of.append(np.arange(len(names), len(names) + len(mods), dtype=np.int64))
        names.extend(map(str, mods))
        n_cells[i], r2[i], gated[i], icpt[i] = nc, r, g, b0
        kc, km = np.nonzero(coef)
        nzt.append(np.full(kc.size, i, dtype=np.int64))
        nzc.append(kc)
        nzm.append(km)
        nzv.append(coef[kc, km])
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    nonzeros = (cat(nzt, np.int64), cat(nzc, np.int64), cat(nzm, np.int64), cat(nzv, np.float64))
    return build_store(
        [f[0] for f in fits], clusters, np.array(names, dtype=str), cols_of, n_cells, r2, gated, icpt, nonzeros
    )


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_paths(model_dir) -> list[Path]:
    d = Path(model_dir) / COEFS
    return sorted(d.glob(SHARD_PATTERN)) if d.exists() else []


def next_shard_path(model_dir) -> Path:
    nums = [int(p.stem.split("-")[1]) for p in shard_paths(model_dir) if p.stem.split("-")[1].isdigit()]
    return Path(model_dir) / COEFS / f"part-{max(nums, default=-1) + 1:05d}.npz"


def shard_key(model_dir, path) -> str:
    return Path(path).relative_to(Path(model_dir)).as_posix()


def write_shard(model_dir, store: CoefStore, path=None) -> tuple[str, str]:
    """Write ``store`` as a shard (temp name, then one rename); returns (manifest key, sha256)."""
    from ...io.write import atomic_path

    path = Path(path) if path is not None else next_shard_path(model_dir)
    with atomic_path(path, ".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **store.arrays())  # the index columns compress ~5x
    return shard_key(model_dir, path), file_sha256(path)


def read_shard(path, columns=_SHARD_KEYS + PERCELL_KEYS) -> CoefStore:
    """A shard's columns (an .npz member is decompressed only when read: the others are skipped)."""
    with np.load(path, allow_pickle=False) as z:
        pc = {k: z[k] for k in PERCELL_KEYS if k in columns and k in z.files}
        return CoefStore(**{k: (z[k] if k in columns else None) for k in _SHARD_KEYS}, **pc)


def scan_shards(model_dir) -> dict[str, list[str]]:
    """{manifest key: targets} of every shard on disk that reads back whole (a torn write never gets its name:
    shards are renamed into place)."""
    out = {}
    for p in shard_paths(model_dir):
        try:
            with np.load(p, allow_pickle=False) as z:
                out[shard_key(model_dir, p)] = [str(t) for t in z["targets"]]
        except Exception:  # unreadable: its targets count as not trained, training refits them
            continue
    return out


_FIT_KEYS = ("n_cells", "r2", "gated", "intercept")


def _percell_of(stores: list[CoefStore]) -> dict:
    """The per-cell columns of concatenated stores (blocks of ``pc_z`` stacked, rows renumbered); empty when no
    store has them. A store without them (seed) counts as one whose targets have none."""
    have = [s for s in stores if s.pc_flag is not None and s.pc_z is not None]
    if not have:
        return {}
    _, n, d = have[0].pc_z.shape
    flags, r2, zs, w, wt, wm, wb = [], [], [], [], [], [], []
    t_off = blk_off = 0
    for s in stores:
        T = len(s.targets)
        if s.pc_flag is None or s.pc_z is None:
            flags.append(np.zeros(T, dtype=bool))
            r2.append(np.full((T, 2), np.nan))
        else:
            flags.append(s.pc_flag.astype(bool))
            r2.append(s.pc_r2)
            zs.append(s.pc_z)
            w.append(s.pc_w)
            wt.append(s.pc_w_target.astype(np.int64) + t_off)
            wm.append(s.pc_w_mod)
            wb.append(s.pc_w_block.astype(np.int64) + blk_off)
            blk_off += s.pc_z.shape[0]
        t_off += T
    return dict(
        pc_flag=np.concatenate(flags),
        pc_r2=np.concatenate(r2),
        pc_z=np.concatenate(zs, axis=0) if zs else np.zeros((0, n, d), np.float32),
        pc_w=np.concatenate(w, axis=0),
        pc_w_target=np.concatenate(wt).astype(np.int32),
        pc_w_mod=np.concatenate(wm).astype(np.int32),
        pc_w_block=np.concatenate(wb).astype(np.int32),
    )


def concat_stores(stores: list[CoefStore]) -> CoefStore:
    if len(stores) == 1:
        return stores[0]
    offs = np.cumsum([0] + [len(s.targets) for s in stores])
    mod_offs = np.cumsum([0] + [len(s.mod_code) for s in stores])
    ptr = np.concatenate([[0]] + [s.mod_ptr[1:] + mo for s, mo in zip(stores, mod_offs)]).astype(np.int64)
    cat = lambda k: np.concatenate([getattr(s, k) for s in stores])  # noqa: E731
    vocab = np.unique(np.concatenate([s.mod_vocab for s in stores]))
    code = np.concatenate([np.searchsorted(vocab, s.mod_vocab).astype(np.int32)[s.mod_code] for s in stores])
    return CoefStore(
        cat("targets"),
        stores[0].clusters,
        vocab,
        ptr,
        code,
        *(None if stores[0].n_cells is None else np.vstack([getattr(s, k) for s in stores]) for k in _FIT_KEYS),
        np.concatenate([s.nz_target.astype(np.int64) + o for s, o in zip(stores, offs)]),
        cat("nz_cluster"),
        cat("nz_mod"),
        cat("nz_value"),
        **_percell_of(stores),
    )


def uses_store(manifest: dict) -> bool:
    """Whether the coefficients are in the store (format 3, or any manifest naming store shards: the layout of
    the coefficients is read from what the manifest names, the version governs the other keys)."""
    return int(manifest.get("format_version", 1)) >= STORE_VERSION or bool(manifest.get(STORE_CHECKSUMS))


def check_loadable(model_dir, manifest: dict) -> None:
    """One InputError for a folder this version cannot load: newer format, or training not finished."""
    version = int(manifest.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise InputError(
            f"{model_dir} has model format {version}; this version of spatial-deconv-gui reads up to {FORMAT_VERSION}.",
            "update spatial-deconv-gui (retraining with this version also "
            "works; 'perturb train' cannot resume a newer folder).",
            code="model_too_new",
        )
    mode = manifest.get("mode", "seed")
    if mode not in MODES:
        raise InputError(
            f"{model_dir} was trained with mode {mode!r}, which this version of spatial-deconv-gui does not know "
            f"(it knows {', '.join(MODES)}).",
            "update spatial-deconv-gui, or train the model again with this version.",
            code="model_too_new",
        )
    if mode != "seed" and version < PERCELL_VERSION:
        raise InputError(
            f"{model_dir} says mode {mode!r} but has model format {version}, which holds no per-cell coefficients: "
            "the manifest was edited or written by another tool.",
            "train the model again with 'spatial-deconv perturb train --mode " + mode + "'.",
            code="bad_model_dir",
        )
    status = manifest.get("status", "complete")
    if status != "complete":
        targets = manifest.get("targets", [])
        n_done = len(finished_genes(model_dir, targets))
        raise InputError(
            f"{model_dir} is a half-trained model (status {status!r}: {n_done} of {len(targets)} "
            "targets written; training was stopped or killed).",
            "run the same 'spatial-deconv perturb train' command again: it resumes the folder and fits "
            "only the missing targets.",
            code="model_incomplete",
        )


def read_store(model_dir, manifest: dict, columns=_SHARD_KEYS) -> CoefStore:
    """The concatenated store of a format 3 folder, checked against the manifest's checksums; ``columns``
    (default all) are the ones decompressed (``PROPAGATION_COLUMNS``: what a knockout needs)."""
    sums = manifest.get(STORE_CHECKSUMS)
    resume = (
        "run the same 'spatial-deconv perturb train' command again: it resumes the folder and refits the "
        "targets of the missing or damaged part."
    )
    if not sums:
        raise InputError(
            f"{model_dir}: the manifest lists no coefficient store ({STORE_CHECKSUMS}).", resume, code="bad_model_dir"
        )
    stores = []
    for key, want in sums.items():
        p = Path(model_dir) / key
        if not p.exists():
            raise InputError(
                f"{model_dir}: the coefficient store part {key} named in the manifest is missing.",
                resume,
                code="bad_model_dir",
            )
        got = file_sha256(p)
        if got != want:
            raise InputError(
                f"{model_dir}: the coefficient store part {key} does not match the manifest's "
                f"checksum (sha256 {got[:12]}..., manifest {str(want)[:12]}...).",
                resume,
                code="bad_model_dir",
            )
        try:
            stores.append(read_shard(p, columns))
        except Exception as exc:
            raise InputError(
                f"{model_dir}: the coefficient store part {key} cannot be read ({exc}).", resume, code="bad_model_dir"
            ) from exc
    store = concat_stores(stores)
    missing = sorted(set(map(str, manifest.get("targets", []))) - set(store.targets.tolist()))
    if missing:
        raise InputError(
            f"{model_dir}: the coefficient store lacks {len(missing)} of the manifest's targets ({missing[:5]}).",
            resume,
            code="bad_model_dir",
        )
    return store


class OldFormatNotice(UserWarning):
    """An older model folder was loaded (it works, slowly); ``perturb upgrade`` rewrites it."""


def notice_old_layout(model_dir, version: int) -> None:
    warnings.warn(
        f"{model_dir} is a format {version} model folder (one CSV per target, slow to load); "
        f"'spatial-deconv perturb upgrade {model_dir}' rewrites it as a format {STORE_VERSION} store.",
        OldFormatNotice,
        stacklevel=3,
    )


def migrate_csv_tables(model_dir, manifest: dict) -> tuple[str, str] | None:
    """Write the CSV tables of ``manifest['targets']`` as one store shard; returns (key, sha256), or None when
    there are none. The CSVs stay (the caller removes them once the manifest names the shard)."""
    targets = [str(t) for t in manifest.get("targets", [])]
    have = csv_genes(model_dir, targets)
    clusters = [str(c) for c in manifest["clusters"]]
    cidx = {c: k for k, c in enumerate(clusters)}
    fits = []
    for t in targets:
        if t not in have:
            continue
        df = read_coefs_csv(model_dir, t)
        rows = np.array([cidx[str(c)] for c in df["cluster"]], dtype=np.int64)
        bcols = [c for c in df.columns if c.startswith("beta_")]
        C = len(clusters)
        nc, r2, gated, icpt = np.zeros(C, np.int64), np.full(C, np.nan), np.ones(C, bool), np.zeros(C)
        coef = np.zeros((C, len(bcols)))
        nc[rows] = df["n_cells"].to_numpy(np.int64)
        r2[rows] = df["r2"].to_numpy(np.float64)
        gated[rows] = df["gated"].to_numpy(bool)
        icpt[rows] = df["intercept"].to_numpy(np.float64)
        coef[rows] = df[bcols].to_numpy(np.float64)
        fits.append((t, nc, r2, gated, icpt, coef, [c[5:] for c in bcols]))
    if not fits:
        return None
    return write_shard(model_dir, store_from_fits(clusters, fits))


def remove_csv_tables(model_dir, genes) -> int:
    n = 0
    for g in csv_genes(model_dir, genes):
        csv_path(model_dir, g).unlink(missing_ok=True)
        n += 1
    return n


def upgrade(model_dir) -> dict:
    """Rewrite a format 1-2 folder in place as format 3: the store is written under a temp name and renamed,
    the manifest is updated last, the CSVs are removed only after. Returns a summary."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    version = int(manifest.get("format_version", 1))
    if version > FORMAT_VERSION:
        check_loadable(model_dir, manifest)
    if uses_store(manifest):
        recorded = False
        if FILE_CHECKSUMS not in manifest and manifest.get("status", "complete") == "complete":
            check_loadable(model_dir, manifest)
            write_manifest(model_dir, manifest)  # a store written before file checksums: record them
            recorded = True
        return {
            "model_dir": str(model_dir),
            "upgraded": False,
            "file_checksums_recorded": recorded,
            "format_version": version,
            "n_targets": len(manifest.get("targets", [])),
        }
    targets = [str(t) for t in manifest.get("targets", [])]
    written = migrate_csv_tables(model_dir, manifest)
    if written is None:
        raise InputError(
            f"{model_dir} has no coefficient tables to upgrade.",
            "train the model with 'spatial-deconv perturb train' (it resumes the folder).",
            code="model_incomplete",
        )
    key, sha = written
    manifest[STORE_CHECKSUMS] = {key: sha}
    manifest["format_version"] = STORE_VERSION  # an upgraded folder is a seed model: the store's format
    manifest["upgraded_from_format"] = version
    write_manifest(model_dir, manifest)
    n_removed = remove_csv_tables(model_dir, targets)
    return {
        "model_dir": str(model_dir),
        "upgraded": True,
        "from_format": version,
        "format_version": STORE_VERSION,
        "n_targets": n_removed,
        "store": key,
        "store_bytes": (model_dir / key).stat().st_size,
    }


def coef_path(model_dir, gene: str) -> Path:
    """Where ``gene``'s coefficients live: its store shard, else its CSV (format 1-2) path."""
    for key, shard_targets in scan_shards(model_dir).items():
        if gene in shard_targets:
            return Path(model_dir) / key
    return csv_path(model_dir, gene)
