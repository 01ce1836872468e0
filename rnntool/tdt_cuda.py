"""Numba CUDA kernels of the TDT loss: the engine's three stages on the duration lattice.

Twins of ``tdt_cpu.py`` (every ``cuda_X`` here has its ``cpu_X`` there); the
per-node rules of ``tdt_lattice.py`` are compiled by both. Storage types, launch
shapes (``cuda.CONFIG``), streams and the simulator are ``cuda.py``'s.

1. ``cuda_normalise``  a ``(threads_v, rows)`` block handles ``rows`` nodes, the
                       ``threads_v`` threads striding the ``V`` token logits with
                       coalesced reads (``cuda._block_max``/``_block_sum``); one
                       thread per node then normalises its ``D`` duration logits.
2. ``cuda_alpha_beta`` one block per utterance, frame by frame (schedule below);
                       ``cuda_viterbi`` its max-product twin, for alignments.
3. ``cuda_gradient``   one fused pass over ``V + D`` per node.

The stage-2 schedule. RNN-T's anti-diagonals do not work here: a blank or label
arc may jump ``d`` frames, and a ``d = 0`` label arc stays in its frame, so the
nodes of one anti-diagonal depend on each other. What does hold: every arc into
frame ``t`` comes from a frame ``< t``, except the ``d = 0`` label arc from
``(t, u-1)``. So one block per utterance walks the frames in order; within frame
``t``:

- the block's threads compute, for all ``u`` in parallel (chunks of ``blockDim``),
  ``a_u``, the log-sum of the arcs from earlier frames (finished before, behind a
  ``syncthreads()``), and ``b_u``, the log-prob of the ``d = 0`` arc from
  ``(t, u-1)``;
- ``alpha(t, u) = logaddexp(a_u, alpha(t, u-1) + b_u)`` is a first-order linear
  recurrence in the log semiring: ``x -> logaddexp(a_u, x + b_u)`` composes as
  ``(a, b) then (a', b') = (logaddexp(a', a + b'), b + b')``, an associative
  operation, so a block-wide inclusive scan (Hillis-Steele, log2(blockDim) steps
  with ``syncthreads()``) gives every ``alpha(t, u)`` of a chunk at once; the last
  value of a chunk is carried into the next.

beta mirrors it: frames from last to first, the scan along ``u`` downwards. No
thread or block waits on another except at ``syncthreads()``; no atomics or spin
loops; any ``U`` and ``T`` (the chunks loop), any ``B`` (blocks grid-stride).
Work per utterance: ``T * (U+1) * D`` arc terms plus ``T * ceil((U+1)/blockDim)``
scans.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numba
import numpy as np
import torch
from numba import cuda

from . import cuda as _rc
from . import lattice
from . import tdt_lattice as rules
from .tdt_lattice import TDTEngine, TDTOptions, TDTState

# Set per storage kind by ``cuda.storage_kernel`` (stages 1 and 3); never read from here.
_load = _store = lat = None

_device = cuda.jit(device=True, inline=True)
_lae = _device(lattice.logaddexp)
_log_prob = _device(lattice.log_prob)
_into_from_earlier = rules.compiled(rules.into_from_earlier, _device, _lae=_lae)
_same_frame_arc = rules.compiled(rules.same_frame_arc, _device)
_out_to_later = rules.compiled(rules.out_to_later, _device, _lae=_lae)
_final_blanks = rules.compiled(rules.final_blanks, _device, _lae=_lae)
_arc_posteriors = rules.compiled(rules.arc_posteriors, _device)
_best_blank_into = rules.compiled(rules.best_blank_into, _device)
_best_label_into = rules.compiled(rules.best_label_into, _device)
_best_final_blank = rules.compiled(rules.best_final_blank, _device)
_block_max = _rc._block_max
_block_sum = _rc._block_sum
_node = _rc._node


# --------------------------------------------------------------------------- stage 1
def cuda_normalise(logits, targets, logit_lengths, target_lengths, blank, V, sigma, fused,
                   keep_lse, lse, blank_lp, emit_lp, dur_lp, bad_row):
    """Stage 1: ``blank_lp``, ``emit_lp`` ``(B, T, U1)`` (token log-prob minus sigma) and
    ``dur_lp`` ``(B, T, U1, D)``; same arrays and rules as ``tdt_cpu.cpu_normalise``.

    Compiled per storage kind (``cuda.storage_kernel``). ``bad_row`` is uint8 and also
    flags a label outside [0, V) or equal to blank (only without host validation).
    Launch with a ``(threads_v, rows)`` block and ``2 * threads_v * rows`` lattice
    floats of dynamic shared memory.
    """
    B, T, U1, _ = logits.shape
    D = dur_lp.shape[3]
    nodes = B * T * U1
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    nx = cuda.blockDim.x
    ny = cuda.blockDim.y
    buf = cuda.shared.array(0, dtype=lat)
    me = ty * nx + tx
    flags = nx * ny
    start = np.int64(cuda.blockIdx.x) * ny
    step = np.int64(cuda.gridDim.x) * ny
    for base in range(start, nodes, step):
        row = base + ty
        valid = False
        b, t, u = _node(row, T, U1)
        if row < nodes:
            valid = t < logit_lengths[b] and u <= target_lengths[b]
        m = lat(-math.inf)
        flag = lat(0.0)
        if valid:
            x_row = logits[b, t, u]
            for v in range(tx, V + D, nx):  # the flags cover the durations too
                x = _load(x_row, v)
                if not x < math.inf:  # NaN or +inf
                    flag = lat(1.0)
                if v < V and x > m:
                    m = x
        buf[me] = m
        buf[flags + me] = flag
        cuda.syncthreads()
        _block_max(buf, me, flags, tx, nx)
        m = buf[ty * nx]
        nonfinite = buf[flags + ty * nx] > 0.0 or (fused and m == -math.inf)
        cuda.syncthreads()
        total = lat(0.0)
        if valid and fused and not nonfinite:
            x_row = logits[b, t, u]
            for v in range(tx, V, nx):
                total += math.exp(_load(x_row, v) - m)
        buf[me] = total
        cuda.syncthreads()
        _block_sum(buf, me, tx, nx)
        if tx == 0 and row < nodes:
            if not valid:
                blank_lp[b, t, u] = -math.inf
                emit_lp[b, t, u] = -math.inf
                for i in range(D):
                    dur_lp[b, t, u, i] = -math.inf
            else:
                x_row = logits[b, t, u]
                dm = lat(-math.inf)
                for i in range(D):
                    x = _load(x_row, V + i)
                    if x > dm:
                        dm = x
                nonfinite = nonfinite or (fused and dm == -math.inf)
                hi = lat(0.0)
                lo = lat(0.0)
                dhi = lat(0.0)
                dlo = lat(0.0)
                if nonfinite:
                    lo = lat(math.nan)
                    dlo = lat(math.nan)
                elif fused:
                    hi = m
                    lo = math.log(buf[ty * nx])
                    dsum = lat(0.0)
                    for i in range(D):
                        dsum += math.exp(_load(x_row, V + i) - dm)
                    dhi = dm
                    dlo = math.log(dsum)
                if keep_lse:
                    lse[b, t, u, 0] = hi
                    lse[b, t, u, 1] = lo
                s = lat(sigma)
                blank_lp[b, t, u] = _log_prob(_load(x_row, blank), hi, lo) - s
                emit = lat(-math.inf)
                if u < target_lengths[b]:
                    y = targets[b, u]
                    if y < 0 or y >= V or y == blank:  # only without host validation
                        nonfinite = True
                        emit = lat(math.nan)
                    else:
                        emit = _log_prob(_load(x_row, y), hi, lo) - s
                emit_lp[b, t, u] = emit
                for i in range(D):
                    dur_lp[b, t, u, i] = _log_prob(_load(x_row, V + i), dhi, dlo)
                bad_row[b, t, u] = 1 if nonfinite else 0
        cuda.syncthreads()


# --------------------------------------------------------------------------- stage 2
@cuda.jit(device=True, inline=True)
def _chain_scan(buf, tid, n, a, w):
    """Block-wide inclusive scan of the maps ``x -> logaddexp(a_j, x + w_j)`` of a chunk
    of ``n`` elements (thread j holds element j; threads ``>= n`` hold the identity
    ``(-inf, 0)``). Returns thread j's ``a`` of the composition of elements ``0..j``:
    the chain's value at j when element 0 already holds what came before the chunk.
    ``buf``: ``2 * blockDim`` float64 of shared memory; ``buf[n - 1]`` holds the
    chunk's last value afterwards. Fixed order: the same bits on every run."""
    nt = cuda.blockDim.x
    buf[tid] = a
    buf[nt + tid] = w
    cuda.syncthreads()
    s = 1
    while s < n:
        pa = -math.inf
        pw = 0.0
        if tid >= s:
            pa = buf[tid - s]
            pw = buf[nt + tid - s]
        cuda.syncthreads()
        if tid >= s:
            a = _lae(a, pa + w)
            w = pw + w
            buf[tid] = a
            buf[nt + tid] = w
        cuda.syncthreads()
        s *= 2
    return a


