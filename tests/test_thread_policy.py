"""Importing the package shortens how long idle OpenMP threads spin (benchmarks/bench_omp_wait.py), unless the user
chose a wait setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "given, expected",
    [
        ({}, ("10000", None)),
        ({"GOMP_SPINCOUNT": "INFINITE"}, ("INFINITE", None)),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, (None, "ACTIVE")),
    ],
)
def test_import_sets_spin_count_unless_user_chose(given, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(given)
    code = "import os, spatial_deconv_gui; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert tuple(None if v == "None" else v for v in out.stdout.split()) == expected
