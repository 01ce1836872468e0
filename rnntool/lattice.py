"""Per-node rules of the loss engine, written once and compiled by each backend.

``cpu.py`` compiles these with ``numba.njit`` and ``cuda.py`` with
``numba.cuda.jit(device=True)``, so the two backends cannot drift apart on
them: the two arcs into and out of a node (alpha, beta and Viterbi), Viterbi's
tie rule, the arc posteriors of stage 3, a log-prob from the normaliser, and
the bfloat16 rounding of a gradient. Each is a leaf (it calls no other rule:
a compiled function can only call compiled ones). Plain Python: no numba
import here, and the float64 reference does not use them.

Arrays are indexed ``[b, t, u]``: utterance b, frame t, label position u.
"""

import math

import numpy as np


def logaddexp(a, b):
    """log(exp(a) + exp(b)) that is exact when either side is -inf."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


def arcs_into(score, blank_lp, emit_lp, b, t, u):
    """The two ways into node (t, u) on the forward walk (alpha, Viterbi's delta):
    ``(by blank from (t-1, u), by emission from (t, u-1))``, -inf where there is
    none; the origin (0, 0) is entered by a blank of score 0."""
    a = 0.0 if t == 0 and u == 0 else -math.inf
    e = -math.inf
    if t > 0:
        a = score[b, t - 1, u] + blank_lp[b, t - 1, u]
    if u > 0:
        e = score[b, t, u - 1] + emit_lp[b, t, u - 1]
    return a, e


def arcs_out(score, blank_lp, emit_lp, b, t, u, Tb, Ub):
    """The two ways out of node (t, u) on the backward walk (beta): ``(by blank to
    (t+1, u), by emission to (t, u+1))``, -inf where there is none; the last node
    (Tb-1, Ub) leaves by its final blank."""
    a = blank_lp[b, t, u] if t == Tb - 1 and u == Ub else -math.inf
    e = -math.inf
    if t < Tb - 1:
        a = score[b, t + 1, u] + blank_lp[b, t, u]
    if u < Ub:
        e = score[b, t, u + 1] + emit_lp[b, t, u]
    return a, e


def emission_wins(a, e, t, u):
    """Viterbi: does the best way into (t, u) come by emission from (t, u-1)?

    ``a`` is the score by blank from (t-1, u), ``e`` by emission from (t, u-1).
    At t = 0 only emission is possible, at u = 0 only blank; ties go to the blank.
    """
    return u > 0 and (t == 0 or e > a)


def arc_posteriors(alpha, beta, blank_lp, emit_lp, b, t, u, Tb, Ub, log_like, emit_weight):
    """Stage 3: ``(P_blank, P_emit)``, the posteriors of the two arcs leaving (t, u).

    ``exp(alpha + arc log-prob + beta after the arc - log P)``; the final blank
    out of (Tb-1, Ub) ends the path (beta 0 after it); P_emit is 0 at u = Ub and
    scaled by ``emit_weight`` (``1 + FastEmit lambda``).
    """
    a = alpha[b, t, u]
    after_blank = -math.inf
    if t + 1 < Tb:
        after_blank = beta[b, t + 1, u]
    elif u == Ub:
        after_blank = 0.0
    p_blank = math.exp(a + blank_lp[b, t, u] + after_blank - log_like)
    p_emit = 0.0
    if u < Ub:
        p_emit = emit_weight * math.exp(a + emit_lp[b, t, u] + beta[b, t, u + 1] - log_like)
    return p_blank, p_emit


def log_prob(x, hi, lo):
    """A logit's log-prob from the normaliser split as (row max ``hi``, log-sum ``lo``):
    ``(x - hi) - lo`` in this order, since ``x - (hi + lo)`` loses the small ``lo``
    when logits are large (float32 keeps ~7 digits of a logit of 75)."""
    return (x - hi) - lo


def bf16_round(bits):
    """float32 ``bits`` (uint32) -> bfloat16 bits as int16: round to nearest even,
    NaN kept NaN (quiet)."""
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        r = (bits >> np.uint32(16)) | np.uint32(0x40)
    else:
        r = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    # uint16 -> int16 with wrap-around: the same 16 bits.
    return np.int16(np.int32(r) - 65536 if r >= np.uint32(0x8000) else np.int32(r))


def negative_loss_tolerance(T, U, float64=False, input_eps=0.0):
    """How far below 0 rounding can put a computed ``-log P(y|x)`` (nats), for an
    utterance of ``T`` frames and ``U`` labels.

    log P sums the T + U log-probs of a path, each rounded in the lattice's
    float32 (float64 for float64 logits), or, for log-prob input
    (``fused_log_softmax=False``), already rounded in the input's own type:
    ``input_eps`` is that type's epsilon (2**-7 for bfloat16, 2**-10 for float16).
    Allow 8 units of the coarser roundoff per arc, and at least 1e-6 nats. A loss
    below ``-tolerance`` is impossible: the input was not normalised log-probs (or
    the engine is wrong). Plain Python, used by ``rnnt_loss``'s warning and the
    CLI's checks alike.
    """
    eps = max(2.0**-52 if float64 else 2.0**-23, input_eps)
    return max(8 * eps * (T + U), 1e-6)
