"""The loss engine (CPU backend) against the float64 reference."""

import warnings

import pytest
import torch
from helpers import random_batch, reference_loss_and_grad
from hypothesis import given
from hypothesis import strategies as st
from test_reference import PUBLIC_LOGITS, PUBLIC_LOSS

import rnntool
from rnntool import TransducerLoss, rnnt_loss

# (loss atol, gradient atol) by dtype: the lattice is float32 except for float64,
# and half inputs are rounded before the engine sees them (the reference
# gets the same rounded values), so only the gradient's rounding differs.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-4, 2e-6),
    torch.float16: (2e-4, 2e-3),
    torch.bfloat16: (2e-4, 1e-2),
}


def run_engine(logits, labels, t_len, u_len, *, grad_output=None, backend="cpu",
               reduction="none", **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = rnnt_loss(x, labels, t_len, u_len, backend=backend, reduction=reduction, **kw)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    loss.backward(grad_output.to(loss.dtype))
    return loss.detach(), x.grad


def assert_matches_reference(logits, labels, t_len, u_len, *, reduction="none", seed=0,
                             backend="cpu", grad_rtol=None, **kw):
    dtype = logits.dtype
    B = logits.shape[0]
    g = torch.Generator().manual_seed(seed)
    go = torch.rand(B if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5
    loss, grad = run_engine(
        logits, labels, t_len, u_len, grad_output=go, reduction=reduction, backend=backend, **kw
    )
    ref_loss, ref_grad = reference_loss_and_grad(
        logits.double(), labels, t_len, u_len, reduction=reduction, grad_output=go, **kw
    )
    loss_atol, grad_atol = TOL[dtype]
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss.double(), ref_loss, atol=loss_atol, rtol=1e-5)
    if grad_rtol is None:
        grad_rtol = 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(grad.double(), ref_grad, atol=grad_atol, rtol=grad_rtol)


def test_public_case_value_and_gradient():
    x = torch.tensor([PUBLIC_LOGITS])
    y, T, U = torch.tensor([[1, 2]]), torch.tensor([2]), torch.tensor([2])
    loss, _ = run_engine(x, y, T, U, reduction="sum")
    assert abs(float(loss) - PUBLIC_LOSS) < 1e-5
    assert_matches_reference(x, y, T, U)
    assert_matches_reference(x.double(), y, T, U)


@given(
    B=st.integers(1, 3), T=st.integers(1, 6), U=st.integers(0, 4), V=st.integers(2, 7),
    blank_pos=st.sampled_from(["first", "last", "middle", "negative"]),
    scale=st.sampled_from([1.0, 50.0]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    neg_inf=st.booleans(), mixed=st.booleans(), seed=st.integers(0, 2**16),
)
def test_engine_matches_reference(B, T, U, V, blank_pos, scale, dtype, neg_inf, mixed, seed):
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
    assert_matches_reference(logits, labels, t_len, u_len, blank=blank, seed=seed)


@pytest.mark.parametrize("reduction", rnntool.loss.REDUCTIONS)
def test_every_reduction_value_and_gradient(reduction):
    logits, labels, t_len, u_len = random_batch(4, 5, 3, 6, seed=7)
    assert_matches_reference(logits, labels, t_len, u_len, reduction=reduction)
    assert_matches_reference(logits.double(), labels, t_len, u_len, reduction=reduction)


def test_reduction_values_by_definition():
    logits, labels, t_len, u_len = random_batch(4, 5, 3, 6, seed=3)
    per = rnnt_loss(logits, labels, t_len, u_len, reduction="none")
    torch.testing.assert_close(rnnt_loss(logits, labels, t_len, u_len, reduction="sum"), per.sum())
    torch.testing.assert_close(rnnt_loss(logits, labels, t_len, u_len), per.mean())
    torch.testing.assert_close(
        rnnt_loss(logits, labels, t_len, u_len, reduction="mean_frames"),
        (per / t_len).mean(),
    )
    torch.testing.assert_close(
        rnnt_loss(logits, labels, t_len, u_len, reduction="mean_tokens"),
        per.sum() / u_len.clamp(min=1).sum(),
    )


def test_gradcheck_float64():
    logits, labels, t_len, u_len = random_batch(2, 4, 3, 5, seed=11, dtype=torch.float64)
    x = logits.requires_grad_(True)
    for reduction in ("none", "mean_frames"):
        assert torch.autograd.gradcheck(
            lambda z, r=reduction: rnnt_loss(z, labels, t_len, u_len, reduction=r), (x,)
        )


def test_log_probs_input():
    logits, labels, t_len, u_len = random_batch(3, 5, 3, 6, seed=5)
    logp = torch.log_softmax(logits, -1)
    assert_matches_reference(logp, labels, t_len, u_len, fused_log_softmax=False)
    fused = rnnt_loss(logits, labels, t_len, u_len, reduction="none")
    unfused = rnnt_loss(logp, labels, t_len, u_len, reduction="none", fused_log_softmax=False)
    torch.testing.assert_close(fused, unfused)
    # Without the fused softmax only the blank and label entries get gradient.
    _, grad = run_engine(logp, labels, t_len, u_len, fused_log_softmax=False)
    assert int((grad != 0).sum(-1).max()) <= 2


@pytest.mark.parametrize("clamp", [0.05, 0.2])
def test_clamp(clamp):
    logits, labels, t_len, u_len = random_batch(3, 5, 3, 6, seed=9, scale=3.0)
    for reduction in ("none", "mean"):
        assert_matches_reference(
            logits, labels, t_len, u_len, reduction=reduction, clamp=clamp
        )
    _, grad = run_engine(logits, labels, t_len, u_len, clamp=clamp, reduction="sum")
    assert float(grad.abs().max()) <= clamp + 1e-7
    assert float(grad.max()) == pytest.approx(clamp) and float(grad.min()) == pytest.approx(-clamp)


@pytest.mark.parametrize("lam", [0.0, 0.01, 0.5])
def test_fastemit_gradient_and_value(lam):
    logits, labels, t_len, u_len = random_batch(3, 6, 3, 5, seed=13)
    assert_matches_reference(logits, labels, t_len, u_len, fastemit_lambda=lam)
    plain = rnnt_loss(logits, labels, t_len, u_len, reduction="none")
    fe = rnnt_loss(logits, labels, t_len, u_len, reduction="none", fastemit_lambda=lam)
    torch.testing.assert_close(plain, fe)


def test_padding_gets_zero_gradient_and_does_not_change_the_loss():
    logits, labels, t_len, u_len = random_batch(3, 6, 4, 5, seed=17)
    t_len[1], u_len[1] = 3, 2
    loss, grad = run_engine(logits, labels, t_len, u_len)
    assert float(grad[1, 3:].abs().max()) == 0.0
    assert float(grad[1, :, 3:].abs().max()) == 0.0
    alone, _ = run_engine(logits[1:2, :3, :3], labels[1:2, :2], t_len[1:2], u_len[1:2])
    torch.testing.assert_close(loss[1:2], alone)
    # Garbage in the padding changes nothing.
    noisy = logits.clone()
    noisy[1, 3:] = 1e4
    loss2, grad2 = run_engine(noisy, labels, t_len, u_len)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(grad, grad2)


def test_non_contiguous_input():
    logits, labels, t_len, u_len = random_batch(2, 5, 3, 6, seed=19)
    base = logits.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # strided view
    assert not base.is_contiguous()
    strided_labels = torch.stack([labels, labels], -1)[..., 0]
    assert_matches_reference(base, strided_labels, t_len, u_len)
    wide = torch.randn(2, 5, 4, 12)[..., ::2]  # stride 2 over V
    assert_matches_reference(wide, labels, t_len, u_len)


def test_no_grad_forward_equals_grad_forward():
    logits, labels, t_len, u_len = random_batch(4, 7, 3, 6, seed=23)
    with torch.no_grad():
        a = rnnt_loss(logits, labels, t_len, u_len, reduction="none")
    b, _ = run_engine(logits, labels, t_len, u_len)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_integer_dtypes_of_labels_and_lengths():
    logits, labels, t_len, u_len = random_batch(2, 4, 3, 6, seed=29)
    ref = rnnt_loss(logits, labels, t_len, u_len, reduction="none")
    for dt in (torch.int16, torch.int32, torch.uint8):
        got = rnnt_loss(
            logits, labels.clamp(min=0).to(dt), t_len.to(dt), u_len.to(dt), reduction="none"
        )
        torch.testing.assert_close(got, ref)


def test_loss_dtype():
    logits, labels, t_len, u_len = random_batch(2, 4, 3, 6)
    assert rnnt_loss(logits.half(), labels, t_len, u_len).dtype == torch.float32
    assert rnnt_loss(logits.bfloat16(), labels, t_len, u_len).dtype == torch.float32
    assert rnnt_loss(logits.double(), labels, t_len, u_len).dtype == torch.float64


def test_transducer_loss_module_is_a_drop_in():
    logits, labels, t_len, u_len = random_batch(3, 5, 3, 6, seed=31)
    for reduction in ("mean", "sum", "mean_frames"):
        crit = TransducerLoss(blank=0, reduction=reduction)
        x1 = logits.clone().requires_grad_(True)
        x2 = logits.clone().requires_grad_(True)
        crit(x1, labels, t_len, u_len).backward()
        rnnt_loss(x2, labels, t_len, u_len, reduction=reduction).backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    assert "blank=0" in repr(TransducerLoss())


def test_large_logits_are_stable():
    logits, labels, t_len, u_len = random_batch(2, 6, 3, 8, seed=37, scale=1000.0)
    loss, grad = run_engine(logits, labels, t_len, u_len)
    assert torch.isfinite(grad).all()
    assert_matches_reference(logits.double(), labels, t_len, u_len)
    # Logits of ~1000 leave float32 about 4 significant digits in alpha + beta - log P.
    assert_matches_reference(logits, labels, t_len, u_len, grad_rtol=5e-3)


def test_nan_logits_give_nan_loss_and_a_warning_naming_the_utterance():
    logits, labels, t_len, u_len = random_batch(3, 4, 2, 5, seed=41, mixed=False)
    logits[1, 2, 1, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"utterance\(s\) \[1\]"):
        loss, grad = run_engine(logits, labels, t_len, u_len)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert float(grad[1].abs().max()) == 0.0 and torch.isfinite(grad).all()
    logits[1, 2, 1, 3] = float("inf")
    with pytest.warns(RuntimeWarning, match="NaN or \\+inf"), torch.no_grad():
        assert torch.isnan(rnnt_loss(logits, labels, t_len, u_len, reduction="none")[1])


def test_impossible_alignment_gives_inf_loss():
    logits, labels, t_len, u_len = random_batch(2, 3, 2, 5, seed=43, mixed=False)
    logits[0, ..., 0] = float("-inf")  # blank impossible everywhere
    with pytest.warns(RuntimeWarning, match="no alignment"):
        loss, grad = run_engine(logits, labels, t_len, u_len)
    assert loss[0] == float("inf") and torch.isfinite(loss[1])
    assert float(grad[0].abs().max()) == 0.0


def test_impossible_losses_warn_by_class_with_reason_and_utterances():
    import pickle

    from rnntool.loss import ImpossibleLossWarning

    x, y, T, U = random_batch(4, 4, 2, 5, seed=41, mixed=False)
    x[1, 0, 0, 3] = float("nan")
    x[2, ..., 0] = float("-inf")  # no alignment
    lp = torch.log_softmax(x, -1)
    lp[3] += 3.0  # "log-probs" that do not normalise: a negative loss
    with pytest.warns(ImpossibleLossWarning) as caught, torch.no_grad():
        rnnt_loss(lp, y, T, U, reduction="none", fused_log_softmax=False)
    got = {w.message.reason: w.message.utterances for w in caught}
    assert got == {"nan": (1,), "inf": (2,), "negative": (3,)}
    for w in caught:
        assert issubclass(w.category, RuntimeWarning)
        assert str(w.message).startswith("rnnt_loss: ")
        again = pickle.loads(pickle.dumps(w.message))
        assert (str(again), again.reason, again.utterances) == (
            str(w.message), w.message.reason, w.message.utterances)
    with warnings.catch_warnings():  # callers filter by class, not by text
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", ImpossibleLossWarning)
        rnnt_loss(lp, y, T, U, reduction="none", fused_log_softmax=False)


def test_the_engine_contract_is_typed_and_torch_free():
    import dataclasses
    import subprocess
    import sys

    from rnntool import cpu
    from rnntool.engine import ENGINES, ForwardState, LossOptions, load_engine

    assert load_engine("cpu") is cpu.ENGINE and set(ENGINES) == {"cpu", "cuda"}
    assert rnntool.loss.BACKENDS[1:] == tuple(ENGINES)
    opts = LossOptions(blank=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.blank = 1
    x, y, T, U = random_batch(2, 3, 2, 5, seed=3)
    state = cpu.ENGINE.forward(x, y, T, U, opts, False)
    assert isinstance(state, ForwardState)
    assert state.lse is None and state.alpha is None and state.beta is None
    # The dispatch table and the CPU forward on numpy arrays need no torch (rnntool score).
    code = (
        "import sys, numpy as np\n"
        "from rnntool.engine import LossOptions, load_engine\n"
        "x = np.zeros((1, 2, 2, 3), np.float32); y = np.array([[1]]); n = np.array([2]); "
        "u = np.array([1])\n"
        "s = load_engine('cpu').forward(x, y, n, u, LossOptions(blank=0), False)\n"
        "print(np.isfinite(s.log_like).all(), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["True", "False"], out.stderr


def test_no_warning_on_good_input():
    logits, labels, t_len, u_len = random_batch(2, 3, 2, 5, seed=47)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_engine(logits, labels, t_len, u_len)


def test_zero_length_targets_is_the_all_blank_path():
    logits = torch.randn(1, 4, 1, 5)
    loss = rnnt_loss(logits, torch.zeros(1, 0, dtype=torch.long), torch.tensor([4]),
                     torch.tensor([0]), reduction="none")
    expected = -torch.log_softmax(logits.double(), -1)[0, :, 0, 0].sum()
    assert abs(float(loss) - float(expected)) < 1e-5


def test_no_size_limits_on_the_cpu():
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
