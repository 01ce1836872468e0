"""The loss engine against the float64 reference, on every backend (the `backend`
fixture: the CPU, and the CUDA kernels in Numba's simulator).

The simulator takes about a second per launch sequence, so some tests shrink their
shapes or examples for "cuda" (said where they do); what they assert is the same.
"""

import warnings

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


def test_public_case_value_and_gradient(backend):
    x = torch.tensor([PUBLIC_LOGITS])
    y, T, U = torch.tensor([[1, 2]]), torch.tensor([2]), torch.tensor([2])
    loss, _ = run_engine(x, y, T, U, reduction="sum", backend=backend)
    assert abs(float(loss) - PUBLIC_LOSS) < 1e-5
    assert_matches_reference(x, y, T, U, backend=backend)
    assert_matches_reference(x.double(), y, T, U, backend=backend)


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
    assert_matches_reference(logits, labels, t_len, u_len, reduction=reduction, backend=backend)
    assert_matches_reference(logits.double(), labels, t_len, u_len, reduction=reduction,
                             backend=backend)


def test_reduction_values_by_definition(backend):
    logits, labels, t_len, u_len = random_batch(4, 5, 3, 6, seed=3)

    def loss(reduction):
        return rnnt_loss(logits, labels, t_len, u_len, reduction=reduction, backend=backend)

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
            lambda z, r=reduction: rnnt_loss(z, labels, t_len, u_len, reduction=r,
                                             backend=backend), (x,)
        )


def test_log_probs_input(backend):
    logits, labels, t_len, u_len = random_batch(3, 5, 3, 6, seed=5)
    logp = torch.log_softmax(logits, -1)
    assert_matches_reference(logp, labels, t_len, u_len, fused_log_softmax=False,
                             backend=backend)
    fused = rnnt_loss(logits, labels, t_len, u_len, reduction="none", backend=backend)
    unfused = rnnt_loss(logp, labels, t_len, u_len, reduction="none", fused_log_softmax=False,
                        backend=backend)
    torch.testing.assert_close(fused, unfused)
    # Without the fused softmax only the blank and label entries get gradient.
    _, grad = run_engine(logp, labels, t_len, u_len, fused_log_softmax=False, backend=backend)
    assert int((grad != 0).sum(-1).max()) <= 2


@pytest.mark.parametrize("clamp", [0.05, 0.2])
def test_clamp(clamp, backend):
    logits, labels, t_len, u_len = random_batch(3, 5, 3, 6, seed=9, scale=3.0)
    for reduction in ("none", "mean"):
        assert_matches_reference(
            logits, labels, t_len, u_len, reduction=reduction, clamp=clamp, backend=backend
        )
    _, grad = run_engine(logits, labels, t_len, u_len, clamp=clamp, reduction="sum",
                         backend=backend)
    assert float(grad.abs().max()) <= clamp + 1e-7
    assert float(grad.max()) == pytest.approx(clamp) and float(grad.min()) == pytest.approx(-clamp)


@pytest.mark.parametrize("lam", [0.0, 0.01, 0.5])
def test_fastemit_gradient_and_value(lam, backend):
    logits, labels, t_len, u_len = random_batch(3, 6, 3, 5, seed=13)
    assert_matches_reference(logits, labels, t_len, u_len, fastemit_lambda=lam, backend=backend)
    plain = rnnt_loss(logits, labels, t_len, u_len, reduction="none", backend=backend)
    fe = rnnt_loss(logits, labels, t_len, u_len, reduction="none", fastemit_lambda=lam,
                   backend=backend)
    torch.testing.assert_close(plain, fe)


