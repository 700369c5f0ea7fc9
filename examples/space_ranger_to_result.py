"""From a Space Ranger output folder to a saved result: open, check, deconvolve, save.

    python examples/space_ranger_to_result.py [OUTS_FOLDER REFERENCE.h5ad] [OUT.h5ad]

Without arguments it writes the bundled sample slide as a Space Ranger 2.x ``outs/`` folder first (matrix,
tissue_positions.csv, scale factors, H&E PNGs), so the script runs anywhere.
"""

import sys
import tempfile
from pathlib import Path

from spatial_deconv_gui import api
from spatial_deconv_gui.io.slide import read_slide
from spatial_deconv_gui.io.spaceranger import write_visium_folder
from spatial_deconv_gui.sample_data import sample_paths

if len(sys.argv) >= 3:
    outs, reference = Path(sys.argv[1]), Path(sys.argv[2])
    result_path = Path(sys.argv[3] if len(sys.argv) > 3 else "space_ranger_rctd.h5ad")
else:
    sample, reference = sample_paths()
    slide = read_slide(sample)
    outs = write_visium_folder(
        slide.adata,
        Path(tempfile.mkdtemp()) / "sample_run" / "outs",
        image=slide.adata.uns["spatial"]["sample"]["images"]["hires"],
        scalefactors=dict(slide.adata.uns["spatial"]["sample"]["scalefactors"]),
    )
    result_path = Path(sys.argv[1] if len(sys.argv) > 1 else "space_ranger_rctd.h5ad")

slide = read_slide(outs)  # Visium or Visium HD: the format is told from the folder
print(slide.description())
for notice in slide.notices:
    print("note:", notice)

report = api.validate_files(slide.adata, reference)
print(report.format())
report.raise_if_failed()

run = api.run_deconvolution(slide, reference, method="rctd", params={"mode": "doublet"})
api.save_result(run.adata, result_path)  # the H&E rides along in uns['spatial'], as scanpy keeps it
print(f"{int(run.result.fitted.sum())}/{run.adata.n_obs} spots fitted; wrote {result_path}")
