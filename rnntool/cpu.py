"""Numba CPU kernels of the loss engine: the three stages of DESIGN.md.

Twins of ``cuda.py``: every stage function ``cpu_X`` here has its mirror
``cuda_X`` there, on the same arrays, and the per-node rules of ``lattice.py``
are compiled by both (``engine.py`` maps the two side by side).

1. ``cpu_normalise``   one pass over V per lattice node, one (b, t) frame per
                       parallel iteration: the compact log-probs.
2. ``cpu_alpha_beta``  forward-backward over the compact arrays, one utterance
                       per thread; ``cpu_alpha_loss`` is the forward-only variant
                       that keeps one row of alpha, for scoring without gradients;
                       ``cpu_viterbi`` the max-product twin, for alignments.
3. ``cpu_gradient``    one fused pass over V per node, in ``backward()``.

``cpu_forward`` (stages 1-2), ``cpu_backward`` (3) and ``cpu_best_path``
(Viterbi) make this module's ``ENGINE``. The bit-level float helpers under the
stages live in ``floatbits.py``.

Shapes: ``B`` utterances, padded to ``T`` frames and ``U1 = U+1`` label
positions, vocabulary ``V``. Logits arrive in their *storage* type:
float32 or float64 as they are, float16 as its bits in a ``uint16`` array and
bfloat16 as its bits in an ``int16`` array (numba has no half types on the CPU;
``floatbits.py`` reads and writes them). Stages 1 and 3 compute in float64 for
float64 input and float32 otherwise; stage 2 (alpha, beta, log P) always in float64.

``-inf`` logits (masked tokens) are legal, so no fastmath flag that assumes
finite values is used, and none that re-associates: every sum runs in an order
fixed by the shapes alone, so an utterance's bits do not depend on the CPU's
vector width, the arrays' strides, the batch it shares or the thread count.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from numba import njit, prange

from . import lattice
from .engine import Engine, ForwardState, LatticeTerms, LossOptions
from .floatbits import LANES, exp, like, load, row_max, store, sum_exp, sum_sq_probs
from .threads import kernel_lock, select_layer

select_layer()

# error_model="numpy": IEEE results for x/0 rather than exceptions (and no checks in hot loops).
_PAR = dict(parallel=True, cache=True, nogil=True, error_model="numpy")

_logaddexp = njit(cache=True)(lattice.logaddexp)
_emission_wins = njit(cache=True)(lattice.emission_wins)
_log_prob = njit(cache=True)(lattice.log_prob)
# Rules that take arrays are inlined by numba: as calls, each would pay for the
# arrays' reference counting at every node (a Viterbi step 10 times slower).
_arcs_into = njit(cache=True, inline="always")(lattice.arcs_into)
_arcs_out = njit(cache=True, inline="always")(lattice.arcs_out)
_arc_posteriors = njit(cache=True, inline="always")(lattice.arc_posteriors)


# --------------------------------------------------------------------------- stage 1
@njit(**_PAR)
def cpu_normalise(logits, targets, logit_lengths, target_lengths, blank, fused, keep_lse,
                  lse, keep_p2, log_p2, blank_lp, emit_lp, bad_row):
    """Stage 1: the two log-probs the lattice needs, one pass over V per node.

    logits: ``(B, T, U1, V)`` storage array; targets ``(B, S)`` int64;
    logit_lengths, target_lengths ``(B,)`` int64. Writes, in the lattice float type:
    ``(B, T, U1)`` ``blank_lp`` and ``emit_lp`` (-inf where u = U_b or outside the
    lengths), computed as ``(x - max) - logsum`` so that float32 keeps its
    precision for large logits; with ``keep_lse``, ``lse`` ``(B, T, U1, 2)``, the
    log-normaliser split as (row max, log of the sum of exp(x - max)), zeros when
    ``fused`` is False (without it ``lse`` is never touched); with ``keep_p2``,
    ``log_p2`` ``(B, T, U1)``: log of the sum of p_v**2 over every v but the blank
    and y_{u+1} (a lattice dump's third array, from which the per-node gradient
    norm follows; NaN for a bad row, -inf outside the lengths). ``bad_row[b, t, u]``
    is set where the row holds NaN or +inf: the loss of that utterance is NaN.
    """
    B, T, U1, V = logits.shape
    # One (b, t) frame per iteration: no divisions per node, rows read in order.
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        scratch = np.empty(2 * LANES, blank_lp.dtype)
        for u in range(U1):
            if t >= logit_lengths[b] or u > target_lengths[b]:
                blank_lp[b, t, u] = -np.inf
                emit_lp[b, t, u] = -np.inf
                if keep_p2:
                    log_p2[b, t, u] = -np.inf
            else:
                _normalise_node(logits[b, t, u], targets, b, t, u, target_lengths[b], blank,
                                fused, keep_lse, lse, keep_p2, log_p2, blank_lp, emit_lp,
                                bad_row, scratch)


@njit(cache=True, error_model="numpy", inline="always")
def _normalise_node(row, targets, b, t, u, Ub, blank, fused, keep_lse, lse, keep_p2, log_p2,
                    blank_lp, emit_lp, bad_row, scratch):
    """Stage 1 for one node: ``row`` is its ``(V,)`` logits."""
    m, nonfinite = row_max(row)
    hi = like(m, 0.0)
    lo = like(m, 0.0)
    nonfinite |= fused and m == -np.inf  # all -inf: no distribution
    if fused and not nonfinite:
        hi = m
        lo = math.log(sum_exp(row, m, scratch))
    if nonfinite:
        lo = like(m, np.nan)
    bad_row[b, t, u] = nonfinite
    if keep_lse:
        lse[b, t, u, 0] = hi
        lse[b, t, u, 1] = lo
    blank_lp[b, t, u] = _log_prob(load(row, blank), hi, lo)
    y = -1
    if u < Ub:
        y = targets[b, u]
        emit_lp[b, t, u] = _log_prob(load(row, y), hi, lo)
    else:
        emit_lp[b, t, u] = -np.inf
    if keep_p2:
        log_p2[b, t, u] = lo if nonfinite else math.log(sum_sq_probs(row, hi, lo, blank, y,
                                                                      scratch))


# --------------------------------------------------------------------------- stage 2
@njit(**_PAR)
def cpu_alpha_beta(blank_lp, emit_lp, logit_lengths, target_lengths, alpha, beta, log_like):
    """Stage 2: alpha and beta ``(B, T, U1)`` over the compact arrays; one utterance per thread.

    ``log_like[b] = alpha[T_b-1, U_b] + blank_lp[T_b-1, U_b]`` (= log P(y|x)).
    Nodes outside the lengths are left -inf. ``alpha``, ``beta`` and ``log_like``
    are float64 whatever the compact arrays' type: on a long lattice they reach
    thousands of nats, where float32 keeps only ~1e-4 absolute, and the gradient's
    posteriors ``exp(alpha + beta - log P)`` would carry that error (and its drift
    along the lattice). float64 costs O(B*T*U) and nothing per V.
    """
    B, T, U1 = blank_lp.shape
    for b in prange(B):
        Tb = logit_lengths[b]
        Ub = target_lengths[b]
        alpha[b] = -np.inf
        beta[b] = -np.inf
        for t in range(Tb):
            for u in range(Ub + 1):
                a, e = _arcs_into(alpha, blank_lp, emit_lp, b, t, u)
                alpha[b, t, u] = _logaddexp(a, e)
        for t in range(Tb - 1, -1, -1):
            for u in range(Ub, -1, -1):
                a, e = _arcs_out(beta, blank_lp, emit_lp, b, t, u, Tb, Ub)
                beta[b, t, u] = _logaddexp(a, e)
        log_like[b] = alpha[b, Tb - 1, Ub] + blank_lp[b, Tb - 1, Ub]


@njit(**_PAR)
def cpu_alpha_loss(blank_lp, emit_lp, logit_lengths, target_lengths, log_like):
    """Stage 2 without gradients: alpha keeping one row of ``U1`` per utterance.

    Writes only ``log_like[b] = log P(y|x)`` (float64, as in ``cpu_alpha_beta``);
    O(B * U1) scratch memory.
    """
    B, T, U1 = blank_lp.shape
    for b in prange(B):
        Tb = logit_lengths[b]
        Ub = target_lengths[b]
        row = np.empty(Ub + 1, dtype=np.float64)
        row[0] = 0.0
        for u in range(1, Ub + 1):
            row[u] = row[u - 1] + emit_lp[b, 0, u - 1]
        for t in range(1, Tb):
            row[0] = row[0] + blank_lp[b, t - 1, 0]
            for u in range(1, Ub + 1):
                row[u] = _logaddexp(
                    row[u] + blank_lp[b, t - 1, u], row[u - 1] + emit_lp[b, t, u - 1]
                )
        log_like[b] = row[Ub] + blank_lp[b, Tb - 1, Ub]


@njit(**_PAR)
def cpu_viterbi(blank_lp, emit_lp, logit_lengths, target_lengths, delta, from_emit, best):
    """The max-product twin of stage 2: the best alignment's log-prob into each node.

    Writes ``delta`` ``(B, T, U1)``, ``from_emit`` ``(B, T, U1)`` uint8 (1 where
    the best way into (t, u) is the emission from (t, u-1), 0 for the blank from
    (t-1, u); ties go to the blank, on every backend) and ``best[b]``, the best
    path's log-prob ``delta[T_b-1, U_b] + blank_lp[T_b-1, U_b]``.
    """
    B, T, U1 = blank_lp.shape
    for b in prange(B):
        Tb = logit_lengths[b]
        Ub = target_lengths[b]
        for t in range(Tb):
            for u in range(Ub + 1):
                a, e = _arcs_into(delta, blank_lp, emit_lp, b, t, u)
                if _emission_wins(a, e, t, u):
                    delta[b, t, u] = e
                    from_emit[b, t, u] = 1
                else:
                    delta[b, t, u] = a
                    from_emit[b, t, u] = 0
        best[b] = delta[b, Tb - 1, Ub] + blank_lp[b, Tb - 1, Ub]


# --------------------------------------------------------------------------- stage 3
@njit(**_PAR)
def cpu_gradient(
    logits, targets, logit_lengths, target_lengths, blank, fused, lse, blank_lp, emit_lp,
    alpha, beta, log_like, scale, fastemit_lambda, clamp, grad,
):
    """Stage 3: ``grad = scale[b] * clip(d loss_b / d logits)``, one fused pass over V per node.

    d loss_b / d x[v] = softmax[v] * (P_blank + (1+l) P_emit) - [v==blank] P_blank
    - [v==y_u] (1+l) P_emit, with P_* the posteriors of the two arcs leaving
    (t, u) and l the FastEmit lambda (without ``fused`` the softmax term is
    absent). ``clamp`` <= 0 means no clipping. ``grad`` has the storage type
    and shape ``(B, T, U1, V)`` of ``logits``; every entry is written, padding
    and utterances with a non-finite loss get zeros.
    """
    B, T, U1, V = logits.shape
    # One (b, t) frame per iteration, as in stage 1.
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        for u in range(U1):
            _gradient_node(logits[b, t, u], grad[b, t, u], targets, b, t, u, logit_lengths[b],
                           target_lengths[b], blank, fused, lse, blank_lp, emit_lp, alpha, beta,
                           log_like[b], scale[b], 1.0 + fastemit_lambda, clamp)


@njit(cache=True, error_model="numpy", inline="always")
def _gradient_node(row, out, targets, b, t, u, Tb, Ub, blank, fused, lse, blank_lp, emit_lp,
                   alpha, beta, ll, scale_b, emit_w, clamp):
    """Stage 3 for one node: ``row``, ``out`` are its ``(V,)`` logits and gradient."""
    V = row.shape[0]
    if t >= Tb or u > Ub or not (abs(ll) < np.inf):
        for v in range(V):
            store(out, v, 0.0)
        return
    p_blank, p_emit = _arc_posteriors(alpha, beta, blank_lp, emit_lp, b, t, u, Tb, Ub, ll,
                                      emit_w)
    y = targets[b, u] if u < Ub else -1
    _token_gradient(row, out, blank, y, fused, lse[b, t, u, 0], lse[b, t, u, 1], p_blank,
                    p_emit, scale_b, clamp)


@njit(cache=True, error_model="numpy", inline="always")
def _token_gradient(row, out, blank, y, fused, hi, lo, p_blank, p_emit, scale_b, clamp):
    """The token part of stage 3 for one node: ``row``, ``out`` its ``(V,)`` logits and
    gradient, ``(hi, lo)`` its token normaliser, ``p_blank``, ``p_emit`` the posteriors
    of its blank and label arcs (FastEmit's weight already in ``p_emit``), ``y`` the
    next label or -1 at u = U_b. Shared with ``tdt_cpu.cpu_gradient``."""
    V = row.shape[0]
    s = like(hi, scale_b)
    zero = like(hi, 0.0)
    occ = like(hi, p_blank + p_emit)
    c = like(hi, clamp)
    # Branches outside the loops over V, so that each loop vectorises.
    if not fused:
        for v in range(V):
            store(out, v, zero)
    elif clamp > 0:
        for v in range(V):
            g = exp(_log_prob(load(row, v), hi, lo)) * occ
            store(out, v, min(max(g, -c), c) * s)
    else:
        occ_s = occ * s
        for v in range(V):
            store(out, v, exp(_log_prob(load(row, v), hi, lo)) * occ_s)
    # The two arcs' own terms: recompute those entries from scratch.
    for k in range(2):
        v = blank if k == 0 else y
        if v < 0:
            continue
        g = zero
        if fused:
            g = exp(_log_prob(load(row, v), hi, lo)) * occ
        g = g - like(hi, p_blank if k == 0 else p_emit)
        if clamp > 0:
            g = min(max(g, -c), c)
        store(out, v, g * s)


# --------------------------------------------------------------------------- host side
def storage_view(x):
    """A view of ``x`` (torch tensor or numpy array) in the storage types the kernels take.

    No copy: float16 becomes its uint16 bits, bfloat16 its int16 bits.
    """
    if isinstance(x, np.ndarray):
        return x.view(np.uint16) if x.dtype == np.float16 else x
    import torch

    x = x.detach()
    if x.dtype == torch.float16:
        return x.view(torch.int16).numpy().view(np.uint16)
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy()
    return x.numpy()


def lattice_dtype(x: np.ndarray):
    """The float type of stages 1 and 3 for storage array ``x``: float64 for float64
    logits, float32 otherwise."""
    return np.float64 if x.dtype == np.float64 else np.float32


def cpu_check_device(logits) -> None:
    """Raise unless ``logits`` is a CPU tensor."""
    if logits.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors; logits are on {logits.device}")


def _index_arrays(targets, logit_lengths, target_lengths):
    return tuple(np.asarray(a) for a in (targets, logit_lengths, target_lengths))


def cpu_forward(logits, targets, logit_lengths, target_lengths, opts: LossOptions,
                keep_state: bool) -> ForwardState:
    """Stages 1 and 2 on the CPU.

    logits: ``(B, T, U1, V)`` torch tensor (any float dtype, any strides) or numpy
    array; targets ``(B, S)`` and lengths ``(B,)`` int64 tensors or arrays, already
    validated (``loss.check_inputs``). Takes numpy alone without importing torch
    (``rnntool score``). The state's arrays are numpy.
    """
    x = storage_view(logits)
    B, T, U1, _ = x.shape
    lat = lattice_dtype(x)
    targets, logit_lengths, target_lengths = _index_arrays(targets, logit_lengths,
                                                           target_lengths)
    blank_lp = np.empty((B, T, U1), lat)
    emit_lp = np.empty((B, T, U1), lat)
    bad_row = np.zeros((B, T, U1), np.bool_)
    lse = np.empty((B, T, U1, 2) if keep_state else (0, 0, 0, 2), lat)
    with kernel_lock():
        cpu_normalise(x, targets, logit_lengths, target_lengths, opts.blank, opts.fused,
                      keep_state, lse, False, np.empty((0, 0, 0), lat), blank_lp, emit_lp,
                      bad_row)
    bad = bad_row.any(axis=(1, 2))  # (also for B = 0, where reshape(B, -1) fails)
    state = cpu_forward_compact(blank_lp, emit_lp, targets, logit_lengths, target_lengths,
                                keep_state)
    state.log_like[bad] = np.nan
    return dataclasses.replace(state, bad=bad, lse=lse if keep_state else None)


def cpu_forward_compact(blank_lp, emit_lp, targets, logit_lengths, target_lengths,
                        keep_state: bool) -> ForwardState:
    """Stage 2 on compact arrays, as a lattice dump stores them.

    ``blank_lp``, ``emit_lp`` ``(B, T, U1)`` numpy float32/float64 (``emit_lp``'s
    column ``U_b`` and everything outside the lengths is never read); targets and
    lengths as for ``cpu_forward``. Returns the state ``cpu_forward`` would (``bad``
    marks NaN losses, ``lse`` None): on the arrays stage 1 wrote, the same bits.
    """
    targets, logit_lengths, target_lengths = _index_arrays(targets, logit_lengths,
                                                           target_lengths)
    B, T, U1 = blank_lp.shape
    log_like = np.empty(B, np.float64)
    alpha = beta = None
    with kernel_lock():
        # Stage 2 always runs in float64 (see cpu_alpha_beta).
        if keep_state:
            alpha = np.empty((B, T, U1), np.float64)
            beta = np.empty((B, T, U1), np.float64)
            cpu_alpha_beta(blank_lp, emit_lp, logit_lengths, target_lengths, alpha, beta,
                           log_like)
        else:
            cpu_alpha_loss(blank_lp, emit_lp, logit_lengths, target_lengths, log_like)
    return ForwardState(
        log_like=log_like, bad=np.isnan(log_like), blank_lp=blank_lp, emit_lp=emit_lp,
        targets=targets, logit_lengths=logit_lengths, target_lengths=target_lengths,
        alpha=alpha, beta=beta,
    )


def cpu_lattice_terms(logits, targets, logit_lengths, target_lengths,
                      opts: LossOptions) -> LatticeTerms:
    """Stage 1 with the third array of a lattice dump, on the CPU: ``LatticeTerms`` of
    numpy arrays. Inputs as for ``cpu_forward`` (validated)."""
    x = storage_view(logits)
    B, T, U1, _ = x.shape
    lat = lattice_dtype(x)
    targets, logit_lengths, target_lengths = _index_arrays(targets, logit_lengths,
                                                           target_lengths)
    blank_lp, emit_lp, log_p2 = (np.empty((B, T, U1), lat) for _ in range(3))
    bad_row = np.zeros((B, T, U1), np.bool_)
    with kernel_lock():
        cpu_normalise(x, targets, logit_lengths, target_lengths, opts.blank, opts.fused,
                      False, np.empty((0, 0, 0, 2), lat), True, log_p2, blank_lp, emit_lp,
                      bad_row)
    return LatticeTerms(blank_lp, emit_lp, log_p2, bad_row.any(axis=(1, 2)))


def cpu_backward(logits, state: ForwardState, opts: LossOptions, scale):
    """Stage 3 on the CPU: the gradient ``(B, T, U1, V)`` in ``logits``' dtype, contiguous.

    ``scale`` ``(B,)`` (torch or numpy): d(returned value)/d loss_b times grad_output.
    """
    import torch

    grad = torch.empty(logits.shape, dtype=logits.dtype)
    with kernel_lock():
        cpu_gradient(
            storage_view(logits), state.targets, state.logit_lengths, state.target_lengths,
            opts.blank, opts.fused, state.lse, state.blank_lp, state.emit_lp, state.alpha,
            state.beta, state.log_like,
            np.ascontiguousarray(np.asarray(scale), dtype=state.lse.dtype),
            float(opts.fastemit_lambda), float(opts.clamp), storage_view(grad),
        )
    return grad


def cpu_best_path(state: ForwardState):
    """``cpu_viterbi`` on a kept state: ``(best (B,), from_emit (B, T, U1))``."""
    blank_lp = state.blank_lp
    delta = np.empty(blank_lp.shape, np.float64)
    from_emit = np.zeros(blank_lp.shape, np.uint8)
    best = np.empty(blank_lp.shape[0], np.float64)
    with kernel_lock():
        cpu_viterbi(blank_lp, state.emit_lp, state.logit_lengths, state.target_lengths, delta,
                    from_emit, best)
    return best, from_emit


ENGINE = Engine(
    name="cpu", check_device=cpu_check_device, forward=cpu_forward, backward=cpu_backward,
    best_path=cpu_best_path, guards_indices=False, lattice_terms=cpu_lattice_terms,
    forward_compact=cpu_forward_compact,
)
