"""The TDT loss (``rnntool.tdt_loss``) on every backend (the `backend` fixture: the CPU,
and the CUDA kernels in Numba's simulator with tiny launches) against the float64
reference of ``rnntool.tdt_reference``: losses, token and duration gradients,
reductions, dtypes, sigma, FastEmit, clamp, padding; bitwise reproducibility; bad input.

The simulator is slow, so the CUDA side runs fewer hypothesis examples on the same
strategy (``examples``).
"""

import math
import warnings

import numpy as np
import pytest
import torch
from helpers import TOL, examples, random_batch
from hypothesis import given, settings
from hypothesis import strategies as st

import rnntool
from rnntool import TDTLoss, tdt_loss
from rnntool.engine import ImpossibleLossWarning
from rnntool.loss import REDUCTIONS, reduction_weights
from rnntool.tdt_lattice import TDTOptions, backtrack, load_tdt_engine
from rnntool.tdt_reference import tdt_reference_gradients, tdt_reference_viterbi

DURATION_SETS = ([0, 1], [0, 1, 2], [0, 1, 2, 3, 4])


def tdt_batch(B, T, U, V, durations, *, blank=0, seed=0, mixed=True, dtype=torch.float32,
              scale=1.0):
    """Padded ``(B, T, U+1, V+D)`` logits, ``(B, U)`` targets (padding -1) and lengths;
    with ``mixed`` the lengths vary (the first utterance is full-length)."""
    return random_batch(B, T, U, V, blank=blank, seed=seed, scale=scale, mixed=mixed,
                        dtype=dtype, extra=len(durations))


def run_tdt(logits, labels, t_len, u_len, *, grad_output=None, **kw):
    """``tdt_loss``'s value and the gradient of ``grad_output`` (default ones)."""
    x = logits.detach().clone().requires_grad_(True)
    loss = tdt_loss(x, labels, t_len, u_len, **kw)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    loss.backward(grad_output.to(loss.dtype))
    return loss.detach(), x.grad


def reference(logits, labels, t_len, u_len, *, durations, blank, sigma=0.0, reduction="none",
              fused_log_softmax=True, fastemit_lambda=0.0, clamp=None, grad_output=None):
    """The reference's reduced value and gradient, clamp on the token part only, each
    utterance's own gradient clipped before the reduction scales it."""
    losses, grads = tdt_reference_gradients(
        logits.double(), labels, t_len, u_len, durations=durations, blank=blank, sigma=sigma,
        fused_log_softmax=fused_log_softmax, fastemit_lambda=fastemit_lambda)
    V = logits.shape[-1] - len(durations)
    if clamp is not None and clamp > 0:
        grads[..., :V] = grads[..., :V].clamp(-clamp, clamp)
    B = logits.shape[0]
    w = reduction_weights(reduction, t_len, u_len)
    if grad_output is None:
        grad_output = torch.ones(B if reduction == "none" else (), dtype=torch.float64)
    go = grad_output.to(torch.float64).expand(B)
    value = losses if reduction == "none" else (losses * w).sum()
    return value, grads * (go * w).view(B, 1, 1, 1)


def assert_matches_reference(logits, labels, t_len, u_len, *, backend, seed=0,
                             reduction="none", **kw):
    """Value and gradient (for a random ``grad_output``) within ``TOL`` of the reference."""
    g = torch.Generator().manual_seed(seed)
    B = logits.shape[0]
    go = torch.rand(B if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5
    loss, grad = run_tdt(logits, labels, t_len, u_len, grad_output=go, backend=backend,
                         reduction=reduction, **kw)
    ref_loss, ref_grad = reference(logits, labels, t_len, u_len, reduction=reduction,
                                   grad_output=go, **kw)
    dtype = logits.dtype
    loss_atol, grad_atol = TOL[dtype]
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss.double(), ref_loss, atol=loss_atol, rtol=1e-5)
    rtol = 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(grad.double(), ref_grad, atol=grad_atol, rtol=rtol)
    return grad


