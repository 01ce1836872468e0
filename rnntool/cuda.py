"""Numba CUDA kernels of the loss engine: the three stages of DESIGN.md on the GPU.

Twins of ``cpu.py``: every stage function ``cuda_X`` here has its mirror
``cpu_X`` there, on the same arrays, and the per-node rules of ``lattice.py``
are compiled by both (``engine.py`` maps the two side by side). Every
``numba.cuda`` import of the project lives in this module.

1. ``cuda_normalise``   a ``(THREADS_V, ROWS)`` block handles ROWS lattice nodes,
                        THREADS_V threads striding V with coalesced reads and
                        meeting in the block reductions ``_block_max`` and
                        ``_block_sum`` (the CPU's ``row_max`` and ``sum_exp``).
2. ``cuda_alpha_beta``  one block per utterance walks the anti-diagonals
                        ``t + u = n`` with ``syncthreads()`` between them, each
                        thread covering as many u as needed: no limit on U, T or B;
                        ``cuda_alpha_loss`` walks alpha only (scoring without
                        gradients), ``cuda_viterbi`` the max-product twin.
3. ``cuda_gradient``    one fused pass over V per node, in ``backward()``.

``cuda_forward`` (stages 1-2), ``cuda_backward`` (3) and ``cuda_best_path``
(Viterbi) make this module's ``ENGINE``. No thread or block ever waits on
another through atomics or spin loops.

Storage types as on the CPU, except float16, which numba-cuda handles natively:
float32/float64/float16 arrays as they are, bfloat16 as its bits in ``int16``.
``STORAGE`` says, per logits dtype, how stages 1 and 3 read and write it and in
which float type they compute (float64 for float64 input, float32 otherwise);
``storage_kernel`` compiles them once per row. Stage 2 (alpha, beta, log P)
runs in float64 whatever the input, as on the CPU. Indexing is numba's 64-bit,
so tensors of more than 2**31 elements work.

Under ``NUMBA_ENABLE_CUDASIM=1`` the same kernels run in Numba's simulator on
CPU tensors: that is how CI tests them. ``PTX_SIGNATURES`` lists every kernel
with the argument types its launches use, for ``scripts/check_ptx.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
from typing import Any, NamedTuple

import numba
import numpy as np
import torch
from numba import config as numba_config
from numba import cuda

from . import lattice
from .engine import Engine, ForwardState, LatticeTerms, LossOptions

SIMULATOR = bool(numba_config.ENABLE_CUDASIM)

# Tunables, in one place. Tests shrink them so that multi-chunk paths run.
CONFIG = {
    "threads_v": 32,  # threads striding V per node row (a power of two)
    "rows_per_block": 4,  # node rows per block in stages 1 and 3
    "threads_diag": 256,  # threads per utterance walking a diagonal in stage 2
    "max_blocks": 65535 * 4,  # grid cap for stages 1 and 3 (they grid-stride)
}
DEFAULT_CONFIG = dict(CONFIG)


@contextlib.contextmanager
def config(**overrides):
    """Temporarily override ``CONFIG`` entries (threads_v, rows_per_block, ...)."""
    unknown = set(overrides) - set(CONFIG)
    if unknown:
        raise KeyError(f"unknown CUDA config keys: {sorted(unknown)}")
    tv = overrides.get("threads_v", CONFIG["threads_v"])
    if tv & (tv - 1):
        raise ValueError(f"threads_v must be a power of two, got {tv}")
    old = dict(CONFIG)
    CONFIG.update(overrides)
    try:
        yield
    finally:
        CONFIG.clear()
        CONFIG.update(old)


# --------------------------------------------------------------------------- storage types
if SIMULATOR:

    def _f32_from_bits(bits):
        return np.uint32(bits).view(np.float32)

    def _bits_from_f32(x):
        return np.float32(x).view(np.uint32)

else:  # pragma: no cover - needs a GPU
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _f32_from_bits(bits):
        return libdevice.int_as_float(np.int32(bits))

    @cuda.jit(device=True, inline=True)
    def _bits_from_f32(x):
        return np.uint32(libdevice.float_as_int(np.float32(x)))


_bf16_round = cuda.jit(device=True, inline=True)(lattice.bf16_round)


@cuda.jit(device=True, inline=True)
def _load_plain(a, i):
    return a[i]


@cuda.jit(device=True, inline=True)
def _load_f16(a, i):
    """float16 -> float32: lattice math stays float32 for half inputs."""
    return numba.float32(a[i])


@cuda.jit(device=True, inline=True)
def _load_bf16(a, i):
    """bfloat16 bits (int16) -> float32."""
    return _f32_from_bits(np.uint32(np.uint16(a[i])) << np.uint32(16))


@cuda.jit(device=True, inline=True)
def _store_plain(a, i, x):
    a[i] = x


@cuda.jit(device=True, inline=True)
def _store_bf16(a, i, x):
    """float -> bfloat16 bits (int16), round to nearest even, NaN kept NaN."""
    a[i] = _bf16_round(_bits_from_f32(x))


class Storage(NamedTuple):
    """How stages 1 and 3 hold one logits dtype: ``element``, the numba type of the
    arrays they are handed; ``lat``, the float type they compute in; ``load`` and
    ``store``, device functions between the two."""

    element: Any
    lat: Any
    load: Any
    store: Any


STORAGE = {
    "float32": Storage(numba.types.float32, numba.float32, _load_plain, _store_plain),
    "float64": Storage(numba.types.float64, numba.float64, _load_plain, _store_plain),
    "float16": Storage(numba.types.float16, numba.float32, _load_f16, _store_plain),
    "bfloat16": Storage(numba.types.int16, numba.float32, _load_bf16, _store_bf16),
}


@functools.cache
def storage_kernel(kernel, kind: str):
    """``kernel`` (``cuda_normalise`` or ``cuda_gradient``) compiled for one row of
    ``STORAGE``: a copy of the function whose globals ``_load``, ``_store`` and
    ``lat`` are that row's (numba reads globals as compile-time constants), so no
    float32 input pays for double-precision math on the GPU. Built once per kind."""
    row = STORAGE[kind]
    scope = dict(kernel.__globals__, _load=row.load, _store=row.store, lat=row.lat)
    twin = types.FunctionType(kernel.__code__, scope, kernel.__name__, kernel.__defaults__,
                              kernel.__closure__)
    twin.__doc__ = kernel.__doc__
    return cuda.jit(twin)


# Set per storage kind by ``storage_kernel``; never read from here.
_load = _store = lat = None


# --------------------------------------------------------------------------- shared rules
_logaddexp = cuda.jit(device=True, inline=True)(lattice.logaddexp)
_arcs_into = cuda.jit(device=True, inline=True)(lattice.arcs_into)
_arcs_out = cuda.jit(device=True, inline=True)(lattice.arcs_out)
_emission_wins = cuda.jit(device=True, inline=True)(lattice.emission_wins)
_arc_posteriors = cuda.jit(device=True, inline=True)(lattice.arc_posteriors)
_log_prob = cuda.jit(device=True, inline=True)(lattice.log_prob)


@cuda.jit(device=True, inline=True)
def _node(row, T, U1):
    return row // (T * U1), (row // U1) % T, row % U1


@cuda.jit(device=True, inline=True)
def _block_max(buf, me, flags, tx, nx):
    """Tree reduction along x of a block's rows: ``buf[ty * nx]`` becomes the maximum
    of its row's values, ``buf[flags + ty * nx]`` of their flags."""
    s = nx // 2
    while s > 0:
        if tx < s:
            buf[me] = max(buf[me], buf[me + s])
            buf[flags + me] = max(buf[flags + me], buf[flags + me + s])
        cuda.syncthreads()
        s //= 2


