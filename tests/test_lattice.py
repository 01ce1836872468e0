"""rnntool.lattice: the per-node rules both backends compile, against plain float64
numpy and hand cases.

Each rule runs as written (plain Python, as the CUDA simulator runs it) and compiled
by Numba's ``njit`` (as cpu.py compiles it): the ``rule`` fixture gives both.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from numba import njit

from rnntool import lattice
from rnntool.reference import reference_gradients

INF = math.inf
NAN = math.nan
_COMPILED = {}


@pytest.fixture(params=["python", "njit"])
def rule(request):
    """``rule(name)``: lattice's function ``name`` as written, or compiled with njit."""
    if request.param == "python":
        return lambda name: getattr(lattice, name)

    def compiled(name):
        if name not in _COMPILED:
            _COMPILED[name] = njit(getattr(lattice, name))
        return _COMPILED[name]

    return compiled


def same(a, b):
    """Equal, or both NaN."""
    return a == b or (math.isnan(a) and math.isnan(b))


# --------------------------------------------------------------------------- logaddexp
@pytest.mark.parametrize("a,b,want", [
    (-INF, -INF, -INF),
    (-INF, -3.5, -3.5),  # exactly the other side: no rounding through exp/log
    (-2.25, -INF, -2.25),
    (-INF, 0.0, 0.0),
    (0.0, 0.0, math.log(2.0)),
    (-1e300, -INF, -1e300),
    (-1000.0, 0.0, 0.0),  # exp(-1000) is below float64's resolution at 0
    (NAN, -1.0, NAN),
    (-1.0, NAN, NAN),
    (NAN, -INF, NAN),
    (-INF, NAN, NAN),
    (INF, -1.0, INF),
])
def test_logaddexp_hand_cases(rule, a, b, want):
    assert same(rule("logaddexp")(a, b), want)


@given(a=st.floats(-1e4, 1e3), b=st.floats(-1e4, 1e3))
def test_logaddexp_is_numpys_and_symmetric(a, b):
    for f in (lattice.logaddexp, njit(lattice.logaddexp)):
        got = f(a, b)
        assert got == f(b, a)  # bitwise
        assert got == pytest.approx(np.logaddexp(a, b), rel=1e-15, abs=1e-15)
        assert got >= max(a, b)


# --------------------------------------------------------------------------- arcs
def _lattice(B=2, T=4, U1=3, seed=0):
    rng = np.random.default_rng(seed)
    score, blank_lp, emit_lp = (-rng.random((B, T, U1)) * 5 for _ in range(3))
    return score, blank_lp, emit_lp


def test_arcs_into_every_node(rule):
    score, blank_lp, emit_lp = _lattice()
    arcs_into = rule("arcs_into")
    B, T, U1 = score.shape
    for b in range(B):
        for t in range(T):
            for u in range(U1):
                by_blank, by_emit = arcs_into(score, blank_lp, emit_lp, b, t, u)
                if t == 0 and u == 0:
                    want_blank = 0.0  # the origin: entered by a blank of score 0
                elif t == 0:
                    want_blank = -INF
                else:
                    want_blank = score[b, t - 1, u] + blank_lp[b, t - 1, u]
                want_emit = score[b, t, u - 1] + emit_lp[b, t, u - 1] if u else -INF
                assert (by_blank, by_emit) == (want_blank, want_emit), (b, t, u)


def test_arcs_out_every_node(rule):
    score, blank_lp, emit_lp = _lattice(seed=1)
    arcs_out = rule("arcs_out")
    B, T, U1 = score.shape
    for Tb, Ub in ((T, U1 - 1), (2, 1), (1, 0)):  # the whole lattice, and shorter utterances
        for b in range(B):
            for t in range(Tb):
                for u in range(Ub + 1):
                    by_blank, by_emit = arcs_out(score, blank_lp, emit_lp, b, t, u, Tb, Ub)
                    if t < Tb - 1:
                        want_blank = score[b, t + 1, u] + blank_lp[b, t, u]
                    elif u == Ub:
                        want_blank = blank_lp[b, t, u]  # the final blank ends the path
                    else:
                        want_blank = -INF
                    want_emit = score[b, t, u + 1] + emit_lp[b, t, u] if u < Ub else -INF
                    assert (by_blank, by_emit) == (want_blank, want_emit), (Tb, Ub, b, t, u)


