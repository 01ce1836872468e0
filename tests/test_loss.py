"""The loss engine against the float64 reference, on every backend (the `backend`
fixture: the CPU, and the CUDA kernels in Numba's simulator).

The simulator takes about a second per launch sequence, so some tests shrink their
shapes or examples for "cuda" (said where they do); what they assert is the same.
"""

import inspect
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    PUBLIC_LOGITS,
    PUBLIC_LOSS,
    assert_matches_reference,
    examples,
    random_batch,
    reference_loss_and_grad,
    run_engine,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import rnntool
from rnntool import TransducerLoss, rnnt_loss
from rnntool.engine import ImpossibleLossWarning
from rnntool.reference import reference_gradients


def test_public_case_value_and_gradient(backend):
    x = torch.tensor([PUBLIC_LOGITS])
    y, T, U = torch.tensor([[1, 2]]), torch.tensor([2]), torch.tensor([2])
    loss, _ = run_engine(x, y, T, U, blank=0, reduction="sum", backend=backend)
    assert abs(float(loss) - PUBLIC_LOSS) < 1e-5
    assert_matches_reference(x, y, T, U, blank=0, backend=backend)
    assert_matches_reference(x.double(), y, T, U, blank=0, backend=backend)


def test_engine_matches_reference(backend):
    # Fewer examples in the simulator (examples()); the same shapes, dtypes and blanks.
    @settings(max_examples=examples(backend))
    @given(
        B=st.integers(1, 3), T=st.integers(1, 6), U=st.integers(0, 4), V=st.integers(2, 9),
        blank_pos=st.sampled_from(["first", "last", "middle", "negative"]),
        scale=st.sampled_from([1.0, 50.0]),
        dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
        neg_inf=st.booleans(), mixed=st.booleans(), seed=st.integers(0, 2**16),
    )
    def check(B, T, U, V, blank_pos, scale, dtype, neg_inf, mixed, seed):
        blank = {"first": 0, "last": V - 1, "middle": V // 2, "negative": -1}[blank_pos]
        logits, labels, t_len, u_len = random_batch(
            B, T, U, V, blank=blank, seed=seed, scale=scale, mixed=mixed, dtype=dtype
        )
        if dtype in (torch.float16, torch.bfloat16) and scale > 1:
            logits = (logits.float() / scale * 4).to(dtype)  # keep half precision meaningful
        if neg_inf and V > 2:
            # Mask one token that is neither blank nor any label: legal, zero gradient.
            used = set(labels[labels >= 0].tolist()) | {blank % V}
            free = [v for v in range(V) if v not in used]
            if free:
                logits[..., free[0]] = float("-inf")
        assert_matches_reference(logits, labels, t_len, u_len, blank=blank, seed=seed,
                                 backend=backend)

    check()


@pytest.mark.parametrize("reduction", rnntool.loss.REDUCTIONS)
def test_every_reduction_value_and_gradient(reduction, backend):
    logits, labels, t_len, u_len = random_batch(4, 5, 3, 6, seed=7)
    assert_matches_reference(logits, labels, t_len, u_len, blank=0, reduction=reduction, backend=backend)
    assert_matches_reference(logits.double(), labels, t_len, u_len, blank=0, reduction=reduction,
                             backend=backend)


def test_reduction_values_by_definition(backend):
    logits, labels, t_len, u_len = random_batch(4, 5, 3, 6, seed=3)

    def loss(reduction):
        return rnnt_loss(logits, labels, t_len, u_len, blank=0, reduction=reduction, backend=backend)

    per = loss("none")
    torch.testing.assert_close(loss("sum"), per.sum())
    torch.testing.assert_close(loss("mean"), per.mean())
    torch.testing.assert_close(loss("mean_frames"), (per / t_len).mean())
    torch.testing.assert_close(loss("mean_tokens"), per.sum() / u_len.clamp(min=1).sum())


def test_gradcheck_float64(backend):
    # torch's gradcheck runs two forwards per logit: in the simulator a smaller batch
    # (still two utterances, T = 2 and 1).
    shape = (2, 4, 3, 5) if backend == "cpu" else (2, 2, 1, 3)
    logits, labels, t_len, u_len = random_batch(*shape, seed=11, dtype=torch.float64)
    x = logits.requires_grad_(True)
    for reduction in ("none", "mean_frames"):
        assert torch.autograd.gradcheck(
            lambda z, r=reduction: rnnt_loss(z, labels, t_len, u_len, blank=0, reduction=r,
                                             backend=backend), (x,)
        )


def test_log_probs_input(backend):
    logits, labels, t_len, u_len = random_batch(3, 5, 3, 6, seed=5)
    logp = torch.log_softmax(logits, -1)
    assert_matches_reference(logp, labels, t_len, u_len, blank=0, fused_log_softmax=False,
                             backend=backend)
    fused = rnnt_loss(logits, labels, t_len, u_len, blank=0, reduction="none", backend=backend)
    unfused = rnnt_loss(logp, labels, t_len, u_len, blank=0, reduction="none", fused_log_softmax=False,
                        backend=backend)
    torch.testing.assert_close(fused, unfused)
    # Without the fused softmax only the blank and label entries get gradient.
    _, grad = run_engine(logp, labels, t_len, u_len, blank=0, fused_log_softmax=False, backend=backend)
    assert int((grad != 0).sum(-1).max()) <= 2


@pytest.mark.parametrize("clamp", [0.05, 0.2])
def test_clamp(clamp, backend):
    logits, labels, t_len, u_len = random_batch(3, 5, 3, 6, seed=9, scale=3.0)
    for reduction in ("none", "mean"):
        assert_matches_reference(
            logits, labels, t_len, u_len, blank=0, reduction=reduction, clamp=clamp, backend=backend
        )
    _, grad = run_engine(logits, labels, t_len, u_len, blank=0, clamp=clamp, reduction="sum",
                         backend=backend)
    assert float(grad.abs().max()) <= clamp + 1e-7
    assert float(grad.max()) == pytest.approx(clamp) and float(grad.min()) == pytest.approx(-clamp)


@pytest.mark.parametrize("lam", [0.0, 0.01, 0.5])
def test_fastemit_gradient_and_value(lam, backend):
    logits, labels, t_len, u_len = random_batch(3, 6, 3, 5, seed=13)
    assert_matches_reference(logits, labels, t_len, u_len, blank=0, fastemit_lambda=lam, backend=backend)
    plain = rnnt_loss(logits, labels, t_len, u_len, blank=0, reduction="none", backend=backend)
    fe = rnnt_loss(logits, labels, t_len, u_len, blank=0, reduction="none", fastemit_lambda=lam,
                   backend=backend)
    torch.testing.assert_close(plain, fe)


def test_padding_gets_zero_gradient_and_does_not_change_the_loss(backend):
    logits, labels, t_len, u_len = random_batch(3, 6, 4, 5, seed=17)
    t_len[1], u_len[1] = 3, 2
    loss, grad = run_engine(logits, labels, t_len, u_len, blank=0, backend=backend)
    assert float(grad[1, 3:].abs().max()) == 0.0
    assert float(grad[1, :, 3:].abs().max()) == 0.0
    alone, _ = run_engine(logits[1:2, :3, :3], labels[1:2, :2], t_len[1:2], u_len[1:2], blank=0,
                          backend=backend)
    torch.testing.assert_close(loss[1:2], alone)
    # Garbage in the padding changes nothing.
    noisy = logits.clone()
    noisy[1, 3:] = 1e4
    loss2, grad2 = run_engine(noisy, labels, t_len, u_len, blank=0, backend=backend)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(grad, grad2)


def test_non_contiguous_input(backend):
    logits, labels, t_len, u_len = random_batch(2, 5, 3, 6, seed=19)
    base = logits.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # strided view
    assert not base.is_contiguous()
    strided_labels = torch.stack([labels, labels], -1)[..., 0]
    assert not strided_labels.is_contiguous()
    assert_matches_reference(base, strided_labels, t_len, u_len, blank=0, backend=backend)
    wide = torch.randn(2, 5, 4, 12)[..., ::2]  # stride 2 over V
    assert_matches_reference(wide, labels, t_len, u_len, blank=0, backend=backend)


def test_no_grad_forward_equals_grad_forward(backend):
    logits, labels, t_len, u_len = random_batch(4, 7, 3, 6, seed=23)
    with torch.no_grad():
        a = rnnt_loss(logits, labels, t_len, u_len, blank=0, reduction="none", backend=backend)
    b, _ = run_engine(logits, labels, t_len, u_len, blank=0, backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_integer_dtypes_of_labels_and_lengths(backend):
    logits, labels, t_len, u_len = random_batch(2, 4, 3, 6, seed=29)
    ref = rnnt_loss(logits, labels, t_len, u_len, blank=0, reduction="none", backend=backend)
    for dt in (torch.int16, torch.int32, torch.uint8):
        got = rnnt_loss(logits, labels.clamp(min=0).to(dt), t_len.to(dt), u_len.to(dt), blank=0,
                        reduction="none", backend=backend)
        torch.testing.assert_close(got, ref)


def test_loss_dtype(backend):
    logits, labels, t_len, u_len = random_batch(2, 4, 3, 6)

    def dtype(x):
        return rnnt_loss(x, labels, t_len, u_len, blank=0, backend=backend).dtype

    assert dtype(logits.half()) == torch.float32
    assert dtype(logits.bfloat16()) == torch.float32
    assert dtype(logits) == torch.float32
    assert dtype(logits.double()) == torch.float64


def test_transducer_loss_module_is_a_drop_in(backend):
    # SpeechBrain's mean (of loss_b / T_b) is rnnt_loss's mean_frames, bit for bit;
    # mean_frames is the same in TransducerLoss, mean_tokens keeps rnnt_loss's meaning.
    logits, labels, t_len, u_len = random_batch(3, 5, 3, 6, seed=31)
    for reduction, same_as in (("mean", "mean_frames"), ("mean_frames", "mean_frames"),
                               ("mean_tokens", "mean_tokens")):
        crit = TransducerLoss(blank=0, reduction=reduction, backend=backend)
        x1 = logits.clone().requires_grad_(True)
        x2 = logits.clone().requires_grad_(True)
        got = crit(x1, labels, t_len, u_len)
        want = rnnt_loss(x2, labels, t_len, u_len, blank=0, reduction=same_as, backend=backend)
        got.backward()
        want.backward()
        assert torch.equal(got, want)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    assert "blank=0" in repr(TransducerLoss())


def test_large_logits_are_stable(backend):
    logits, labels, t_len, u_len = random_batch(2, 6, 3, 8, seed=37, scale=1000.0)
    loss, grad = run_engine(logits, labels, t_len, u_len, blank=0, backend=backend)
    assert torch.isfinite(grad).all()
    assert_matches_reference(logits.double(), labels, t_len, u_len, blank=0, backend=backend)
    # Logits of ~1000 leave float32 about 4 significant digits in alpha + beta - log P.
    assert_matches_reference(logits, labels, t_len, u_len, blank=0, grad_rtol=5e-3, backend=backend)


def test_nan_logits_give_nan_loss_and_a_warning_naming_the_utterance(backend):
    # The simulator's tensors are CPU tensors, so "cuda" gives the warning too.
    logits, labels, t_len, u_len = random_batch(3, 4, 2, 5, seed=41, mixed=False)
    logits[1, 2, 1, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"utterance\(s\) \[1\]"):
        loss, grad = run_engine(logits, labels, t_len, u_len, blank=0, backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert float(grad[1].abs().max()) == 0.0 and torch.isfinite(grad).all()
    logits[1, 2, 1, 3] = float("inf")
    with pytest.warns(RuntimeWarning, match="NaN or \\+inf"), torch.no_grad():
        loss = rnnt_loss(logits, labels, t_len, u_len, blank=0, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_impossible_alignment_gives_inf_loss(backend):
    logits, labels, t_len, u_len = random_batch(2, 3, 2, 5, seed=43, mixed=False)
    logits[0, ..., 0] = float("-inf")  # blank impossible everywhere
    with pytest.warns(RuntimeWarning, match="no alignment"):
        loss, grad = run_engine(logits, labels, t_len, u_len, blank=0, backend=backend)
    assert loss[0] == float("inf") and torch.isfinite(loss[1])
    assert float(grad[0].abs().max()) == 0.0


def test_impossible_losses_warn_by_class_with_reason_and_utterances(backend):
    x, y, T, U = random_batch(4, 4, 2, 5, seed=41, mixed=False)
    x[1, 0, 0, 3] = float("nan")
    x[2, ..., 0] = float("-inf")  # no alignment
    lp = torch.log_softmax(x, -1)
    lp[3] += 3.0  # "log-probs" that do not normalise: a negative loss
    with pytest.warns(ImpossibleLossWarning) as caught, torch.no_grad():
        rnnt_loss(lp, y, T, U, blank=0, reduction="none", fused_log_softmax=False, backend=backend)
    got = {w.message.reason: w.message.utterances for w in caught}
    assert got == {"nan": (1,), "inf": (2,), "negative": (3,)}
    for w in caught:
        assert w.category is ImpossibleLossWarning
        assert str(w.message).startswith("rnnt_loss: ")
    with warnings.catch_warnings():  # callers filter by class, not by text
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", ImpossibleLossWarning)
        rnnt_loss(lp, y, T, U, blank=0, reduction="none", fused_log_softmax=False, backend=backend)


def test_no_warning_on_good_input(backend):
    logits, labels, t_len, u_len = random_batch(2, 3, 2, 5, seed=47)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_engine(logits, labels, t_len, u_len, blank=0, backend=backend)


def test_zero_length_targets_is_the_all_blank_path(backend):
    logits = torch.randn(1, 4, 1, 5)
    loss = rnnt_loss(logits, torch.zeros(1, 0, dtype=torch.long), torch.tensor([4]),
                     torch.tensor([0]), blank=0, reduction="none", backend=backend)
    expected = -torch.log_softmax(logits.double(), -1)[0, :, 0, 0].sum()
    assert abs(float(loss) - float(expected)) < 1e-5


def test_no_size_limits_on_the_cpu():
    # CPU only: U+1 = 2000 and B = 2048 would take hours in the simulator; the CUDA
    # twin is test_cuda.py's test_gpu_long_labels_and_big_batch, on a real GPU.
    # The kernels this replaces cap U+1 and B at 1024; nothing here does.
    logits, labels, t_len, u_len = random_batch(1, 2, 1999, 3, seed=53, mixed=False)
    assert logits.shape[2] == 2000
    assert_matches_reference(logits.double(), labels, t_len, u_len, blank=0)
    # float32: alpha, beta and log P near -3000 keep ~4 digits of exp(alpha + beta - log P).
    assert_matches_reference(logits, labels, t_len, u_len, blank=0, grad_rtol=1e-2)
    logits, labels, t_len, u_len = random_batch(2048, 2, 1, 3, seed=59)
    loss, _ = run_engine(logits, labels, t_len, u_len, blank=0)
    ref = reference_loss_and_grad(logits[:64].double(), labels[:64], t_len[:64], u_len[:64])[0]
    torch.testing.assert_close(loss[:64].double(), ref, atol=1e-5, rtol=1e-6)
    assert torch.isfinite(loss).all() and loss.shape == (2048,)


# --------------------------------------------------------------------------- torchaudio
# rnnt_loss and RNNTLoss are torchaudio's function and module: its signature, positions
# and defaults (blank=-1, clamp=-1). tests/data/torchaudio_rnnt.npz holds torchaudio
# 2.11's own losses and gradients for fixed inputs (scripts/record_torchaudio_rnnt.py
# wrote it; CI has no torchaudio), each with the call that made it.
TORCHAUDIO_DATA = Path(__file__).parent / "data" / "torchaudio_rnnt.npz"
with np.load(TORCHAUDIO_DATA) as _f:
    TORCHAUDIO_CASES = sorted({k.split("/")[0] for k in _f.files if "/" in k})
# The simulator is slow: on "cuda" only these (a positional blank, the defaults, a
# clamp, log-prob input, float16, the module).
TORCHAUDIO_CUDA_CASES = ("positional_blank0", "default_blank", "clamp_01_none",
                         "log_probs_sum", "float16_none", "module_positional")


def _torchaudio_case(name):
    with np.load(TORCHAUDIO_DATA) as f:
        case = {k.split("/", 1)[1]: f[k] for k in f.files if k.startswith(name + "/")}
    call = json.loads(str(case.pop("call")))
    return {k: torch.from_numpy(v) for k, v in case.items()}, call


def _call_like_torchaudio(call, x, y, T, U, **extras):
    """rnntool called exactly as torchaudio was (rnnt_loss or RNNTLoss, same arguments)."""
    if call["style"] == "function":
        return rnnt_loss(x, y, T, U, *call["args"], **call["kwargs"], **extras)
    return rnntool.RNNTLoss(*call["args"], **call["kwargs"], **extras)(x, y, T, U)


def test_torchaudio_recorded_cases_cover_what_the_issue_asks():
    calls = {name: _torchaudio_case(name)[1] for name in TORCHAUDIO_CASES}
    assert {"positional_blank0", "default_blank", "positional_all", "module_defaults"} <= set(
        calls)
    assert calls["positional_blank0"] == {"style": "function", "args": [0], "kwargs": {}}
    assert calls["default_blank"]["args"] == [] and calls["module_defaults"]["args"] == []
    assert calls["positional_all"]["args"] == [-1, -1, "sum", True]
    dtypes = {str(_torchaudio_case(n)[0]["logits"].dtype) for n in TORCHAUDIO_CASES}
    assert dtypes == {"torch.float32", "torch.float16"}  # torchaudio refuses the others
    assert TORCHAUDIO_DATA.stat().st_size < 200_000


@pytest.mark.parametrize("name", TORCHAUDIO_CASES)
def test_matches_recorded_torchaudio(name, backend):
    if backend == "cuda" and name not in TORCHAUDIO_CUDA_CASES:
        pytest.skip("a subset of the recorded cases in the simulator")
    case, call = _torchaudio_case(name)
    x = case["logits"].clone().requires_grad_(True)
    y, T, U = case["targets"], case["logit_lengths"], case["target_lengths"]
    loss = _call_like_torchaudio(call, x, y, T, U, backend=backend)
    loss.backward(case["grad_output"].to(loss.dtype))
    want, want_grad = case["loss"].double(), case["grad"].double()
    assert loss.shape == want.shape and x.grad.dtype == x.dtype
    if x.dtype == torch.float16:
        # torchaudio rounds its float16 loss to float16 (half an ulp: 4e-3 at 10),
        # rnntool returns float32; the gradients are float16 on both sides.
        torch.testing.assert_close(loss.double(), want, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(x.grad.double(), want_grad, rtol=2e-3, atol=2e-3)
    else:
        torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=2e-5)
        torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-4, atol=1e-5)
        # rnntool also takes the same inputs in float64 (torchaudio does not).
        x64 = case["logits"].double().requires_grad_(True)
        loss64 = _call_like_torchaudio(call, x64, y, T, U, backend=backend)
        loss64.backward(case["grad_output"].double().expand(loss64.shape))
        torch.testing.assert_close(loss64, want, rtol=1e-6, atol=2e-5)
        torch.testing.assert_close(x64.grad, want_grad, rtol=1e-4, atol=1e-5)


def test_signature_is_torchaudios():
    def params(fn):
        return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]

    torchaudio_order = [("blank", -1), ("clamp", -1), ("reduction", "mean"),
                        ("fused_log_softmax", True)]
    got = params(rnnt_loss)
    assert [n for n, _, _ in got[:4]] == ["logits", "targets", "logit_lengths",
                                          "target_lengths"]
    assert [(n, d) for n, _, d in got[4:8]] == torchaudio_order
    assert all(k == "POSITIONAL_OR_KEYWORD" for _, k, _ in got[:8])
    assert {n for n, k, _ in got[8:] if k == "KEYWORD_ONLY"} == {
        "fastemit_lambda", "backend", "validate"} and len(got) == 11
    got = params(rnntool.RNNTLoss.__init__)[1:]
    assert [(n, d) for n, _, d in got[:4]] == torchaudio_order
    assert all(k == "KEYWORD_ONLY" for _, k, _ in got[4:])
    assert [p for p in inspect.signature(rnntool.RNNTLoss.forward).parameters][1:] == [
        "logits", "targets", "logit_lengths", "target_lengths"]
    # SpeechBrain's module keeps SpeechBrain's blank=0 and order.
    got = params(TransducerLoss.__init__)[1:]
    assert [(n, d) for n, _, d in got[:2]] == [("blank", 0), ("reduction", "mean")]


def test_torchaudio_calls_positions_and_defaults(backend):
    x, y, T, U = random_batch(3, 5, 3, 6, seed=61, blank=5)
    y0 = torch.where(y == 0, 1, y)  # labels for blank=0: no 0 within the lengths
    y0[y < 0] = -1

    def kw(*args, **kwargs):
        return rnnt_loss(x, *args, backend=backend, **kwargs)

    # The positional blank used to be a TypeError.
    assert torch.equal(kw(y0, T, U, 0), kw(y0, T, U, blank=0))
    # The default blank is the last class, as torchaudio's; so is -1.
    assert torch.equal(kw(y, T, U), kw(y, T, U, blank=5))
    assert torch.equal(kw(y, T, U, -1, -1, "sum", True), kw(y, T, U, blank=5, reduction="sum"))
    assert torch.equal(kw(y, T, U, -1, -1, "none"), kw(y, T, U, blank=-1, reduction="none"))
    # The default clamp (-1) is off.
    assert torch.equal(kw(y, T, U), kw(y, T, U, clamp=None))
    # A blank of 0 on labels that use 0 now fails loudly instead of quietly differing.
    with pytest.raises(ValueError, match="equal to blank|blank"):
        kw(torch.where(y < 0, y, 0), T, U, 0)
    # rnntool's extras are keyword-only: a 9th positional argument is refused.
    with pytest.raises(TypeError):
        rnnt_loss(x, y, T, U, -1, -1, "sum", True, 0.5)
    # RNNTLoss() is rnnt_loss with the defaults; its options by position too.
    for args in ((), (-1, -1, "sum"), (5, 0.1, "none", True)):
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        a = rnntool.RNNTLoss(*args, backend=backend)(xa, y, T, U)
        b = rnnt_loss(xb, y, T, U, *args, backend=backend)
        a.sum().backward()
        b.sum().backward()
        assert torch.equal(a, b) and torch.equal(xa.grad, xb.grad)
    assert "blank=-1" in repr(rnntool.RNNTLoss())
    assert "RNNTLoss" in rnntool.__all__ and "RNNTLoss" in dir(rnntool)


def test_rnnt_loss_module_checks_options_in_the_constructor():
    with pytest.raises(ValueError, match="reduction must be one of"):
        rnntool.RNNTLoss(reduction="batchmean")
    with pytest.raises(TypeError, match="blank must be an integer"):
        rnntool.RNNTLoss(1.0)
    with pytest.raises(ValueError, match="clamp must be None or a number, got nan"):
        rnntool.RNNTLoss(clamp=float("nan"))
    with pytest.raises(TypeError, match="fused_log_softmax must be True or False"):
        rnntool.RNNTLoss(0, -1, "mean", "no")


def test_matches_live_torchaudio():
    """The recorded values' live twin, where torchaudio is installed (not in CI)."""
    ta = pytest.importorskip("torchaudio")
    F = ta.functional  # noqa: N806
    for seed, blank, clamp, reduction, fused, dtype in [
        (71, 0, -1, "mean", True, torch.float32), (72, -1, -1, "sum", True, torch.float32),
        (73, 3, 0.05, "none", True, torch.float32), (74, -1, -1, "none", False, torch.float32),
        (75, 0, 0.1, "sum", True, torch.float16),
    ]:
        x, y, T, U = random_batch(3, 6, 4, 7, blank=blank, seed=seed, mixed=False,
                                  scale=2.0, dtype=dtype)
        T[1], U[2] = 3, 2  # shorter utterances; the first fills the padded dims
        y = y.clamp(min=0).int()
        if not fused:
            x = torch.log_softmax(x, -1)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        a = F.rnnt_loss(xa, y, T.int(), U.int(), blank, clamp, reduction, fused)
        b = rnnt_loss(xb, y, T, U, blank, clamp, reduction, fused)
        a.sum().backward()
        b.sum().backward()
        tol = 2e-3 if dtype == torch.float16 else 2e-5
        torch.testing.assert_close(b.double(), a.double(), rtol=1e-3 if tol > 1e-4 else 1e-6,
                                   atol=tol)
        torch.testing.assert_close(xb.grad.double(), xa.grad.double(), rtol=tol, atol=tol)
    x, y, T, U = random_batch(2, 4, 2, 5, seed=76, mixed=False)
    y = y.int()
    torch.testing.assert_close(rnntool.RNNTLoss()(x, y, T, U),
                               ta.transforms.RNNTLoss()(x, y, T.int(), U.int()))


# --------------------------------------------------------------------------- SpeechBrain
# TransducerLoss is SpeechBrain's: its kernels divide each utterance's loss by T_b, so
# "none", "sum" and "mean" are of loss_b / T_b; the gradient is that of the value.
def _speechbrain_reference(x, y, T, U, reduction, blank=0):
    losses, grads = reference_gradients(x.double(), y, T, U, blank=blank)
    per = losses / T.double()
    grads = grads / T.double().view(-1, 1, 1, 1)
    if reduction == "none":
        return per, grads
    if reduction == "sum":
        return per.sum(), grads
    return per.mean(), grads / x.shape[0]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_transducer_loss_is_speechbrains_value(reduction, backend):
    x, y, T, U = random_batch(4, 6, 3, 7, seed=67)
    want, want_grad = _speechbrain_reference(x, y, T, U, reduction)
    for dtype, atol, gtol in ((torch.float32, 2e-5, 1e-6), (torch.float64, 1e-12, 1e-13)):
        xg = x.detach().to(dtype).clone().requires_grad_(True)
        got = TransducerLoss(reduction=reduction, backend=backend)(xg, y, T, U)
        got.sum().backward()  # for "none", grad_output of ones
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-6)
        torch.testing.assert_close(xg.grad.double(), want_grad, atol=gtol, rtol=1e-5)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_transducer_loss_gradient_is_that_of_its_value():
    x, y, T, U = random_batch(2, 4, 2, 5, seed=69, dtype=torch.float64)
    for reduction in ("none", "sum", "mean"):
        crit = TransducerLoss(reduction=reduction)
        assert torch.autograd.gradcheck(lambda z, c=crit: c(z, y, T, U),
                                        (x.clone().requires_grad_(True),))


def test_speechbrains_gradient_is_the_sum_gradient(backend):
    """SpeechBrain's backward hands back the unnormalised gradient, whatever the
    reduction: that of rnnt_loss(..., 0, reduction="sum"); TransducerLoss's "mean"
    gradient is it times 1 / (B * T_b), as the docstring and README say."""
    x, y, T, U = random_batch(3, 5, 3, 6, seed=71)
    xs, xm = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    rnnt_loss(xs, y, T, U, 0, reduction="sum", backend=backend).backward()
    TransducerLoss(backend=backend)(xm, y, T, U).backward()
    scale = (1.0 / (x.shape[0] * T.double())).view(-1, 1, 1, 1)
    torch.testing.assert_close(xm.grad.double(), xs.grad.double() * scale, atol=1e-7,
                               rtol=1e-5)
    _, sb_grad = reference_gradients(x.double(), y, T, U, blank=0)
    torch.testing.assert_close(xs.grad.double(), sb_grad, atol=2e-6, rtol=1e-4)


def test_transducer_loss_none_with_grad_output_and_empty_batch(backend):
    x, y, T, U = random_batch(3, 5, 3, 6, seed=73)
    go = torch.tensor([0.5, 2.0, -1.0])
    loss, grad = run_engine(x, y, T, U, blank=0, backend=backend, reduction="none")
    xg = x.clone().requires_grad_(True)
    per = TransducerLoss(reduction="none", backend=backend)(xg, y, T, U)
    per.backward(go)
    torch.testing.assert_close(per, loss / T, rtol=1e-6, atol=0)
    _, want = reference_gradients(x.double(), y, T, U, blank=0)
    want = want * (go.double() / T.double()).view(-1, 1, 1, 1)
    torch.testing.assert_close(xg.grad.double(), want, atol=2e-6, rtol=1e-4)
    empty = (torch.zeros(0, 2, 1, 3), torch.zeros(0, 0, dtype=torch.long),
             torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert TransducerLoss(reduction="none", backend=backend)(*empty).shape == (0,)
    assert float(TransducerLoss(reduction="sum", backend=backend)(*empty)) == 0.0
    assert torch.isnan(TransducerLoss(backend=backend)(*empty))