@cuda.jit(device=True, inline=True)
def _block_sum(buf, me, tx, nx):
    """Tree reduction along x of a block's rows: ``buf[ty * nx]`` becomes its row's sum."""
    s = nx // 2
    while s > 0:
        if tx < s:
            buf[me] = buf[me] + buf[me + s]
        cuda.syncthreads()
        s //= 2


# --------------------------------------------------------------------------- stage 1
def cuda_normalise(logits, targets, logit_lengths, target_lengths, blank, fused, keep_lse,
                   lse, keep_p2, log_p2, blank_lp, emit_lp, bad_row):
    """Stage 1: the two log-probs the lattice needs, one pass over V per node.

    Compiled per storage kind (``storage_kernel``). logits ``(B, T, U1, V)``
    storage array; targets ``(B, S)`` int64; logit_lengths, target_lengths
    ``(B,)`` int64. Writes the lattice arrays ``(B, T, U1)`` ``blank_lp``,
    ``emit_lp``, with ``keep_lse`` also ``lse`` ``(B, T, U1, 2)`` (row max,
    log-sum), with ``keep_p2`` also ``log_p2`` ``(B, T, U1)`` (log of the sum of
    p_v**2 over every v but the blank and y_{u+1}, a third block reduction),
    and the uint8 ``bad_row`` (NaN/+inf in the row, or a label
    outside [0, V) or equal to blank). Launch with a ``(threads_v, rows)`` block
    and ``2 * threads_v * rows`` lattice floats of dynamic shared memory.
    """
    B, T, U1, V = logits.shape
    nodes = B * T * U1
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    nx = cuda.blockDim.x
    ny = cuda.blockDim.y
    buf = cuda.shared.array(0, dtype=lat)
    me = ty * nx + tx
    flags = nx * ny  # second half of buf: non-finite flags
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
            for v in range(tx, V, nx):
                x = _load(x_row, v)
                if not x < math.inf:  # NaN or +inf
                    flag = lat(1.0)
                if x > m:
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
        # Every thread of the row takes the normaliser (the p2 sum below needs it).
        hi = lat(0.0)
        lo = lat(0.0)
        if nonfinite:
            lo = lat(math.nan)
        elif fused:
            hi = m
            lo = math.log(buf[ty * nx])
        if tx == 0 and row < nodes:
            if not valid:
                blank_lp[b, t, u] = -math.inf
                emit_lp[b, t, u] = -math.inf
            else:
                x_row = logits[b, t, u]
                if keep_lse:
                    lse[b, t, u, 0] = hi
                    lse[b, t, u, 1] = lo
                blank_lp[b, t, u] = _log_prob(_load(x_row, blank), hi, lo)
                emit = -math.inf
                if u < target_lengths[b]:
                    y = targets[b, u]
                    if y < 0 or y >= V or y == blank:  # only without host validation
                        nonfinite = True
                        emit = math.nan
                    else:
                        emit = _log_prob(_load(x_row, y), hi, lo)
                emit_lp[b, t, u] = emit
                bad_row[b, t, u] = 1 if nonfinite else 0
        cuda.syncthreads()
        if keep_p2:
            total = lat(0.0)
            y = -1
            if valid and u < target_lengths[b]:
                y = targets[b, u]  # compared with v only, never used as an index
            if valid and not nonfinite:
                x_row = logits[b, t, u]
                for v in range(tx, V, nx):
                    if v != blank and v != y:
                        lp = _log_prob(_load(x_row, v), hi, lo)
                        total += math.exp(lp + lp)
            buf[me] = total
            cuda.syncthreads()
            _block_sum(buf, me, tx, nx)
            if tx == 0 and row < nodes:
                if not valid:
                    log_p2[b, t, u] = -math.inf
                elif nonfinite:
                    log_p2[b, t, u] = lat(math.nan)
                elif buf[ty * nx] > 0.0:
                    log_p2[b, t, u] = math.log(buf[ty * nx])
                else:  # no other entry has any mass (V = 2, or all -inf)
                    log_p2[b, t, u] = -math.inf
            cuda.syncthreads()


