"""rnntool.gradcheck: an utterance of a dump checked, as grad-check's rows."""

import numpy as np
import pytest
import torch
from helpers import random_batch

from rnntool import rnnt_loss
from rnntool.dump import DumpWriter
from rnntool.gradcheck import (
    GRADCHECK_FIELDS,
    check_utterance,
    engine_gradient,
    utterance_gradient,
)
from rnntool.reader import DumpReader


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_utterance_gradient_is_the_engines(dtype):
    x, y, T, U = random_batch(1, 6, 3, 7, seed=9, dtype=dtype, mixed=False)
    xg = x.clone().requires_grad_(True)
    rnnt_loss(xg, y, T, U, blank=0, reduction="sum").backward()
    got = utterance_gradient(x[0].numpy(), y[0].numpy(), blank=0)
    assert got.dtype == dtype and torch.equal(got, xg.grad[0])
    as_numpy = engine_gradient(x[0].numpy(), y[0].numpy(), 0, True, "cpu")
    assert as_numpy.dtype == np.float64 and np.array_equal(as_numpy, xg.grad[0].double().numpy())


def _dump(tmp_path, grads_scale=None, poison=False):
    x, y, T, U = random_batch(1, 5, 3, 6, seed=43, mixed=False)
    if poison:
        x[0, 1, 1, 2] = float("nan")
    grads = None
    if grads_scale is not None:
        xg = x.clone().requires_grad_(True)
        rnnt_loss(xg, y, T, U, blank=0, reduction="sum").backward()
        grads = xg.grad[0].clone()
        grads[2, 1] *= grads_scale
    path = tmp_path / "d.h5"
    with DumpWriter(path) as w:
        w.add("u", x[0], y[0], grads=grads)
    return path


def _check(path, **kw):
    with DumpReader(path) as r:
        return check_utterance(r, r.read("u", with_grads=True), samples=6, **kw)


def test_rows_of_a_good_utterance(tmp_path):
    path = _dump(tmp_path, grads_scale=1.0)
    checked = _check(path, compare_cuda=False, atol=1e-5, rtol=1e-3)
    assert checked.utt_id == "u" and checked.problem is None and np.isfinite(checked.loss)
    assert [r["check"] for r in checked.rows] == [
        "cpu-vs-reference", "reference-vs-finite-diff", "stored-vs-reference"]
    for r in checked.rows:
        assert set(GRADCHECK_FIELDS) <= set(r) and r["_file"] == str(path)
        assert (r["utt_id"], r["atol"], r["rtol"], r["result"]) == ("u", 1e-5, 1e-3, "PASS")
        assert 0 <= r["max_abs_err"] < 1e-5


def test_a_wrong_stored_gradient_fails(tmp_path):
    checked = _check(_dump(tmp_path, grads_scale=1.5), compare_cuda=False)
    result = {r["check"]: r["result"] for r in checked.rows}
    assert result == {"cpu-vs-reference": "PASS", "reference-vs-finite-diff": "PASS",
                      "stored-vs-reference": "FAIL"}
    assert checked.problem is None  # the loss itself is fine


def test_cpu_against_cuda_where_cuda_runs(tmp_path):
    from rnntool import cuda

    if not cuda.SIMULATOR:
        pytest.skip("needs the simulator")
    checked = _check(_dump(tmp_path))  # compare_cuda=None: whenever CUDA runs here
    assert [r["check"] for r in checked.rows][-1] == "cpu-vs-cuda"
    assert all(r["result"] == "PASS" for r in checked.rows)
    on_cuda = _check(_dump(tmp_path), backend="cuda")
    assert [r["check"] for r in on_cuda.rows] == ["cuda-vs-reference", "reference-vs-finite-diff"]


def test_a_non_finite_loss_has_no_rows(tmp_path):
    checked = _check(_dump(tmp_path, poison=True), compare_cuda=False)
    assert checked.rows == [] and np.isnan(checked.loss)
    assert checked.problem == "loss is nan (NaN or +inf in its logits)"
