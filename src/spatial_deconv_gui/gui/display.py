"""A private Xvfb display for headless rendering, when the machine has Xvfb and no display."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys


@contextlib.contextmanager
def virtual_display(width: int = 1600, height: int = 1000):
    """Yields True when a display (real or Xvfb) is available, False when only offscreen Qt is left."""
    if os.environ.get("DISPLAY") or sys.platform != "linux":
        yield True
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        yield False
        return
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write_fd), "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as fh:
        number = fh.readline().strip()  # Xvfb writes the display number once it accepts connections
    if not number:
        proc.kill()
        yield False
        return
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = f":{number}"
    try:
        yield True
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        if old is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = old