@pytest.mark.parametrize("a,e,t,u,want", [
    (-1.0, -2.0, 1, 1, False),  # blank better
    (-2.0, -1.0, 1, 1, True),  # emission better
    (-1.5, -1.5, 1, 1, False),  # a tie goes to the blank
    (-INF, -INF, 1, 1, False),
    (-INF, -5.0, 3, 2, True),
    (-1.0, -9.0, 0, 1, True),  # t = 0: emission is the only way in
    (-1.0, -INF, 0, 2, True),
    (-9.0, -1.0, 2, 0, False),  # u = 0: blank is the only way in
    (-9.0, -1.0, 0, 0, False),  # the origin
    (NAN, -1.0, 1, 1, False),  # NaN compares false: the blank
    (-1.0, NAN, 1, 1, False),
])
def test_emission_wins(rule, a, e, t, u, want):
    assert rule("emission_wins")(a, e, t, u) is want


def _alpha_beta(blank_lp, emit_lp, Tb, Ub, logaddexp, arcs_into, arcs_out):
    """Plain loops over the lattice with the rules: alpha, beta and log P of utterance 0."""
    alpha = np.full(blank_lp.shape, -INF)
    beta = np.full(blank_lp.shape, -INF)
    for t in range(Tb):
        for u in range(Ub + 1):
            alpha[0, t, u] = logaddexp(*arcs_into(alpha, blank_lp, emit_lp, 0, t, u))
    for t in range(Tb - 1, -1, -1):
        for u in range(Ub, -1, -1):
            beta[0, t, u] = logaddexp(*arcs_out(beta, blank_lp, emit_lp, 0, t, u, Tb, Ub))
    return alpha, beta, alpha[0, Tb - 1, Ub] + blank_lp[0, Tb - 1, Ub]


@pytest.fixture
def utterance():
    """Log-probs of one utterance (T=5, U=3, V=6, labels [2, 5, 1], blank 0), the
    float64 reference's loss and gradient w.r.t. them, and its compact arrays."""
    g = torch.Generator().manual_seed(7)
    logp = torch.log_softmax(torch.randn(1, 5, 4, 6, generator=g, dtype=torch.float64) * 2, -1)
    y = torch.tensor([[2, 5, 1]])
    loss, grad = reference_gradients(logp, y, torch.tensor([5]), torch.tensor([3]),
                                     fused_log_softmax=False)
    blank_lp = logp[..., 0].numpy().copy()
    emit_lp = np.full(blank_lp.shape, -INF)
    for u in range(3):
        emit_lp[0, :, u] = logp[0, :, u, y[0, u]].numpy()
    return dict(loss=float(loss[0]), grad=grad[0].numpy(), y=y[0].numpy(), blank_lp=blank_lp,
                emit_lp=emit_lp)


def test_the_arc_rules_give_the_references_loss(rule, utterance):
    blank_lp, emit_lp = utterance["blank_lp"], utterance["emit_lp"]
    alpha, beta, log_like = _alpha_beta(blank_lp, emit_lp, 5, 3, rule("logaddexp"),
                                        rule("arcs_into"), rule("arcs_out"))
    assert -log_like == pytest.approx(utterance["loss"], rel=1e-13)
    assert beta[0, 0, 0] == pytest.approx(log_like, rel=1e-13)  # both walks agree


