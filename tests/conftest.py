import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# The CUDA kernels run in Numba's simulator unless told otherwise (set
# NUMBA_ENABLE_CUDASIM=0 on a GPU machine to run the `cuda`-marked tests).
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
if os.environ["NUMBA_ENABLE_CUDASIM"] == "1":
    # The simulator runs each CUDA thread as a Python thread, and its launcher polls
    # them while holding the GIL: with Python's default 5 ms switch interval a
    # thread woken at a syncthreads() waits that long for its turn. 0.1 ms makes the
    # simulated kernels about 5x faster (with SMALL_LAUNCHES); results are the same.
    sys.setswitchinterval(1e-4)

from hypothesis import HealthCheck, settings  # noqa: E402

# Numba compiles a kernel per dtype/layout on first use: no deadline.
settings.register_profile(
    "rnntool", deadline=None, max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "rnntool"))


import pytest  # noqa: E402
from helpers import BACKENDS, SMALL_LAUNCHES  # noqa: E402


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each engine backend in turn: a test taking ``backend`` runs on every one, so a
    backend a test does not cover shows as a missing parameter. ``"cuda"`` runs the
    CUDA kernels in Numba's simulator on CPU tensors, with ``SMALL_LAUNCHES`` (every
    multi-chunk path on tiny inputs); without the simulator it is skipped (on a GPU
    machine the `cuda`-marked tests of test_cuda.py run the real kernels)."""
    if request.param == "cpu":
        yield "cpu"
        return
    from rnntool import cuda

    if not cuda.SIMULATOR:
        pytest.skip("the cuda parameter runs the CUDA kernels in Numba's simulator")
    with cuda.config(**SMALL_LAUNCHES):
        yield "cuda"
