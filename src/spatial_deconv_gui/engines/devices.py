"""Which compute device a run uses: one answer for every engine, the api and the CLI.

torch is imported only when a device has to be looked at, so that naming a device stays cheap.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from ..io.errors import InputError

if TYPE_CHECKING:
    import torch

AUTO = "auto"


def device_name(device: object = AUTO) -> str:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` for a device asked for as auto / cpu / cuda[:N] (or None / "" for auto).

    auto picks CUDA when torch sees a GPU; asking for CUDA without one, or for a device that does not exist,
    is an :class:`InputError` naming the fix.
    """
    if device is None or str(device) in ("", AUTO):
        if "torch" not in sys.modules and not gpu_driver_visible():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    name = str(device)
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise InputError(f"unknown device {name!r}.", "use auto, cpu, cuda or cuda:N.", code="unknown_device")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError("CUDA was requested but torch sees no GPU.", "use --device cpu (or auto).", code="no_cuda")
    return name


def gpu_driver_visible() -> bool:
    """Whether torch could see a GPU here, told without importing torch (~1-2 s): on Linux a GPU needs its
    kernel driver (NVIDIA's /proc/driver/nvidia or /dev/nvidiactl, WSL's /dev/dxg, ROCm's /dev/kfd); elsewhere
    True (torch is asked). ``auto`` asks torch only when this is True or torch is imported already."""
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd"))


def torch_device(device: object = AUTO) -> torch.device:
    """The torch device of :func:`device_name`."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    return torch.device(device_name(device))


def resolve(device: object = AUTO) -> tuple[str, str | None]:
    """:func:`device_name`, with the notice to show when ``auto`` fell back to the CPU (else None)."""
    name = device_name(device)
    if (device is None or str(device) in ("", AUTO)) and name == "cpu":
        if "torch" not in sys.modules:  # device_name answered without torch: keep the notice as cheap
            return name, "--device auto: no GPU driver found; running on the CPU."
        import torch

        why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
        return name, f"--device auto: {why}; running on the CPU."
    return name, None


class DeviceOutOfMemory(InputError):
    """The GPU ran out of memory even at the smallest batch; names the sizes tried and the way out."""

    def __init__(self, problem: str, fix: str | None = None, code: str = "cuda_out_of_memory", tried=()):
        super().__init__(problem, fix, code)
        self.tried = [int(t) for t in tried]

    @classmethod
    def after(cls, what: str, device: object, tried=(), unit: str = "spots") -> DeviceOutOfMemory:
        sizes = f" with batches of {', '.join(map(str, tried))} {unit}" if tried else ""
        return cls(
            f"{what} ran out of GPU memory on {device}{sizes}.",
            "run on the CPU (--device cpu), free GPU memory used by other processes, or use a smaller input.",
            tried=tried,
        )

    def __reduce__(self):
        return (type(self), (self.problem, self.fix, self.code, self.tried))


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA out-of-memory error (also when raised as a plain RuntimeError by older code paths)."""
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)
    )
