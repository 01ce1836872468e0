"""rnntool.gradcheck: an utterance's gradient checked, on arrays and as grad-check's rows."""

import numpy as np
import pytest
import torch
from helpers import SMALL_LAUNCHES, random_batch

from rnntool import gradcheck, rnnt_loss
from rnntool.dump import DumpWriter
from rnntool.gradcheck import (
    GRADCHECK_FIELDS,
    check_utterance,
    compare,
    engine_gradient,
    error_ratios,
    finite_difference_error,
    finite_difference_indices,
    grad_check_utterance,
    precision_limited,
    reference_work,
    runs_reference,
    utterance_gradient,
)
from rnntool.reader import DumpReader
from rnntool.reference import reference_loss_value

SMALL = ["cpu-vs-float64", "float64-vs-finite-diff", "float64-vs-reference"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_utterance_gradient_is_the_engines(dtype):
    x, y, T, U = random_batch(1, 6, 3, 7, seed=9, dtype=dtype, mixed=False)
    xg = x.clone().requires_grad_(True)
    rnnt_loss(xg, y, T, U, blank=0, reduction="sum").backward()
    got = utterance_gradient(x[0].numpy(), y[0].numpy(), blank=0)
    assert got.dtype == dtype and torch.equal(got, xg.grad[0])
    as_numpy = engine_gradient(x[0].numpy(), y[0].numpy(), 0, True, "cpu")
    assert as_numpy.dtype == np.float64 and np.array_equal(as_numpy, xg.grad[0].double().numpy())


# --------------------------------------------------------------------------- a dump's rows
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


def _check(path, samples=6, **kw):
    with DumpReader(path) as r:
        return check_utterance(r, r.read("u", with_grads=True), samples=samples, **kw)


def test_rows_of_a_good_utterance(tmp_path):
    path = _dump(tmp_path, grads_scale=1.0)
    checked = _check(path, compare_cuda=False, atol=1e-5, rtol=1e-3)
    assert checked.utt_id == "u" and checked.problem is None and np.isfinite(checked.loss)
    assert checked.reference  # a small utterance: the reference ran
    assert [r["check"] for r in checked.rows] == [*SMALL, "stored-vs-reference"]
    for r in checked.rows:
        assert set(GRADCHECK_FIELDS) <= set(r) and r["_file"] == str(path)
        assert (r["utt_id"], r["rtol"], r["result"]) == ("u", 1e-3, "PASS")
        assert r["atol"] >= 1e-5 and 0 <= r["worst_ratio"] <= 1
        assert (r["_precision_limited"], r["_note"]) == (False, "")
        assert 0 <= r["max_abs_err"] < 1e-5
    assert GRADCHECK_FIELDS == ["utt_id", "check", "max_abs_err", "max_rel_err", "worst_ratio",
                                "atol", "rtol", "result"]


def test_a_wrong_stored_gradient_fails(tmp_path):
    checked = _check(_dump(tmp_path, grads_scale=1.5), compare_cuda=False)
    result = {r["check"]: r["result"] for r in checked.rows}
    assert result == {**dict.fromkeys(SMALL, "PASS"), "stored-vs-reference": "FAIL"}
    assert checked.problem is None  # the loss itself is fine
    row = checked.rows[-1]
    assert row["worst_ratio"] > 1 and not row["_precision_limited"]


def test_without_the_reference_the_stored_gradient_meets_the_float64_engine(tmp_path):
    checked = _check(_dump(tmp_path, grads_scale=1.5), compare_cuda=False, reference=False)
    assert not checked.reference
    assert {r["check"]: r["result"] for r in checked.rows} == {
        "cpu-vs-float64": "PASS", "float64-vs-finite-diff": "PASS", "stored-vs-float64": "FAIL"}


def test_cpu_against_cuda_where_cuda_runs(tmp_path):
    from rnntool import cuda

    if not cuda.SIMULATOR:
        pytest.skip("needs the simulator")
    checked = _check(_dump(tmp_path))  # compare_cuda=None: whenever CUDA runs here
    assert [r["check"] for r in checked.rows][-1] == "cpu-vs-cuda"
    assert all(r["result"] == "PASS" for r in checked.rows)
    with cuda.config(**SMALL_LAUNCHES):  # fewer simulated threads: faster
        on_cuda = _check(_dump(tmp_path), backend="cuda", samples=2)
    assert [r["check"] for r in on_cuda.rows] == ["cuda-vs-float64", *SMALL[1:]]


def test_a_non_finite_loss_has_no_rows(tmp_path):
    checked = _check(_dump(tmp_path, poison=True), compare_cuda=False)
    assert checked.rows == [] and np.isnan(checked.loss)
    assert checked.problem == "loss is nan (NaN or +inf in its logits)"


# --------------------------------------------------------------------------- on arrays
def _utterance(seed=5, dtype=torch.float64):
    """One utterance ``(T=5, U+1=4, V=6)`` and its targets, as numpy."""
    x, y, _, _ = random_batch(1, 5, 3, 6, seed=seed, mixed=False, dtype=dtype)
    return x[0].numpy(), y[0].numpy()


def _by_name(checks):
    return {c.check: c for c in checks}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_grad_check_utterance_passes_a_correct_gradient(backend, dtype):
    logits, targets = _utterance(dtype=dtype)
    stored = engine_gradient(logits, targets, 0, True, backend)
    checks = grad_check_utterance(logits, targets, blank=0, backend=backend, samples=8,
                                  stored=stored)
    assert [c.check for c in checks] == [
        f"{backend}-vs-float64", *SMALL[1:], "stored-vs-reference"]
    assert all(c.passed for c in checks), checks
    assert [c.n for c in checks] == [logits.size, 8, logits.size, logits.size]
    loss = reference_loss_value(logits.astype(np.float64), targets, 0, True)
    assert checks.loss == pytest.approx(loss, rel=1e-12) and checks.reference
    by_name = _by_name(checks)
    assert by_name["float64-vs-reference"].max_abs_err < 1e-12  # float64 against float64
    if dtype == torch.float64:  # the engine's gradient is its float64 gradient
        assert by_name[f"{backend}-vs-float64"].max_abs_err == 0


def test_the_float64_checks_are_tight():
    """The float64 engine agrees with the reference to rounding, and the finite
    differences with it to far better than their error bound."""
    logits, targets = _utterance()
    checks = grad_check_utterance(logits, targets, blank=0, samples=20, atol=1e-13,
                                  rtol=1e-10)
    by_name = _by_name(checks)
    assert by_name["float64-vs-reference"].passed
    fd = by_name["float64-vs-finite-diff"]
    bound = finite_difference_error(5, 3, checks.loss, float(np.abs(logits).max()), 1e-4)
    assert fd.atol == bound > 1e-13  # the row shows the atol it was judged by
    assert fd.passed and fd.max_abs_err < bound  # at this size mostly truncation, h²/30


def test_a_planted_wrong_stored_gradient_fails():
    logits, targets = _utterance()
    right = engine_gradient(logits, targets, 0, True, "cpu")
    wrong = right.copy()
    wrong[2, 1, 3] += 1e-3
    for reference, name in ((True, "stored-vs-reference"), (False, "stored-vs-float64")):
        checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=6,
                                               stored=wrong, reference=reference))
        assert not checks[name].passed and checks[name].worst_ratio > 1
        assert checks[name].max_abs_err == pytest.approx(1e-3, rel=1e-6)
        assert all(c.passed for n, c in checks.items() if n != name)
    # Within the tolerance (atol 1e-5 + rtol 1e-3 |g|) the stored gradient still passes.
    close = right.copy()
    close[2, 1, 3] += 0.5e-5
    checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=6, stored=close))
    assert checks["stored-vs-reference"].passed