@cuda.jit
def cuda_alpha_beta(blank_lp, emit_lp, dur_lp, durations, logit_lengths, target_lengths,
                    with_beta, alpha, beta, log_like):
    """Stage 2: alpha (and with ``with_beta`` beta) ``(B, T, U1)`` float64 and ``log_like``,
    one block per utterance, frame by frame with a scan along u (module docstring).
    Same arrays as ``tdt_cpu.cpu_alpha_beta``; only nodes inside the lengths are
    written. Launch with ``2 * blockDim`` float64 of dynamic shared memory."""
    buf = cuda.shared.array(0, dtype=numba.float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for b in range(cuda.blockIdx.x, blank_lp.shape[0], cuda.gridDim.x):
        Tb = logit_lengths[b]
        Ub = target_lengths[b]
        for t in range(Tb):
            carry = -math.inf
            for base in range(0, Ub + 1, nt):
                n = min(nt, Ub + 1 - base)
                u = base + tid
                a = -math.inf
                w = 0.0
                if tid < n:
                    a = _into_from_earlier(alpha, blank_lp, emit_lp, dur_lp, durations, b, t,
                                           u)
                    if u > 0:
                        w = _same_frame_arc(emit_lp, dur_lp, b, t, u - 1)
                    if tid == 0:  # fold in what came before the chunk
                        a = _lae(a, carry + w)
                        w = -math.inf
                a = _chain_scan(buf, tid, n, a, w)
                if tid < n:
                    alpha[b, t, u] = a
                carry = buf[n - 1]
                cuda.syncthreads()
        if tid == 0:
            log_like[b] = _final_blanks(alpha, blank_lp, dur_lp, durations, b, Tb, Ub)
        if with_beta:
            for t in range(Tb - 1, -1, -1):
                carry = -math.inf
                for base in range(0, Ub + 1, nt):
                    n = min(nt, Ub + 1 - base)
                    u = Ub - base - tid
                    a = -math.inf
                    w = 0.0
                    if tid < n:
                        a = _out_to_later(beta, blank_lp, emit_lp, dur_lp, durations, b, t, u,
                                          Tb, Ub)
                        if u < Ub:
                            w = _same_frame_arc(emit_lp, dur_lp, b, t, u)
                        if tid == 0:
                            a = _lae(a, carry + w)
                            w = -math.inf
                    a = _chain_scan(buf, tid, n, a, w)
                    if tid < n:
                        beta[b, t, u] = a
                    carry = buf[n - 1]
                    cuda.syncthreads()
        cuda.syncthreads()


@cuda.jit
def cuda_viterbi(blank_lp, emit_lp, dur_lp, durations, logit_lengths, target_lengths, delta,
                 from_arc, best, last):
    """The max-product twin of stage 2; same arrays, codes and tie order as
    ``tdt_cpu.cpu_viterbi``, and the same arithmetic, so the same paths.

    One block per utterance, frame by frame: the block's threads take the best blank
    from earlier frames for all u at once; then one thread walks u upwards, weighing
    the ``d = 0`` label arc (from the node just finished) and the label jumps. That
    walk is serial in U per frame (a max-scan would reorder the tie rule's
    comparisons); it is for alignments, not training.
    """
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for b in range(cuda.blockIdx.x, blank_lp.shape[0], cuda.gridDim.x):
        Tb = logit_lengths[b]
        Ub = target_lengths[b]
        for t in range(Tb):
            for u in range(tid, Ub + 1, nt):
                score = 0.0
                code = 0
                if t > 0 or u > 0:
                    score, code = _best_blank_into(delta, blank_lp, dur_lp, durations, b, t, u)
                delta[b, t, u] = score
                from_arc[b, t, u] = code
            cuda.syncthreads()
            if tid == 0:
                for u in range(1, Ub + 1):
                    score = delta[b, t, u]
                    code = from_arc[b, t, u]
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
            cuda.syncthreads()
        if tid == 0:
            best[b], last[b] = _best_final_blank(delta, blank_lp, dur_lp, durations, b, Tb, Ub)
        cuda.syncthreads()


# --------------------------------------------------------------------------- stage 3
def cuda_gradient(logits, targets, logit_lengths, target_lengths, blank, V, fused, lse,
                  blank_lp, emit_lp, dur_lp, durations, alpha, beta, log_like, scale,
                  fastemit_lambda, clamp, grad):
    """Stage 3: ``grad = scale[b] * d loss_b / d logits`` ``(B, T, U1, V + D)``, one fused
    pass over ``V + D`` per node; same formula and arrays as ``tdt_cpu.cpu_gradient``
    (the token part clipped, FastEmit on the label arcs' token term). Compiled per
    storage kind; every entry is written."""
    B, T, U1, VD = logits.shape
    D = durations.shape[0]
    nodes = B * T * U1
    tx = cuda.threadIdx.x
    nx = cuda.blockDim.x
    ny = cuda.blockDim.y
    emit_w = 1.0 + fastemit_lambda
    start = np.int64(cuda.blockIdx.x) * ny + cuda.threadIdx.y
    step = np.int64(cuda.gridDim.x) * ny
    for row in range(start, nodes, step):
        b, t, u = _node(row, T, U1)
        out = grad[b, t, u]
        ll = log_like[b]
        Tb = logit_lengths[b]
        Ub = target_lengths[b]
        if t >= Tb or u > Ub or not abs(ll) < math.inf:
            for v in range(tx, VD, nx):
                _store(out, v, lat(0.0))
            continue
        x_row = logits[b, t, u]
        p_blank = 0.0
        p_label = 0.0
        for i in range(D):
            pb, pl = _arc_posteriors(alpha, beta, blank_lp, emit_lp, dur_lp, durations, b, t,
                                     u, i, Tb, Ub, ll)
            p_blank += pb
            p_label += pl
        y = targets[b, u] if u < Ub else -1
        hi = lse[b, t, u, 0]
        lo = lse[b, t, u, 1]
        pb = lat(p_blank)
        pe = lat(emit_w * p_label)
        occ = pb + pe
        occ_d = lat(p_blank + p_label)
        s = lat(scale[b])
        c = lat(clamp)
        for v in range(tx, VD, nx):
            g = lat(0.0)
            if v < V:
                if fused:
                    g = math.exp(_log_prob(_load(x_row, v), hi, lo)) * occ
                if v == blank:
                    g -= pb
                if v == y:
                    g -= pe
                if c > 0:
                    g = min(max(g, -c), c)
            else:
                i = v - V
                if fused:
                    g = math.exp(dur_lp[b, t, u, i]) * occ_d
                qb, ql = _arc_posteriors(alpha, beta, blank_lp, emit_lp, dur_lp, durations, b,
                                         t, u, i, Tb, Ub, ll)
                g -= lat(qb + ql)
            _store(out, v, g * s)


# --------------------------------------------------------------------------- host side
def cuda_check_device(logits: torch.Tensor) -> None:
    """Raise unless ``logits`` can run here (``cuda.cuda_check_device``)."""
    _rc.cuda_check_device(logits)


@functools.lru_cache(maxsize=64)
def _device_durations(durations: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The duration set on ``device``, copied once per (set, device): a copy from pageable
    host memory each forward would make the host wait for the stream."""
    return torch.tensor(durations, dtype=torch.int64).to(device)


def _alpha_beta(blank_lp, emit_lp, dur_lp, durations, logit_lengths, target_lengths,
                keep_state: bool):
    """Launch stage 2 on the current stream: ``(alpha, beta, log_like)`` float64 on the
    lattice's device (``beta`` ``(0, 0, 0)`` unless ``keep_state``)."""
    B, T, U1 = blank_lp.shape
    device = blank_lp.device
    alpha = torch.empty(B, T, U1, dtype=torch.float64, device=device)
    beta = torch.empty((B, T, U1) if keep_state else (0, 0, 0), dtype=torch.float64,
                       device=device)
    log_like = torch.empty(B, dtype=torch.float64, device=device)
    a = _rc.storage_view
    if B > 0:  # a grid of 0 blocks is a launch error
        nt = _rc.CONFIG["threads_diag"]
        cuda_alpha_beta[B, nt, _rc._stream(), 2 * nt * 8](
            a(blank_lp), a(emit_lp), a(dur_lp), a(durations), a(logit_lengths),
            a(target_lengths), keep_state, a(alpha), a(beta), a(log_like))
    return alpha, beta, log_like


def cuda_forward(logits, targets, logit_lengths, target_lengths, opts: TDTOptions,
                 keep_state: bool) -> TDTState:
    """Stages 1 and 2 on the GPU; same contract as ``tdt_cpu.cpu_forward``, the state's
    arrays torch tensors on the logits' device. Lengths outside the padded dims or
    bad labels (only without host validation) make that utterance's loss NaN."""
    cuda_check_device(logits)
    B, T, U1, VD = logits.shape
    device = logits.device
    D = len(opts.durations)
    targets, logit_lengths, target_lengths, bad_len = _rc._index_tensors(
        targets, logit_lengths, target_lengths, T, U1, device)
    durations = _device_durations(opts.durations, device)
    lat_dtype = _rc.lattice_dtype(logits)
    blank_lp = torch.empty(B, T, U1, dtype=lat_dtype, device=device)
    emit_lp = torch.empty(B, T, U1, dtype=lat_dtype, device=device)
    dur_lp = torch.empty(B, T, U1, D, dtype=lat_dtype, device=device)
    bad_row = torch.zeros(B, T, U1, dtype=torch.uint8, device=device)
    lse = torch.empty((B, T, U1, 2) if keep_state else (0, 0, 0, 2), dtype=lat_dtype,
                      device=device)
    a = _rc.storage_view
    stream = _rc._stream()
    blocks, block = _rc._row_launch(B * T * U1)
    shared = 2 * block[0] * block[1] * blank_lp.element_size()
    _rc.storage_kernel(cuda_normalise, _rc._storage_kind(logits))[blocks, block, stream,
                                                                  shared](
        a(logits), a(targets), a(logit_lengths), a(target_lengths), opts.blank, VD - D,
        float(opts.sigma), opts.fused, keep_state, a(lse), a(blank_lp), a(emit_lp), a(dur_lp),
        a(bad_row),
    )
    alpha, beta, log_like = _alpha_beta(blank_lp, emit_lp, dur_lp, durations, logit_lengths,
                                        target_lengths, keep_state)
    bad = bad_row.flatten(1).any(dim=1).bool() | bad_len
    log_like = torch.where(bad, torch.full_like(log_like, math.nan), log_like)
    state = TDTState(
        log_like=log_like, bad=bad, blank_lp=blank_lp, emit_lp=emit_lp, dur_lp=dur_lp,
        durations=durations, targets=targets, logit_lengths=logit_lengths,
        target_lengths=target_lengths,
    )
    if keep_state:
        state = dataclasses.replace(state, lse=lse, alpha=alpha, beta=beta)
    return state


def cuda_backward(logits, state: TDTState, opts: TDTOptions, scale):
    """Stage 3 on the GPU; same contract as ``tdt_cpu.cpu_backward``. ``scale`` ``(B,)``:
    a tensor on any device (moved without a host sync)."""
    B, T, U1, VD = logits.shape
    device = logits.device
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=device)
    scale = torch.as_tensor(scale).to(device, torch.float64)
    blocks, block = _rc._row_launch(B * T * U1)
    a = _rc.storage_view
    _rc.storage_kernel(cuda_gradient, _rc._storage_kind(logits))[blocks, block, _rc._stream()](
        a(logits), a(state.targets), a(state.logit_lengths), a(state.target_lengths),
        opts.blank, VD - len(opts.durations), opts.fused, a(state.lse), a(state.blank_lp),
        a(state.emit_lp), a(state.dur_lp), a(state.durations), a(state.alpha), a(state.beta),
        a(state.log_like), a(scale), float(opts.fastemit_lambda), float(opts.clamp), a(grad),
    )
    return grad


def cuda_best_path(state: TDTState):
    """``cuda_viterbi`` on a forward state: ``(best (B,), last (B,), from_arc (B, T, U1))``
    as torch tensors on the logits' device; same contract as ``tdt_cpu.cpu_best_path``."""
    blank_lp = state.blank_lp
    B, T, U1 = blank_lp.shape
    device = blank_lp.device
    delta = torch.empty(B, T, U1, dtype=torch.float64, device=device)
    from_arc = torch.zeros(B, T, U1, dtype=torch.int8, device=device)
    best = torch.empty(B, dtype=torch.float64, device=device)
    last = torch.zeros(B, dtype=torch.int64, device=device)
    a = _rc.storage_view
    if B > 0:
        cuda_viterbi[B, _rc.CONFIG["threads_diag"], _rc._stream()](
            a(blank_lp), a(state.emit_lp), a(state.dur_lp), a(state.durations),
            a(state.logit_lengths), a(state.target_lengths), a(delta), a(from_arc), a(best),
            a(last))
    return best, last, from_arc


def cuda_forward_compact(blank_lp, emit_lp, dur_lp, durations, targets, logit_lengths,
                         target_lengths, keep_state: bool) -> TDTState:
    """Stage 2 alone on a TDT lattice dump's padded arrays; same contract as
    ``tdt_cpu.cpu_forward_compact``. Tensors on one device (CPU tensors in the
    simulator); numpy arrays are taken as CPU tensors. Lengths outside the padded
    dims make that utterance's loss NaN."""
    blank_lp, emit_lp, dur_lp = (torch.as_tensor(a) for a in (blank_lp, emit_lp, dur_lp))
    cuda_check_device(blank_lp)
    B, T, U1 = blank_lp.shape
    device = blank_lp.device
    targets, logit_lengths, target_lengths, bad_len = _rc._index_tensors(
        *(torch.as_tensor(a) for a in (targets, logit_lengths, target_lengths)), T, U1, device)
    durations = torch.as_tensor(np.asarray(durations, dtype=np.int64)).to(device)
    alpha, beta, log_like = _alpha_beta(blank_lp, emit_lp, dur_lp, durations, logit_lengths,
                                        target_lengths, keep_state)
    log_like = torch.where(bad_len, torch.full_like(log_like, math.nan), log_like)
    return TDTState(
        log_like=log_like, bad=torch.isnan(log_like), blank_lp=blank_lp, emit_lp=emit_lp,
        dur_lp=dur_lp, durations=durations, targets=targets, logit_lengths=logit_lengths,
        target_lengths=target_lengths, alpha=alpha if keep_state else None,
        beta=beta if keep_state else None,
    )


TDT_ENGINE = TDTEngine(name="cuda", check_device=cuda_check_device, forward=cuda_forward,
                       backward=cuda_backward, best_path=cuda_best_path, guards_indices=True,
                       forward_compact=cuda_forward_compact)


# --------------------------------------------------------------------------- PTX signatures
def _ptx_signatures() -> dict:
    """``{(kernel name, storage kind): (kernel, argument types)}``: every TDT kernel with
    the types the host functions above launch it with, as ``cuda.PTX_SIGNATURES``
    (for compiling to PTX without a GPU, as ``scripts/check_ptx.py`` does)."""
    nt = numba.types
    i64, f64, flag = nt.int64, nt.float64, nt.boolean
    idx1, idx2 = nt.Array(i64, 1, "C"), nt.Array(i64, 2, "C")
    d1, d3 = (nt.Array(nt.float64, n, "C") for n in (1, 3))
    u8 = nt.Array(nt.uint8, 3, "C")
    table = {}
    for kind, row in _rc.STORAGE.items():
        x4 = nt.Array(row.element, 4, "A")
        l3, l4 = (nt.Array(row.lat, n, "C") for n in (3, 4))
        table.update({
            ("cuda_normalise", kind): (
                _rc.storage_kernel(cuda_normalise, kind),
                (x4, idx2, idx1, idx1, i64, i64, f64, flag, flag, l4, l3, l3, l4, u8)),
            ("cuda_alpha_beta", kind): (
                cuda_alpha_beta, (l3, l3, l4, idx1, idx1, idx1, flag, d3, d3, d1)),
            ("cuda_viterbi", kind): (
                cuda_viterbi, (l3, l3, l4, idx1, idx1, idx1, d3, nt.Array(nt.int8, 3, "C"), d1,
                               idx1)),
            ("cuda_gradient", kind): (
                _rc.storage_kernel(cuda_gradient, kind),
                (x4, idx2, idx1, idx1, i64, i64, flag, l4, l3, l3, l4, idx1, d3, d3, d1, d1,
                 f64, f64, nt.Array(row.element, 4, "C"))),
        })
    return table


PTX_SIGNATURES = _ptx_signatures()
