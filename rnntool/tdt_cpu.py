"""Numba CPU kernels of the TDT loss: the engine's three stages on the duration lattice.

Twins of ``tdt_cuda.py`` (every ``cpu_X`` here has its ``cuda_X`` there); the
per-node rules of ``tdt_lattice.py`` are compiled by both. The float helpers and
storage types are ``cpu.py``'s (``floatbits.py``): the same bits rules hold.

1. ``cpu_normalise``  one pass over the ``V + D`` logits of each node, one (b, t)
                      frame per parallel iteration: the blank and next-label
                      log-probs (minus sigma), the ``D`` duration log-probs, and the
                      token log-normaliser for stage 3.
2. ``cpu_alpha_beta`` alpha (and, for a gradient, beta) over the duration lattice,
                      one utterance per thread: frames in order, label positions in
                      order within a frame (the ``d = 0`` label arc stays in its frame).
3. ``cpu_gradient``   one fused pass over ``V + D`` per node, in ``backward()``.

``cpu_viterbi`` is stage 2's max-product twin, for alignments. ``cpu_forward``
(stages 1-2), ``cpu_backward`` (3), ``cpu_best_path`` (Viterbi) and
``cpu_forward_compact`` (stage 2 on a lattice dump's arrays) make ``TDT_ENGINE``.

Shapes: ``B`` utterances padded to ``T`` frames and ``U1 = U+1`` label positions,
``V`` tokens then ``D`` durations along the last dim. Every sum runs in an order
fixed by the shapes alone, so an utterance's bits do not depend on the batch,
the strides or the thread count.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from numba import njit, prange

from . import tdt_lattice as rules
from .cpu import _token_gradient, lattice_dtype, storage_view
from .floatbits import LANES, exp, like, load, row_max, store, sum_exp
from .lattice import log_prob, logaddexp
from .tdt_lattice import TDTEngine, TDTOptions, TDTState
from .threads import kernel_lock, select_layer

select_layer()

_PAR = dict(parallel=True, cache=True, nogil=True, error_model="numpy")

_lae = njit(cache=True)(logaddexp)
_log_prob = njit(cache=True)(log_prob)
# Rules that take arrays are inlined (as calls they would pay reference counting per node).
_inline = njit(inline="always", error_model="numpy")
_into_from_earlier = rules.compiled(rules.into_from_earlier, _inline, _lae=_lae)
_same_frame_arc = rules.compiled(rules.same_frame_arc, _inline)
_out_to_later = rules.compiled(rules.out_to_later, _inline, _lae=_lae)
_final_blanks = rules.compiled(rules.final_blanks, _inline, _lae=_lae)
_arc_posteriors = rules.compiled(rules.arc_posteriors, _inline)
_best_blank_into = rules.compiled(rules.best_blank_into, _inline)
_best_label_into = rules.compiled(rules.best_label_into, _inline)
_best_final_blank = rules.compiled(rules.best_final_blank, _inline)


# --------------------------------------------------------------------------- stage 1
@njit(**_PAR)
def cpu_normalise(logits, targets, logit_lengths, target_lengths, blank, V, sigma, fused,
                  keep_lse, lse, blank_lp, emit_lp, dur_lp, bad_row):
    """Stage 1: per node, ``blank_lp``, ``emit_lp`` ``(B, T, U1)`` (token log-prob minus
    ``sigma``; ``-inf`` where u = U_b or outside the lengths) and ``dur_lp``
    ``(B, T, U1, D)`` (duration log-probs), in the lattice float type.

    logits ``(B, T, U1, V + D)`` storage array (tokens ``[0, V)``, durations
    ``[V, V + D)``); targets ``(B, S)``, lengths ``(B,)`` int64. Tokens and durations
    are normalised separately, each as ``(x - max) - logsum``. With ``keep_lse``,
    ``lse`` ``(B, T, U1, 2)``: the token normaliser (row max, log-sum), zeros when not
    ``fused``. ``bad_row[b, t, u]``: NaN or +inf among the ``V + D`` logits, or (fused)
    tokens or durations all ``-inf``.
    """
    B, T, U1, _ = logits.shape
    D = dur_lp.shape[3]
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        scratch = np.empty(2 * LANES, blank_lp.dtype)
        for u in range(U1):
            if t >= logit_lengths[b] or u > target_lengths[b]:
                blank_lp[b, t, u] = -np.inf
                emit_lp[b, t, u] = -np.inf
                for i in range(D):
                    dur_lp[b, t, u, i] = -np.inf
                continue
            row = logits[b, t, u]
            tokens = row[:V]
            durs = row[V:]
            m, nonfinite = row_max(tokens)
            dm, dur_nonfinite = row_max(durs)
            nonfinite |= dur_nonfinite
            nonfinite |= fused and (m == -np.inf or dm == -np.inf)  # no distribution
            hi = like(m, 0.0)
            lo = like(m, 0.0)
            dhi = like(m, 0.0)
            dlo = like(m, 0.0)
            if fused and not nonfinite:
                hi = m
                lo = math.log(sum_exp(tokens, m, scratch))
                dhi = dm
                dlo = math.log(sum_exp(durs, dm, scratch))
            if nonfinite:
                lo = like(m, np.nan)
                dlo = like(m, np.nan)
            bad_row[b, t, u] = nonfinite
            if keep_lse:
                lse[b, t, u, 0] = hi
                lse[b, t, u, 1] = lo
            s = like(m, sigma)
            blank_lp[b, t, u] = _log_prob(load(tokens, blank), hi, lo) - s
            if u < target_lengths[b]:
                emit_lp[b, t, u] = _log_prob(load(tokens, targets[b, u]), hi, lo) - s
            else:
                emit_lp[b, t, u] = -np.inf
            for i in range(D):
                dur_lp[b, t, u, i] = _log_prob(load(durs, i), dhi, dlo)


# --------------------------------------------------------------------------- stage 2
@njit(**_PAR)
def cpu_alpha_beta(blank_lp, emit_lp, dur_lp, durations, logit_lengths, target_lengths,
                   with_beta, alpha, beta, log_like):
    """Stage 2: alpha (and with ``with_beta`` beta) ``(B, T, U1)`` float64 over the
    duration lattice, one utterance per thread; ``log_like[b]`` = log P(y|x).

    alpha(t, u) sums the arcs from earlier frames (``tdt_lattice.into_from_earlier``)
    and then the ``d = 0`` label arc from (t, u-1), so within a frame u runs upwards;
    beta mirrors it (frames and u downwards). Nodes outside the lengths stay -inf.
    """
    B = blank_lp.shape[0]
    for b in prange(B):
        Tb = logit_lengths[b]
        Ub = target_lengths[b]
        alpha[b] = -np.inf
        for t in range(Tb):
            for u in range(Ub + 1):
                acc = _into_from_earlier(alpha, blank_lp, emit_lp, dur_lp, durations, b, t, u)
                if u > 0:
                    acc = _lae(acc, alpha[b, t, u - 1] + _same_frame_arc(emit_lp, dur_lp, b,
                                                                         t, u - 1))
                alpha[b, t, u] = acc
        log_like[b] = _final_blanks(alpha, blank_lp, dur_lp, durations, b, Tb, Ub)
        if not with_beta:
            continue
        beta[b] = -np.inf
        for t in range(Tb - 1, -1, -1):
            for u in range(Ub, -1, -1):
                acc = _out_to_later(beta, blank_lp, emit_lp, dur_lp, durations, b, t, u, Tb,
                                    Ub)
                if u < Ub:
                    acc = _lae(acc, _same_frame_arc(emit_lp, dur_lp, b, t, u)
                               + beta[b, t, u + 1])
                beta[b, t, u] = acc


@njit(**_PAR)
def cpu_viterbi(blank_lp, emit_lp, dur_lp, durations, logit_lengths, target_lengths, delta,
                from_arc, best, last):
    """The max-product twin of stage 2: ``delta`` ``(B, T, U1)`` float64, the best path's
    log-prob into each node, and ``from_arc`` ``(B, T, U1)`` int8, the code of the arc it
    came by (``tdt_lattice``: ``i + 1`` blank, ``-(i + 1)`` label of duration index i,
    0 none); ``best[b]`` the best complete path's log-prob, ``last[b]`` the duration
    index of its final blank.

    Ties: blanks by ascending duration, then labels by ascending duration (``d = 0``
    first), a later arc only if strictly better: a blank beats a label, a shorter jump
    a longer one (``tdt_reference.tdt_reference_viterbi``'s order).
    """
    B = blank_lp.shape[0]
    for b in prange(B):
        Tb = logit_lengths[b]
        Ub = target_lengths[b]
        for t in range(Tb):
            for u in range(Ub + 1):
                if t == 0 and u == 0:
                    delta[b, 0, 0] = 0.0
                    from_arc[b, 0, 0] = 0
                    continue
                score, code = _best_blank_into(delta, blank_lp, dur_lp, durations, b, t, u)
                if u > 0:
                    c = delta[b, t, u - 1] + _same_frame_arc(emit_lp, dur_lp, b, t, u - 1)
                    if c > score:
                        score = c
                        code = -1
                    c, k = _best_label_into(delta, emit_lp, dur_lp, durations, b, t, u, 1)
                    if c > score:
                        score = c
                        code = k
                delta[b, t, u] = score
                from_arc[b, t, u] = code
        best[b], last[b] = _best_final_blank(delta, blank_lp, dur_lp, durations, b, Tb, Ub)


# --------------------------------------------------------------------------- stage 3
@njit(**_PAR)
def cpu_gradient(logits, targets, logit_lengths, target_lengths, blank, V, fused, lse,
                 blank_lp, emit_lp, dur_lp, durations, alpha, beta, log_like, scale,
                 fastemit_lambda, clamp, grad):
    """Stage 3: ``grad = scale[b] * d loss_b / d logits`` ``(B, T, U1, V + D)``, one fused
    pass over ``V + D`` per node, the token part clipped to ``[-clamp, clamp]``.

    With P_blank, P_label the summed posteriors of the blank and label arcs out of
    (t, u), post_i those of the two arcs of duration i and w = 1 + fastemit_lambda:
    token k gets ``softmax_k * (P_blank + w P_label) - [k == blank] P_blank
    - [k == y_{u+1}] w P_label``, duration i ``Q_i * (P_blank + P_label) - post_i``
    (FastEmit scales the label arcs' token log-prob only, as NeMo's TDT kernel; no
    softmax terms without ``fused``). ``clamp <= 0``: off.
    Every entry is written: padding and utterances with a non-finite loss get zeros.
    """
    B, T, U1, _ = logits.shape
    D = durations.shape[0]
    emit_w = 1.0 + fastemit_lambda
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        post = np.empty(D, np.float64)
        Tb = logit_lengths[b]
        Ub = target_lengths[b]
        ll = log_like[b]
        for u in range(U1):
            row = logits[b, t, u]
            out = grad[b, t, u]
            if t >= Tb or u > Ub or not (abs(ll) < np.inf):
                for v in range(row.shape[0]):
                    store(out, v, 0.0)
                continue
            p_blank = 0.0
            p_label = 0.0
            for i in range(D):
                pb, pl = _arc_posteriors(alpha, beta, blank_lp, emit_lp, dur_lp, durations,
                                         b, t, u, i, Tb, Ub, ll)
                post[i] = pb + pl
                p_blank += pb
                p_label += pl
            y = targets[b, u] if u < Ub else -1
            hi = lse[b, t, u, 0]
            lo = lse[b, t, u, 1]
            _token_gradient(row[:V], out[:V], blank, y, fused, hi, lo, p_blank,
                            emit_w * p_label, scale[b], clamp)
            occ = p_blank + p_label
            s = like(hi, scale[b])
            for i in range(D):
                g = like(hi, 0.0)
                if fused:
                    g = exp(dur_lp[b, t, u, i]) * like(hi, occ)
                store(out, V + i, (g - like(hi, post[i])) * s)


# --------------------------------------------------------------------------- host side
def cpu_check_device(logits) -> None:
    """Raise unless ``logits`` is a CPU tensor."""
    if logits.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors; logits are on {logits.device}")


def _durations_array(durations) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(durations, dtype=np.int64))


def _index_arrays(targets, logit_lengths, target_lengths):
    """Targets and lengths as the kernels read them: contiguous int64 numpy (no copy
    when they already are)."""
    return tuple(np.ascontiguousarray(np.asarray(a), dtype=np.int64)
                 for a in (targets, logit_lengths, target_lengths))


def cpu_forward(logits, targets, logit_lengths, target_lengths, opts: TDTOptions,
                keep_state: bool) -> TDTState:
    """Stages 1 and 2 on the CPU.

    logits ``(B, T, U1, V + D)`` torch tensor (any float dtype, any strides) or numpy
    array, with ``D = len(opts.durations)``; targets ``(B, S)`` and lengths ``(B,)``
    already validated. The state's arrays are numpy.
    """
    x = storage_view(logits)
    B, T, U1, VD = x.shape
    durations = _durations_array(opts.durations)
    D = durations.shape[0]
    lat = lattice_dtype(x)
    targets, logit_lengths, target_lengths = _index_arrays(targets, logit_lengths,
                                                           target_lengths)
    blank_lp = np.empty((B, T, U1), lat)
    emit_lp = np.empty((B, T, U1), lat)
    dur_lp = np.empty((B, T, U1, D), lat)
    bad_row = np.zeros((B, T, U1), np.bool_)
    lse = np.empty((B, T, U1, 2) if keep_state else (0, 0, 0, 2), lat)
    with kernel_lock():
        cpu_normalise(x, targets, logit_lengths, target_lengths, opts.blank, VD - D,
                      float(opts.sigma), opts.fused, keep_state, lse, blank_lp, emit_lp, dur_lp,
                      bad_row)
    bad = bad_row.any(axis=(1, 2))
    state = cpu_forward_compact(blank_lp, emit_lp, dur_lp, durations, targets, logit_lengths,
                                target_lengths, keep_state)
    state.log_like[bad] = np.nan
    return dataclasses.replace(state, bad=bad, lse=lse if keep_state else None)


def cpu_backward(logits, state: TDTState, opts: TDTOptions, scale):
    """Stage 3 on the CPU: the gradient ``(B, T, U1, V + D)`` in ``logits``' dtype,
    contiguous. ``scale`` ``(B,)``: d(returned value)/d loss_b times grad_output."""
    import torch

    grad = torch.empty(logits.shape, dtype=logits.dtype)
    V = logits.shape[-1] - state.durations.shape[0]
    with kernel_lock():
        cpu_gradient(
            storage_view(logits), state.targets, state.logit_lengths, state.target_lengths,
            opts.blank, V, opts.fused, state.lse, state.blank_lp, state.emit_lp, state.dur_lp,
            state.durations, state.alpha, state.beta, state.log_like,
            np.ascontiguousarray(np.asarray(scale), dtype=np.float64),
            float(opts.fastemit_lambda), float(opts.clamp), storage_view(grad),
        )
    return grad


def cpu_best_path(state: TDTState):
    """``cpu_viterbi`` on a forward state (kept or not): ``(best (B,), last (B,),
    from_arc (B, T, U1))`` numpy; ``tdt_lattice.backtrack`` turns one utterance's into
    its arcs."""
    B, T, U1 = state.blank_lp.shape
    delta = np.empty((B, T, U1), np.float64)
    from_arc = np.zeros((B, T, U1), np.int8)
    best = np.empty(B, np.float64)
    last = np.zeros(B, np.int64)
    with kernel_lock():
        cpu_viterbi(state.blank_lp, state.emit_lp, state.dur_lp, state.durations,
                    state.logit_lengths, state.target_lengths, delta, from_arc, best, last)
    return best, last, from_arc


def cpu_forward_compact(blank_lp, emit_lp, dur_lp, durations, targets, logit_lengths,
                        target_lengths, keep_state: bool) -> TDTState:
    """Stage 2 alone on a TDT lattice dump's padded arrays: ``blank_lp``, ``emit_lp``
    ``(B, T, U1)`` and ``dur_lp`` ``(B, T, U1, D)`` numpy float32/float64 (entries
    outside the lengths, and ``emit_lp`` at u = U_b, are never read); ``durations``
    ``(D,)``; targets and lengths as for ``cpu_forward``. Returns the state
    ``cpu_forward`` gives for the logits the arrays came from (the same bits: stage 2
    reads nothing else), ``lse`` None, ``bad`` where the loss is NaN."""
    durations = _durations_array(durations)
    targets, logit_lengths, target_lengths = _index_arrays(targets, logit_lengths,
                                                           target_lengths)
    B, T, U1 = blank_lp.shape
    alpha = np.empty((B, T, U1), np.float64)
    beta = np.empty((B, T, U1) if keep_state else (0, 0, 0), np.float64)
    log_like = np.empty(B, np.float64)
    with kernel_lock():
        cpu_alpha_beta(blank_lp, emit_lp, dur_lp, durations, logit_lengths, target_lengths,
                       keep_state, alpha, beta, log_like)
    return TDTState(
        log_like=log_like, bad=np.isnan(log_like), blank_lp=blank_lp, emit_lp=emit_lp,
        dur_lp=dur_lp, durations=durations, targets=targets, logit_lengths=logit_lengths,
        target_lengths=target_lengths, alpha=alpha if keep_state else None,
        beta=beta if keep_state else None,
    )


TDT_ENGINE = TDTEngine(name="cpu", check_device=cpu_check_device, forward=cpu_forward,
                       backward=cpu_backward, best_path=cpu_best_path, guards_indices=False,
                       forward_compact=cpu_forward_compact)