def test_padding_gets_zero_gradient_and_does_not_change_the_loss(backend):
    logits, labels, t_len, u_len = random_batch(3, 6, 4, 5, seed=17)
    t_len[1], u_len[1] = 3, 2
    loss, grad = run_engine(logits, labels, t_len, u_len, backend=backend)
    assert float(grad[1, 3:].abs().max()) == 0.0
    assert float(grad[1, :, 3:].abs().max()) == 0.0
    alone, _ = run_engine(logits[1:2, :3, :3], labels[1:2, :2], t_len[1:2], u_len[1:2],
                          backend=backend)
    torch.testing.assert_close(loss[1:2], alone)
    # Garbage in the padding changes nothing.
    noisy = logits.clone()
    noisy[1, 3:] = 1e4
    loss2, grad2 = run_engine(noisy, labels, t_len, u_len, backend=backend)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(grad, grad2)


def test_non_contiguous_input(backend):
    logits, labels, t_len, u_len = random_batch(2, 5, 3, 6, seed=19)
    base = logits.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # strided view
    assert not base.is_contiguous()
    strided_labels = torch.stack([labels, labels], -1)[..., 0]
    assert not strided_labels.is_contiguous()
    assert_matches_reference(base, strided_labels, t_len, u_len, backend=backend)
    wide = torch.randn(2, 5, 4, 12)[..., ::2]  # stride 2 over V
    assert_matches_reference(wide, labels, t_len, u_len, backend=backend)


