"""The CUDA backend: in Numba's simulator here (CI), on a real GPU under the `cuda` marker."""

import pytest
import torch
from helpers import random_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_loss import assert_matches_reference, run_engine

from rnntool import cuda as rcuda
from rnntool import rnnt_loss

SIM = rcuda.SIMULATOR
REAL_GPU = (not SIM) and torch.cuda.is_available()
sim_only = pytest.mark.skipif(not SIM, reason="runs the kernels in Numba's simulator")

# Tiny launch shapes, so that every multi-chunk path runs even on tiny inputs:
# several v per thread and a tree reduction (threads_v=4), several rows per
# block, grid-striding over rows (max_blocks=3), several u per thread (threads_diag=2).
SMALL = {"threads_v": 4, "rows_per_block": 2, "threads_diag": 2, "max_blocks": 3}


@pytest.fixture(autouse=True)
def small_launches():
    with rcuda.config(**SMALL):
        yield


@sim_only
@settings(max_examples=12)
@given(
    B=st.integers(1, 3), T=st.integers(1, 4), U=st.integers(0, 4), V=st.integers(2, 9),
    blank_pos=st.sampled_from(["first", "last", "middle"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_simulated_cuda_matches_reference(B, T, U, V, blank_pos, dtype, seed):
    blank = {"first": 0, "last": V - 1, "middle": V // 2}[blank_pos]
    logits, labels, t_len, u_len = random_batch(B, T, U, V, blank=blank, seed=seed, dtype=dtype)
    assert_matches_reference(logits, labels, t_len, u_len, blank=blank, seed=seed, backend="cuda")


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
def test_simulated_cuda_log_probs_and_no_grad():
    logits, labels, t_len, u_len = random_batch(2, 3, 2, 5, seed=9)
    logp = torch.log_softmax(logits, -1)
    assert_matches_reference(logp, labels, t_len, u_len, fused_log_softmax=False, backend="cuda")
    with torch.no_grad():
        a = rnnt_loss(logits, labels, t_len, u_len, backend="cuda", reduction="none")
    b = rnnt_loss(logits, labels, t_len, u_len, backend="cpu", reduction="none")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)


@sim_only
def test_simulated_cuda_long_label_sequence():
    # U+1 = 9 with 2 threads per diagonal: each thread walks several u.
    logits, labels, t_len, u_len = random_batch(1, 3, 8, 4, seed=11, mixed=False)
    assert_matches_reference(logits, labels, t_len, u_len, backend="cuda")


@sim_only
def test_simulated_cuda_nan_logits_give_nan_loss():
    logits, labels, t_len, u_len = random_batch(2, 3, 2, 5, seed=13, mixed=False)
    logits[1, 1, 1, 2] = float("nan")
    # The simulator's tensors are CPU tensors, so the warning (CPU only) is given.
    with pytest.warns(RuntimeWarning, match=r"utterance\(s\) \[1\]"):
        loss, grad = run_engine(logits, labels, t_len, u_len, backend="cuda")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0])
    assert float(grad[1].abs().max()) == 0.0


@sim_only
def test_simulated_cuda_validates_like_cpu():
    logits, labels, t_len, u_len = random_batch(2, 3, 2, 5, seed=15, mixed=False)
    labels[1, 1] = 5
    with pytest.raises(ValueError, match=r"utterance 1: targets\[1, 1\] = 5"):
        rnnt_loss(logits, labels, t_len, u_len, backend="cuda")
    # Unvalidated (the sync-free CUDA path): bad utterances give NaN, never a bad read.
    t_len[0] = 9
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="validate=False"):
        loss = rnnt_loss(logits, labels, t_len, u_len, backend="cuda", reduction="none",
                         validate=False)
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
        "try:\n    rnntool.rnnt_loss(x, y, T, U, backend='cuda')\n"
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
