"""The float64 TDT oracle itself: against brute force, NeMo's published values, RNN-T, its gradients."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rnntool.reference import reference_gradients, reference_utterance_loss
from rnntool.tdt_reference import (
    tdt_brute_force_loss,
    tdt_enumerate_paths,
    tdt_reference_gradients,
    tdt_reference_loss,
    tdt_reference_utterance_loss,
    tdt_reference_viterbi,
)

# [1, 2] has no 0 (NeMo's tests use [1, 2, 3, 4, 5]); rnntool.tdt_loss refuses it,
# the oracle takes it. [1] alone is NOT the RNN-T lattice: every arc, label
# included, then advances one frame (one symbol per frame); see
# test_rnnt_is_a_limit_of_tdt for what RNN-T is.
DURATION_SETS = [[0, 1], [0, 1, 2], [0, 1, 3], [0, 1, 2, 3, 4], [1, 2], [1]]


def _case(draw_or_seed, T, U, V, D, scale=2.0, fused=True):
    g = torch.Generator().manual_seed(draw_or_seed)
    x = torch.randn(T, U + 1, V + D, generator=g, dtype=torch.float64) * scale
    if not fused:
        # Log-probs for both parts, as fused_log_softmax=False takes them.
        x = torch.cat([torch.log_softmax(x[..., :V], -1), torch.log_softmax(x[..., V:], -1)], -1)
    return x


@st.composite
def tdt_cases(draw, max_T=5, max_U=2):
    T = draw(st.integers(1, max_T))
    U = draw(st.integers(0, max_U))
    V = draw(st.integers(2, 4))
    durations = draw(st.sampled_from(DURATION_SETS))
    blank = draw(st.sampled_from([0, V - 1, -1]))
    b = blank % V
    labels = [draw(st.sampled_from([k for k in range(V) if k != b])) for _ in range(U)]
    fused = draw(st.booleans())
    sigma = draw(st.sampled_from([0.0, 0.05, 0.7]))
    seed = draw(st.integers(0, 2**31 - 1))
    x = _case(seed, T, U, V, len(durations), scale=draw(st.sampled_from([0.5, 3.0])), fused=fused)
    return x, torch.tensor(labels, dtype=torch.long), durations, blank, sigma, fused


# --------------------------------------------------------------------------- value
@settings(max_examples=120)
@given(tdt_cases(), st.sampled_from([0.0, 0.5]))
def test_against_brute_force(case, lam):
    x, y, ds, blank, sigma, fused = case
    kw = dict(durations=ds, blank=blank, sigma=sigma, fused_log_softmax=fused)
    want = tdt_brute_force_loss(x, y, **kw)
    got = float(tdt_reference_utterance_loss(x, y, fastemit_lambda=lam, **kw))
    if math.isinf(want):
        assert got == math.inf
    else:
        assert abs(got - want) <= 1e-11 * max(1.0, abs(want))


def test_brute_force_counts_paths():
    # With every arc weight 0 (fused=False, all log-probs 0) the sum over paths is
    # their number. T=3, U=1, durations [0, 1, 2]: labelled by the label's frame
    # and duration and the blanks around it, by hand:
    #   label at t=0: d=0 -> (0,1) then blanks 1+1+1 / 1+2 / 2+1: 3 paths;
    #                 d=1 -> (1,1) then 1+1 / 2: 2; d=2 -> (2,1) then 1: 1
    #   blank 0->1 first, label at t=1: d=0 -> 2 paths, d=1 -> 1 path
    #   blank 0->2 or 0->1->2 first, label at t=2, d=0: 2 paths
    # 3 + 2 + 1 + 2 + 1 + 2 = 11.
    x = torch.zeros(3, 2, 2 + 3, dtype=torch.float64)
    y = torch.tensor([1])
    kw = dict(durations=[0, 1, 2], blank=0, fused_log_softmax=False)
    assert len(list(tdt_enumerate_paths(x, y, **kw))) == 11
    assert abs(float(tdt_reference_utterance_loss(x, y, **kw)) + math.log(11)) < 1e-14
    # sigma counts once per arc.
    got = float(tdt_reference_utterance_loss(x, y, sigma=0.25, **kw))
    want = -math.log(sum(math.exp(-0.25 * len(a)) for _, a in tdt_enumerate_paths(x, y, **kw)))
    assert abs(got - want) < 1e-14


def test_final_blank_lands_exactly_on_T():
    # T=2, U=0, durations [0, 1, 2, 3], all weights 0: blank 1+1 and blank 2 end
    # the path; a blank of 3 (or 1 then 2) would overshoot T and is no path.
    x = torch.zeros(2, 1, 2 + 4, dtype=torch.float64)
    kw = dict(durations=[0, 1, 2, 3], blank=1, fused_log_softmax=False)
    paths = sorted(a for _, a in tdt_enumerate_paths(x, torch.tensor([], dtype=torch.long), **kw))
    assert paths == [[(0, 0, 1, 1), (1, 0, 1, 1)], [(0, 0, 1, 2)]]
    loss = tdt_reference_utterance_loss(x, torch.tensor([], dtype=torch.long), **kw)
    assert abs(float(loss) + math.log(2)) < 1e-15


def test_no_path_is_infinite_with_zero_gradient():
    # One frame, one label, no duration 0: the label can only land beyond T.
    x = _case(1, 1, 1, 3, 2).unsqueeze(0)
    y = torch.tensor([[1]])
    losses, grads = tdt_reference_gradients(
        x, y, torch.tensor([1]), torch.tensor([1]), durations=[1, 2], blank=0)
    assert losses.tolist() == [math.inf]
    assert tdt_brute_force_loss(x[0], y[0], durations=[1, 2], blank=0) == math.inf
    assert not grads.any()
    assert tdt_reference_viterbi(x[0], y[0], durations=[1, 2], blank=0) == (-math.inf, [])


def test_minus_inf_log_probs_give_zero_not_nan_gradient():
    # fused=False with impossible tokens/durations (log-prob -inf), FastEmit on.
    x = _case(2, 4, 2, 4, 3, fused=False)
    x[1, 1, 2] = -math.inf  # label y_2 = 2 impossible at (1, 1)
    x[:, :, 4 + 1] = -math.inf  # duration 1 never
    x = x.unsqueeze(0)
    y = torch.tensor([[3, 2]])
    kw = dict(durations=[0, 1, 2], blank=0, fused_log_softmax=False)
    losses, grads = tdt_reference_gradients(
        x, y, torch.tensor([4]), torch.tensor([2]), fastemit_lambda=0.5, **kw)
    assert math.isfinite(float(losses[0]))
    assert torch.isfinite(grads).all()
    assert abs(float(losses[0]) - tdt_brute_force_loss(x[0], y[0], **kw)) < 1e-12


# --------------------------------------------------------------------------- NeMo
def test_nemo_fixed_case():
    """NeMo's published TDT values, reproduced.

    From NVIDIA NeMo (Apache-2.0), tests/collections/asr/numba/rnnt_loss/
    test_rnnt_pytorch.py, ``TestTDTLoss.test_case_fixed_case_act_label`` (commit
    8cfedd7): ``B, T, U, V = 1, 3, 2, 3`` where NeMo's ``U`` is our ``U+1`` (one
    label) and its ``V`` counts non-blank tokens; acts all zeros of shape
    ``(1, 3, 2, V + 1 + 3)``, labels ``[[0]]``, ``TDTLossNumba(blank=V=3,
    durations=[0, 1, 2], sigma=0.05, reduction='sum')``. Mapping: NeMo's acts are
    our logits as they are (V+1 = 4 token logits, blank last, then 3 duration
    logits), blank=3 (or -1), durations=[0, 1, 2], sigma=0.05, fused_log_softmax=True
    (NeMo log-softmaxes both parts), reduction 'sum' over B=1 = our per-utterance
    loss. Expected values copied from that test (NeMo checks its float32 CUDA
    kernel against them with rtol 1e-6 for the cost, 1e-2 for the gradient).
    """
    expected_cost = 4.155739
    expected_grads = [
        [
            [-0.64962804, 0.25, 0.25, 0.14962798, 0.2672583, -0.16792619, -0.09933221],
            [0.01651875, 0.01651875, 0.01651875, -0.04955626, 0.022025, -0.01227201, -0.009753],
        ],
        [
            [-0.04892651, 0.01714851, 0.01714851, 0.01462949, -0.01143234, -0.01143234, 0.02286467],
            [0.12531489, 0.12531489, 0.12531489, -0.37594467, 0.16708651, 0.13027048, -0.29735702],
        ],
        [
            [-0.02572276, 0.00857425, 0.00857425, 0.00857425, -0.02286468, 0.01143234, 0.01143234],
            [0.13388914, 0.13388914, 0.13388914, -0.40166742, 0.17851885, -0.35703772, 0.17851885],
        ],
    ]
    x = torch.zeros(1, 3, 2, 4 + 3, dtype=torch.float64)
    y = torch.tensor([[0]])
    for blank in (3, -1):
        losses, grads = tdt_reference_gradients(
            x, y, torch.tensor([3]), torch.tensor([1]), durations=[0, 1, 2], blank=blank,
            sigma=0.05)
        # NeMo prints 7 significant digits of a float32 result.
        assert abs(float(losses[0]) - expected_cost) < 1e-6
        assert float(torch.abs(grads[0] - torch.tensor(expected_grads, dtype=torch.float64)).max()) < 1e-7


# --------------------------------------------------------------------------- RNN-T
@pytest.mark.parametrize("T,U,V,blank", [(1, 0, 3, 0), (2, 1, 3, -1), (4, 2, 5, 0), (5, 3, 4, 2)])
def test_rnnt_is_a_limit_of_tdt(T, U, V, blank):
    """RNN-T inside TDT: durations [0, 1] with fused_log_softmax=False and log-probs
    chosen so that blank arcs keep RNN-T's weight and duration-1 label arcs vanish.

    RNN-T's arcs are the TDT blank with d=1 and the TDT label with d=0. Take RNN-T
    log-probs L; set the TDT token log-probs to L, plus K on blank, and the
    duration log-probs to log Q(0) = 0, log Q(1) = -K: then a blank arc weighs
    L_blank + K - K = L_blank, a label arc with d=0 weighs L_y, and a label arc
    with d=1 weighs L_y - K. With K = 80, every path using one of the latter is
    e^-80 ~ 2e-35 times an RNN-T path, far below float64's resolution: the TDT
    loss and its gradients w.r.t. the token log-probs are RNN-T's.
    """
    K = 80.0
    g = torch.Generator().manual_seed(T * 10 + U)
    L = torch.log_softmax(torch.randn(T, U + 1, V, generator=g, dtype=torch.float64) * 2, -1)
    b = blank % V
    labels = torch.tensor([(b + 1 + u) % V for u in range(U)])
    tok = L.clone()
    tok[..., b] += K
    dur = torch.zeros(T, U + 1, 2, dtype=torch.float64)
    dur[..., 1] = -K
    x = torch.cat([tok, dur], -1)
    tdt_losses, tdt_grads = tdt_reference_gradients(
        x[None], labels[None], torch.tensor([T]), torch.tensor([U]), durations=[0, 1],
        blank=blank, fused_log_softmax=False)
    rnnt_losses, rnnt_grads = reference_gradients(
        L[None], labels[None], torch.tensor([T]), torch.tensor([U]), blank=blank,
        fused_log_softmax=False)
    assert abs(float(tdt_losses[0] - rnnt_losses[0])) < 1e-12
    assert float(torch.abs(tdt_grads[0, ..., :V] - rnnt_grads[0]).max()) < 1e-12
    assert abs(float(tdt_losses[0]) - float(reference_utterance_loss(
        L, labels, blank=blank, fused_log_softmax=False))) < 1e-12


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("ds,blank,sigma,fused", [([0, 1], 0, 0.0, True), ([0, 1, 2], -1, 0.05, False),
                                                  ([0, 1, 3], 1, 0.3, True), ([1, 2], 0, 0.0, False)])
def test_gradient_against_finite_differences(ds, blank, sigma, fused):
    x = _case(len(ds) * 7 + blank, 3, 2, 3, len(ds), fused=fused).requires_grad_(True)
    y = torch.tensor([2, 2]) if blank % 3 != 2 else torch.tensor([0, 1])

    def f(z):
        return tdt_reference_utterance_loss(z, y, durations=ds, blank=blank, sigma=sigma,
                                            fused_log_softmax=fused)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def _lattice(tok, dur, ys, ds, blank):
    """numpy float64 alpha, beta and arc posteriors, the sums spelled out by arcs (push form).

    Returns ``(ll, post_blank (T, U+1, D), post_label (T, U+1, D))`` where a
    posterior is P(path uses that arc | y, x); ``tok`` already has sigma subtracted.
    """
    T, U1, _ = tok.shape
    U = U1 - 1
    D = len(ds)
    alpha = np.full((T, U1), -np.inf)
    alpha[0, 0] = 0.0
    for t in range(T):
        for u in range(U1):
            for i, d in enumerate(ds):
                if d >= 1 and t + d <= T - 1:
                    alpha[t + d, u] = np.logaddexp(alpha[t + d, u], alpha[t, u] + tok[t, u, blank] + dur[t, u, i])
                if u < U and t + d <= T - 1:
                    alpha[t + d, u + 1] = np.logaddexp(alpha[t + d, u + 1],
                                                       alpha[t, u] + tok[t, u, ys[u]] + dur[t, u, i])
    beta = np.full((T + 1, U1), -np.inf)
    beta[T, U] = 0.0  # "past the end": only the final blanks reach it
    for t in range(T - 1, -1, -1):
        for u in range(U, -1, -1):
            for i, d in enumerate(ds):
                if d >= 1 and (t + d <= T - 1 or (u == U and t + d == T)):
                    beta[t, u] = np.logaddexp(beta[t, u], tok[t, u, blank] + dur[t, u, i] + beta[t + d, u])
                if u < U and t + d <= T - 1:
                    beta[t, u] = np.logaddexp(beta[t, u], tok[t, u, ys[u]] + dur[t, u, i] + beta[t + d, u + 1])
    ll = beta[0, 0]
    if not np.isfinite(ll):
        return ll, None, None
    pb = np.zeros((T, U1, D))
    pl = np.zeros((T, U1, D))
    for t in range(T):
        for u in range(U1):
            for i, d in enumerate(ds):
                if d >= 1 and t + d <= T:
                    pb[t, u, i] = np.exp(alpha[t, u] + tok[t, u, blank] + dur[t, u, i] + beta[t + d, u] - ll)
                if u < U and t + d <= T - 1:
                    pl[t, u, i] = np.exp(alpha[t, u] + tok[t, u, ys[u]] + dur[t, u, i] + beta[t + d, u + 1] - ll)
    return ll, pb, pl


@settings(max_examples=60)
@given(tdt_cases(max_T=6, max_U=3), st.sampled_from([0.0, 0.3, 1.0]))
def test_gradient_formula(case, lam):
    """The issue's gradient, with FastEmit as the reference defines it, against autograd.

    Fused: d/d token logit k = P(k) (occ + lam P_label) - P_blank [k = blank]
    - (1 + lam) P_label [k = y_{u+1}], and d/d duration logit d = Q(d) occ - P_d;
    without fusing the terms in P(k), Q(d) go (the gradient is w.r.t. the
    log-probs). occ(t, u) = P_blank + P_label is the node's occupancy, P_blank /
    P_label the summed posteriors of the blank / label arcs leaving it, P_d that
    of its arcs with duration d.
    """
    x, y, ds, blank, sigma, fused = case
    T, U1, VD = x.shape
    V = VD - len(ds)
    b = blank % V
    tok = x[..., :V].numpy()
    dur = x[..., V:].numpy()
    if fused:
        tok = torch.log_softmax(x[..., :V], -1).numpy()
        dur = torch.log_softmax(x[..., V:], -1).numpy()
    ys = y.tolist()
    ll, pb, pl = _lattice(tok - sigma, dur, ys, ds, b)
    losses, grads = tdt_reference_gradients(
        x[None], y[None], torch.tensor([T]), torch.tensor([U1 - 1]), durations=ds, blank=blank,
        sigma=sigma, fused_log_softmax=fused, fastemit_lambda=lam)
    if not np.isfinite(ll):
        assert float(losses[0]) == math.inf and not grads.any()
        return
    assert abs(float(losses[0]) + ll) < 1e-10 * max(1.0, abs(ll))
    want = np.zeros((T, U1, VD))
    P_blank, P_label = pb.sum(-1), pl.sum(-1)
    occ = P_blank + P_label
    if fused:
        want[..., :V] = np.exp(tok) * (occ + lam * P_label)[..., None]
        want[..., V:] = np.exp(dur) * occ[..., None]
    want[..., b] -= P_blank
    for u, k in enumerate(ys):
        want[:, u, k] -= (1 + lam) * P_label[:, u]
    want[..., V:] -= pb + pl
    np.testing.assert_allclose(grads[0].numpy(), want, rtol=0, atol=1e-10)


def test_fastemit_leaves_value_and_blank_only_nodes_alone():
    x = _case(3, 4, 2, 4, 3)
    y = torch.tensor([1, 2])
    kw = dict(durations=[0, 1, 2], blank=0, sigma=0.05)
    plain = tdt_reference_gradients(x[None], y[None], torch.tensor([4]), torch.tensor([2]), **kw)
    fe = tdt_reference_gradients(x[None], y[None], torch.tensor([4]), torch.tensor([2]),
                                 fastemit_lambda=0.5, **kw)
    assert float(plain[0][0]) == float(fe[0][0])
    # At u = U no label leaves a node: FastEmit changes nothing there.
    assert torch.allclose(plain[1][0, :, 2], fe[1][0, :, 2], rtol=0, atol=1e-15)
    assert float((plain[1][0, :, :2, :4] - fe[1][0, :, :2, :4]).abs().max()) > 1e-3
    # Duration gradients are FastEmit-free (NeMo's convention).
    assert torch.allclose(plain[1][0, ..., 4:], fe[1][0, ..., 4:], rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- batch
def test_batch_crops_and_padding_gets_no_gradient():
    ds = [0, 1, 2, 3]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 5, 4, 4 + len(ds), generator=g, dtype=torch.float64)
    targets = torch.tensor([[1, 2, 3], [3, -1, -1], [2, 1, -1]])
    t_len = torch.tensor([5, 2, 4])
    u_len = torch.tensor([3, 1, 2])
    kw = dict(durations=ds, blank=0, sigma=0.1)
    losses, grads = tdt_reference_gradients(x, targets, t_len, u_len, **kw)
    assert torch.equal(losses, tdt_reference_loss(x, targets, t_len, u_len, **kw).detach())
    for b in range(3):
        T, U = int(t_len[b]), int(u_len[b])
        xb = x[b, :T, : U + 1].clone().requires_grad_(True)
        loss = tdt_reference_utterance_loss(xb, targets[b, :U], **kw)
        (gb,) = torch.autograd.grad(loss, xb)
        assert float(loss.detach()) == float(losses[b])
        assert torch.equal(grads[b, :T, : U + 1], gb)
        mask = torch.ones(5, 4, dtype=torch.bool)
        mask[:T, : U + 1] = False
        assert not grads[b][mask].any()


# --------------------------------------------------------------------------- Viterbi
@settings(max_examples=80)
@given(tdt_cases())
def test_viterbi_is_the_best_enumerated_path(case):
    x, y, ds, blank, sigma, fused = case
    kw = dict(durations=ds, blank=blank, sigma=sigma, fused_log_softmax=fused)
    paths = list(tdt_enumerate_paths(x, y, **kw))
    best, arcs = tdt_reference_viterbi(x, y, **kw)
    top = max((lp for lp, _ in paths), default=-math.inf)
    if top == -math.inf:
        assert (best, arcs) == (-math.inf, [])
        return
    assert abs(best - top) < 1e-12
    (lp_of_arcs,) = [lp for lp, a in paths if a == arcs]  # a real path, exactly once
    assert abs(lp_of_arcs - best) < 1e-12
    V = x.shape[-1] - len(ds)
    assert [a[2] for a in arcs if a[2] != blank % V] == y.tolist()
    assert arcs[-1][0] + arcs[-1][3] == x.shape[0] and arcs[-1][1] == y.numel()


def test_viterbi_ties_prefer_blank_then_shorter_duration():
    # All-zero logits: every arc weighs the same, so the best paths are the ones
    # with fewest arcs and the tie rule picks among them. T=3, U=1, durations
    # [0, 1, 2]: two-arc paths are "label d=2, blank d=1" and "label d=1, blank
    # d=2"; the final blank takes the shorter duration.
    x = torch.zeros(3, 2, 4 + 3, dtype=torch.float64)
    best, arcs = tdt_reference_viterbi(x, torch.tensor([0]), durations=[0, 1, 2], blank=-1)
    assert arcs == [(0, 0, 0, 2), (2, 1, 3, 1)]
    assert abs(best - 2 * math.log(1 / 12)) < 1e-14
    # T=2: "label d=0, blank d=2" and "label d=1, blank d=1" tie at two arcs;
    # again the final blank's shorter duration decides.
    best, arcs = tdt_reference_viterbi(x[:2], torch.tensor([0]), durations=[0, 1, 2], blank=-1)
    assert arcs == [(0, 0, 0, 1), (1, 1, 3, 1)]


def test_viterbi_exact_ties_follow_the_order_blanks_then_labels_shorter_first():
    # fused=False with every log-prob 0: all paths weigh 0 and every choice is a
    # tie. Node by node from the end: the final blank takes d=1 from (2, 1);
    # into (2, 1) the blank d=1 from (1, 1) comes first (before the blank d=2
    # from (0, 1) and the labels from (2, 0), (1, 0), (0, 0)); into (1, 1) the
    # blank from (0, 1); into (0, 1) only the label d=0 from (0, 0).
    x = torch.zeros(3, 2, 3 + 3, dtype=torch.float64)
    best, arcs = tdt_reference_viterbi(x, torch.tensor([2]), durations=[0, 1, 2], blank=0,
                                       fused_log_softmax=False)
    assert best == 0.0
    assert arcs == [(0, 0, 2, 0), (0, 1, 0, 1), (1, 1, 0, 1), (2, 1, 0, 1)]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("ds,msg", [([0, 2, 1], "ascending"), ([1, 1], "ascending"),
                                    ([-1, 0, 1], ">= 0"), ([], "non-empty"),
                                    ([0, 1.5], "integers")])
def test_bad_durations(ds, msg):
    x = torch.zeros(2, 1, 3 + max(len(ds), 1), dtype=torch.float64)
    with pytest.raises(ValueError, match=msg):
        tdt_reference_utterance_loss(x[..., : 3 + len(ds)], torch.tensor([], dtype=torch.long),
                                     durations=ds, blank=0)


def test_bad_shapes_and_labels():
    x = torch.zeros(2, 2, 5, dtype=torch.float64)
    kw = dict(durations=[0, 1, 2, 3, 4], blank=0)
    with pytest.raises(ValueError, match="no token logits"):
        tdt_reference_utterance_loss(x, torch.tensor([1]), **kw)
    kw = dict(durations=[0, 1], blank=0)
    with pytest.raises(ValueError, match="label 0 is 0"):
        tdt_reference_utterance_loss(x, torch.tensor([0]), **kw)
    with pytest.raises(ValueError, match="label 0 is 3"):
        tdt_reference_utterance_loss(x, torch.tensor([3]), **kw)
    with pytest.raises(ValueError, match="U=1"):
        tdt_reference_utterance_loss(x, torch.tensor([1, 2]), **kw)
    with pytest.raises(ValueError, match="blank 3"):
        tdt_reference_utterance_loss(x, torch.tensor([1]), durations=[0, 1], blank=3)
    with pytest.raises(ValueError, match="utterance 1"):
        tdt_reference_loss(x[None].expand(2, -1, -1, -1), torch.tensor([[1], [1]]),
                           torch.tensor([2, 3]), torch.tensor([1, 1]), **kw)
