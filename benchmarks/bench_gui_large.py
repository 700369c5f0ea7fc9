"""How large slides open and redraw in napari: 100k spots (Points) and 1M spots (raster strategy).

Each size runs in a fresh process (so first-open imports are counted, as a user would see them), under
Xvfb when there is no display. Prints open time (File > Open to first frame) and redraw time after a zoom.

    python benchmarks/bench_gui_large.py [--sizes 100000 1000000] [--layouts grid random]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, resource, sys, time
t_start = time.perf_counter()
import napari
from qtpy.QtWidgets import QApplication
viewer = napari.Viewer(show=True)
app = QApplication.instance(); app.processEvents()
t0 = time.perf_counter()
viewer.open(sys.argv[1], plugin="spatial-deconv-gui")
viewer.screenshot(canvas_only=True, flash=False)  # forces the first frame
t_open = time.perf_counter() - t0
redraws = []
for k in range(5):
    viewer.camera.zoom *= 1.3 if k % 2 == 0 else 1 / 1.3
    t = time.perf_counter(); viewer.screenshot(canvas_only=True, flash=False); redraws.append(time.perf_counter() - t)
# a screenshot also reads the frame back; time that alone on an empty canvas to subtract it
viewer.layers[0].visible = False
t = time.perf_counter(); viewer.screenshot(canvas_only=True, flash=False); readback = time.perf_counter() - t
print(json.dumps({"layer": type(viewer.layers[0]).__name__, "open_s": t_open,
                  "redraw_ms": 1000 * (sorted(redraws)[2] - readback),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
'''


def make_slide(n: int, path: Path, layout: str = "grid"):
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n)))
    rows, cols = np.divmod(np.arange(n), side)
    x = sp.random(n, 50, density=0.1, format="csr", random_state=0, data_rvs=lambda k: rng.integers(1, 20, k)).astype(
        np.int32
    )
    a = ad.AnnData(
        X=x,
        obs=pd.DataFrame(
            {"cluster": pd.Categorical(rng.choice(list("ABCDEFGH"), n))}, index=[f"b{i}" for i in range(n)]
        ),
        var=pd.DataFrame(index=[f"G{g}" for g in range(50)]),
    )
    if layout == "grid":  # Visium HD-like bins
        a.obsm["spatial"] = np.column_stack([cols * 2.0, rows * 2.0])
    else:  # Slide-seq-like beads at random positions, same density
        a.obsm["spatial"] = rng.uniform(0, side * 2.0, size=(n, 2))
    a.write_h5ad(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--layouts", nargs="+", default=["grid", "random"], choices=["grid", "random"])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for n, layout in [(n, lay) for n in args.sizes for lay in args.layouts]:
        path = tmp / f"slide_{n}_{layout}.h5ad"
        make_slide(n, path, layout)
        cmd = [sys.executable, "-c", CHILD, str(path)]
        if not os.environ.get("DISPLAY"):
            cmd = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24"] + cmd
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((n, res))
        print(
            f"{n:>9,d} spots ({layout:<6})  layer={res['layer']:<6}  open+first frame {res['open_s']:.2f} s  "
            f"redraw after zoom {res['redraw_ms']:.0f} ms  peak RSS {res['peak_rss_gb']:.2f} GB",
            flush=True,
        )


if __name__ == "__main__":
    main()
