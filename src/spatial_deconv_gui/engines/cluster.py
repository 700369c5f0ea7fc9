"""Running an engine's independent pieces (chunks of spots, batches of targets, knockouts) on a Dask cluster.

``scheduler`` everywhere means: ``None`` - in this process, as without Dask; ``"local"`` - an embedded
``distributed.LocalCluster`` of worker processes started here and closed after the run; ``"tcp://host:port"``
(or any address ``distributed.Client`` takes) - an existing cluster, such as one from dask-jobqueue,
dask-kubernetes or a cloud deployment.

Everything Dask lives here: connecting (with a timeout, so an unreachable address fails within seconds),
checking that the workers run this package at the client's version, and submitting pieces as tasks whose
results stream back in completion order. ``dask`` / ``distributed`` are imported only when a scheduler is
given: importing them costs ~0.5 s of start-up that in-process runs should not pay.

A piece is a pure function of its arguments, so a piece whose worker died is simply run again on another
worker (Dask's own rescheduling): it costs only that piece, and its result arrives once. A piece that kills
its worker ``distributed.scheduler.allowed-failures`` + 1 times in a row is given up; the run collects every
other piece and :class:`PiecesFailed` names the lost ones.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..io.errors import InputError
from .base import Cancelled, RunControl

LOCAL = "local"
CONNECT_TIMEOUT_S = 10.0
PACKAGE = "spatial_deconv_gui"


class PiecesFailed(RuntimeError):
    """Some pieces could not be computed on the cluster (their workers died each time); the others were kept.

    ``failed`` maps each lost piece's index to the reason; ``what`` lists what those pieces held (spots,
    targets, genes) once the caller has named them; ``partial`` is what the run kept, where it keeps one."""

    def __init__(self, failed: dict[int, str], what: Sequence[str] = (), noun: str = "items", partial: Any = None):
        self.failed = dict(failed)
        self.what = list(what)
        self.noun = noun
        self.partial = partial
        reasons = sorted(set(self.failed.values()))
        listed = ", ".join(self.what[:50]) + (f" and {len(self.what) - 50} more" if len(self.what) > 50 else "")
        super().__init__(
            f"{len(self.failed)} piece(s) of the run failed on the cluster ({'; '.join(reasons)[:500]}); "
            f"their {len(self.what)} {noun} have no result: {listed}. Every other piece finished and is kept."
        )

    def named(self, what: Sequence[str], noun: str, partial: Any = None) -> PiecesFailed:
        return PiecesFailed(self.failed, what, noun, partial)


def describe(scheduler: str | None) -> str:
    if scheduler is None:
        return "in-process"
    return "a local Dask cluster" if scheduler == LOCAL else f"the Dask scheduler at {scheduler}"


def _worker_probe() -> Callable[[], dict]:
    # runs on each worker. Compiled from source here, so that it is not importable by name: cloudpickle then
    # sends it by value and it unpickles on a worker that lacks this package, to say so
    namespace: dict = {}
    exec(compile(_PROBE_SOURCE, "<spatial_deconv_gui worker probe>", "exec"), namespace)
    return namespace["_probe"]


_PROBE_SOURCE = '''
def _probe():
    import importlib
    import sys

    out = {"python": "%d.%d.%d" % sys.version_info[:3]}
    try:
        mod = importlib.import_module("spatial_deconv_gui")
        out["package"] = str(getattr(mod, "__version__", "unknown"))
    except Exception as exc:
        out["package"] = None
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out
'''


def check_workers(client, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, dict]:
    """Every worker imports this package at this process's version, or one :class:`InputError` names each side."""
    from .. import __version__

    try:
        client.wait_for_workers(1, timeout=timeout)
    except Exception as exc:  # distributed raises TimeoutError (a plain one or its own)
        raise InputError(
            f"the Dask scheduler at {client.scheduler.address} has no workers (none joined within {timeout:g} s).",
            "start workers with `dask worker <scheduler address>` (or check the cluster's deployment).",
            code="scheduler_no_workers",
        ) from exc
    found = client.run(_worker_probe())
    bad = []
    for addr, info in sorted(found.items()):
        if info.get("package") is None:
            bad.append(f"{addr} cannot import {PACKAGE} ({info.get('error', 'not installed')})")
        elif info["package"] != __version__:
            bad.append(f"{addr} runs {PACKAGE} {info['package']}")
    if bad:
        raise InputError(
            f"the Dask workers do not run {PACKAGE} {__version__} as this process does: " + "; ".join(bad) + ".",
            f"install spatial-deconv-gui=={__version__} in the workers' environment (the same version on every "
            "side), then restart the workers.",
            code="worker_version",
        )
    return found


