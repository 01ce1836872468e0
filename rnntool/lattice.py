"""Scalar rules of the lattice recursion, written once and compiled by each backend.

``cpu.py`` compiles these with ``numba.njit`` and ``cuda.py`` with
``numba.cuda.jit(device=True)``, so the two backends cannot drift apart on
them (in particular, Viterbi ties break the same way everywhere). Plain Python:
no numba import here, and the float64 reference does not use them.
"""

import math


def logaddexp(a, b):
    """log(exp(a) + exp(b)) that is exact when either side is -inf."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


def emission_wins(a, e, t, u):
    """Viterbi: does the best way into (t, u) come by emission from (t, u-1)?

    ``a`` is the score by blank from (t-1, u), ``e`` by emission from (t, u-1).
    At t = 0 only emission is possible, at u = 0 only blank; ties go to the blank.
    """
    return u > 0 and (t == 0 or e > a)


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