# --------------------------------------------------------------------------- against the reference
def test_matches_reference(backend):
    @settings(max_examples=examples(backend, cuda=8))
    @given(
        durations=st.sampled_from(DURATION_SETS), B=st.integers(1, 3), T=st.integers(1, 6),
        U=st.integers(0, 3), V=st.integers(2, 5), blank_last=st.booleans(),
        dtype=st.sampled_from([torch.float32, torch.float64]), mixed=st.booleans(),
        sigma=st.sampled_from([0.0, 0.05]), lam=st.sampled_from([0.0, 0.3]),
        clamp=st.sampled_from([None, 0.03]), reduction=st.sampled_from(REDUCTIONS),
        seed=st.integers(0, 2**16),
    )
    def check(durations, B, T, U, V, blank_last, dtype, mixed, sigma, lam, clamp, reduction,
              seed):
        blank = V - 1 if blank_last else 0
        logits, labels, t_len, u_len = tdt_batch(B, T, U, V, durations, blank=blank, seed=seed,
                                                 mixed=mixed, dtype=dtype)
        assert_matches_reference(logits, labels, t_len, u_len, backend=backend, seed=seed,
                                 durations=durations, blank=blank, sigma=sigma,
                                 fastemit_lambda=lam, clamp=clamp, reduction=reduction)

    check()


# NeMo's published TDT case (NeMo, Apache-2.0: tests/collections/asr/numba/rnnt_loss/
# test_rnnt_pytorch.py, TestTDTLoss.test_case_fixed_case_act_label, the values
# test_tdt_reference.py reproduces with the oracle): acts all zeros (1, 3, 2, 4 + 3),
# labels [[0]], TDTLossNumba(blank=3, durations=[0, 1, 2], sigma=0.05, reduction="sum").
# Mapping: NeMo's acts are our logits as they are (4 tokens, blank last, then 3
# durations), blank=3, durations and sigma as they are, one utterance: reduction "sum".
NEMO_COST = 4.155739
NEMO_GRADS = [
    [[-0.64962804, 0.25, 0.25, 0.14962798, 0.2672583, -0.16792619, -0.09933221],
     [0.01651875, 0.01651875, 0.01651875, -0.04955626, 0.022025, -0.01227201, -0.009753]],
    [[-0.04892651, 0.01714851, 0.01714851, 0.01462949, -0.01143234, -0.01143234, 0.02286467],
     [0.12531489, 0.12531489, 0.12531489, -0.37594467, 0.16708651, 0.13027048, -0.29735702]],
    [[-0.02572276, 0.00857425, 0.00857425, 0.00857425, -0.02286468, 0.01143234, 0.01143234],
     [0.13388914, 0.13388914, 0.13388914, -0.40166742, 0.17851885, -0.35703772, 0.17851885]],
]


def test_nemo_published_case(backend):
    # NeMo checks its float32 CUDA kernel against these with rtol 1e-6 (cost), 1e-2 (grad).
    loss, grad = run_tdt(torch.zeros(1, 3, 2, 7), torch.tensor([[0]]), torch.tensor([3]),
                         torch.tensor([1]), durations=[0, 1, 2], blank=3, sigma=0.05,
                         reduction="sum", backend=backend)
    assert abs(float(loss) - NEMO_COST) < 2e-6
    torch.testing.assert_close(grad[0], torch.tensor(NEMO_GRADS), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype, backend):
    # The reference sees the same rounded logits; the gradient comes back in the dtype.
    logits, labels, t_len, u_len = tdt_batch(2, 4, 2, 5, [0, 1, 2], seed=3, dtype=dtype)
    assert_matches_reference(logits, labels, t_len, u_len, backend=backend,
                             durations=[0, 1, 2], blank=4 if dtype == torch.float16 else 0,
                             reduction="mean")