def test_arc_posteriors_are_the_references_gradient(rule, utterance):
    """d loss / d log-prob of an arc = -(its posterior): the float64 reference's
    autograd gives P_blank and P_emit of every node independently of alpha and beta."""
    blank_lp, emit_lp, y = utterance["blank_lp"], utterance["emit_lp"], utterance["y"]
    alpha, beta, log_like = _alpha_beta(blank_lp, emit_lp, 5, 3, lattice.logaddexp,
                                        lattice.arcs_into, lattice.arcs_out)
    posteriors = rule("arc_posteriors")
    grad = utterance["grad"]
    for t in range(5):
        for u in range(4):
            p_blank, p_emit = posteriors(alpha, beta, blank_lp, emit_lp, 0, t, u, 5, 3,
                                         log_like, 1.0)
            assert p_blank == pytest.approx(-grad[t, u, 0], abs=1e-12), (t, u)
            want_emit = -grad[t, u, y[u]] if u < 3 else 0.0
            assert p_emit == pytest.approx(want_emit, abs=1e-12), (t, u)
            # Every path through (t, u) leaves it by one of the two arcs.
            occupancy = math.exp(alpha[0, t, u] + beta[0, t, u] - log_like)
            assert p_blank + p_emit == pytest.approx(occupancy, abs=1e-12), (t, u)
            if u == 3:
                assert p_emit == 0.0  # no label left to emit
            if t == 4 and u < 3:
                assert p_blank == 0.0  # a blank out of the last frame ends too early


def test_arc_posteriors_scale_only_the_emission(rule, utterance):
    blank_lp, emit_lp = utterance["blank_lp"], utterance["emit_lp"]
    alpha, beta, log_like = _alpha_beta(blank_lp, emit_lp, 5, 3, lattice.logaddexp,
                                        lattice.arcs_into, lattice.arcs_out)
    posteriors = rule("arc_posteriors")
    for t, u in ((0, 0), (2, 1), (4, 2), (4, 3)):
        plain = posteriors(alpha, beta, blank_lp, emit_lp, 0, t, u, 5, 3, log_like, 1.0)
        fast = posteriors(alpha, beta, blank_lp, emit_lp, 0, t, u, 5, 3, log_like, 1.25)
        assert fast[0] == plain[0] and fast[1] == 1.25 * plain[1], (t, u)


def test_arc_posteriors_of_a_final_node(rule):
    # One frame, no labels: the only path is the final blank, posterior 1.
    alpha, beta = np.zeros((1, 1, 1)), np.zeros((1, 1, 1))
    blank_lp, emit_lp = np.full((1, 1, 1), -0.25), np.full((1, 1, 1), -INF)
    p = rule("arc_posteriors")(alpha, beta, blank_lp, emit_lp, 0, 0, 0, 1, 0, -0.25, 1.0)
    assert p == (1.0, 0.0)


# --------------------------------------------------------------------------- log_prob
def test_log_prob_is_log_softmax(rule):
    rng = np.random.default_rng(3)
    row = rng.standard_normal(9) * 20
    hi = row.max()
    lo = math.log(np.exp(row - hi).sum())
    want = row - np.logaddexp.reduce(row)
    got = [rule("log_prob")(x, hi, lo) for x in row]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


def test_log_prob_subtracts_the_max_first(rule):
    # float32 keeps ~7 digits of a logit of 75: hi + lo would round lo away.
    x, hi, lo = np.float32(75.0), np.float32(75.0), np.float32(1e-6)
    got = rule("log_prob")(x, hi, lo)
    assert got == -lo and np.float32(x - (hi + lo)) == 0.0


@pytest.mark.parametrize("x,want", [(-INF, -INF), (NAN, NAN), (3.0, -0.5)])
def test_log_prob_of_masked_and_bad_logits(rule, x, want):
    assert same(rule("log_prob")(x, 3.0, 0.5), want)


# --------------------------------------------------------------------------- bf16_round
def _torch_bf16(bits):
    """torch's float32 -> bfloat16 rounding, as int16 bits."""
    f = torch.from_numpy(np.asarray(bits, np.uint32).view(np.float32).copy())
    return f.bfloat16().view(torch.int16).numpy()


_BF16 = njit(lattice.bf16_round)


@njit
def _bf16_all(bits):
    out = np.empty(bits.size, np.int16)
    for i in range(bits.size):
        out[i] = _BF16(bits[i])
    return out


