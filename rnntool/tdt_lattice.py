"""The TDT (Token-and-Duration Transducer) lattice: per-node rules both backends compile,
and the typed contract between ``tdt.py`` and the TDT kernels.

TDT (Xu et al., ICML 2023, arXiv:2304.06795): the joint emits per node ``(t, u)``
``V`` token logits (blank among them) and ``D`` duration logits for the ascending
duration set ``durations`` (``durations[0] = 0``, ``durations[1] = 1``), normalised
by two separate log-softmaxes, ``log P(k | t, u)`` and ``log Q(d | t, u)``. From
``(t, u)``:

- a blank with duration ``d >= 1`` goes to ``(t + d, u)``;
- the next label ``y_{u+1}`` with duration ``d >= 0`` goes to ``(t + d, u + 1)``;
- every arc lands on a frame ``t + d <= T_b - 1``, except a blank out of a node with
  ``u = U_b``, which may land exactly on ``t + d = T_b``: that ends the path.

An arc's log-prob is its token's ``log P - sigma`` plus its duration's ``log Q``.
``-log P(y|x)`` is the negative log of the sum over every path from ``(0, 0)`` to
the end.

The rules below are plain Python, compiled by ``tdt_cpu.py`` (``numba.njit``) and
``tdt_cuda.py`` (``numba.cuda.jit(device=True)``) through ``compiled``, so the
backends cannot drift apart on them. Arrays are indexed ``[b, t, u]`` (``dur_lp``:
``[b, t, u, i]``, ``i`` the duration's index in ``durations``). The rules sum
through ``_lae`` (``lattice.logaddexp``'s rule); ``compiled`` hands each backend's
compiled ``_lae`` to them. Plain Python: no numba import here.
"""

from __future__ import annotations

import importlib
import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .lattice import logaddexp as _lae  # replaced by each backend's compiled twin

# backend name -> the module whose ``TDT_ENGINE`` runs it (imported on first use).
TDT_ENGINES = {"cpu": "rnntool.tdt_cpu", "cuda": "rnntool.tdt_cuda"}


@dataclass(frozen=True)
class TDTOptions:
    """``tdt_loss``'s options, checked, as the TDT kernels read them.

    ``blank`` in ``[0, V)``; ``durations`` a tuple of ints, strictly ascending,
    starting ``(0, 1, ...)``; ``sigma >= 0`` (subtracted from every token log-prob);
    ``fused``: the input is logits, else log-probs (tokens and durations alike);
    ``clamp > 0`` clips the token part of each utterance's gradient to
    ``[-clamp, clamp]``, 0.0 is off; ``fastemit_lambda >= 0``; ``reduction`` as
    ``loss.REDUCTIONS`` (applied by ``tdt.py``).
    """

    blank: int
    durations: tuple[int, ...]
    sigma: float = 0.0
    fused: bool = True
    clamp: float = 0.0
    fastemit_lambda: float = 0.0
    reduction: str = "none"


@dataclass(frozen=True)
class TDTState:
    """What the TDT forward (stages 1 and 2) hands on to the gradient (stage 3).

    Arrays of the backend (numpy on the CPU, torch tensors on CUDA); ``B``
    utterances padded to ``T`` frames and ``U1 = U+1`` label positions, ``D``
    durations.

    - ``log_like`` ``(B,)`` float64: ``log P(y|x)``, NaN for a bad utterance.
    - ``bad`` ``(B,)`` bool: NaN or +inf in the utterance's logits (tokens or
      durations), or a row with no distribution (all ``-inf``); on CUDA also label
      values or lengths out of range (possible only without host validation).
    - ``blank_lp``, ``emit_lp`` ``(B, T, U1)`` lattice float (float64 for float64
      logits, else float32): ``log P(blank) - sigma`` and ``log P(y_{u+1}) - sigma``,
      ``-inf`` outside the lengths (``emit_lp`` also at ``u = U_b``).
    - ``dur_lp`` ``(B, T, U1, D)`` lattice float: ``log Q(d_i)``.
    - ``lse`` ``(B, T, U1, 2)`` lattice float: the token log-normaliser as (row max,
      log of the sum of exp(x - max)); zeros when not fused. Kept only with
      ``keep_state`` (else None), as ``alpha`` and ``beta`` ``(B, T, U1)`` float64.
    - ``durations`` ``(D,)`` int64; ``targets`` ``(B, S)``, ``logit_lengths``,
      ``target_lengths`` ``(B,)`` int64, as the kernels read them.
    """

    log_like: Any
    bad: Any
    blank_lp: Any
    emit_lp: Any
    dur_lp: Any
    durations: Any
    targets: Any
    logit_lengths: Any
    target_lengths: Any
    lse: Any = None
    alpha: Any = None
    beta: Any = None


