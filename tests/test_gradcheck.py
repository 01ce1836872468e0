"""rnntool.gradcheck: an utterance of a dump checked, as grad-check's rows."""

import numpy as np
import pytest
import torch
from helpers import random_batch

from rnntool import gradcheck, rnnt_loss
from rnntool.dump import DumpWriter
from rnntool.gradcheck import (
    GRADCHECK_FIELDS,
    check_utterance,
    compare,
    engine_gradient,
    finite_difference_indices,
    grad_check_utterance,
    utterance_gradient,
)
from rnntool.reader import DumpReader
from rnntool.reference import reference_loss_value


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


# --------------------------------------------------------------------------- on arrays
def _utterance(seed=5):
    """One float64 utterance ``(T=5, U+1=4, V=6)`` and its targets, as numpy."""
    x, y, _, _ = random_batch(1, 5, 3, 6, seed=seed, mixed=False, dtype=torch.float64)
    return x[0].numpy(), y[0].numpy()


def _by_name(checks):
    return {c.check: c for c in checks}


def test_grad_check_utterance_passes_a_correct_gradient(backend):
    logits, targets = _utterance()
    stored = engine_gradient(logits, targets, 0, True, backend)
    checks = grad_check_utterance(logits, targets, blank=0, backend=backend, samples=8,
                                  stored=stored)
    assert [c.check for c in checks] == [
        f"{backend}-vs-reference", "reference-vs-finite-diff", "stored-vs-reference"]
    assert all(c.passed for c in checks), checks
    assert [c.n for c in checks] == [logits.size, 8, logits.size]
    assert checks.loss == pytest.approx(reference_loss_value(logits, targets, 0, True), rel=1e-12)
    assert checks[0].max_abs_err < 1e-12  # float64 logits: the engine is float64 too


def test_a_planted_wrong_stored_gradient_fails():
    logits, targets = _utterance()
    right = engine_gradient(logits, targets, 0, True, "cpu")
    wrong = right.copy()
    wrong[2, 1, 3] += 1e-3
    checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=6, stored=wrong))
    assert not checks["stored-vs-reference"].passed
    assert checks["stored-vs-reference"].max_abs_err == pytest.approx(1e-3, rel=1e-6)
    assert checks["cpu-vs-reference"].passed and checks["reference-vs-finite-diff"].passed
    # Within the tolerance (atol 1e-5 + rtol 1e-3 |g|) the stored gradient still passes.
    close = right.copy()
    close[2, 1, 3] += 0.5e-5
    checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=6, stored=close))
    assert checks["stored-vs-reference"].passed


def test_a_wrong_engine_gradient_fails_against_the_reference(monkeypatch):
    real = gradcheck.engine_gradient

    def off_by_one_percent(*args):
        return real(*args) * 1.01

    monkeypatch.setattr(gradcheck, "engine_gradient", off_by_one_percent)
    logits, targets = _utterance()
    checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=6))
    assert not checks["cpu-vs-reference"].passed
    assert checks["reference-vs-finite-diff"].passed  # the reference is not to blame


def test_finite_differences_catch_a_wrong_gradient(monkeypatch):
    """A gradient wrong in its largest entry, where the probes always look: the
    finite differences of the loss disagree with it."""
    real = gradcheck.reference_gradients

    def wrong_at_the_largest(*args, **kw):
        losses, grads = real(*args, **kw)
        flat = grads.view(-1)
        flat[flat.abs().argmax()] += 1e-3
        return losses, grads

    monkeypatch.setattr(gradcheck, "reference_gradients", wrong_at_the_largest)
    logits, targets = _utterance()
    checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=4))
    assert not checks["reference-vs-finite-diff"].passed
    assert checks["reference-vs-finite-diff"].max_abs_err == pytest.approx(1e-3, rel=1e-3)


def test_a_wrong_cuda_gradient_fails_against_the_cpu(monkeypatch):
    if not gradcheck.cuda_usable():
        pytest.skip("the cuda backend does not run here")
    real = gradcheck.engine_gradient

    def wrong_on_cuda(logits, targets, blank, fused, backend):
        g = real(logits, targets, blank, fused, backend)
        return -g if backend == "cuda" else g

    logits, targets = _utterance()
    checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=4,
                                           compare_cuda=True))
    assert checks["cpu-vs-cuda"].passed
    monkeypatch.setattr(gradcheck, "engine_gradient", wrong_on_cuda)
    checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=4,
                                           compare_cuda=True))
    assert not checks["cpu-vs-cuda"].passed and checks["cpu-vs-reference"].passed


@pytest.mark.parametrize("usable", [False, True])
def test_check_utterance_compares_with_cuda_where_cuda_usable_says(tmp_path, monkeypatch,
                                                                   usable):
    if usable and not gradcheck.cuda_usable():
        pytest.skip("the cuda backend does not run here")
    monkeypatch.setattr(gradcheck, "cuda_usable", lambda: usable)
    checks = [r["check"] for r in _check(_dump(tmp_path)).rows]
    assert ("cpu-vs-cuda" in checks) is usable


@pytest.mark.parametrize("poison,loss", [("nan", np.nan), ("inf", np.nan), ("no blank", np.inf)])
def test_no_checks_without_a_finite_loss(poison, loss):
    logits, targets = _utterance()
    if poison == "no blank":
        logits[..., 0] = -np.inf  # no alignment has probability > 0
    else:
        logits[1, 2, 3] = float(poison)
    checks = grad_check_utterance(logits, targets, blank=0, samples=4)
    assert list(checks) == [] and np.array_equal(checks.loss, loss, equal_nan=True)


# --------------------------------------------------------------------------- the pieces
def test_compare_passes_within_atol_plus_rtol():
    expected = np.array([1.0, -2.0, 0.0, 1e-7])
    assert compare("x", expected, expected, 1e-3, 1e-5).passed
    edge = expected + np.array([1e-5 + 1e-3, 0.0, 0.0, 0.0]) * 0.999
    c = compare("x", edge, expected, 1e-3, 1e-5)
    assert c.passed and c.n == 4 and c.check == "x"
    c = compare("x", expected + np.array([0.0, 0.0, 2e-5, 0.0]), expected, 1e-3, 1e-5)
    assert not c.passed  # |err| 2e-5 > atol at an expected 0
    assert c.max_abs_err == pytest.approx(2e-5) and c.max_rel_err == pytest.approx(2.0)


# compare's relative error divides inf by inf there (numpy warns); the verdict is what counts.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_compare_fails_on_non_finite_values(bad):
    expected = np.array([0.5, 0.25])
    got = np.array([0.5, bad])
    assert not compare("x", got, expected, 1.0, 1.0).passed
    assert not compare("x", expected, got, 1.0, 1.0).passed


def test_finite_difference_indices_probe_the_largest_entries():
    rng = np.random.default_rng(0)
    grad = rng.standard_normal((5, 4, 6))
    for samples in (1, 7, 20, grad.size, 10 * grad.size):
        idx = finite_difference_indices(grad, samples)
        k = min(samples, grad.size)
        top = np.argsort(-np.abs(grad).ravel())[: (k + 1) // 2]
        assert set(top) <= set(idx.tolist()), samples
        assert len(idx) <= k and np.array_equal(idx, np.unique(idx))
        assert ((idx >= 0) & (idx < grad.size)).all()
        assert np.array_equal(idx, finite_difference_indices(grad, samples))  # seeded

