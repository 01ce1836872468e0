"""Compile every CUDA kernel to PTX for each input dtype, with no GPU needed.

The kernels and their argument types are ``rnntool.cuda.PTX_SIGNATURES`` (RNN-T)
and ``rnntool.tdt_cuda.PTX_SIGNATURES`` (TDT), kept beside the kernels.

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

from numba import cuda  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rnntool import cuda as rc  # noqa: E402
from rnntool import tdt_cuda  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 (Hopper)")
    cc = tuple(int(v) for v in ap.parse_args().cc.split("."))
    failures = 0
    # Every kernel with the argument types its launches use, for each storage kind.
    table = [*rc.PTX_SIGNATURES.items(),
             *(((f"tdt:{k}", kind), v) for (k, kind), v in tdt_cuda.PTX_SIGNATURES.items())]
    for (kname, kind), (kernel, sig) in table:
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
            print(f"ok    {kname:20s} {kind:9s} {len(ptx):7d} bytes of PTX")
        except Exception as e:  # noqa: BLE001 (report every kernel, then fail)
            failures += 1
            print(f"FAIL  {kname:20s} {kind:9s} {type(e).__name__}: "
                  f"{str(e).strip().splitlines()[-1][:200]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