class TDTEngine(NamedTuple):
    """A backend's TDT host functions.

    - ``check_device(logits)``: raise unless this backend can run these tensors.
    - ``forward(logits, targets, logit_lengths, target_lengths, opts, keep_state)
      -> TDTState``: stages 1 and 2 on validated inputs; ``logits`` ``(B, T, U1, V + D)``.
    - ``backward(logits, state, opts, scale) -> grad``: stage 3, the gradient
      ``(B, T, U1, V + D)`` in the logits' dtype, utterance b's scaled by ``scale[b]``.
    - ``best_path(state) -> (best (B,), last (B,), from_arc (B, T, U1))``: the Viterbi
      twin of stage 2 on a forward state (``backtrack`` reads one utterance's path).
    - ``guards_indices``: whether the kernels survive unchecked label values and lengths.
    - ``forward_compact(blank_lp, emit_lp, dur_lp, durations, targets, logit_lengths,
      target_lengths, keep_state) -> TDTState``: stage 2 alone on a TDT lattice dump's
      padded arrays (``(B, T, U1)``, ``(B, T, U1)``, ``(B, T, U1, D)``); the state
      ``forward`` gives for the logits they came from (same bits), without ``lse``
      (so no ``backward``), ``bad`` where the loss is NaN.
    """

    name: str
    check_device: Callable[[Any], None]
    forward: Callable[[Any, Any, Any, Any, TDTOptions, bool], TDTState]
    backward: Callable[[Any, TDTState, TDTOptions, Any], Any]
    best_path: Callable[[TDTState], tuple[Any, Any, Any]]
    guards_indices: bool
    forward_compact: Callable[..., TDTState]


def load_tdt_engine(backend: str) -> TDTEngine:
    """The ``TDTEngine`` of ``backend``, one of ``TDT_ENGINES`` (imported on first use)."""
    return importlib.import_module(TDT_ENGINES[backend]).TDT_ENGINE


MAX_DURATION = 2**31 - 1  # frames; t + d stays far inside int64 in the kernels
# Viterbi back-pointers are int8 codes +-(i + 1) for duration index i (below), so at most
# 127 durations (NeMo's models use 5 or so).
MAX_DURATIONS = 127


def check_duration_values(values: tuple[int, ...]) -> tuple[int, ...]:
    """The duration set's rules, on Python ints (torch-free: dumps check theirs with it,
    ``tdt.check_durations`` after converting its argument): strictly ascending,
    ``>= 0``, at most ``MAX_DURATION`` frames, at most ``MAX_DURATIONS`` of them,
    containing 0 and 1. Returns ``values``;
    ``ValueError`` in one line naming the value otherwise (e.g. ``[0, 2, 4]``: no 1).
    """
    if not values:
        raise ValueError("durations is empty; TDT needs a duration set with 0 and 1, "
                         "e.g. [0, 1, 2, 3, 4]")
    if len(values) > MAX_DURATIONS:
        raise ValueError(f"durations has {len(values)} values; at most {MAX_DURATIONS} are "
                         "supported (the best path's back-pointers are 8-bit)")
    for i, d in enumerate(values):
        if d < 0:
            raise ValueError(f"durations[{i}] = {d} is negative in {list(values)}; "
                             "durations are frame counts >= 0")
        if d > MAX_DURATION:
            raise ValueError(f"durations[{i}] = {d} is larger than {MAX_DURATION} frames")
        if i and d <= values[i - 1]:
            raise ValueError(f"durations must be strictly ascending, got {list(values)} "
                             f"(durations[{i}] = {d} after {values[i - 1]})")
    if values[0] != 0 or len(values) < 2 or values[1] != 1:
        missing = " and ".join(str(d) for d in (0, 1) if d not in values)
        raise ValueError(f"durations must contain 0 and 1, got {list(values)} (no {missing})")
    return values