# --------------------------------------------------------------------------- stage 2
@cuda.jit(device=True, inline=True)
def _alpha_diagonals(blank_lp, emit_lp, b, Tb, Ub, alpha, log_like):
    """alpha of utterance b by anti-diagonals (the block's threads share each one),
    then ``log_like[b]``."""
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for n in range(Tb + Ub):
        u_lo = max(0, n - Tb + 1)
        for u in range(u_lo + tid, min(n, Ub) + 1, nt):
            t = n - u
            a, e = _arcs_into(alpha, blank_lp, emit_lp, b, t, u)
            alpha[b, t, u] = _logaddexp(a, e)
        cuda.syncthreads()
    if tid == 0:
        log_like[b] = alpha[b, Tb - 1, Ub] + blank_lp[b, Tb - 1, Ub]


@cuda.jit(device=True, inline=True)
def _beta_diagonals(blank_lp, emit_lp, b, Tb, Ub, beta):
    """beta of utterance b by anti-diagonals, from the last one back."""
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for n in range(Tb + Ub - 1, -1, -1):
        u_lo = max(0, n - Tb + 1)
        for u in range(u_lo + tid, min(n, Ub) + 1, nt):
            t = n - u
            a, e = _arcs_out(beta, blank_lp, emit_lp, b, t, u, Tb, Ub)
            beta[b, t, u] = _logaddexp(a, e)
        cuda.syncthreads()


