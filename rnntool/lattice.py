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
