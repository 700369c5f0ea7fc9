"""Reading, validating and writing AnnData: the first step of the io -> engines -> api -> gui flow."""

from .errors import InputError
from .inputs import ReferenceInput, SpatialInput
from .read import counts_matrix, find_coordinates, read_h5ad, reference_input, spatial_input
from .validate import Problem, ValidationReport, validate
from .write import attach_result, write_h5ad_atomic

__all__ = [
    "InputError",
    "Problem",
    "ReferenceInput",
    "SpatialInput",
    "ValidationReport",
    "attach_result",
    "counts_matrix",
    "find_coordinates",
    "read_h5ad",
    "reference_input",
    "spatial_input",
    "validate",
    "write_h5ad_atomic",
]