@cuda.jit
def cuda_alpha_beta(blank_lp, emit_lp, logit_lengths, target_lengths, alpha, beta, log_like):
    """Stage 2: alpha and beta ``(B, T, U1)``; one block per utterance, by anti-diagonals.

    ``log_like[b] = alpha[T_b-1, U_b] + blank_lp[T_b-1, U_b]``. Only nodes inside
    the lengths are written; no other node is ever read. ``alpha``, ``beta`` and
    ``log_like`` are float64, as on the CPU (``cpu.cpu_alpha_beta`` says why).
    """
    for b in range(cuda.blockIdx.x, blank_lp.shape[0], cuda.gridDim.x):
        Tb = logit_lengths[b]
        Ub = target_lengths[b]
        _alpha_diagonals(blank_lp, emit_lp, b, Tb, Ub, alpha, log_like)
        _beta_diagonals(blank_lp, emit_lp, b, Tb, Ub, beta)
        cuda.syncthreads()


@cuda.jit
def cuda_alpha_loss(blank_lp, emit_lp, logit_lengths, target_lengths, alpha, log_like):
    """Stage 2 without gradients: alpha and ``log_like`` as in ``cuda_alpha_beta``, no beta."""
    for b in range(cuda.blockIdx.x, blank_lp.shape[0], cuda.gridDim.x):
        _alpha_diagonals(blank_lp, emit_lp, b, logit_lengths[b], target_lengths[b], alpha,
                         log_like)
        cuda.syncthreads()


@cuda.jit
def cuda_viterbi(blank_lp, emit_lp, logit_lengths, target_lengths, delta, from_emit, best):
    """The max-product twin of stage 2, by anti-diagonals; same arrays and tie rule
    (ties go to the blank) as ``cpu_viterbi``."""
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for b in range(cuda.blockIdx.x, blank_lp.shape[0], cuda.gridDim.x):
        Tb = logit_lengths[b]
        Ub = target_lengths[b]
        for n in range(Tb + Ub):
            u_lo = max(0, n - Tb + 1)
            for u in range(u_lo + tid, min(n, Ub) + 1, nt):
                t = n - u
                a, e = _arcs_into(delta, blank_lp, emit_lp, b, t, u)
                if _emission_wins(a, e, t, u):
                    delta[b, t, u] = e
                    from_emit[b, t, u] = 1
                else:
                    delta[b, t, u] = a
                    from_emit[b, t, u] = 0
            cuda.syncthreads()
        if tid == 0:
            best[b] = delta[b, Tb - 1, Ub] + blank_lp[b, Tb - 1, Ub]
        cuda.syncthreads()


# --------------------------------------------------------------------------- stage 3
def cuda_gradient(logits, targets, logit_lengths, target_lengths, blank, fused, lse, blank_lp,
                  emit_lp, alpha, beta, log_like, scale, fastemit_lambda, clamp, grad):
    """Stage 3: ``grad = scale[b] * clip(d loss_b / d logits)``, one fused pass over V per node.

    Compiled per storage kind (``storage_kernel``). Same formula and arrays as
    ``cpu_gradient``; ``grad`` ``(B, T, U1, V)`` has the storage type of
    ``logits`` and every entry is written.
    """
    B, T, U1, V = logits.shape
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
            for v in range(tx, V, nx):
                _store(out, v, lat(0.0))
            continue
        x_row = logits[b, t, u]
        p_blank, p_emit = _arc_posteriors(alpha, beta, blank_lp, emit_lp, b, t, u, Tb, Ub, ll,
                                          emit_w)
        y = targets[b, u] if u < Ub else -1
        hi = lse[b, t, u, 0]
        lo = lse[b, t, u, 1]
        # Per-node scalars above may be float64; the loop over V runs in lat.
        pb = lat(p_blank)
        pe = lat(p_emit)
        occ = pb + pe
        s = lat(scale[b])
        c = lat(clamp)
        for v in range(tx, V, nx):
            g = lat(0.0)
            if fused:
                g = math.exp(_log_prob(_load(x_row, v), hi, lo)) * occ
            if v == blank:
                g -= pb
            if v == y:
                g -= pe
            if c > 0:
                g = min(max(g, -c), c)
            _store(out, v, g * s)


