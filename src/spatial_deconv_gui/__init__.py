import os as _os

__version__ = "0.1.0"

# numba's parallel loops and torch's threads run on libgomp, whose idle threads spin for 300,000 rounds before
# they sleep. When another process holds a core (napari drawing, a second job), a spinning thread takes the time
# slices its busy sibling needs: with two busy processes beside it on 2 cores, a 2-thread RCTD run took 18.5 s
# instead of 9.3 s. 10,000 rounds keeps most of that gain and costs little on a quiet machine, where sleeping at
# once (OMP_WAIT_POLICY=PASSIVE) slows torch's threads by a third (benchmarks/bench_omp_wait.py). libgomp reads
# this when it loads, so it applies when this package is imported before torch or numba's parallel code; a wait
# setting the user made is kept.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")
