"""Where the loss engine runs: one place that turns a device choice into a backend.

Two names, kept apart everywhere: a *device* is what a user asks for
(``--device auto|cpu|cuda``) or where a torch tensor lives; a *backend* is the
engine that runs (``rnnt_loss(backend=...)``: ``"cpu"`` or ``"cuda"``). Under
Numba's simulator (``NUMBA_ENABLE_CUDASIM=1``) the ``cuda`` backend runs on CPU
tensors, so the two differ there.

torch is imported only when the answer needs it: ``--device auto`` on a machine
without NVIDIA device nodes resolves to the CPU without it (a second of
start-up; CPU scoring of raw dumps never needs torch).
"""

from __future__ import annotations

import os

DEVICES = ("auto", "cpu", "cuda")
# Device nodes present wherever an NVIDIA driver is (Linux, WSL).
_NVIDIA_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")


def _simulated() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def backend_for(device: str) -> str:
    """The backend (``"cpu"`` or ``"cuda"``) that ``device`` (one of ``DEVICES``) selects.

    ``auto``: ``cuda`` where torch sees a GPU, else ``cpu`` (without importing
    torch when no NVIDIA device node exists). ``cuda``: needs a GPU torch can
    use, or Numba's simulator. Raises ValueError for an unknown device
    (``"'x' is not one of auto, cpu, cuda"``) and for ``cuda`` without a GPU
    (``"cuda: no usable CUDA GPU here (...)"``).
    """
    if device not in DEVICES:
        raise ValueError(f"{device!r} is not one of {', '.join(DEVICES)}")
    if device == "auto":
        if not any(os.path.exists(p) for p in _NVIDIA_NODES):
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not _simulated():
        import torch

        if not torch.cuda.is_available():
            raise ValueError("cuda: no usable CUDA GPU here (torch.cuda.is_available() is False)")
    return device


def tensor_device(backend: str) -> str:
    """The torch device for tensors that ``backend`` runs on: ``"cuda"`` only for the
    ``cuda`` backend on a real GPU (the simulator runs it on CPU tensors)."""
    if backend != "cuda":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_usable() -> bool:
    """True where ``backend="cuda"`` runs: a real GPU that torch and Numba both see, or
    Numba's simulator when it is on."""
    try:
        from . import cuda
    except ImportError:
        return False
    import torch

    return cuda.SIMULATOR or (torch.cuda.is_available() and cuda.cuda.is_available())
