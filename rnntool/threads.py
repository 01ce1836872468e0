"""The Numba threading layer the CPU kernels run on, and a lock where that layer needs one.

(Stub: filled in by the fork/thread-safety work of issue 8.)
"""

from __future__ import annotations

import contextlib


def select_layer() -> None:
    """Choose the threading layer before the first parallel kernel runs (idempotent)."""


@contextlib.contextmanager
def kernel_lock():
    """Held around every parallel CPU kernel launch; a no-op where the layer is thread-safe."""
    yield
