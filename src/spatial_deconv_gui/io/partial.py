"""A run's finished chunks of spots on disk, so that a long run writes its results as it goes and a stopped run
resumes where it stopped.

The store is a folder beside the output (``OUT.partial/``, :func:`partial_store_path`) holding

* ``manifest.json``: the format, a fingerprint of the run (method, settings, and the identity of each input:
  path, size and modification time of a file, or a hash of an in-memory AnnData's counts and names), and, once
  the engine knows them, a fingerprint of its chunk plan (which spots are fitted, the model every chunk reads)
  and the chunk size;
* ``chunk-LO-HI.npz``: one finished chunk's per-spot results (rows ``LO`` to ``HI - 1`` of the fitted spots),
  each written to a temporary name and renamed, so a file that exists is complete.

A store left by another run (other settings, another input, another plan) is never mixed in: it is emptied,
with a notice saying what differed. The caller writes the final output from :meth:`PartialStore.assemble`
(atomically) and then :meth:`PartialStore.remove` s the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .errors import InputError
from .write import atomic_path

FORMAT = 1
MANIFEST = "manifest.json"
SUFFIX = ".partial"
_CHUNK = re.compile(r"^chunk-(\d+)-(\d+)\.npz$")


def partial_store_path(output: str | os.PathLike) -> Path:
    """Where the run writing ``output`` keeps its finished chunks."""
    output = Path(output)
    return output.with_name(output.name + SUFFIX)


def fingerprint(value: Any) -> str:
    """sha256 of ``value``'s canonical JSON (keys sorted; anything not JSON written by ``str``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def array_digest(*arrays) -> str:
    """sha256 over the arrays' dtypes, shapes and bytes (a sparse matrix by its data, indices and indptr)."""
    h = hashlib.sha256()
    for a in arrays:
        if sp.issparse(a):
            a = a.tocsr()
            parts = [a.data, a.indices, a.indptr, np.asarray(a.shape)]
        else:
            parts = [np.asarray(a)]
        for p in parts:
            p = np.ascontiguousarray(p)
            if p.dtype == object:
                p = np.asarray(p.astype(str))
            h.update(f"{p.dtype.str}{p.shape}".encode())
            h.update(p.tobytes() if p.dtype.kind != "U" else "\x00".join(p.ravel().tolist()).encode())
    return h.hexdigest()


def input_identity(obj) -> dict[str, Any]:
    """What tells one input from another: a file's (or a store folder's) resolved path, size and modification
    time; an in-memory AnnData's counts, spot names and gene names, hashed."""
    adata = getattr(obj, "adata", obj)  # a Slide holds its AnnData
    if hasattr(adata, "obs_names") and hasattr(adata, "X"):
        x = adata.X
        if x is None:
            return {"anndata": array_digest(np.asarray(adata.obs_names), np.asarray(adata.var_names))}
        if not sp.issparse(x):
            x = np.asarray(x)
        return {"anndata": array_digest(np.asarray(adata.obs_names), np.asarray(adata.var_names), x)}
    path = Path(obj).resolve()
    if path.is_dir():  # a .zarr store, a Space Ranger folder: every file's size and time
        files = sorted(p for p in path.rglob("*") if p.is_file())
        stats = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return {"path": str(path), "files": len(stats), "digest": fingerprint(stats)}
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and k == "config":
            out += _differences(a, b, f"{prefix}{k}.")
        elif fingerprint(a) != fingerprint(b):
            out.append(f"{prefix}{k}")
    return out