def test_token_and_duration_gradients_both_checked(backend):
    # A case where both parts of the gradient are far from 0, so a wrong duration
    # gradient (or a token one) cannot pass unnoticed; with FastEmit and sigma.
    durations = [0, 1, 2, 3, 4]
    logits, labels, t_len, u_len = tdt_batch(2, 6, 3, 4, durations, seed=11, mixed=False,
                                             dtype=torch.float64)
    grad = assert_matches_reference(logits, labels, t_len, u_len, backend=backend,
                                    durations=durations, blank=0, sigma=0.1,
                                    fastemit_lambda=0.5)
    assert grad[..., :4].abs().max() > 0.05 and grad[..., 4:].abs().max() > 0.05


def test_log_probs_input(backend):
    # fused_log_softmax=False: both parts are log-probs and the gradient is w.r.t. them.
    durations = [0, 1, 2]
    logits, labels, t_len, u_len = tdt_batch(2, 4, 2, 4, durations, seed=5,
                                             dtype=torch.float64)
    lp = torch.cat([logits[..., :4].log_softmax(-1), logits[..., 4:].log_softmax(-1)], -1)
    assert_matches_reference(lp, labels, t_len, u_len, backend=backend, durations=durations,
                             blank=0, fused_log_softmax=False, sigma=0.05)
    # Same loss as from the logits themselves.
    a, _ = run_tdt(logits, labels, t_len, u_len, durations=durations, blank=0,
                   reduction="none", backend=backend)
    b, _ = run_tdt(lp, labels, t_len, u_len, durations=durations, blank=0, reduction="none",
                   backend=backend, fused_log_softmax=False)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_padding_gets_zero_gradient_and_does_not_change_the_loss(backend):
    durations = [0, 1, 2]
    logits, labels, t_len, u_len = tdt_batch(1, 4, 2, 5, durations, seed=2, mixed=False)
    padded = torch.randn(1, 6, 4, 8) * 100
    padded[:, :4, :3] = logits
    lab = torch.full((1, 3), 3)
    lab[:, :2] = labels
    kw = dict(durations=durations, blank=0, reduction="none", backend=backend)
    l0, g0 = run_tdt(logits, labels, t_len, u_len, **kw)
    l1, g1 = run_tdt(padded, lab, t_len, u_len, **kw)
    torch.testing.assert_close(l1, l0, atol=0, rtol=0)
    torch.testing.assert_close(g1[:, :4, :3], g0, atol=0, rtol=0)
    g1[:, :4, :3] = 0
    assert not g1.any()


def test_no_grad_forward_equals_grad_forward(backend):
    durations = [0, 1, 2, 3, 4]
    logits, labels, t_len, u_len = tdt_batch(3, 5, 2, 4, durations, blank=3, seed=9)
    kw = dict(durations=durations, blank=3, reduction="none", backend=backend)
    with torch.no_grad():
        a = tdt_loss(logits, labels, t_len, u_len, **kw)
    b, _ = run_tdt(logits, labels, t_len, u_len, **kw)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_module_is_the_function(backend):
    durations = [0, 1, 2]
    logits, labels, t_len, u_len = tdt_batch(2, 4, 2, 5, durations, seed=4)
    module = TDTLoss(durations=durations, blank=0, sigma=0.05, reduction="sum",
                     backend=backend)
    assert "durations=[0, 1, 2]" in repr(module)
    a = module(logits, labels, t_len, u_len)
    b = tdt_loss(logits, labels, t_len, u_len, durations=durations, blank=0, sigma=0.05,
                 reduction="sum", backend=backend)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert rnntool.TDTLoss is TDTLoss and rnntool.tdt_loss is tdt_loss


