"""rnntool.devices: --device choices to backends, and backends to tensor devices."""

import os
import subprocess
import sys

import pytest
import torch

from rnntool import devices
from rnntool.devices import DEVICES, backend_for, cuda_usable, tensor_device


def test_the_choices():
    assert DEVICES == ("auto", "cpu", "cuda")
    assert backend_for("cpu") == "cpu"
    for bad in ("gpu", "CPU", "", "cuda:0"):
        with pytest.raises(ValueError, match=r"is not one of auto, cpu, cuda"):
            backend_for(bad)


def test_auto_without_nvidia_device_nodes_is_the_cpu_without_torch(monkeypatch):
    # Without a device node no driver exists: no need to ask torch (a second of start-up).
    code = (
        "import os, sys; os.path.exists = lambda p: False; "
        "from rnntool.devices import backend_for; b = backend_for('auto'); "
        "print(b, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["cpu", "False"]


def test_auto_with_device_nodes_asks_torch(monkeypatch):
    monkeypatch.setattr(devices.os.path, "exists", lambda p: p == "/dev/nvidiactl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend_for("auto") == "cpu"  # a driver, but no GPU torch can use
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend_for("auto") == "cuda"


def test_cuda_needs_a_gpu_or_the_simulator(monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    assert backend_for("cuda") == "cuda"  # the simulator runs it on CPU tensors
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^cuda: no usable CUDA GPU here"):
        backend_for("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend_for("cuda") == "cuda"


def test_tensor_device(monkeypatch):
    assert tensor_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tensor_device("cuda") == "cpu"  # the simulator's tensors stay on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tensor_device("cuda") == "cuda"
    assert tensor_device("cpu") == "cpu"


def test_cuda_usable_follows_the_simulator():
    from rnntool import cuda

    if cuda.SIMULATOR:
        assert cuda_usable() is True
    else:
        assert cuda_usable() == torch.cuda.is_available()


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs the simulator")
def test_the_simulated_cuda_backend_runs_where_backend_for_says():
    from rnntool import rnnt_loss

    backend = backend_for("cuda")
    x = torch.randn(1, 3, 2, 4, device=tensor_device(backend))
    y = torch.tensor([[1]], device=x.device)
    lengths = torch.tensor([3]), torch.tensor([1])
    got = rnnt_loss(x, y, *lengths, blank=0, backend=backend, reduction="none")
    want = rnnt_loss(x.cpu(), y.cpu(), *lengths, blank=0, backend="cpu", reduction="none")
    assert torch.allclose(got.cpu(), want, atol=1e-5)
