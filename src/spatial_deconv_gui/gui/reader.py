"""npe2 reader: a spatial .h5ad opens as a Points layer; a reference is refused with a clear message."""
from __future__ import annotations

from pathlib import Path

from ..io.read import read_h5ad
from .layers import spatial_layer_data


def get_reader(path):
    if isinstance(path, list):
        if not all(str(p).endswith(".h5ad") for p in path):
            return None
    elif not str(path).endswith(".h5ad"):
        return None
    return read_spatial


def read_spatial(path):
    paths = path if isinstance(path, list) else [path]
    layers = []
    for p in paths:
        adata = read_h5ad(p)
        layers.append(spatial_layer_data(adata, path=Path(p).resolve()))
    return layers