def test_single_frame_and_long_jumps(backend):
    # T = 1: only duration-0 labels then one blank of duration 1 out of the lattice;
    # durations longer than T are never taken.
    durations = [0, 1, 2, 3, 4]
    logits, labels, t_len, u_len = tdt_batch(2, 1, 2, 3, durations, seed=6, mixed=False,
                                             dtype=torch.float64)
    assert_matches_reference(logits, labels, t_len, u_len, backend=backend,
                             durations=durations, blank=0)
    # Longer label sequences than the simulated block (threads_diag=2): several scan chunks.
    logits, labels, t_len, u_len = tdt_batch(1, 3, 6, 3, durations, blank=2, seed=8,
                                             mixed=False, dtype=torch.float64)
    assert_matches_reference(logits, labels, t_len, u_len, backend=backend,
                             durations=durations, blank=2)


@pytest.mark.parametrize("threads", [1, 4, 8])
def test_cuda_scan_block_sizes(threads):
    # The d=0 label chain along u is a block-wide scan in chunks of threads_diag: a
    # chunk of several steps (4, 8) and carries between chunks (U+1 = 10), and the
    # one-thread block, which walks u one by one.
    from rnntool import cuda as rc

    if not rc.SIMULATOR:
        pytest.skip("runs the kernels in Numba's simulator")
    durations = [0, 1, 2]
    logits, labels, t_len, u_len = tdt_batch(2, 3, 9, 3, durations, seed=12,
                                             dtype=torch.float64)
    with rc.config(threads_diag=threads):
        assert_matches_reference(logits, labels, t_len, u_len, backend="cuda",
                                 durations=durations, blank=0, sigma=0.05)


# --------------------------------------------------------------------------- Viterbi
def viterbi_paths(backend, logits, labels, t_len, u_len, **opts):
    """``[(best log-prob, arcs)]`` per utterance from the backend's Viterbi kernels."""
    engine = load_tdt_engine(backend)
    opts = TDTOptions(**opts)
    state = engine.forward(logits, labels, t_len, u_len, opts, False)
    best, last, from_arc = (torch.as_tensor(a) for a in engine.best_path(state))
    out = []
    for b in range(logits.shape[0]):
        T, U = int(t_len[b]), int(u_len[b])
        arcs = backtrack(from_arc[b].numpy(), int(last[b]), opts.durations, opts.blank,
                         labels[b].tolist(), T, U)
        out.append((float(best[b]), arcs))
    return out


def test_viterbi_matches_reference(backend):
    @settings(max_examples=examples(backend, cuda=6))
    @given(durations=st.sampled_from(DURATION_SETS), B=st.integers(1, 2), T=st.integers(1, 6),
           U=st.integers(0, 3), V=st.integers(2, 4), blank_last=st.booleans(),
           sigma=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 2**16))
    def check(durations, B, T, U, V, blank_last, sigma, seed):
        blank = V - 1 if blank_last else 0
        logits, labels, t_len, u_len = tdt_batch(B, T, U, V, durations, blank=blank, seed=seed,
                                                 dtype=torch.float64, scale=2.0)
        got = viterbi_paths(backend, logits, labels, t_len, u_len, blank=blank,
                            durations=tuple(durations), sigma=sigma)
        for b, (best, arcs) in enumerate(got):
            T_b, U_b = int(t_len[b]), int(u_len[b])
            ref_best, ref_arcs = tdt_reference_viterbi(
                logits[b, :T_b, :U_b + 1], labels[b, :U_b], durations=durations, blank=blank,
                sigma=sigma)
            assert arcs == ref_arcs
            assert abs(best - ref_best) < 1e-9
            # The path's own score is its log-prob: arcs as the lattice defines them.
            assert arcs[-1][0] + arcs[-1][3] == T_b and arcs[-1][1] == U_b

    check()