def _wrong_in_float64(monkeypatch, where=None, by=1e-3):
    """The engine's float64 gradient wrong by ``by`` at flat index ``where`` (default:
    its largest entry, where the finite differences always probe); other dtypes right."""
    real = gradcheck.engine_gradient

    def wrong(logits, targets, blank, fused, backend):
        g = real(logits, targets, blank, fused, backend)
        if np.asarray(logits).dtype == np.float64:
            flat = g.reshape(-1)
            flat[np.abs(flat).argmax() if where is None else where] += by
        return g

    monkeypatch.setattr(gradcheck, "engine_gradient", wrong)


def test_a_wrong_float64_engine_gradient_fails_against_the_reference_and_fd(monkeypatch):
    _wrong_in_float64(monkeypatch)
    logits, targets = _utterance()
    checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=4))
    assert not checks["float64-vs-reference"].passed
    assert not checks["float64-vs-finite-diff"].passed
    assert checks["float64-vs-finite-diff"].max_abs_err == pytest.approx(1e-3, rel=1e-3)


def test_finite_differences_catch_a_wrong_gradient_without_the_reference(monkeypatch):
    """A float32 utterance whose float64 engine gradient is wrong in its largest entry:
    with no reference, the finite differences (and the float32 engine) disagree."""
    _wrong_in_float64(monkeypatch)
    logits, targets = _utterance(dtype=torch.float32)
    checks = grad_check_utterance(logits, targets, blank=0, samples=4, reference=False)
    by_name = _by_name(checks)
    assert list(by_name) == ["cpu-vs-float64", "float64-vs-finite-diff"] and not checks.reference
    assert not by_name["float64-vs-finite-diff"].passed
    assert not by_name["cpu-vs-float64"].passed
    assert not by_name["cpu-vs-float64"].precision_limited  # 1e-3 is no rounding


