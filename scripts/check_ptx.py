"""Compile every CUDA kernel to PTX for each input dtype, with no GPU needed.

Catches what Numba's simulator cannot: typing and lowering errors of the real
CUDA target (casts to float16, libdevice calls, shared memory). Needs NVVM and
NVRTC (a CUDA toolkit, or `pip install nvidia-cuda-nvrtc` beside numba-cuda):

    NUMBA_ENABLE_CUDASIM=0 CUDA_HOME=/usr/local/cuda python scripts/check_ptx.py [--cc 9.0]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

import numba  # noqa: E402
from numba import cuda, types  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rnntool import cuda as rc  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 (Hopper)")
    cc = tuple(int(v) for v in ap.parse_args().cc.split("."))
    i64 = types.int64
    idx1, idx2 = types.Array(i64, 1, "C"), types.Array(i64, 2, "C")
    failures = 0
    storage = {"float32": numba.float32, "float64": numba.float64, "float16": types.float16,
               "bfloat16": numba.int16}
    for name, st in storage.items():
        lat = numba.float64 if name == "float64" else numba.float32
        x4 = types.Array(st, 4, "A")
        l1, l3, l4 = (types.Array(lat, n, "C") for n in (1, 3, 4))
        u8 = types.Array(numba.uint8, 3, "C")
        d1, d3 = (types.Array(numba.float64, n, "C") for n in (1, 3))  # stage 2: float64
        normalise, gradient = rc.row_kernels(name)
        jobs = {
            "cuda_normalise": (normalise, (x4, idx2, idx1, idx1, i64, types.boolean,
                                           l4, l3, l3, u8)),
            "cuda_gradient": (gradient, (x4, idx2, idx1, idx1, i64, types.boolean, l4, l3, l3,
                                         d3, d3, d1, l1, numba.float64, numba.float64,
                                         types.Array(st, 4, "C"))),
            "cuda_alpha_beta": (rc.cuda_alpha_beta, (l3, l3, idx1, idx1, d3, d3, d1,
                                                     types.boolean)),
            "cuda_viterbi": (rc.cuda_viterbi, (l3, l3, idx1, idx1, d3, u8, d1)),
        }
        for kname, (kernel, sig) in jobs.items():
            try:
                ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
                print(f"ok    {kname:16s} {name:9s} {len(ptx):7d} bytes of PTX")
            except Exception as e:  # noqa: BLE001 (report every kernel, then fail)
                failures += 1
                print(f"FAIL  {kname:16s} {name:9s} {type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1][:200]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