# --------------------------------------------------------------------------- host side
def cuda_check_device(logits: torch.Tensor) -> None:
    """Raise unless ``logits`` can run here: CUDA tensors on a GPU, CPU tensors in the simulator."""
    if SIMULATOR:
        if logits.is_cuda:
            raise ValueError(
                "backend='cuda' under NUMBA_ENABLE_CUDASIM=1 runs the kernels in Numba's "
                "simulator and needs CPU tensors; logits are on " + str(logits.device)
            )
        return
    if not cuda.is_available():
        raise RuntimeError(
            "backend='cuda' needs a usable CUDA GPU and none was found "
            "(numba.cuda.is_available() is False); use backend='cpu'"
        )
    if not logits.is_cuda:
        raise ValueError(
            "backend='cuda' needs CUDA tensors; logits are on "
            f"{logits.device} (move them with .cuda(), or use backend='cpu')"
        )


def storage_view(x: torch.Tensor):
    """Zero-copy view of a tensor for the kernels (bfloat16 as its int16 bits)."""
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    if SIMULATOR:
        # Wrapped as the simulator's device array: launched as it is, any strides,
        # as on a GPU (a plain numpy argument would be copied, and only if contiguous).
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(x.detach().numpy())
    # sync=False: the kernels run on torch's current stream, after whatever wrote
    # the tensor; numba's default would synchronise the host with that stream.
    return cuda.as_cuda_array(x.detach(), sync=False)  # pragma: no cover - needs a GPU


def _stream():
    if SIMULATOR:
        return 0
    return cuda.external_stream(torch.cuda.current_stream().cuda_stream)  # pragma: no cover