# --------------------------------------------------------------------------- per-node rules
def compiled(rule, jit, **names):
    """``rule`` compiled by ``jit`` as a copy whose globals ``names`` (``_lae=...``) are
    the backend's compiled functions (numba reads globals at compile time)."""
    scope = dict(rule.__globals__, **names)
    twin = types.FunctionType(rule.__code__, scope, rule.__name__, rule.__defaults__,
                              rule.__closure__)
    twin.__doc__ = rule.__doc__
    return jit(twin)


def into_from_earlier(alpha, blank_lp, emit_lp, dur_lp, durations, b, t, u):
    """The sum (log) of the arcs into ``(t, u)`` from earlier frames, ``alpha``-weighted:
    blanks of every duration ``d >= 1`` from ``(t - d, u)`` and labels of every ``d >= 1``
    from ``(t - d, u - 1)``; 0 for the origin ``(0, 0)``. In the order of ``durations``,
    blank before label. The ``d = 0`` label arc from ``(t, u - 1)`` is not included:
    ``same_frame_arc`` gives its weight, and the caller chains it along ``u``."""
    acc = 0.0 if t == 0 and u == 0 else -math.inf
    for i in range(1, durations.shape[0]):
        s = t - durations[i]
        if s < 0:
            break
        acc = _lae(acc, alpha[b, s, u] + blank_lp[b, s, u] + dur_lp[b, s, u, i])
        if u > 0:
            acc = _lae(acc, alpha[b, s, u - 1] + emit_lp[b, s, u - 1] + dur_lp[b, s, u - 1, i])
    return acc


def same_frame_arc(emit_lp, dur_lp, b, t, u):
    """The log-prob of the ``d = 0`` label arc out of ``(t, u)`` into ``(t, u + 1)``
    (``-inf`` at ``u = U_b``, where ``emit_lp`` is)."""
    return emit_lp[b, t, u] + dur_lp[b, t, u, 0]


def out_to_later(beta, blank_lp, emit_lp, dur_lp, durations, b, t, u, Tb, Ub):
    """The sum (log) of the arcs out of ``(t, u)`` into later frames, ``beta``-weighted:
    blanks of every ``d >= 1`` to ``(t + d, u)`` (at ``u = U_b`` also those landing on
    ``t + d = T_b``, which end the path), labels of every ``d >= 1`` to
    ``(t + d, u + 1)``. The mirror of ``into_from_earlier``; the ``d = 0`` label arc
    is the caller's."""
    acc = -math.inf
    for i in range(1, durations.shape[0]):
        s = t + durations[i]
        if s > Tb:
            break
        if s < Tb:
            acc = _lae(acc, blank_lp[b, t, u] + dur_lp[b, t, u, i] + beta[b, s, u])
            if u < Ub:
                acc = _lae(acc, emit_lp[b, t, u] + dur_lp[b, t, u, i] + beta[b, s, u + 1])
        elif u == Ub:
            acc = _lae(acc, blank_lp[b, t, u] + dur_lp[b, t, u, i])
    return acc


def final_blanks(alpha, blank_lp, dur_lp, durations, b, Tb, Ub):
    """``log P(y|x)``: the sum (log) over the blanks that end the path, from
    ``(T_b - d, U_b)`` with every ``d >= 1``, in the order of ``durations``."""
    acc = -math.inf
    for i in range(1, durations.shape[0]):
        s = Tb - durations[i]
        if s < 0:
            break
        acc = _lae(acc, alpha[b, s, Ub] + blank_lp[b, s, Ub] + dur_lp[b, s, Ub, i])
    return acc


def arc_posteriors(alpha, beta, blank_lp, emit_lp, dur_lp, durations, b, t, u, i, Tb, Ub,
                   log_like):
    """Stage 3: ``(P_blank_i, P_label_i)``, the posteriors of the blank and the label arc
    of duration ``durations[i]`` out of ``(t, u)`` (0 where there is no such arc).

    ``exp(alpha + arc log-prob + beta after the arc - log P)``; a blank landing on
    ``T_b`` from ``u = U_b`` ends the path (beta 0 after it). FastEmit's weight is
    the caller's: it scales the label arcs' token gradient only.
    """
    d = durations[i]
    s = t + d
    a = alpha[b, t, u]
    p_blank = 0.0
    p_label = 0.0
    if d >= 1:
        after = -math.inf
        if s < Tb:
            after = beta[b, s, u]
        elif s == Tb and u == Ub:
            after = 0.0
        if after > -math.inf:
            p_blank = math.exp(a + blank_lp[b, t, u] + dur_lp[b, t, u, i] + after - log_like)
    if u < Ub and s < Tb:
        p_label = math.exp(
            a + emit_lp[b, t, u] + dur_lp[b, t, u, i] + beta[b, s, u + 1] - log_like)
    return p_blank, p_label


