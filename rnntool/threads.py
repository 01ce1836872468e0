"""The Numba threading layer the CPU kernels run on, and a lock where that layer needs one.

Numba runs ``parallel=True`` code on one of three layers, chosen once per
process when the first parallel function compiles or loads (numba's default
order: tbb, omp, workqueue). They differ in what they survive:

=========  ==========================  =====================================
layer      concurrent Python threads   ``fork`` after the kernels have run
=========  ==========================  =====================================
tbb        safe                        safe (numba re-creates TBB in the child)
omp (GNU)  safe                        the child is killed (SIGTERM) at its
                                       first launch; a Pool never returns
workqueue  aborts the process          safe
=========  ==========================  =====================================

So, unless the user named a layer or a priority (``NUMBA_THREADING_LAYER``,
``NUMBA_THREADING_LAYER_PRIORITY``, ``numba.config`` or ``.numba_config.yaml``:
then theirs is used as it is), :func:`select_layer` asks numba for tbb first
and workqueue second, never omp first. The ``tbb`` pip package (a dependency
on the platforms it has wheels for) puts ``libtbb.so.12`` in the environment's
``lib`` folder, where the loader does not look, so numba would skip tbb; we
load it by path first. Measured on a 2-core x86 machine, one forward+backward
of a (16, 200, 41, 256) batch: tbb 84 ms, omp 79 ms, workqueue 123 ms; small
batches: tbb and omp alike, workqueue 2-9x slower.

:func:`kernel_lock` then makes the layer actually in use safe:

- workqueue (TBB missing): launches are serialised by one re-entrant lock,
  so concurrent threads take turns instead of aborting;
- omp with GNU OpenMP (only if the user chose it, or other code started it
  first): in a process forked after it started, every launch raises a
  ``RuntimeError`` saying what to do instead of the child being killed;
- tbb, or omp before any fork: no lock.

The layer is started (``numba.get_num_threads()``) on the first launch through
:func:`kernel_lock`, not at import, so importing rnntool and then forking is
always safe.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading

import numba

_NUMBA_PRIORITY = ["tbb", "omp", "workqueue"]
_OUR_PRIORITY = ["tbb", "workqueue", "omp"]
_THREAD_SAFE = frozenset({"tbb", "omp"})
_TBB_NAMES = frozenset({"libtbb.so.12", "libtbb.12.dylib", "tbb12.dll"})

_selected = False
_layer: str | None = None
_forked_after_gnu_omp = False
_launch_lock = threading.RLock()
_init_lock = threading.Lock()
_tbb_handle = None  # keeps the preloaded library alive


def _load_tbb() -> None:
    """Load the ``tbb`` pip package's shared library by path, so numba finds it by name."""
    global _tbb_handle
    from importlib import metadata

    try:
        files = metadata.distribution("tbb").files or []
    except metadata.PackageNotFoundError:
        return
    for f in files:
        if f.name in _TBB_NAMES:
            with contextlib.suppress(OSError):
                _tbb_handle = ctypes.CDLL(str(f.locate()))
                return


def _user_chose() -> bool:
    cfg = numba.config
    return (
        "NUMBA_THREADING_LAYER" in os.environ
        or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ
        or str(cfg.THREADING_LAYER).lower() != "default"
        or list(cfg.THREADING_LAYER_PRIORITY) not in (_NUMBA_PRIORITY, _OUR_PRIORITY)
    )


def _started_layer() -> str | None:
    """The layer numba has started in this process, or None before any parallel launch."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def _ask_for_safe_layer() -> None:
    # numba.config re-reads the environment when a NUMBA_* variable changes, which
    # undoes this; current_layer() calls it again right before starting the layer.
    if not _user_chose() and _started_layer() is None:
        numba.config.THREADING_LAYER_PRIORITY = list(_OUR_PRIORITY)


def select_layer() -> None:
    """Choose the threading layer before the first parallel kernel runs (idempotent)."""
    global _selected
    if _selected:
        return
    _selected = True
    _load_tbb()
    _ask_for_safe_layer()


def current_layer() -> str:
    """The threading layer the kernels run on, starting numba's thread pool if need be."""
    global _layer
    if _layer is None:
        with _init_lock:
            if _layer is None:
                select_layer()
                _ask_for_safe_layer()
                numba.get_num_threads()  # starts the layer now, with our choice in force
                _layer = numba.threading_layer()
    return _layer


def _gnu_omp_started() -> bool:
    if _started_layer() != "omp":
        return False
    try:
        from numba.np.ufunc import omppool
    except ImportError:
        return False
    return getattr(omppool, "openmp_vendor", "GNU") == "GNU"


def _after_fork_in_child() -> None:
    global _forked_after_gnu_omp, _launch_lock, _init_lock
    # A thread of the parent may have held these at the fork; it does not exist here.
    _launch_lock = threading.RLock()
    _init_lock = threading.Lock()
    if _gnu_omp_started():
        _forked_after_gnu_omp = True


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def kernel_lock():
    """Held around every parallel CPU kernel launch; a no-op where the layer is thread-safe."""
    layer = current_layer()
    if _forked_after_gnu_omp:
        raise RuntimeError(
            "rnntool's CPU kernels cannot run in this process: it was forked after Numba's "
            "GNU OpenMP threading layer had started, and GNU OpenMP is not fork-safe. Use the "
            "'spawn' or 'forkserver' start method, or another threading layer "
            "(NUMBA_THREADING_LAYER=tbb with `pip install tbb`, or workqueue)."
        )
    if layer in _THREAD_SAFE:
        yield
    else:
        with _launch_lock:
            yield