def lattice_dtype(logits: torch.Tensor) -> torch.dtype:
    """The float type of stages 1 and 3: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _storage_kind(logits: torch.Tensor) -> str:
    return str(logits.dtype).removeprefix("torch.")


def _row_launch(nodes: int):
    tv, rows = CONFIG["threads_v"], CONFIG["rows_per_block"]
    blocks = max(1, min(CONFIG["max_blocks"], -(-nodes // rows)))
    return blocks, (tv, rows)


def _index_tensors(targets, logit_lengths, target_lengths, T, U1, device):
    """Targets and lengths as int64 on ``device``; lengths outside the padded dims
    (possible only without host validation) replaced by (1, 0) and flagged ``bad_len``
    ``(B,)``, so that no kernel reads out of bounds."""
    targets = targets.to(device, torch.int64)
    logit_lengths = logit_lengths.to(device, torch.int64)
    target_lengths = target_lengths.to(device, torch.int64)
    B, S = targets.shape
    bad_len = ((logit_lengths < 1) | (logit_lengths > T) | (target_lengths < 0)
               | (target_lengths > min(U1 - 1, S)))
    logit_lengths = torch.where(bad_len, torch.ones_like(logit_lengths), logit_lengths)
    target_lengths = torch.where(bad_len, torch.zeros_like(target_lengths), target_lengths)
    if S == 0:  # kernels index targets[b, u] only for u < U_b = 0; keep a valid shape
        targets = torch.zeros(B, 1, dtype=torch.int64, device=device)
    return targets, logit_lengths, target_lengths, bad_len


def _normalise(logits, targets, logit_lengths, target_lengths, opts: LossOptions,
               keep_lse: bool, keep_p2: bool):
    """Launch stage 1: ``(blank_lp, emit_lp, lse, log_p2, bad (B,))`` on the logits' device
    (``lse``, ``log_p2`` empty unless kept)."""
    B, T, U1, V = logits.shape
    device = logits.device
    lat_dtype = lattice_dtype(logits)
    blank_lp = torch.empty(B, T, U1, dtype=lat_dtype, device=device)
    emit_lp = torch.empty(B, T, U1, dtype=lat_dtype, device=device)
    bad_row = torch.zeros(B, T, U1, dtype=torch.uint8, device=device)
    lse = torch.empty((B, T, U1, 2) if keep_lse else (0, 0, 0, 2), dtype=lat_dtype,
                      device=device)
    log_p2 = torch.empty((B, T, U1) if keep_p2 else (0, 0, 0), dtype=lat_dtype, device=device)
    blocks, block = _row_launch(B * T * U1)
    shared = 2 * block[0] * block[1] * lse.element_size()
    a = storage_view
    storage_kernel(cuda_normalise, _storage_kind(logits))[blocks, block, _stream(), shared](
        a(logits), a(targets), a(logit_lengths), a(target_lengths), opts.blank, opts.fused,
        keep_lse, a(lse), keep_p2, a(log_p2), a(blank_lp), a(emit_lp), a(bad_row),
    )
    bad = bad_row.flatten(1).any(dim=1).bool()  # (view(B, -1) fails at B = 0)
    return blank_lp, emit_lp, lse, log_p2, bad


def cuda_forward(logits, targets, logit_lengths, target_lengths, opts: LossOptions,
                 keep_state: bool) -> ForwardState:
    """Stages 1 and 2 on the GPU; same contract as ``cpu.cpu_forward``.

    The state's arrays are torch tensors on the logits' device. Lengths outside
    the padded dims (possible only without host validation) make that
    utterance's loss NaN instead of reading out of bounds.
    """
    cuda_check_device(logits)
    B, T, U1, V = logits.shape
    targets, logit_lengths, target_lengths, bad_len = _index_tensors(
        targets, logit_lengths, target_lengths, T, U1, logits.device)
    blank_lp, emit_lp, lse, _, bad = _normalise(logits, targets, logit_lengths, target_lengths,
                                                opts, keep_state, False)
    state = cuda_forward_compact(blank_lp, emit_lp, targets, logit_lengths, target_lengths,
                                 keep_state)
    bad = bad | bad_len
    log_like = torch.where(bad, torch.full_like(state.log_like, math.nan), state.log_like)
    return dataclasses.replace(state, log_like=log_like, bad=bad,
                               lse=lse if keep_state else None)


def cuda_forward_compact(blank_lp, emit_lp, targets, logit_lengths, target_lengths,
                         keep_state: bool) -> ForwardState:
    """Stage 2 on compact ``(B, T, U1)`` tensors; same contract as
    ``cpu.cpu_forward_compact``. Tensors on one device (CPU tensors in the simulator);
    numpy arrays are taken as CPU tensors."""
    blank_lp, emit_lp = (torch.as_tensor(a) for a in (blank_lp, emit_lp))
    cuda_check_device(blank_lp)
    B, T, U1 = blank_lp.shape
    device = blank_lp.device
    targets, logit_lengths, target_lengths, bad_len = _index_tensors(
        *(torch.as_tensor(a) for a in (targets, logit_lengths, target_lengths)), T, U1, device)
    # Stage 2 in float64 whatever the input, as on the CPU (see cpu.cpu_alpha_beta).
    alpha = torch.empty(B, T, U1, dtype=torch.float64, device=device)
    beta = torch.empty(B, T, U1, dtype=torch.float64, device=device) if keep_state else None
    log_like = torch.empty(B, dtype=torch.float64, device=device)
    a = storage_view
    stream = _stream()
    compact = a(blank_lp), a(emit_lp), a(logit_lengths), a(target_lengths)
    if B > 0 and keep_state:  # a grid of 0 blocks is a launch error
        cuda_alpha_beta[B, CONFIG["threads_diag"], stream](*compact, a(alpha), a(beta),
                                                           a(log_like))
    elif B > 0:
        cuda_alpha_loss[B, CONFIG["threads_diag"], stream](*compact, a(alpha), a(log_like))
    log_like = torch.where(bad_len, torch.full_like(log_like, math.nan), log_like)
    return ForwardState(
        log_like=log_like, bad=torch.isnan(log_like), blank_lp=blank_lp, emit_lp=emit_lp,
        targets=targets, logit_lengths=logit_lengths, target_lengths=target_lengths,
        alpha=alpha if keep_state else None, beta=beta,
    )


def cuda_lattice_terms(logits, targets, logit_lengths, target_lengths,
                       opts: LossOptions) -> LatticeTerms:
    """Stage 1 with the third array of a lattice dump, on the GPU: ``LatticeTerms`` of
    tensors on the logits' device; same contract as ``cpu.cpu_lattice_terms``."""
    cuda_check_device(logits)
    _, T, U1, _ = logits.shape
    targets, logit_lengths, target_lengths, bad_len = _index_tensors(
        targets, logit_lengths, target_lengths, T, U1, logits.device)
    blank_lp, emit_lp, _, log_p2, bad = _normalise(logits, targets, logit_lengths,
                                                   target_lengths, opts, False, True)
    return LatticeTerms(blank_lp, emit_lp, log_p2, bad | bad_len)