def test_a_wrong_engine_gradient_in_the_dumps_dtype_fails_against_float64(monkeypatch):
    real = gradcheck.engine_gradient

    def wrong_in_float32(logits, targets, blank, fused, backend):
        g = real(logits, targets, blank, fused, backend)
        return g * 1.01 if np.asarray(logits).dtype == np.float32 else g

    monkeypatch.setattr(gradcheck, "engine_gradient", wrong_in_float32)
    logits, targets = _utterance(dtype=torch.float32)
    checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=6))
    assert not checks["cpu-vs-float64"].passed
    assert not checks["cpu-vs-float64"].precision_limited
    assert all(checks[n].passed for n in SMALL[1:])  # the float64 engine is not to blame


def test_a_wrong_reference_fails_only_its_row(monkeypatch):
    real = gradcheck.reference_gradients

    def skewed(*args, **kw):
        losses, grads = real(*args, **kw)
        return losses, grads * 1.01

    monkeypatch.setattr(gradcheck, "reference_gradients", skewed)
    logits, targets = _utterance()
    checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=6))
    assert not checks["float64-vs-reference"].passed
    assert checks["cpu-vs-float64"].passed and checks["float64-vs-finite-diff"].passed


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
    assert not checks["cpu-vs-cuda"].passed and checks["cpu-vs-float64"].passed


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


def test_minus_inf_logits_are_not_probed():
    """A token ruled out everywhere (-inf logits, the loss still finite): the probes
    skip it and the finite differences keep their finite tolerance."""
    logits, targets = _utterance()
    logits[..., [v for v in range(6) if v != 0 and v not in targets][0]] = -np.inf
    checks = grad_check_utterance(logits, targets, blank=0, samples=logits.size)
    fd = _by_name(checks)["float64-vs-finite-diff"]
    assert np.isfinite(checks.loss) and all(c.passed for c in checks), checks
    assert 0 < fd.n <= np.isfinite(logits).sum() and fd.atol < 1e-5 + 1e-9


def test_no_finite_difference_row_without_samples():
    logits, targets = _utterance()
    checks = grad_check_utterance(logits, targets, blank=0, samples=0)
    assert [c.check for c in checks] == ["cpu-vs-float64", "float64-vs-reference"]


def test_on_step_names_each_row_before_its_work():
    logits, targets = _utterance(dtype=torch.float32)
    stored = engine_gradient(logits, targets, 0, True, "cpu")
    steps = []
    checks = grad_check_utterance(logits, targets, blank=0, samples=4, stored=stored,
                                  on_step=steps.append)
    assert steps == [c.check for c in checks] == [*SMALL, "stored-vs-reference"]


# --------------------------------------------------------------------------- the reference's cut
def _spy_on_the_reference(monkeypatch):
    calls = []
    real = gradcheck.reference_gradients

    def spy(logits, *args, **kw):
        calls.append(tuple(logits.shape[1:]))
        return real(logits, *args, **kw)

    monkeypatch.setattr(gradcheck, "reference_gradients", spy)
    return calls


def test_the_reference_runs_by_size_unless_told(monkeypatch):
    calls = _spy_on_the_reference(monkeypatch)
    logits, targets = _utterance()  # (5, 4, 6): work (5·4)²·6 = 2400
    assert reference_work(*logits.shape) == 2400
    monkeypatch.setattr(gradcheck, "REFERENCE_MAX_WORK", 2400)
    assert runs_reference(logits.shape) and grad_check_utterance(
        logits, targets, blank=0, samples=2).reference
    assert calls == [logits.shape]
    monkeypatch.setattr(gradcheck, "REFERENCE_MAX_WORK", 2399)
    assert not runs_reference(logits.shape)
    checks = grad_check_utterance(logits, targets, blank=0, samples=2)
    assert not checks.reference and "float64-vs-reference" not in _by_name(checks)
    assert len(calls) == 1
    checks = grad_check_utterance(logits, targets, blank=0, samples=2, reference=True)
    assert checks.reference and _by_name(checks)["float64-vs-reference"].passed
    assert len(calls) == 2
    monkeypatch.setattr(gradcheck, "REFERENCE_MAX_WORK", 1e12)
    checks = grad_check_utterance(logits, targets, blank=0, samples=2, reference=False)
    assert not checks.reference and len(calls) == 2


