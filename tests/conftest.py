import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# The CUDA kernels run in Numba's simulator unless told otherwise (set
# NUMBA_ENABLE_CUDASIM=0 on a GPU machine to run the `cuda`-marked tests).
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# Numba compiles a kernel per dtype/layout on first use: no deadline.
settings.register_profile(
    "rnntool", deadline=None, max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "rnntool"))
