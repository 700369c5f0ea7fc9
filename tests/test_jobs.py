"""The one job runner every dock uses: throttled relays, cancel, errors, staged finishing."""

from __future__ import annotations

import threading
import time

import numpy as np

from spatial_deconv_gui.api import RunControl, TrainingStatus
from spatial_deconv_gui.gui.jobs import JobRunner, progress_text


class Recorder:
    """Stands in for a status Label / ProgressBar: keeps every value set, with the time it was set."""

    def __init__(self):
        self.history: list[tuple[float, object]] = []

    @property
    def value(self):
        return self.history[-1][1] if self.history else None

    @value.setter
    def value(self, v):
        self.history.append((time.perf_counter(), v))


def test_progress_text_and_eta_by_hand():
    assert progress_text("fit", 0.25, "batch 2", elapsed_s=10.0) == "fit: 25%, about 30 s left - batch 2"
    assert progress_text("fit", 0.01, elapsed_s=10.0) == "fit: 1%"  # too early to guess
    assert progress_text("fit", 1.0, elapsed_s=10.0) == "fit: 100%"


def test_training_eta_is_an_upper_bound_until_the_stop_is_in_sight():
    # 100 of at most 2,000 epochs at 10 epochs/s: the cap is 190 s away, an upper bound only
    early = TrainingStatus(epoch=100, max_epochs=2000, epochs_per_s=10.0)
    assert progress_text("spatial", 0.05, "epoch 100/2000", 10.0, early) == (
        "spatial: 5%, at most 190 s left - epoch 100/2000"
    )
    # the rule expects the stop near epoch 400: 30 s expected, the 190 s bound still shown
    near = TrainingStatus(epoch=100, max_epochs=2000, epochs_per_s=10.0, expected_epochs=400)
    assert progress_text("spatial", 0.25, "", 10.0, near) == "spatial: 25%, about 30 s left (at most 190 s)"
    # an expected stop at the cap itself is no news: the bound alone
    capped = TrainingStatus(epoch=100, max_epochs=2000, epochs_per_s=10.0, expected_epochs=2000)
    assert progress_text("spatial", 0.05, "", 10.0, capped) == "spatial: 5%, at most 190 s left"
    # the stage's last event (a stop reason set) has no time left to show
    stopped = TrainingStatus(epoch=980, max_epochs=2000, epochs_per_s=10.0, stop_reason="converged")
    assert progress_text("spatial", 1.0, "converged", 98.0, stopped) == "spatial: 100% - converged"


def test_a_fast_producer_reaches_the_canvas_at_most_five_times_a_second(qtbot):
    status, progress = Recorder(), Recorder()
    runner = JobRunner("Fake", status=status, progress=progress)
    relays: list[tuple[float, list]] = []
    done = []
    n = 3000

    def work(control: RunControl):
        t_end = time.perf_counter() + 1.5
        i = 0
        while i < n:
            control.report("fit", i / n, partial=i)  # every partial is delivered, however fast
            i += 1
            if i % 10 == 0:
                time.sleep(max(0.0, (t_end - time.perf_counter()) / ((n - i) / 10 + 1)))
        return "answer"

    t0 = time.perf_counter()
    assert runner.start(work, done.append, on_partials=lambda parts: relays.append((time.perf_counter(), parts)))
    assert runner.busy
    qtbot.waitUntil(lambda: not runner.busy, timeout=30_000)
    elapsed = time.perf_counter() - t0
    assert done == ["answer"]
    # the job sent 3000 partials; the canvas heard of them a few times a second, in order, none lost or repeated
    delivered = [p for _, parts in relays for p in parts]
    assert delivered == list(range(len(delivered))) and len(delivered) > 0.5 * n
    assert len(relays) <= 5 * elapsed + 1, (len(relays), elapsed)
    gaps = np.diff([t for t, _ in relays])
    assert gaps.size >= 3 and gaps.min() >= 0.18, gaps  # 200 ms apart, less Qt's coarse-timer slack (5 %)
    # the status line too: ~5 changes a second, with an ETA while it runs
    texts = [v for _, v in status.history]
    assert len(texts) <= 5 * elapsed + 2
    assert any("s left" in t for t in texts), texts
    assert progress.value == 1000


