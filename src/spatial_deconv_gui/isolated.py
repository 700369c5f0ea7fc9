"""Run one job in a child process, with progress and cancellation as if it ran in this one.

A GUI that trains a model in a thread shares the interpreter lock with it: any stretch of Python or C code that
holds the lock (numba compiling a kernel, pandas parsing a table) freezes the event loop for that long. A child
process shares nothing, so the GUI's event loop stays free however the job is written. The cost is the child's
start (importing torch, a few seconds), so this is for jobs that take longer than that.

The child calls ``module:function(**kwargs, control=...)``; its progress events come back through a queue and
are re-reported on the caller's :class:`RunControl`, the caller's cancel event is forwarded, and the child's
return value or exception is handed back (an exception that cannot be pickled comes back as a RuntimeError
with its type, message and traceback text). A child that dies without an answer (a crash in native code, the
system killing it) becomes a RuntimeError naming its exit code or signal; a caller that goes away (a closed
window) sets ``abandon``, and the child is ended at once instead of at its next cancellation check.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import traceback
from collections.abc import Callable
from typing import Any

from .engines.base import Cancelled, RunControl

_POLL_S = 0.05


def _child(target: str, kwargs: dict, events: mp.Queue, cancel, threads: int | None):
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["NUMBA_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    # max_rate=0: every event the job lets through goes to the parent, whose RunControl rate-limits it again
    control = RunControl(lambda ev: events.put(("progress", ev)), cancel, max_rate=0)
    try:
        module, name = target.split(":")
        result = getattr(importlib.import_module(module), name)(**kwargs, control=control)
        message = ("result", result)
    except Cancelled as exc:
        message = ("cancelled", str(exc))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        message = ("error", exc, traceback.format_exc())
    # pickled here, once (the queue would pickle it again after a failed test dump), so a payload that cannot
    # travel is replaced by an error the parent can read
    try:
        payload = pickle.dumps(message)
    except Exception:  # noqa: BLE001 - the payload is what failed to pickle
        if message[0] == "error":
            message = ("error", RuntimeError(f"{type(message[1]).__name__}: {message[1]}"), message[2])
        else:
            message = ("error", RuntimeError("the job's result could not be sent back to the caller"), "")
        payload = pickle.dumps(message)
    events.put(("outcome", payload))


def _context():
    # fork would copy a running Qt application and its threads. A forkserver child is forked from a small
    # server process instead of being started from this (large) one, which shortens the pause the GUI's event
    # loop sees when a child starts (spawn: 70-160 ms, forkserver: 9-37 ms on a 2-core machine). The server
    # preloads nothing (not even __main__, which under napari is its launcher): children import what they use.
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([])
    return ctx


def ended_how(exitcode: int | None) -> str:
    """``"killed by signal SIGSEGV"`` / ``"exit code 3"``: how a child process ended, in words."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _end_now(proc):
    """SIGTERM, then SIGKILL if it lingers: the child's outputs are written atomically, so ending it anywhere
    leaves no half-written file (a later write sweeps the temporaries of dead processes)."""
    if proc.is_alive():
        proc.terminate()
        proc.join(2)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def run_isolated(
    target: str,
    kwargs: dict[str, Any],
    control: RunControl | None = None,
    threads: int | None = None,
    *,
    abandon: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Any:
    """Run ``target`` (``"package.module:function"``) in a fresh child process and return its result.

    ``threads`` caps the child's torch/numba/OpenMP threads (e.g. one fewer than the cores, so the GUI keeps
    a core). Raises :class:`Cancelled` when the caller's control is cancelled, and re-raises the child's error.
    ``abandon``, once set, ends the child at once (the caller's window closed) and raises :class:`Cancelled`;
    ``on_start`` is called with the child's pid.
    """
    control = control or RunControl()
    ctx = _context()
    events = ctx.Queue()
    cancel = ctx.Event()
    proc = ctx.Process(target=_child, args=(target, kwargs, events, cancel, threads), daemon=True)
    proc.start()
    if on_start is not None:
        on_start(proc.pid)
    outcome = None
    try:
        while outcome is None:
            if control.cancelled:
                cancel.set()
            if abandon is not None and abandon.is_set():
                cancel.set()
                _end_now(proc)
                raise Cancelled("the window that ran the job closed")
            try:
                item = events.get(timeout=_POLL_S)
            except queue.Empty:
                if not proc.is_alive():
                    try:  # the last message may have landed between the timeout and the liveness check
                        item = events.get(timeout=1.0)
                    except queue.Empty:
                        proc.join(1)
                        raise RuntimeError(
                            f"the {target.split(':')[-1]} process ended without an answer "
                            f"({ended_how(proc.exitcode)}): a crash in native code, or the system "
                            "ending it when memory ran short"
                        ) from None
                else:
                    continue
            if item[0] == "progress":
                ev = item[1]
                control.report(ev.stage, ev.fraction, ev.message, ev.partial)
            else:
                try:
                    outcome = pickle.loads(item[1])
                except Exception as exc:  # noqa: BLE001 - e.g. an exception class that cannot be rebuilt
                    outcome = ("error", RuntimeError(f"the job's outcome could not be read back: {exc}"), "")
    finally:
        if outcome is None:  # the caller is going away (error, KeyboardInterrupt): stop the child too
            cancel.set()
        proc.join(timeout=30 if outcome is not None else 5)
        _end_now(proc)
    kind = outcome[0]
    if kind == "result":
        return outcome[1]
    if kind == "cancelled":
        raise Cancelled(outcome[1])
    exc, tb = outcome[1], outcome[2]
    try:
        exc.child_traceback = tb  # kept for a bug report; the message is what the user sees
    except AttributeError:
        pass
    raise exc
