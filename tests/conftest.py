from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = tempfile.mkdtemp(prefix="sdg-xdg-")
        os.chmod(runtime, 0o700)
        os.environ["XDG_RUNTIME_DIR"] = runtime
    # pytest-xvfb has set DISPLAY by now when Xvfb exists; with no display at all Qt would abort the process.
    if not os.environ.get("DISPLAY"):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded numerics for a module: on a shared 2-core CI box oversubscribed BLAS/OpenMP/numba threads
    make small problems many times slower; results do not depend on the thread count."""
    from spatial_deconv_gui.engines.base import thread_cap

    with thread_cap(1):
        yield


def has_gl() -> bool:
    return os.environ.get("QT_QPA_PLATFORM") != "offscreen" and bool(os.environ.get("DISPLAY"))


def pytest_collection_modifyitems(config, items):
    skip_render = pytest.mark.skip(reason="no OpenGL display (offscreen Qt): rendering tests need Xvfb")
    skip_shared = pytest.mark.skip(reason=f"shared data not found at {SHARED_DATA}")
    for item in items:
        if "render" in item.keywords and not has_gl():
            item.add_marker(skip_render)
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip_shared)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_pair():
    """A small simulated slide + reference (session-scoped: tests must not modify them)."""
    from spatial_deconv_gui.simulate import simulate_dataset

    return simulate_dataset(n_spots=300, n_genes=120, n_types=4, cells_per_type=30, seed=3)


@pytest.fixture
def small_pair_files(small_pair, tmp_path):
    spatial, reference = small_pair
    sp_path, ref_path = tmp_path / "spatial.h5ad", tmp_path / "reference.h5ad"
    spatial.write_h5ad(sp_path)
    reference.write_h5ad(ref_path)
    return sp_path, ref_path


class StallMeter:
    """Gaps between ticks of a 10 ms timer: how long the event loop was blocked, and when."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.last = None
        self.gaps: list[tuple[float, float]] = []  # (start, end) of each tick interval

    def _tick(self):
        now = time.perf_counter()
        if self.last is not None:
            self.gaps.append((self.last, now))
        self.last = now

    def start(self):
        self.last = time.perf_counter()
        self.timer.start()

    def stop(self):
        self.timer.stop()

    def longest(self, t0: float = -np.inf, t1: float = np.inf) -> float:
        inside = [b - a for a, b in self.gaps if a >= t0 and b <= t1]
        return max(inside, default=0.0)


@pytest.fixture
def stall_meter(qtbot):
    # The objects that hundreds of earlier tests left in this process are not the app's: a full garbage
    # collection walks them all, and whichever thread triggers it holds the GIL meanwhile (measured: 6M extra
    # objects add ~25 ms to the longest stall, and the whole suite ~60 ms). Freezing them measures the event loop
    # as a fresh napari process would see it; objects made during the test are collected as usual.
    gc.collect()
    gc.freeze()
    meter = StallMeter()
    yield meter
    meter.stop()
    gc.unfreeze()
