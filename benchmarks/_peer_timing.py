"""Epoch timing for the peers' Lightning training loops (imported by the peer workers, in the peers' venvs)."""

from __future__ import annotations

import time


def epoch_timer():
    """A Lightning callback recording wall and CPU time at each epoch's end (``.t``, ``.c``)."""
    import lightning.pytorch as pl

    class EpochTimer(pl.Callback):
        def __init__(self):
            self.t, self.c = [], []

        def on_train_epoch_end(self, trainer, module):
            self.t.append(time.perf_counter())
            self.c.append(time.process_time())

    return EpochTimer()
