"""One way for a dock to run work off napari's event loop.

A :class:`JobRunner` runs one job at a time for its dock, in a worker thread, or in a child process through
:func:`spatial_deconv_gui.isolated.run_isolated` (for jobs whose Python or numba code would hold the interpreter
lock long enough to freeze the canvas). The job reports through a :class:`RunControl`; on the GUI thread the
runner keeps the latest progress event and the streamed partial results, and a timer relays them to the dock
(progress bar, status line with an ETA, ``on_partials`` for the canvas) at most five times a second. Cancel sets
the control's cancel event. The job's outcome comes back as a value (never as a worker exception, which superqt
may swallow): a result goes to ``on_done``, a :class:`Cancelled` to ``on_cancelled``, any other error to a
napari notification and the dock's status line. ``on_done`` may return a generator: its steps run one per
event-loop turn (adding layers a little at a time), and the runner stays busy until the last one.

Later controls slot in through :attr:`JobRunner.control`: a "stop now, keep the answer" button asks the running
job's control to stop where the engine allows it, as Cancel sets its cancel event.

:meth:`JobRunner.shutdown` is for a dock that closes (or a viewer that closes under it): the job is cancelled, a
child process is ended at once, and none of the dock's handlers runs afterwards (its widgets may be gone).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, QTimer, Signal

from ..api import Cancelled, RunControl, TrainingStatus
from ..isolated import run_isolated
from .notify import notify_error, user_message

RELAY_INTERVAL_MS = 200  # the canvas and the status line change at most ~5 times a second


def progress_text(
    stage: str,
    fraction: float,
    message: str = "",
    elapsed_s: float | None = None,
    training: TrainingStatus | None = None,
) -> str:
    """``"stage: 40%, about 12 s left - message"``; the estimate assumes the stage's rate so far holds.

    With ``training`` (cell2location, DestVI) the time left knows about early stopping: the epoch cap at the current
    speed is only an upper bound (``at most 90 s left``) until the convergence rule can tell where it will stop,
    then ``about 20 s left (at most 90 s)``.
    """
    eta = ""
    if training is not None and training.stop_reason is None and training.epochs_per_s > 0 and fraction < 1:
        bound = training.seconds_left_max
        expected = training.seconds_left_expected
        if expected is None or training.expected_epochs >= training.max_epochs:
            eta = f", at most {bound:.0f} s left"
        else:
            eta = f", about {expected:.0f} s left (at most {bound:.0f} s)"
    elif elapsed_s is not None and 0.02 < fraction < 1:
        eta = f", about {elapsed_s / fraction * (1 - fraction):.0f} s left"
    return f"{stage}: {100 * fraction:.0f}%{eta}" + (f" - {message}" if message else "")


def leave_a_core():
    """Run this thread's torch and numba work on one core fewer than they would take: compute threads on every
    core would starve the event loop on small machines."""
    # imported here, in the worker: torch takes seconds to import, which opening a dock should not pay
    import numba
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    numba.set_num_threads(max(1, numba.config.NUMBA_NUM_THREADS - 1))


class JobRunner(QObject):
    """Runs a dock's jobs, one at a time, and relays what they report to the dock.

    ``status`` (a magicgui Label) and ``progress`` (a magicgui ProgressBar from 0 to 1000) are the dock's
    widgets the runner writes to; ``context`` names the dock in error notifications.
    """

    progressed = Signal(object)  # every progress event the job sends, as it reaches the GUI thread
    busy_changed = Signal(bool)
    _received = Signal(object)  # emitted in the worker thread, delivered (queued) on the GUI thread

    def __init__(self, context: str, status=None, progress=None, interval_ms: int = RELAY_INTERVAL_MS):
        super().__init__()
        self.context = context
        self.status = status
        self.progress = progress
        self.worker = None
        self.control: RunControl | None = None
        self.finishing = False
        self._handlers: dict[str, Callable | None] = {}
        self._latest = None
        self._shown = None
        self._pending: list = []
        self._stage: str | None = None
        self._stage_t0 = 0.0
        self._abandon = threading.Event()
        self.child_pid: int | None = None  # the child process of the job that runs (or ran last) in one
        self.closed = False
        self._received.connect(self._on_event)
        # single-shot, restarted after each relay: a late tick (a busy event loop) cannot be followed by a
        # catch-up tick, so relays stay at least ``interval_ms`` apart
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._tick)

    @property
    def busy(self) -> bool:
        """True while a job computes or its ``on_done`` steps are still running."""
        return self.worker is not None or self.finishing

    # -- starting ------------------------------------------------------------------------------------
    def start(
        self,
        work: Callable[[RunControl], Any],
        on_done: Callable[[Any], Iterator | None],
        *,
        on_partials: Callable[[list], None] | None = None,
        on_cancelled: Callable[[], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        cancelled_message: str = "cancelled",
        message: str = "",
    ) -> bool:
        """Run ``work(control)`` in a worker thread; False (and nothing started) while another job runs or after
        :meth:`shutdown`."""
        if self.busy or self.closed:
            return False
        self._abandon = threading.Event()
        self.control = RunControl(self._received.emit, threading.Event())
        self._handlers = dict(on_done=on_done, on_partials=on_partials, on_cancelled=on_cancelled, on_error=on_error)
        self._cancelled_message = cancelled_message
        self._latest = self._shown = None
        self._pending = []
        self._stage = None
        # Handlers go in at creation: without them there, superqt may re-raise in the event loop.
        self.worker = create_worker(
            _outcome_of,
            work,
            self.control,
            _start_thread=False,
            _connect={"returned": self._on_outcome, "finished": self._on_finished},
        )
        if self.progress is not None:
            self.progress.value = 0
        if self.status is not None and message:
            self.status.value = message
        self._timer.start()
        self.busy_changed.emit(True)
        self.worker.start()
        return True

    def start_process(self, target: str, kwargs: dict, on_done, threads: int | None = None, **options) -> bool:
        """Run ``target`` (``"module:function"``, called with ``control=``) in a child process: the GUI shares
        no interpreter lock with it, so no compile or parsing step of the job can freeze the canvas."""

        def work(control):
            # self._abandon is the event start() made for this job, before the worker began
            abandon = self._abandon
            return run_isolated(target, kwargs, control, threads=threads, abandon=abandon, on_start=self._child_started)

        return self.start(work, on_done, **options)

    def _child_started(self, pid: int):
        self.child_pid = pid

    def cancel(self):
        if self.control is not None and self.worker is not None:
            self.control.cancel()

    def shutdown(self):
        """The dock closes: cancel the job, end its child process now, and call no handler of the dock again."""
        self.closed = True
        try:
            self._timer.stop()
        except RuntimeError:  # the dock's widgets, the timer's parent among them, were destroyed first
            pass
        self._handlers = {}
        self._pending = []
        if self.control is not None and self.worker is not None:
            self.control.cancel()
        self._abandon.set()

    # -- relaying ------------------------------------------------------------------------------------
    def _on_event(self, event):
        if self.worker is None:  # an event that arrived after the outcome: the job is over
            return
        if event.stage != self._stage:
            self._stage, self._stage_t0 = event.stage, time.monotonic()
        self._latest = event
        if event.partial is not None:
            self._pending.append(event.partial)
        self.progressed.emit(event)

    def _tick(self):
        self.relay()
        if self.worker is not None and not self.closed:
            self._timer.start()

    def relay(self):
        """Hand what arrived since the last call to the dock (the timer calls this every ``interval_ms``)."""
        event = self._latest
        if event is not None and event is not self._shown:
            self._shown = event
            if self.progress is not None:
                self.progress.value = int(1000 * event.fraction)
            if self.status is not None:
                self.status.value = progress_text(
                    event.stage, event.fraction, event.message, time.monotonic() - self._stage_t0, event.training
                )
        if self._pending:
            parts, self._pending = self._pending, []
            self._call(self._handlers.get("on_partials"), parts)

    # -- ending --------------------------------------------------------------------------------------
    def _on_outcome(self, outcome):
        kind, value = outcome
        self._timer.stop()
        self._pending = []
        if self.closed:  # the dock is gone: nobody to tell
            return
        handlers = self._handlers
        if kind == "done":
            if self.progress is not None:
                self.progress.value = 1000
            steps = self._call(handlers["on_done"], value)
            if isinstance(steps, Iterator):
                self.finishing = True
                QTimer.singleShot(0, lambda: self._step(steps))
            return
        if kind == "cancelled":
            if self.progress is not None:
                self.progress.value = 0
            if self.status is not None:
                self.status.value = self._cancelled_message
            self._call(handlers["on_cancelled"])
            return
        self._call(handlers["on_error"], value)
        self._report(value)

    def _step(self, steps: Iterator):
        if self.closed:
            steps.close()
            self._end_finishing()
            return
        try:
            next(steps)
        except StopIteration:
            self._end_finishing()
            return
        except Exception as exc:  # noqa: BLE001 - a failed step is reported like a failed job
            self._end_finishing()
            self._report(exc)
            return
        QTimer.singleShot(0, lambda: self._step(steps))

    def _end_finishing(self):
        self.finishing = False
        if self.worker is None and not self.closed:
            self.busy_changed.emit(False)

    def _call(self, handler, *args):
        if handler is None:
            return None
        try:
            return handler(*args)
        except Exception as exc:  # noqa: BLE001 - a dock's handler failing must not leave the runner busy
            self._report(exc)
            return None

    def _report(self, exc: BaseException):
        if self.closed:
            return
        if self.status is not None:
            self.status.value = f"failed: {user_message(exc)}"
        notify_error(exc, self.context)

    def _on_finished(self):
        self.worker = None
        if not self.finishing and not self.closed:  # a closed dock's buttons may be gone
            self.busy_changed.emit(False)


def _outcome_of(work, control) -> tuple[str, Any]:
    """The job's outcome as a value: superqt only warns about some exceptions raised in a worker (torch's
    RuntimeErrors) and never reports them, so every failure travels back as data."""
    try:
        return "done", work(control)
    except Cancelled as exc:
        return "cancelled", exc
    except Exception as exc:  # noqa: BLE001 - every failure becomes a notification in the GUI thread
        return "error", exc