@pytest.mark.parametrize("bits,want", [
    (0x3F800000, 0x3F80),  # 1.0: exact
    (0x3F808000, 0x3F80),  # half-way between 1.0 and the next bfloat16: to even (down)
    (0x3F818000, 0x3F82),  # half-way, odd below: to even (up)
    (0x3F808001, 0x3F81),  # just above half-way: up
    (0x3F807FFF, 0x3F80),  # just below: down
    (0x7F7FFFFF, 0x7F80),  # the largest float32 rounds to inf
    (0x7F800000, 0x7F80),  # inf
    (0xFF800000, 0xFF80 - 0x10000),  # -inf (int16: the same 16 bits)
    (0x80000000, 0x8000 - 0x10000),  # -0.0
    (0x00000001, 0x0000),  # the smallest subnormal rounds to 0
    (0xBF800000, 0xBF80 - 0x10000),  # -1.0
])
def test_bf16_round_hand_cases(rule, bits, want):
    got = rule("bf16_round")(np.uint32(bits))
    assert isinstance(got, np.int16 | int) and int(got) == want


@pytest.mark.parametrize("bits", [0x7FC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0xFFFFFFFF])
def test_bf16_round_keeps_nan_a_quiet_nan(rule, bits):
    # Signalling NaNs (0x7F800001) and NaNs whose payload sits in the low bits must not
    # round to inf: the result is a quiet NaN of the same sign.
    got = np.int16(rule("bf16_round")(np.uint32(bits))).view(np.uint16)
    assert (got & 0x7F80) == 0x7F80 and (got & 0x7F) != 0  # a NaN
    assert got & 0x40  # quiet
    assert (got >> 15) == (bits >> 31)  # the sign


def test_bf16_round_rounds_like_torch():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(100_000).astype(np.float32) * 100,
        (rng.standard_normal(100_000) * 1e-30).astype(np.float32),  # subnormals too
        np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, -3.3895314e38], np.float32),
    ])
    bits = values.view(np.uint32)
    want = _torch_bf16(bits)
    np.testing.assert_array_equal(_bf16_all(bits), want)
    sample = bits[:: 97]  # as written: slower, a sample
    np.testing.assert_array_equal([lattice.bf16_round(b) for b in sample], want[:: 97])


# --------------------------------------------------------------------------- tolerance
@pytest.mark.parametrize("T,U,float64,input_eps,want", [
    (1, 0, False, 0.0, 1e-6),  # the floor
    (2, 3, True, 0.0, 1e-6),
    (2000, 300, False, 0.0, 8 * 2.0**-23 * 2300),
    (2000, 300, True, 0.0, 1e-6),  # float64's roundoff stays below the floor
    (10**12, 0, True, 0.0, 8 * 2.0**-52 * 10**12),
    (30, 5, False, 2.0**-7, 8 * 2.0**-7 * 35),  # bfloat16 log-probs: the input's roundoff
    (30, 5, False, 2.0**-10, 8 * 2.0**-10 * 35),  # float16
    (30, 5, True, 2.0**-7, 8 * 2.0**-7 * 35),
    (3000, 0, False, 2.0**-30, 8 * 2.0**-23 * 3000),  # a finer input: the lattice's
])
def test_negative_loss_tolerance(T, U, float64, input_eps, want):
    got = lattice.negative_loss_tolerance(T, U, float64=float64, input_eps=input_eps)
    assert got == pytest.approx(want, rel=1e-12)


@given(n=st.integers(0, 10**6), extra=st.integers(1, 10**6), float64=st.booleans(),
       input_eps=st.sampled_from([0.0, 2.0**-10, 2.0**-7]))
def test_negative_loss_tolerance_grows_with_the_path(n, extra, float64, input_eps):
    tol = lattice.negative_loss_tolerance
    small = tol(1 + n, 0, float64, input_eps)
    assert small >= 1e-6
    assert tol(1 + n + extra, 0, float64, input_eps) >= small
    assert tol(1, n, float64, input_eps) == tol(1 + n, 0, float64, input_eps)  # T + U counts
    assert tol(1 + n, 0, False, input_eps) >= tol(1 + n, 0, True, input_eps)