class PartialStore:
    """The folder of one run's finished chunks; see the module's docstring. Open it with :meth:`open`."""

    def __init__(self, folder: Path, run: dict[str, Any], manifest: dict[str, Any]):
        self.folder = folder
        self.run = run
        self._manifest = manifest
        self.notices: list[str] = []  # what the user should hear of (a store discarded, chunks resumed)
        self.n_resumed = 0

    @classmethod
    def open(cls, folder: str | os.PathLike, run: dict[str, Any]) -> PartialStore:
        """The store at ``folder`` for the run described by ``run`` (JSON-able): kept when it was left by the same
        run, emptied (with a notice) when by another, created when absent."""
        folder = Path(folder)
        run = json.loads(json.dumps(run, sort_keys=True, default=str))  # as the manifest will read back
        key = fingerprint(run)
        manifest = _read_manifest(folder)
        notice = None
        if manifest is not None and (manifest.get("format") != FORMAT or manifest.get("run_key") != key):
            what = _differences(manifest.get("run") or {}, run) or ["its format"]
            notice = (
                f"{folder} held the finished chunks of a run with other settings or another input (differing: "
                f"{', '.join(what[:8])}); they were discarded, this run starts afresh."
            )
            manifest = None
        elif manifest is None and folder.exists():
            notice = f"{folder} was not a readable partial-results store; it was replaced."
        if manifest is None:
            _clear(folder)
            manifest = {"format": FORMAT, "run_key": key, "run": run, "plan_key": None, "chunk_size": None}
            folder.mkdir(parents=True, exist_ok=True)
            _write_manifest(folder, manifest)
        store = cls(folder, run, manifest)
        if notice:
            store.notices.append(notice)
        return store

    def begin(self, plan: dict[str, Any], chunk_size: int) -> tuple[int, list[tuple[int, int]]]:
        """The engine's chunk plan (``plan``: JSON-able) and chunk size; returns the chunk size to use and the
        (lo, hi) row ranges already finished. The same plan keeps the chunk size it was started with (an
        automatic size may differ between runs) and its chunks; another plan empties the store first."""
        key = fingerprint(plan)
        if self._manifest.get("plan_key") == key and self._manifest.get("chunk_size"):
            done = self.finished()
            self.n_resumed = len(done)
            return int(self._manifest["chunk_size"]), done
        if self.finished():
            self.notices.append(
                f"{self.folder} held chunks fitted with another model or other spots (the input or the reference "
                "changed in a way its identity did not show); they were discarded, this run starts afresh."
            )
        _clear(self.folder, keep_manifest=True)
        self._manifest.update(plan_key=key, chunk_size=int(chunk_size))
        _write_manifest(self.folder, self._manifest)
        return int(chunk_size), []

    def finished(self) -> list[tuple[int, int]]:
        """(lo, hi) of the chunks on disk, in order."""
        out = []
        for entry in os.scandir(self.folder):
            m = _CHUNK.match(entry.name)
            if m:
                out.append((int(m.group(1)), int(m.group(2))))
        return sorted(out)

    def write_chunk(self, lo: int, hi: int, arrays: dict[str, np.ndarray]) -> None:
        """Rows ``lo`` to ``hi - 1``'s results, one array per field (first axis ``hi - lo``), written atomically."""
        for name, a in arrays.items():
            if np.shape(a)[0] != hi - lo:
                raise ValueError(f"chunk {lo}-{hi}: {name} has {np.shape(a)[0]} rows")
        with atomic_path(self.folder / _chunk_name(lo, hi)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **{name: np.asarray(a) for name, a in arrays.items()})

    def read_chunk(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        with np.load(self.folder / _chunk_name(lo, hi), allow_pickle=False) as z:
            return {name: z[name] for name in z.files}

    def assemble(self, out: dict[str, np.ndarray]) -> list[tuple[int, int]]:
        """Fill ``out`` (arrays with one row per fitted spot) from every chunk on disk; returns their ranges."""
        done = self.finished()
        for lo, hi in done:
            part = self.read_chunk(lo, hi)
            missing = set(out) - set(part)
            if missing:
                raise ValueError(f"{self.folder}: chunk {lo}-{hi} lacks {sorted(missing)}")
            for name, arr in out.items():
                arr[lo:hi] = part[name]
        return done

    def remove(self) -> None:
        """Delete the store (after the output was written); a folder that also holds files of someone else's
        keeps them."""
        _clear(self.folder)
        with contextlib.suppress(OSError):
            self.folder.rmdir()


def _chunk_name(lo: int, hi: int) -> str:
    return f"chunk-{int(lo):09d}-{int(hi):09d}.npz"


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _write_manifest(folder: Path, manifest: dict) -> None:
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _clear(folder: Path, keep_manifest: bool = False) -> None:
    """Empty ``folder`` of chunks and of temporaries a killed writer left (every name this module writes)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise InputError(
            f"{folder} is a file, where the run keeps its finished chunks.",
            "move or delete it, or choose another output path.",
            code="partial_store_blocked",
        )
    for entry in os.scandir(folder):
        if keep_manifest and entry.name == MANIFEST:
            continue
        ours = _CHUNK.match(entry.name) or entry.name == MANIFEST
        left_by_a_killed_writer = entry.name.startswith((".chunk-", f".{MANIFEST}."))  # io.write.temp_name's form
        if ours or left_by_a_killed_writer:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
