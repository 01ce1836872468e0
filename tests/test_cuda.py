"""What only the CUDA backend has: its launch shapes, its unvalidated path, its twin
module's layout, CPU against CUDA, and the real GPU (the `cuda` marker).

The engine suite (test_loss.py, test_align.py, test_guarantees.py, ...) runs on the
CUDA kernels through the `backend` fixture, in Numba's simulator here.
"""

import pytest
import torch
from helpers import SMALL_LAUNCHES, assert_matches_reference, random_batch, run_engine

from rnntool import cuda as rcuda
from rnntool import rnnt_loss

SIM = rcuda.SIMULATOR
REAL_GPU = (not SIM) and torch.cuda.is_available()
sim_only = pytest.mark.skipif(not SIM, reason="runs the kernels in Numba's simulator")


@pytest.fixture(autouse=True)
def small_launches():
    with rcuda.config(**SMALL_LAUNCHES):
        yield


@sim_only
@pytest.mark.parametrize("reduction", ["none", "mean", "mean_frames", "mean_tokens"])
def test_simulated_cuda_matches_cpu(reduction):
    logits, labels, t_len, u_len = random_batch(3, 4, 3, 7, seed=5)
    kw = {"reduction": reduction, "clamp": 0.3, "fastemit_lambda": 0.1}
    l_cpu, g_cpu = run_engine(logits, labels, t_len, u_len, backend="cpu", **kw)
    l_gpu, g_gpu = run_engine(logits, labels, t_len, u_len, backend="cuda", **kw)
    torch.testing.assert_close(l_gpu, l_cpu, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(g_gpu, g_cpu, atol=1e-6, rtol=1e-5)


@sim_only
def test_simulated_cuda_long_label_sequence():
    # U+1 = 9 with 2 threads per diagonal: each thread walks several u.
    logits, labels, t_len, u_len = random_batch(1, 3, 8, 4, seed=11, mixed=False)
    assert_matches_reference(logits, labels, t_len, u_len, backend="cuda")


@sim_only
def test_simulated_cuda_validates_like_cpu():
    logits, labels, t_len, u_len = random_batch(2, 3, 2, 5, seed=15, mixed=False)
    labels[1, 1] = 5
    with pytest.raises(ValueError, match=r"utterance 1: targets\[1, 1\] = 5"):
        rnnt_loss(logits, labels, t_len, u_len, blank=0, backend="cuda")
    # Unvalidated (the sync-free CUDA path): bad utterances give NaN, never a bad read.
    t_len[0] = 9
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="validate=False"):
        loss = rnnt_loss(logits, labels, t_len, u_len, blank=0, backend="cuda",
                         reduction="none", validate=False)
    assert torch.isnan(loss).all()


def test_backend_cuda_refuses_what_it_cannot_run():
    # Outside the simulator, in a fresh process: no GPU -> a clear error, never a fallback;
    # a GPU but CPU tensors -> a clear error too.
    import subprocess
    import sys

    code = (
        "import torch, rnntool\n"
        "x = torch.randn(1, 2, 2, 3); y = torch.tensor([[1]]); T = torch.tensor([2]); "
        "U = torch.tensor([1])\n"
        "try:\n    rnntool.rnnt_loss(x, y, T, U, blank=0, backend='cuda')\n"
        "except (RuntimeError, ValueError) as e:\n    print(type(e).__name__, e)\n"
    )
    env = {**__import__("os").environ, "NUMBA_ENABLE_CUDASIM": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if torch.cuda.is_available():
        assert out.stdout.startswith("ValueError") and "needs CUDA tensors" in out.stdout
    else:
        assert out.stdout.startswith("RuntimeError"), out.stdout + out.stderr
        assert "needs a usable CUDA GPU" in out.stdout


def test_cpu_and_cuda_modules_are_twins():
    # The same stage and host functions on both sides, mirrored by name.
    from rnntool import cpu

    def stages(module, prefix):
        return {n.removeprefix(prefix) for n in vars(module) if n.startswith(prefix)}

    assert stages(cpu, "cpu_") == stages(rcuda, "cuda_")
    assert {"normalise", "alpha_beta", "alpha_loss", "viterbi", "gradient"} <= stages(cpu, "cpu_")
    assert cpu.ENGINE.name == "cpu" and rcuda.ENGINE.name == "cuda"


def test_ptx_signatures_cover_every_kernel_and_storage_kind():
    kernels = {"cuda_normalise", "cuda_alpha_beta", "cuda_alpha_loss", "cuda_viterbi",
               "cuda_gradient"}
    assert set(rcuda.PTX_SIGNATURES) == {(k, kind) for k in kernels for kind in rcuda.STORAGE}
    assert set(rcuda.STORAGE) == {"float32", "float64", "float16", "bfloat16"}


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="power of two"), rcuda.config(threads_v=6):
        pass
    with pytest.raises(KeyError), rcuda.config(warps=2):
        pass


# --------------------------------------------------------------------------- real GPU
cuda_only = pytest.mark.skipif(not REAL_GPU, reason="needs a real CUDA GPU (not the simulator)")


@pytest.fixture
def default_launches():
    with rcuda.config(**rcuda.DEFAULT_CONFIG):
        yield


def _cpu_vs_gpu(B, T, U, V, dtype=torch.float32, seed=0, **kw):
    logits, labels, t_len, u_len = random_batch(B, T, U, V, seed=seed, dtype=dtype)
    l_cpu, g_cpu = run_engine(logits, labels, t_len, u_len, backend="cpu", **kw)
    l_gpu, g_gpu = run_engine(logits.cuda(), labels.cuda(), t_len.cuda(), u_len.cuda(),
                              backend="cuda", **kw)
    torch.testing.assert_close(l_gpu.cpu(), l_cpu, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(g_gpu.cpu().float(), g_cpu.float(), atol=2e-3, rtol=1e-2)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_gpu_matches_cpu(default_launches, dtype):
    _cpu_vs_gpu(8, 40, 12, 64, dtype=dtype, reduction="mean_frames")


@pytest.mark.cuda
@cuda_only
def test_gpu_long_labels_and_big_batch(default_launches):
    _cpu_vs_gpu(1, 30, 1999, 6, reduction="sum")  # U+1 = 2000
    _cpu_vs_gpu(2048, 3, 2, 5, reduction="none")  # B = 2048