def cuda_backward(logits, state: ForwardState, opts: LossOptions, scale):
    """Stage 3 on the GPU; same contract as ``cpu.cpu_backward``.

    ``scale`` ``(B,)``: a tensor on any device (moved without a host sync).
    """
    B, T, U1, V = logits.shape
    device = logits.device
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=device)
    scale = torch.as_tensor(scale).to(device, state.lse.dtype)
    blocks, block = _row_launch(B * T * U1)
    a = storage_view
    storage_kernel(cuda_gradient, _storage_kind(logits))[blocks, block, _stream()](
        a(logits), a(state.targets), a(state.logit_lengths), a(state.target_lengths),
        opts.blank, opts.fused, a(state.lse), a(state.blank_lp), a(state.emit_lp),
        a(state.alpha), a(state.beta), a(torch.as_tensor(state.log_like)), a(scale),
        float(opts.fastemit_lambda), float(opts.clamp), a(grad),
    )
    return grad


def cuda_best_path(state: ForwardState):
    """``cuda_viterbi`` on a kept state: ``(best (B,), from_emit (B, T, U1))`` as torch
    tensors on the logits' device."""
    blank_lp = state.blank_lp
    B = blank_lp.shape[0]
    delta = torch.empty(blank_lp.shape, dtype=torch.float64, device=blank_lp.device)
    from_emit = torch.zeros(blank_lp.shape, dtype=torch.uint8, device=blank_lp.device)
    best = torch.empty(B, dtype=torch.float64, device=blank_lp.device)
    a = storage_view
    if B > 0:
        cuda_viterbi[B, CONFIG["threads_diag"], _stream()](
            a(blank_lp), a(state.emit_lp), a(state.logit_lengths), a(state.target_lengths),
            a(delta), a(from_emit), a(best),
        )
    return best, from_emit


ENGINE = Engine(
    name="cuda", check_device=cuda_check_device, forward=cuda_forward, backward=cuda_backward,
    best_path=cuda_best_path, guards_indices=True, lattice_terms=cuda_lattice_terms,
    forward_compact=cuda_forward_compact,
)


# --------------------------------------------------------------------------- PTX signatures
def _ptx_signatures() -> dict:
    """``{(kernel name, storage kind): (kernel, argument types)}``: every kernel with the
    types the host functions above launch it with (contiguous index and lattice
    arrays, logits of any layout)."""
    nt = numba.types
    i64, flag = nt.int64, nt.boolean
    idx1, idx2 = nt.Array(i64, 1, "C"), nt.Array(i64, 2, "C")
    d1, d3 = (nt.Array(nt.float64, n, "C") for n in (1, 3))  # stage 2: float64
    u8 = nt.Array(nt.uint8, 3, "C")
    table = {}
    for kind, row in STORAGE.items():
        x4 = nt.Array(row.element, 4, "A")
        l1, l3, l4 = (nt.Array(row.lat, n, "C") for n in (1, 3, 4))
        table.update({
            ("cuda_normalise", kind): (
                storage_kernel(cuda_normalise, kind),
                (x4, idx2, idx1, idx1, i64, flag, flag, l4, flag, l3, l3, l3, u8)),
            ("cuda_alpha_beta", kind): (cuda_alpha_beta, (l3, l3, idx1, idx1, d3, d3, d1)),
            ("cuda_alpha_loss", kind): (cuda_alpha_loss, (l3, l3, idx1, idx1, d3, d1)),
            ("cuda_viterbi", kind): (cuda_viterbi, (l3, l3, idx1, idx1, d3, u8, d1)),
            ("cuda_gradient", kind): (
                storage_kernel(cuda_gradient, kind),
                (x4, idx2, idx1, idx1, i64, flag, l4, l3, l3, d3, d3, d1, l1, nt.float64,
                 nt.float64, nt.Array(row.element, 4, "C"))),
        })
    return table


PTX_SIGNATURES = _ptx_signatures()