# Viterbi: ``from_arc`` codes, per node, of the best arc into it (int8): 0 none (the
# origin, or no arc of non-zero probability); ``i + 1`` the blank of duration index
# i (i >= 1); ``-(i + 1)`` the label of duration index i (i >= 0).
def best_blank_into(delta, blank_lp, dur_lp, durations, b, t, u):
    """Viterbi: ``(score, code)`` of the best blank into ``(t, u)``, from ``(t - d, u)``
    for ``d >= 1``; durations in ascending order, a later one only if strictly better
    (ties go to the shorter jump). ``(-inf, 0)`` when there is none."""
    best = -math.inf
    code = 0
    for i in range(1, durations.shape[0]):
        s = t - durations[i]
        if s < 0:
            break
        c = delta[b, s, u] + blank_lp[b, s, u] + dur_lp[b, s, u, i]
        if c > best:
            best = c
            code = i + 1
    return best, code


def best_label_into(delta, emit_lp, dur_lp, durations, b, t, u, first):
    """Viterbi: ``(score, code)`` of the best label into ``(t, u)`` (``u >= 1``), from
    ``(t - d, u - 1)``, over duration indices ``i >= first`` (1: the jumps only; the
    caller weighs the ``d = 0`` arc, whose origin is in the same frame); ascending,
    a later one only if strictly better. ``(-inf, 0)`` when there is none."""
    best = -math.inf
    code = 0
    for i in range(first, durations.shape[0]):
        s = t - durations[i]
        if s < 0:
            break
        c = delta[b, s, u - 1] + emit_lp[b, s, u - 1] + dur_lp[b, s, u - 1, i]
        if c > best:
            best = c
            code = -(i + 1)
    return best, code


def best_final_blank(delta, blank_lp, dur_lp, durations, b, Tb, Ub):
    """Viterbi: ``(score, duration index)`` of the best blank that ends the path, from
    ``(T_b - d, U_b)``; ascending durations, strictly better only. ``(-inf, 0)``: none."""
    best = -math.inf
    last = 0
    for i in range(1, durations.shape[0]):
        s = Tb - durations[i]
        if s < 0:
            break
        c = delta[b, s, Ub] + blank_lp[b, s, Ub] + dur_lp[b, s, Ub, i]
        if c > best:
            best = c
            last = i
    return best, last


def backtrack(from_arc, last, durations, blank, labels, Tb, Ub):
    """The best path of one utterance from a Viterbi's ``from_arc`` ``(T, U+1)`` codes and
    ``last`` (the final blank's duration index): a list of arcs ``(t, u, token,
    duration)`` in order, the last one the blank that ends the path; ``labels`` the
    utterance's ``(U,)`` labels. Plain Python (host side): ``[]`` when the best
    score is ``-inf`` (the caller knows)."""
    arcs = [(Tb - int(durations[last]), Ub, blank, int(durations[last]))]
    t, u = arcs[0][0], Ub
    while t > 0 or u > 0:
        code = int(from_arc[t, u])
        if code == 0:
            return []
        if code > 0:
            d = int(durations[code - 1])
            t -= d
            arcs.append((t, u, blank, d))
        else:
            d = int(durations[-code - 1])
            t -= d
            u -= 1
            arcs.append((t, u, int(labels[u]), d))
    arcs.reverse()
    return arcs


def negative_loss_tolerance(T, U, float64=False, input_eps=0.0):
    """``lattice.negative_loss_tolerance`` for a TDT path: each arc adds two rounded
    log-probs (token and duration), so twice the RNN-T allowance."""
    from .lattice import negative_loss_tolerance as rnnt_tolerance

    return 2.0 * rnnt_tolerance(T, U, float64, input_eps)
