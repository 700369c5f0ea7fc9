"""npe2 sample-data contribution: the bundled simulated slide."""
from __future__ import annotations

from ..io.read import read_h5ad
from ..sample_data import sample_paths
from .layers import spatial_layer_data


def sample_slide():
    spatial_path, reference_path = sample_paths()
    data, kwargs, kind = spatial_layer_data(read_h5ad(spatial_path), path=spatial_path, name="sample slide")
    kwargs["metadata"]["spatial_deconv_gui"]["reference_path"] = str(reference_path)
    return [(data, kwargs, kind)]