def test_cancel_stops_the_work_and_leaves_no_layer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    status = Recorder()
    runner = JobRunner("Fake", status=status)
    iterations = []
    stopped = threading.Event()
    done = []

    def work(control: RunControl):
        try:
            while True:
                control.check_cancel()
                iterations.append(1)
                control.report("fit", min(len(iterations) / 1e4, 0.99), partial=len(iterations))
                time.sleep(0.002)
        finally:
            stopped.set()

    def paint(parts):  # the streamed partial results go onto a layer made for the run
        if "running" not in viewer.layers:
            viewer.add_points(np.zeros((3, 2)), name="running")
        viewer.layers["running"].metadata["seen"] = parts[-1]

    def drop():
        if "running" in viewer.layers:
            viewer.layers.remove("running")

    runner.start(work, done.append, on_partials=paint, on_cancelled=drop, cancelled_message="cancelled: nothing kept")
    qtbot.waitUntil(lambda: "running" in viewer.layers, timeout=10_000)
    runner.cancel()
    assert stopped.wait(5.0)  # the worker left its loop at the next check
    count = len(iterations)
    qtbot.waitUntil(lambda: not runner.busy, timeout=10_000)
    time.sleep(0.1)
    assert len(iterations) == count
    assert done == [] and len(viewer.layers) == 0
    assert status.value == "cancelled: nothing kept"


def test_an_error_in_the_worker_becomes_a_notification_and_a_dock_message(qtbot, monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    status = Recorder()
    runner = JobRunner("Fake dock", status=status)
    errors, done = [], []

    def work(control):
        control.report("fit", 0.5)
        raise RuntimeError("the engine exploded")  # superqt alone would only warn about a RuntimeError

    runner.start(work, done.append, on_error=errors.append)
    qtbot.waitUntil(lambda: not runner.busy, timeout=10_000)
    assert shown == ["Fake dock: RuntimeError: the engine exploded"]
    assert status.value == "failed: RuntimeError: the engine exploded"
    assert [str(e) for e in errors] == ["the engine exploded"] and done == []


def test_finishing_steps_run_one_per_event_loop_turn(qtbot):
    runner = JobRunner("Fake")
    turns, states = [], []

    def finish(result):
        for i in range(3):
            turns.append((result, i))
            states.append(runner.busy)
            yield

    runner.start(lambda control: "r", finish)
    assert not runner.start(lambda control: "second", finish)  # one job at a time
    qtbot.waitUntil(lambda: not runner.busy, timeout=10_000)
    assert turns == [("r", 0), ("r", 1), ("r", 2)] and all(states)


def test_a_failing_finishing_step_is_reported_and_frees_the_runner(qtbot, monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    runner = JobRunner("Fake")

    def finish(_result):
        yield
        raise ValueError("no room for the layer")

    runner.start(lambda control: None, finish)
    qtbot.waitUntil(lambda: not runner.busy, timeout=10_000)
    assert shown == ["Fake: ValueError: no room for the layer"]


def test_busy_changed_brackets_the_job(qtbot):
    runner = JobRunner("Fake")
    busy_signals = []
    runner.busy_changed.connect(busy_signals.append)
    runner.start(lambda control: 1, lambda _r: iter([None, None]))
    qtbot.waitUntil(lambda: not runner.busy, timeout=10_000)
    assert busy_signals == [True, False]


def test_shutdown_cancels_the_job_and_calls_no_handler_afterwards(qtbot, monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    status = Recorder()
    runner = JobRunner("Fake", status=status)
    calls, busy_signals = [], []
    runner.busy_changed.connect(busy_signals.append)
    started = threading.Event()

    def work(control: RunControl):
        started.set()
        while True:
            control.check_cancel()
            control.report("fit", 0.5, partial=1)
            time.sleep(0.005)

    runner.start(work, calls.append, on_partials=calls.append, on_cancelled=lambda: calls.append("cancelled"))
    assert started.wait(10)
    qtbot.waitUntil(lambda: len(calls) > 0, timeout=10_000)  # partials reach the dock while it is open
    seen = len(calls)
    runner.shutdown()  # the dock closes
    assert runner.control.cancelled
    qtbot.waitUntil(lambda: not runner.busy, timeout=10_000)
    time.sleep(0.3)  # a relay tick would have come by now
    assert len(calls) == seen and shown == [] and busy_signals == [True]
    assert not runner.start(lambda control: 1, calls.append)