def test_viterbi_tie_order(backend):
    # Small integer log-probs: every sum is exact, ties everywhere. Blanks beat labels,
    # shorter jumps beat longer ones, on both backends as in the reference.
    g = torch.Generator().manual_seed(0)
    durations = (0, 1, 2)
    for _ in range(4 if backend == "cuda" else 20):
        x = -torch.randint(0, 3, (1, 5, 3, 3 + 3), generator=g).double()
        y = torch.randint(1, 3, (1, 2), generator=g)
        T, U = torch.tensor([5]), torch.tensor([2])
        (best, arcs), = viterbi_paths(backend, x, y, T, U, blank=0, durations=durations,
                                      fused=False)
        ref_best, ref_arcs = tdt_reference_viterbi(x[0], y[0], durations=durations, blank=0,
                                                   fused_log_softmax=False)
        assert arcs == ref_arcs and best == ref_best


# --------------------------------------------------------------------------- non-finite rules
def test_nan_in_a_duration_logit_gives_nan_loss_zero_gradient_and_a_warning(backend):
    durations = [0, 1, 2]
    logits, labels, t_len, u_len = tdt_batch(2, 3, 1, 4, durations, seed=1, mixed=False)
    logits[1, 1, 0, 4 + 2] = float("nan")
    x = logits.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = tdt_loss(x, labels, t_len, u_len, durations=durations, blank=0,
                        reduction="none", backend=backend)
        loss.nansum().backward()
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0])
    assert not x.grad[1].any() and x.grad[0].any()
    if backend == "cpu":  # (CUDA warns nothing: that would need a host sync)
        (w,) = [w.message for w in caught if isinstance(w.message, ImpossibleLossWarning)]
        assert w.reason == "nan" and w.utterances == (1,) and str(w).startswith("tdt_loss: ")


def test_impossible_alignment_gives_inf_loss(backend):
    # No blank can ever be emitted: every path needs a final blank.
    durations = [0, 1]
    logits, labels, t_len, u_len = tdt_batch(2, 3, 1, 4, durations, seed=1, mixed=False)
    logits[0, ..., 0] = float("-inf")
    x = logits.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = tdt_loss(x, labels, t_len, u_len, durations=durations, blank=0,
                        reduction="none", backend=backend)
        loss[1].backward()
    assert loss[0] == math.inf and torch.isfinite(loss[1])
    assert not x.grad[0].any()
    if backend == "cpu":
        (w,) = [w.message for w in caught if isinstance(w.message, ImpossibleLossWarning)]
        assert w.reason == "inf" and w.utterances == (0,)


def test_cuda_unvalidated_bad_labels_give_nan():
    from rnntool import cuda as rc

    if not rc.SIMULATOR:
        pytest.skip("runs the kernels in Numba's simulator")
    durations = [0, 1, 2]
    logits, labels, t_len, u_len = tdt_batch(2, 3, 2, 4, durations, seed=1, mixed=False)
    labels[1, 0] = 4  # a duration's index, not a token (V = 4)
    with torch.no_grad(), pytest.warns(RuntimeWarning):
        loss = tdt_loss(logits, labels, t_len, u_len, durations=durations, blank=0,
                        reduction="none", backend="cuda", validate=False)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


# --------------------------------------------------------------------------- reproducibility
def test_cpu_bitwise_reproducible_run_to_run():
    durations = [0, 1, 2, 3, 4]
    logits, labels, t_len, u_len = tdt_batch(4, 12, 5, 37, durations, seed=21)
    kw = dict(durations=durations, blank=0, reduction="none", backend="cpu", sigma=0.05,
              fastemit_lambda=0.1)
    runs = [run_tdt(logits, labels, t_len, u_len, **kw) for _ in range(3)]
    for loss, grad in runs[1:]:
        assert np.array_equal(loss.numpy().view(np.uint32), runs[0][0].numpy().view(np.uint32))
        assert np.array_equal(grad.numpy().view(np.uint32), runs[0][1].numpy().view(np.uint32))


