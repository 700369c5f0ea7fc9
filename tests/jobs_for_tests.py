"""Jobs that fail the way a child process can fail, for the tests of the GUI's child-process jobs (imported by
name in the child: the tests' folder is on its path)."""

from __future__ import annotations

import os
import signal
import time


def crash(control, how: str = "segfault", **_inputs):
    """Dies without an answer after its first progress message, as a crash in native code does."""
    control.report("training", 0.1, "about to crash")
    if how == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    os._exit(3)


def stuck(control, **_inputs):
    """Reports once, then never looks at its cancel event again (one long native call)."""
    control.report("training", 0.0, "stuck")
    while True:
        time.sleep(0.05)