def test_the_default_cut():
    assert gradcheck.REFERENCE_MAX_WORK == 2.5e8
    assert runs_reference((100, 21, 50))  # (2100)²·50 = 2.2e8: about a second
    assert not runs_reference((201, 38, 512))  # the 11-minute utterance of issue 12
    assert runs_reference((201, 38, 512), True) and not runs_reference((5, 4, 6), False)


def test_a_real_size_utterance_is_checked_fast_and_a_wrong_gradient_is_caught(monkeypatch):
    """T=200, U=40, V=512 in float32: no reference (a spy says so), every row passes,
    and a stored gradient wrong in one entry fails. (About a second of CPU; not timed
    here, the machine is shared.)"""
    calls = _spy_on_the_reference(monkeypatch)
    x, y, _, _ = random_batch(1, 200, 40, 512, seed=12, mixed=False)
    logits, targets = x[0].numpy(), y[0].numpy()
    stored = engine_gradient(logits, targets, 0, True, "cpu").astype(np.float32)
    steps = []
    checks = grad_check_utterance(logits, targets, blank=0, samples=20, stored=stored,
                                  on_step=steps.append)
    assert calls == [] and not checks.reference
    assert steps == ["cpu-vs-float64", "float64-vs-finite-diff", "stored-vs-float64"]
    assert all(c.passed for c in checks), checks
    wrong = stored.copy()
    wrong[120, 17, 300] += 1e-3
    checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=4, stored=wrong))
    assert calls == []
    bad = checks["stored-vs-float64"]
    assert not bad.passed and bad.max_abs_err == pytest.approx(1e-3, rel=1e-3)
    assert not bad.precision_limited and bad.note == ""


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_failure_within_float32_rounding_is_marked_precision_limited(dtype):
    """Tolerances tighter than float32 (or float16) can meet: the reduced-precision
    rows fail, marked precision_limited with a note; the float64 rows pass."""
    x, y, _, _ = random_batch(1, 30, 10, 20, seed=3, mixed=False, dtype=dtype)
    logits, targets = x[0].numpy(), y[0].numpy()
    stored = engine_gradient(logits, targets, 0, True, "cpu").astype(logits.dtype)
    checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=6,
                                           stored=stored, atol=1e-14, rtol=1e-9))
    for name in ("cpu-vs-float64", "stored-vs-reference"):
        c = checks[name]
        assert not c.passed and c.precision_limited, c
        assert c.note.startswith(f"{name} fails within {logits.dtype} rounding")
        what = "logits and grads" if name.startswith("stored") else "logits"
        assert c.note.endswith(f"dump the {what} as float64")
    for name in SMALL[1:]:
        assert checks[name].passed and not checks[name].precision_limited
    # A planted error beyond rounding is not excused.
    wrong = stored.copy()
    wrong[20, 5, 7] += 1e-2
    checks = _by_name(grad_check_utterance(logits, targets, blank=0, samples=2,
                                           stored=wrong, atol=1e-14, rtol=1e-9))
    assert checks["cpu-vs-float64"].precision_limited
    assert not checks["stored-vs-reference"].precision_limited
    assert checks["stored-vs-reference"].note == ""


def test_float64_failures_are_never_precision_limited(monkeypatch):
    _wrong_in_float64(monkeypatch, by=1e-9)
    logits, targets = _utterance()
    checks = grad_check_utterance(logits, targets, blank=0, samples=2, atol=1e-12, rtol=1e-9)
    failed = [c for c in checks if not c.passed]
    assert failed and not any(c.precision_limited for c in failed)