def test_cpu_and_cuda_tdt_modules_are_twins():
    from rnntool import tdt_cpu, tdt_cuda

    def stages(module, prefix):
        return {n.removeprefix(prefix) for n in vars(module) if n.startswith(prefix)}

    assert stages(tdt_cpu, "cpu_") == stages(tdt_cuda, "cuda_")
    assert {"normalise", "alpha_beta", "viterbi", "gradient", "forward", "backward",
            "best_path"} <= stages(tdt_cpu, "cpu_")
    assert set(tdt_cuda.PTX_SIGNATURES) == {
        (k, kind) for k in ("cuda_normalise", "cuda_alpha_beta", "cuda_viterbi", "cuda_gradient")
        for kind in ("float32", "float64", "float16", "bfloat16")}


# --------------------------------------------------------------------------- bad input
def _call(**over):
    logits, labels, t_len, u_len = tdt_batch(2, 3, 2, 4, [0, 1, 2], seed=0, mixed=False)
    args = dict(logits=logits, targets=labels, logit_lengths=t_len, target_lengths=u_len,
                durations=[0, 1, 2], blank=0)
    args.update(over)
    return tdt_loss(args.pop("logits"), args.pop("targets"), args.pop("logit_lengths"),
                    args.pop("target_lengths"), **args)


@pytest.mark.parametrize("durations, message", [
    ([0, 2, 4], r"durations must contain 0 and 1, got \[0, 2, 4\] \(no 1\)"),
    ([1, 2], r"durations must contain 0 and 1, got \[1, 2\] \(no 0\)"),
    ([0, 2, 1], r"durations must be strictly ascending, got \[0, 2, 1\] \(durations\[2\] = 1"),
    ([0, 1, 1], r"strictly ascending.*durations\[2\] = 1 after 1"),
    ([-1, 0, 1], r"durations\[0\] = -1 is negative"),
    ([], r"durations is empty"),
    ([0], r"must contain 0 and 1, got \[0\] \(no 1\)"),
    ([0, 1, 2**63], r"durations\[2\] = 9223372036854775808 is larger than 2147483647 frames"),
    (list(range(128)), r"durations has 128 values; at most 127 are supported"),
])
def test_bad_durations_one_clear_line(durations, message):
    logits = torch.zeros(2, 3, 3, 4 + max(len(durations), 1))
    with pytest.raises(ValueError, match=message) as e:
        _call(logits=logits, durations=durations)
    assert "\n" not in str(e.value)


def test_127_durations_align_to_the_reference_path():
    """The largest duration set the 8-bit back-pointers hold: jumps by the last index
    (code 127) come back as themselves, as the float64 reference finds them."""
    from rnntool.tdt_lattice import MAX_DURATIONS
    from rnntool.tdt_reference import tdt_reference_viterbi

    durations = list(range(MAX_DURATIONS))
    T, V = 2 * durations[-1] + 2, 3
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(T, 2, V + len(durations), dtype=torch.float64, generator=g)
    logits[..., V + len(durations) - 1] += 30.0  # favour the longest jump
    labels = torch.tensor([1])
    best, arcs = tdt_reference_viterbi(logits, labels, durations=durations, blank=0)
    assert any(d == durations[-1] for *_, d in arcs)
    from rnntool.align import tdt_align

    (al,) = tdt_align(logits[None], labels[None], torch.tensor([T]), torch.tensor([1]),
                      durations=durations, blank=0, backend="cpu")
    assert [tuple(a) for a in al.arcs] == [tuple(a) for a in arcs]
    assert al.best_log_prob == pytest.approx(float(best), rel=1e-12)


@pytest.mark.parametrize("durations", ["012", [0, 1.5], [0, True], 3, None])
def test_durations_of_the_wrong_type(durations):
    with pytest.raises(TypeError, match="durations"):
        _call(durations=durations)


def test_durations_as_arrays_and_tensors():
    a = _call(durations=np.array([0, 1, 2]))
    b = _call(durations=torch.tensor([0, 1, 2]))
    c = _call(durations=(0, 1, 2))
    assert a == b == c