def test_no_grad_forward_equals_grad_forward(backend):
    logits, labels, t_len, u_len = random_batch(4, 7, 3, 6, seed=23)
    with torch.no_grad():
        a = rnnt_loss(logits, labels, t_len, u_len, reduction="none", backend=backend)
    b, _ = run_engine(logits, labels, t_len, u_len, backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_integer_dtypes_of_labels_and_lengths(backend):
    logits, labels, t_len, u_len = random_batch(2, 4, 3, 6, seed=29)
    ref = rnnt_loss(logits, labels, t_len, u_len, reduction="none", backend=backend)
    for dt in (torch.int16, torch.int32, torch.uint8):
        got = rnnt_loss(logits, labels.clamp(min=0).to(dt), t_len.to(dt), u_len.to(dt),
                        reduction="none", backend=backend)
        torch.testing.assert_close(got, ref)


def test_loss_dtype(backend):
    logits, labels, t_len, u_len = random_batch(2, 4, 3, 6)

    def dtype(x):
        return rnnt_loss(x, labels, t_len, u_len, backend=backend).dtype

    assert dtype(logits.half()) == torch.float32
    assert dtype(logits.bfloat16()) == torch.float32
    assert dtype(logits) == torch.float32
    assert dtype(logits.double()) == torch.float64


def test_transducer_loss_module_is_a_drop_in(backend):
    logits, labels, t_len, u_len = random_batch(3, 5, 3, 6, seed=31)
    for reduction in ("mean", "sum", "mean_frames"):
        crit = TransducerLoss(blank=0, reduction=reduction, backend=backend)
        x1 = logits.clone().requires_grad_(True)
        x2 = logits.clone().requires_grad_(True)
        crit(x1, labels, t_len, u_len).backward()
        rnnt_loss(x2, labels, t_len, u_len, reduction=reduction, backend=backend).backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    assert "blank=0" in repr(TransducerLoss())


def test_large_logits_are_stable(backend):
    logits, labels, t_len, u_len = random_batch(2, 6, 3, 8, seed=37, scale=1000.0)
    loss, grad = run_engine(logits, labels, t_len, u_len, backend=backend)
    assert torch.isfinite(grad).all()
    assert_matches_reference(logits.double(), labels, t_len, u_len, backend=backend)
    # Logits of ~1000 leave float32 about 4 significant digits in alpha + beta - log P.
    assert_matches_reference(logits, labels, t_len, u_len, grad_rtol=5e-3, backend=backend)


def test_nan_logits_give_nan_loss_and_a_warning_naming_the_utterance(backend):
    # The simulator's tensors are CPU tensors, so "cuda" gives the warning too.
    logits, labels, t_len, u_len = random_batch(3, 4, 2, 5, seed=41, mixed=False)
    logits[1, 2, 1, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"utterance\(s\) \[1\]"):
        loss, grad = run_engine(logits, labels, t_len, u_len, backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert float(grad[1].abs().max()) == 0.0 and torch.isfinite(grad).all()
    logits[1, 2, 1, 3] = float("inf")
    with pytest.warns(RuntimeWarning, match="NaN or \\+inf"), torch.no_grad():
        loss = rnnt_loss(logits, labels, t_len, u_len, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_impossible_alignment_gives_inf_loss(backend):
    logits, labels, t_len, u_len = random_batch(2, 3, 2, 5, seed=43, mixed=False)
    logits[0, ..., 0] = float("-inf")  # blank impossible everywhere
    with pytest.warns(RuntimeWarning, match="no alignment"):
        loss, grad = run_engine(logits, labels, t_len, u_len, backend=backend)
    assert loss[0] == float("inf") and torch.isfinite(loss[1])
    assert float(grad[0].abs().max()) == 0.0


def test_impossible_losses_warn_by_class_with_reason_and_utterances(backend):
    x, y, T, U = random_batch(4, 4, 2, 5, seed=41, mixed=False)
    x[1, 0, 0, 3] = float("nan")
    x[2, ..., 0] = float("-inf")  # no alignment
    lp = torch.log_softmax(x, -1)
    lp[3] += 3.0  # "log-probs" that do not normalise: a negative loss
    with pytest.warns(ImpossibleLossWarning) as caught, torch.no_grad():
        rnnt_loss(lp, y, T, U, reduction="none", fused_log_softmax=False, backend=backend)
    got = {w.message.reason: w.message.utterances for w in caught}
    assert got == {"nan": (1,), "inf": (2,), "negative": (3,)}
    for w in caught:
        assert w.category is ImpossibleLossWarning
        assert str(w.message).startswith("rnnt_loss: ")
    with warnings.catch_warnings():  # callers filter by class, not by text
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", ImpossibleLossWarning)
        rnnt_loss(lp, y, T, U, reduction="none", fused_log_softmax=False, backend=backend)


def test_no_warning_on_good_input(backend):
    logits, labels, t_len, u_len = random_batch(2, 3, 2, 5, seed=47)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_engine(logits, labels, t_len, u_len, backend=backend)


def test_zero_length_targets_is_the_all_blank_path(backend):
    logits = torch.randn(1, 4, 1, 5)
    loss = rnnt_loss(logits, torch.zeros(1, 0, dtype=torch.long), torch.tensor([4]),
                     torch.tensor([0]), reduction="none", backend=backend)
    expected = -torch.log_softmax(logits.double(), -1)[0, :, 0, 0].sum()
    assert abs(float(loss) - float(expected)) < 1e-5


def test_no_size_limits_on_the_cpu():
    # CPU only: U+1 = 2000 and B = 2048 would take hours in the simulator; the CUDA
    # twin is test_cuda.py's test_gpu_long_labels_and_big_batch, on a real GPU.
    # The kernels this replaces cap U+1 and B at 1024; nothing here does.
    logits, labels, t_len, u_len = random_batch(1, 2, 1999, 3, seed=53, mixed=False)
    assert logits.shape[2] == 2000
    assert_matches_reference(logits.double(), labels, t_len, u_len)
    # float32: alpha, beta and log P near -3000 keep ~4 digits of exp(alpha + beta - log P).
    assert_matches_reference(logits, labels, t_len, u_len, grad_rtol=1e-2)
    logits, labels, t_len, u_len = random_batch(2048, 2, 1, 3, seed=59)
    loss, _ = run_engine(logits, labels, t_len, u_len)
    ref = reference_loss_and_grad(logits[:64].double(), labels[:64], t_len[:64], u_len[:64])[0]
    torch.testing.assert_close(loss[:64].double(), ref, atol=1e-5, rtol=1e-6)
    assert torch.isfinite(loss).all() and loss.shape == (2048,)
