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


@pytest.mark.parametrize("n_threads, expected", [(None, 1), (2, 2)])
def test_cell2location_trains_on_one_torch_thread_on_the_cpu_unless_told(small_pair, n_threads, expected):
    """Its step is many small operations that a second thread only waits at (benchmarks/RESULTS.md, issue 21):
    on the CPU it trains on one torch thread by default, ``n_threads`` overrides that, and torch's own setting
    is back after the run."""
    import torch

    from spatial_deconv_gui.engines.base import RunControl
    from spatial_deconv_gui.engines.c2l import C2LConfig, run_c2l
    from spatial_deconv_gui.io.read import reference_input, spatial_input

    seen = set()

    def on_event(ev):
        if ev.stage == "spatial":
            seen.add(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        config = C2LConfig(max_epochs=50, signatures="means", device="cpu", n_threads=n_threads)
        result = run_c2l(
            spatial_input(small_pair[0]), reference_input(small_pair[1]), config, RunControl(on_event, max_rate=0)
        )
        assert seen == {expected}
        assert result.params["torch_threads"] == expected
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