def test_last_dim_not_v_plus_d():
    # 3 durations and a last dim of 3: no token left. The message says how V is found.
    with pytest.raises(ValueError, match=r"last dim is 3 but must be V \+ D .*D = "
                                         r"len\(durations\) = 3 .*logits.shape\[-1\] - "
                                         r"len\(durations\) = 0"):
        _call(logits=torch.zeros(2, 3, 3, 3))
    with pytest.raises(ValueError, match=r"logits must have 4 dims \(B, T, U\+1, V \+ D\)"):
        _call(logits=torch.zeros(3, 3, 7))


def test_blank_outside_the_tokens():
    # V = 7 - 3 = 4 tokens: blank 4 would be the first duration.
    with pytest.raises(ValueError, match=r"blank=4 is outside \[-V, V\) for V=4 tokens "
                                         r"\(V = logits.shape\[-1\] - len\(durations\) = 7 - 3"):
        _call(blank=4)
    # -1 is the last token, not the last duration.
    logits, labels, t_len, u_len = tdt_batch(2, 3, 2, 4, [0, 1, 2], blank=3, seed=0)
    a = tdt_loss(logits, labels, t_len, u_len, durations=[0, 1, 2], blank=-1)
    b = tdt_loss(logits, labels, t_len, u_len, durations=[0, 1, 2], blank=3)
    assert a == b


def test_labels_outside_the_tokens_or_blank(backend):
    logits, labels, t_len, u_len = tdt_batch(2, 3, 2, 4, [0, 1, 2], seed=0, mixed=False)
    labels[1, 1] = 4  # V = 4: index 4 is a duration logit
    with pytest.raises(ValueError, match=r"utterance 1: targets\[1, 1\] = 4 is outside \[0, 4\)"):
        _call(targets=labels, backend=backend)
    labels[1, 1] = 0
    with pytest.raises(ValueError, match=r"utterance 1: targets\[1, 1\] = 0 equals blank"):
        _call(targets=labels, backend=backend)


@pytest.mark.parametrize("t_len, u_len, message", [
    ([3, 0], [2, 2], r"utterance 1: logit_lengths\[1\] = 0"),
    ([3, 4], [2, 2], r"logit_lengths\[1\] = 4 exceeds the logits' T dim 3"),
    ([3, 3], [2, 3], r"target_lengths\[1\] = 3 needs U\+1 = 4"),
    ([3, 3], [-1, 2], r"target_lengths\[0\] = -1 is negative"),
])
def test_bad_lengths_as_rnnt_loss(t_len, u_len, message):
    with pytest.raises(ValueError, match=message):
        _call(logit_lengths=torch.tensor(t_len), target_lengths=torch.tensor(u_len))


@pytest.mark.parametrize("over, error, message", [
    (dict(sigma=-0.1), ValueError, r"sigma must be a finite number >= 0, got -0.1"),
    (dict(sigma=float("nan")), ValueError, r"sigma must be a finite number >= 0"),
    (dict(sigma="0.1"), TypeError, r"sigma must be a real number"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of"),
    (dict(clamp=float("nan")), ValueError, r"clamp must be None or a number"),
    (dict(fastemit_lambda=-1.0), ValueError, r"fastemit_lambda must be a finite number >= 0"),
    (dict(backend="tpu"), ValueError, r"backend must be one of"),
    (dict(blank=1.0), TypeError, r"blank must be an integer"),
    (dict(logits=torch.zeros(2, 3, 3, 7, dtype=torch.int32)), TypeError,
     r"logits must be float16, bfloat16, float32 or float64"),
])
def test_bad_options_as_rnnt_loss(over, error, message):
    with pytest.raises(error, match=message):
        _call(**over)


def test_module_checks_options_in_the_constructor():
    with pytest.raises(ValueError, match="durations must contain 0 and 1"):
        TDTLoss(durations=[0, 2, 4], blank=0)
    with pytest.raises(ValueError, match="sigma"):
        TDTLoss(durations=[0, 1], blank=0, sigma=-1)
    with pytest.raises(ValueError, match="reduction"):
        TDTLoss(durations=[0, 1], blank=0, reduction="avg")
