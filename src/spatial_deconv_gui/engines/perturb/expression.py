"""What counts as expressed, shared by training and propagation (kept apart from ``train`` so that a knockout
does not import the training stack: torch and the lasso)."""

from __future__ import annotations

import numpy as np

FILTER_MIN = 1e-9  # expression at or below this counts as absent (SpaceTravLR's get_filtered_df)


def filtered(x: np.ndarray) -> np.ndarray:
    return np.where(x > FILTER_MIN, x, 0.0)
