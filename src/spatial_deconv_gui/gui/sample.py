"""npe2 sample-data contribution: the bundled simulated slide, with its simulated H&E under the spots."""

from __future__ import annotations

from ..io.read import read_h5ad
from ..io.slide import read_slide
from ..sample_data import grn_sample_paths, sample_paths
from .layers import PLUGIN_KEY, slide_layer_data, spatial_layer_data
from .reader import show_scale_bar


def sample_slide():
    spatial_path, reference_path = sample_paths()
    layers = slide_layer_data(read_slide(spatial_path), name="sample slide")
    layers[-1][1]["metadata"][PLUGIN_KEY]["reference_path"] = str(reference_path)
    show_scale_bar()
    return layers


def grn_sample_slide():
    """The simulated tissue with a known GRN; its prior files and radii ride along in the layer metadata."""
    paths = grn_sample_paths()
    adata = read_h5ad(paths["spatial"])
    data, kwargs, kind = spatial_layer_data(adata, path=paths["spatial"], name="GRN sample tissue")
    sim = adata.uns.get("perturb_sim", {})
    kwargs["metadata"][PLUGIN_KEY].update(
        grn_path=str(paths["grn"]),
        lr_path=str(paths["lr"]),
        truth_path=str(paths["truth"]),
        radius=float(sim.get("radius", 0.0)),
        contact_radius=float(sim.get("contact_radius", 0.0)),
    )
    return [(data, kwargs, kind)]