def test_precision_limited_bound():
    g64 = np.array([0.5, -0.25, 1e-3, 0.0])
    scale = np.array([1.0, 1.0, 1e-3, 0.0])
    T, U = 90, 10  # 8·eps32·(T+U) = 9.5e-5
    step = 8 * 2.0**-23 * 100
    within = g64 + np.array([0.9 * step, 0.0, 0.0, 0.0])
    assert precision_limited(within, g64, g64, scale, T, U, np.float32, 0.0, 0.0)
    beyond = g64 + np.array([0.0, 0.0, 2 * step * 1e-3 + 2e-3 * 2.0**-23, 0.0])
    assert not precision_limited(beyond, g64, g64, scale, T, U, np.float32, 0.0, 0.0)
    # Two reduced-precision gradients (CPU against CUDA) may be twice as far apart.
    twice = g64 + np.array([1.8 * step, 0.0, 0.0, 0.0])
    assert not precision_limited(twice, g64, g64, scale, T, U, np.float32, 0.0, 0.0)
    assert precision_limited(twice, g64, g64, scale, T, U, np.float32, 0.0, 0.0, copies=2)
    # float16 adds its own rounding (eps16·|g|), and nothing excuses a NaN or a pass.
    half = g64 + np.array([0.0, 0.9 * 2.0**-10 * 0.25, 0.0, 0.0])
    assert not precision_limited(half, g64, g64, scale, T, U, np.float32, 0.0, 0.0)
    assert precision_limited(half, g64, g64, scale, T, U, np.float16, 0.0, 0.0)
    assert not precision_limited(g64 + np.array([np.nan, 0, 0, 0]), g64, g64, scale, T, U,
                                 np.float32, 0.0, 0.0)
    assert not precision_limited(within, g64, g64, scale, T, U, np.float32, 1.0, 1.0)


# --------------------------------------------------------------------------- the pieces
def test_compare_passes_within_atol_plus_rtol():
    expected = np.array([1.0, -2.0, 0.0, 1e-7])
    c = compare("x", expected, expected, 1e-3, 1e-5)
    assert c.passed and c.worst_ratio == 0 and (c.atol, c.rtol) == (1e-5, 1e-3)
    edge = expected + np.array([1e-5 + 1e-3, 0.0, 0.0, 0.0]) * 0.999
    c = compare("x", edge, expected, 1e-3, 1e-5)
    assert c.passed and c.n == 4 and c.check == "x"
    assert c.worst_ratio == pytest.approx(0.999)
    c = compare("x", expected + np.array([0.0, 0.0, 2e-5, 0.0]), expected, 1e-3, 1e-5)
    assert not c.passed  # |err| 2e-5 > atol at an expected 0
    assert c.max_abs_err == pytest.approx(2e-5) and c.max_rel_err == pytest.approx(2.0)
    assert c.worst_ratio == pytest.approx(2.0)


def test_worst_ratio_decides_the_result():
    """max_abs_err and max_rel_err can both exceed their tolerances in a passing row
    (each is a maximum on its own); worst_ratio, over the same entries, decides."""
    expected = np.array([0.01, 1.0])
    got = expected + np.array([1.5e-5, 0.0])  # tolerance there: 1e-5 + 1e-3·0.01 = 2e-5
    c = compare("x", got, expected, 1e-3, 1e-5)
    assert c.max_abs_err > c.atol and c.max_rel_err > c.rtol
    assert c.worst_ratio == pytest.approx(0.75) and c.passed
    c = compare("x", expected + np.array([2.5e-5, 0.0]), expected, 1e-3, 1e-5)
    assert c.worst_ratio == pytest.approx(1.25) and not c.passed
    # Exactly at the tolerance passes; atol = rtol = 0 demands equality.
    assert compare("x", np.array([1.5]), np.array([1.0]), 0.5, 0.0).worst_ratio == 1.0
    assert compare("x", np.array([1.5]), np.array([1.0]), 0.5, 0.0).passed
    assert compare("x", expected, expected, 0.0, 0.0).passed
    c = compare("x", np.nextafter(expected, 1.0), expected, 0.0, 0.0)
    assert not c.passed and c.worst_ratio == np.inf
    assert compare("x", np.array([]), np.array([]), 1e-3, 1e-5).worst_ratio == 0.0


def test_error_ratios():
    r = error_ratios(np.array([1.0, 2.0, 0.0, np.nan]), np.array([1.0, 1.0, 0.0, 0.0]), 0.5, 0.5)
    assert r.tolist() == [0.0, 1.0, 0.0, np.inf]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_compare_fails_on_non_finite_values(bad):
    expected = np.array([0.5, 0.25])
    got = np.array([0.5, bad])
    for c in (compare("x", got, expected, 1.0, 1.0), compare("x", expected, got, 1.0, 1.0)):
        assert not c.passed and c.worst_ratio == np.inf


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


def test_finite_difference_error_bound():
    # Truncation h²/30 plus rounding eps64·(T+U)·max(1, |L|, max|x|)/h.
    assert finite_difference_error(1, 0, 0.5, 0.5, 1e-4) == pytest.approx(
        1e-8 / 30 + 2.0**-52 / 1e-4)
    assert finite_difference_error(200, 40, 1430.0, 5.0, 1e-4) == pytest.approx(
        1e-8 / 30 + 2.0**-52 * 240 * 1430 / 1e-4)
