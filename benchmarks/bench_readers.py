"""Opening slides in every format: wall time and peak memory of ``read_slide``, each read in a fresh process.

    python benchmarks/bench_readers.py [--work DIR] [--visium REAL_OUTS_FOLDER ...] [--xenium-cells 100000]
        [--xenium-side 20000] [--hd-bins 200000]

Fixtures are written once into ``--work`` (default ``/tmp/sdg_bench_readers``): a Xenium bundle with a
``--xenium-side``² uint16 morphology pyramid (800 MB in memory at 20000², which must never be read whole), a
Visium HD ``outs/`` with 8 µm bins, and the sample slide as Space Ranger 2.x folder and SpatialData store.
``--visium`` adds real Space Ranger folders.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

CHILD = r"""
import json, sys, time
import numpy as np
import anndata, h5py, pyarrow.parquet, tifffile  # the baseline holds the libraries, not the data
from spatial_deconv_gui.io.slide import read_slide

def rss_mb(field="VmRSS"):
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent that forked us
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) / 1024

path, options = sys.argv[1], json.loads(sys.argv[2])
base = rss_mb()
t = time.perf_counter()
slide = read_slide(path, **options)
elapsed = time.perf_counter() - t
peak = rss_mb("VmHWM")
print(json.dumps({"read_s": round(elapsed, 3), "rss_before_mb": round(base), "peak_mb": round(peak),
                  "after_mb": round(rss_mb()), "description": slide.description(), "notices": slide.notices,
                  "lazy_image": bool(slide.images) and not isinstance(slide.images[0].levels[0], np.ndarray)}))
"""


def _counts(n: int, genes: int, density: float, rng) -> sp.csr_matrix:
    m = sp.random(n, genes, density=density, format="csr", random_state=int(rng.integers(1 << 31)))
    m.data = rng.integers(1, 20, m.data.size).astype(np.float64)
    return m.astype(np.int32)


def xenium_fixture(folder: Path, n_cells: int, side: int) -> Path:
    from spatial_deconv_gui.io.xenium import write_xenium_bundle

    if (folder / "experiment.xenium").exists():
        return folder
    rng = np.random.default_rng(0)
    pixel = 0.2125
    adata = ad.AnnData(
        X=_counts(n_cells, 300, 0.15, rng),
        obs=pd.DataFrame({"cell_area": rng.uniform(30, 150, n_cells)}, index=[f"c{i:07d}-1" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"Gene{j:03d}" for j in range(300)]),
    )
    adata.obsm["spatial"] = rng.uniform(10, side * pixel - 10, (n_cells, 2))
    ramp = np.arange(side, dtype=np.uint16) % 1024
    image = ramp[:, None] + ramp[None, :] + rng.integers(0, 64, (side, side), dtype=np.uint16)
    return write_xenium_bundle(adata, folder, pixel_size=pixel, image=image)


def visium_hd_fixture(outs: Path, n_bins: int) -> Path:
    from spatial_deconv_gui.io.spaceranger import write_visium_hd_folder

    if (outs / "binned_outputs").exists():
        return outs
    rng = np.random.default_rng(1)
    side = int(np.ceil(np.sqrt(n_bins)))
    ii, jj = np.divmod(np.arange(n_bins), side)
    um_per_px = 0.2738
    adata = ad.AnnData(
        X=_counts(n_bins, 2000, 0.02, rng),
        obs=pd.DataFrame(index=[f"s_008um_{i:05d}_{j:05d}-1" for i, j in zip(ii, jj)]),
        var=pd.DataFrame(index=[f"Gene{j:04d}" for j in range(2000)]),
    )
    adata.obsm["spatial"] = np.column_stack([jj, ii]).astype(float) * 8.0 / um_per_px + 100.0
    extent_px = adata.obsm["spatial"].max() + 100.0
    return write_visium_hd_folder(
        {8: adata},
        outs,
        image=np.full((2000, 2000, 3), 200, np.uint8),
        microns_per_pixel=um_per_px,
        hires_scalef=2000 / extent_px,
    )


def sample_fixtures(work: Path) -> tuple[Path, Path]:
    from spatial_deconv_gui.io.sdata import write_spatialdata_fixture
    from spatial_deconv_gui.io.slide import read_slide
    from spatial_deconv_gui.io.spaceranger import write_visium_folder
    from spatial_deconv_gui.sample_data import sample_paths

    outs, store = work / "sample_run" / "outs", work / "sample.zarr"
    slide = read_slide(sample_paths()[0])
    if not outs.exists():
        write_visium_folder(slide.adata, outs)
    if not store.exists():
        write_spatialdata_fixture(slide.adata, store, image=slide.images[0].levels[0], image_scale=5.0)
    return outs, store


def measure(path: Path, options: dict | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), json.dumps(options or {})], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/sdg_bench_readers")
    p.add_argument("--visium", action="append", default=[], help="a real Space Ranger outs/ folder (repeatable)")
    p.add_argument("--xenium-cells", type=int, default=100_000)
    p.add_argument("--xenium-side", type=int, default=20_000)
    p.add_argument("--hd-bins", type=int, default=200_000)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    cases = [(Path(v), {}, "real Visium folder") for v in args.visium]
    outs, store = sample_fixtures(work)
    cases += [
        (outs, {}, "sample as Space Ranger 2.x"),
        (store, {}, "sample as SpatialData .zarr"),
        (visium_hd_fixture(work / "hd" / "outs", args.hd_bins), {"bin_size": 8}, "Visium HD 8 µm outs/"),
        (xenium_fixture(work / "xenium", args.xenium_cells, args.xenium_side), {}, "Xenium bundle"),
        (
            xenium_fixture(work / "xenium", args.xenium_cells, args.xenium_side),
            {"boundaries": True},
            "Xenium bundle + outlines",
        ),
    ]
    print(f"fixtures ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    print("| slide | read_slide (s) | memory before -> peak (MB) | lazy image | what opened |")
    print("|---|---:|---:|---|---|")
    for path, options, label in cases:
        m = measure(path, options)
        notices = "; " + " ".join(m["notices"]) if m["notices"] else ""
        print(
            f"| {label} | {m['read_s']:.2f} | {m['rss_before_mb']} -> {m['peak_mb']} | "
            f"{'yes' if m['lazy_image'] else 'no'} | {m['description']}{notices} |"
        )


if __name__ == "__main__":
    main()