@dataclass
class Cluster:
    """A connected client and what the run needs of it."""

    client: Any
    scheduler: str
    _local: Any = None
    _run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info(n_workers=-1)["workers"])

    def share(self, value: Any):
        """Send ``value`` (the data every piece reads) to every worker once; pass the result to :meth:`run`."""
        return self.client.scatter([value], broadcast=True, hash=False)[0]

    def run(
        self,
        fn: Callable,
        pieces: Iterable[tuple],
        *,
        shared: Any = None,
        on_result: Callable[[int, Any], None],
        control: RunControl | None = None,
        name: str = "piece",
        poll_s: float = 0.05,
        in_flight: int | None = None,
    ) -> None:
        """``fn(*piece, shared)`` (or ``fn(*piece)`` without ``shared``) for every piece, as tasks.

        ``pieces`` may be a generator: it is drawn as tasks are submitted, at most ``in_flight`` tasks submitted
        and unfinished at a time (None: all at once), so pieces read from disk are held only while in flight.
        ``on_result(i, result)`` (``i``: the piece's position) is called here, in completion order, once per
        piece. Cancelling ``control`` cancels every task still queued or running and raises :class:`Cancelled`.
        An exception raised by a piece stops the run (the other tasks are cancelled) and is raised here; a piece
        lost to dying workers is left out and named, after the others finished, by :class:`PiecesFailed`."""
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        control = control or RunControl()
        client = self.client
        source = enumerate(pieces)
        live: dict[str, tuple[int, Any]] = {}  # key -> (piece index, future) of the tasks not yet handled
        pending = as_completed(loop=client.loop)
        limit = None if in_flight is None else max(1, int(in_flight))

        def submit_more() -> None:
            while limit is None or len(live) < limit:
                nxt = next(source, None)
                if nxt is None:
                    return
                i, piece = nxt
                args = (*piece, shared) if shared is not None else tuple(piece)
                fut = client.submit(fn, *args, key=f"{name}-{self._run_id}-{i}", pure=False, retries=0)
                live[fut.key] = (i, fut)
                pending.add(fut)

        failed: dict[int, str] = {}
        try:
            submit_more()
            while not pending.is_empty():
                if control.cancelled:
                    raise Cancelled("run cancelled by the user")
                if not pending.has_ready():
                    time.sleep(poll_s)
                    continue
                for fut in pending.next_batch(block=False):
                    if control.cancelled:  # nothing more is handed on once the user cancelled
                        raise Cancelled("run cancelled by the user")
                    i, _ = live.pop(fut.key)
                    if fut.status == "error":
                        exc = fut.exception()
                        if isinstance(exc, KilledWorker):
                            failed[i] = "its worker died each time it ran"
                            submit_more()
                            continue
                        raise exc.with_traceback(fut.traceback())
                    on_result(i, fut.result())
                    fut.release()
                    submit_more()
        except BaseException:
            client.cancel([f for _, f in live.values() if not f.done()], force=True)
            raise
        if failed:
            raise PiecesFailed(failed)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self._local is not None:
            with contextlib.suppress(Exception):
                self._local.close()


def start_local(n_workers: int | None = None, processes: bool = True, threads_per_worker: int = 1, **kwargs):
    """An embedded LocalCluster: one single-threaded worker process per core by default (each piece's solver
    runs in one thread, so the workers do not fight over cores)."""
    import os

    from distributed import LocalCluster

    n = n_workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return LocalCluster(
        n_workers=int(n),
        threads_per_worker=threads_per_worker,
        processes=processes,
        dashboard_address=None,
        silence_logs=40,
        **kwargs,
    )


@contextlib.contextmanager
def connect(
    scheduler: str | None,
    *,
    n_workers: int | None = None,
    timeout: float = CONNECT_TIMEOUT_S,
    processes: bool = True,
) -> Iterator[Cluster | None]:
    """A :class:`Cluster` for ``scheduler`` (``None`` yields ``None``: run in-process), closed on exit.

    An address that does not answer within ``timeout`` seconds, a scheduler without workers and workers at
    another version of this package each raise one :class:`InputError` naming the problem and the fix."""
    if scheduler is None:
        yield None
        return
    scheduler = str(scheduler).strip()
    try:
        from distributed import Client
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError(
            "running on a Dask cluster needs dask and distributed, which are not installed.",
            "pip install 'spatial-deconv-gui[dask]'.",
            code="dask_missing",
        ) from exc
    local = None
    if scheduler == LOCAL:
        local = start_local(n_workers, processes=processes)
        client = Client(local, timeout=f"{timeout}s", set_as_default=False)
    else:
        if "://" not in scheduler and ":" not in scheduler:
            raise InputError(
                f"scheduler {scheduler!r} is neither 'local' nor an address.",
                "pass 'local', or the scheduler's address such as tcp://10.0.0.5:8786.",
                code="bad_scheduler",
            )
        try:
            client = Client(scheduler, timeout=f"{timeout}s", set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise InputError(
                f"no Dask scheduler answered at {scheduler} within {timeout:g} s ({type(exc).__name__}).",
                "check the address and port (`dask scheduler` prints them) and that this machine can reach it, "
                "or leave --scheduler out to run in this process.",
                code="scheduler_unreachable",
            ) from exc
    cluster = Cluster(client, scheduler, local)
    try:
        check_workers(client, timeout=timeout)
        yield cluster
    finally:
        cluster.close()


@contextlib.contextmanager
def using(scheduler, n_workers: int | None = None) -> Iterator[Cluster | None]:
    """``scheduler`` may already be a :class:`Cluster` (kept open) or an address / ``"local"`` (opened and
    closed here) or ``None``."""
    if scheduler is None or isinstance(scheduler, Cluster):
        yield scheduler
        return
    with connect(scheduler, n_workers=n_workers) as cluster:
        yield cluster


@contextlib.contextmanager
def task_threads(n: int | None):
    """numba's threads for one task (``None``: as they are). A Dask worker runs one task per thread, so a task
    that also spread over every core would oversubscribe the machine; numba's setting is per thread, so this
    touches no other task. (torch's threads follow OMP_NUM_THREADS, which Dask's nanny sets to 1.)"""
    if n is None:
        yield
        return
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


TASK_THREADS = 1


def ranges(n: int, size: int) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` covering ``range(n)`` in pieces of ``size``: the same pieces whatever the number of
    workers, so that the answer does not depend on it."""
    size = max(1, int(size))
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]
