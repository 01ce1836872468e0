"""Numba CUDA kernels of the loss engine: the three stages of DESIGN.md on the GPU.

Twins of ``cpu.py`` (same stage names, same arrays). Every ``numba.cuda``
import of the project lives in this module.

1. ``cuda_normalise``   a ``(THREADS_V, ROWS)`` block handles ROWS lattice nodes,
                        THREADS_V threads striding V with coalesced reads, tree
                        reductions in shared memory.
2. ``cuda_alpha_beta``  one block per utterance walks the anti-diagonals
                        ``t + u = n`` with ``syncthreads()`` between them, each
                        thread covering as many u as needed: no limit on U, T or B.
3. ``cuda_gradient``    one fused pass over V per node, in ``backward()``.

No thread or block ever waits on another through atomics or spin loops.
Storage types as on the CPU, except float16, which numba-cuda handles natively:
float32/float64/float16 arrays as they are, bfloat16 as its bits in ``int16``.
Stages 1 and 3 compute in float64 for float64 input and float32 otherwise;
stage 2 (alpha, beta, log P) always in float64, as on the CPU. Indexing is
numba's 64-bit, so tensors of more than 2**31 elements work.

Under ``NUMBA_ENABLE_CUDASIM=1`` the same kernels run in Numba's simulator on
CPU tensors: that is how CI tests them.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numba
import numpy as np
import torch
from numba import config as numba_config
from numba import cuda

from . import lattice

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


# --------------------------------------------------------------------------- numerics
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
    f = _bits_from_f32(x)
    if (f & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        r = (f >> np.uint32(16)) | np.uint32(0x40)  # quiet NaN
    else:
        r = (f + np.uint32(0x7FFF) + ((f >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    a[i] = np.int16(np.int32(r) - 65536 if r >= np.uint32(0x8000) else np.int32(r))


_logaddexp = cuda.jit(device=True, inline=True)(lattice.logaddexp)
_emission_wins = cuda.jit(device=True, inline=True)(lattice.emission_wins)


@cuda.jit(device=True, inline=True)
def _node(row, T, U1):
    return row // (T * U1), (row // U1) % T, row % U1


# --------------------------------------------------------------------------- stage 2
@cuda.jit
def cuda_alpha_beta(blank_lp, emit_lp, T_len, U_len, alpha, beta, log_like, with_beta):
    """Stage 2: alpha (and beta) ``(B, T, U1)``; one block per utterance, by anti-diagonals.

    ``log_like[b] = alpha[T_b-1, U_b] + blank_lp[T_b-1, U_b]``. Only nodes inside
    the lengths are written; no other node is ever read. ``alpha``, ``beta`` and
    ``log_like`` are float64, as on the CPU (``cpu.cpu_alpha_beta`` says why).
    """
    B = blank_lp.shape[0]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for b in range(cuda.blockIdx.x, B, cuda.gridDim.x):
        Tb = T_len[b]
        Ub = U_len[b]
        for n in range(Tb + Ub):
            u_lo = max(0, n - Tb + 1)
            for u in range(u_lo + tid, min(n, Ub) + 1, nt):
                t = n - u
                a = -math.inf
                if n == 0:
                    a = 0.0
                if t > 0:
                    a = alpha[b, t - 1, u] + blank_lp[b, t - 1, u]
                if u > 0:
                    a = _logaddexp(a, alpha[b, t, u - 1] + emit_lp[b, t, u - 1])
                alpha[b, t, u] = a
            cuda.syncthreads()
        if tid == 0:
            log_like[b] = alpha[b, Tb - 1, Ub] + blank_lp[b, Tb - 1, Ub]
        if with_beta:
            for n in range(Tb + Ub - 1, -1, -1):
                u_lo = max(0, n - Tb + 1)
                for u in range(u_lo + tid, min(n, Ub) + 1, nt):
                    t = n - u
                    e = -math.inf
                    if t == Tb - 1 and u == Ub:
                        e = blank_lp[b, t, u]
                    if t < Tb - 1:
                        e = beta[b, t + 1, u] + blank_lp[b, t, u]
                    if u < Ub:
                        e = _logaddexp(e, beta[b, t, u + 1] + emit_lp[b, t, u])
                    beta[b, t, u] = e
                cuda.syncthreads()
        cuda.syncthreads()


@cuda.jit
def cuda_viterbi(blank_lp, emit_lp, T_len, U_len, delta, from_emit, best):
    """The max-product twin of stage 2, by anti-diagonals; same arrays and tie rule
    (ties go to the blank) as ``cpu_viterbi``."""
    B = blank_lp.shape[0]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for b in range(cuda.blockIdx.x, B, cuda.gridDim.x):
        Tb = T_len[b]
        Ub = U_len[b]
        for n in range(Tb + Ub):
            u_lo = max(0, n - Tb + 1)
            for u in range(u_lo + tid, min(n, Ub) + 1, nt):
                t = n - u
                a = -math.inf
                e = -math.inf
                if n == 0:
                    a = 0.0
                if t > 0:
                    a = delta[b, t - 1, u] + blank_lp[b, t - 1, u]
                if u > 0:
                    e = delta[b, t, u - 1] + emit_lp[b, t, u - 1]
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


# --------------------------------------------------------------------------- stages 1 and 3
@functools.cache
def row_kernels(kind: str):
    """``(cuda_normalise, cuda_gradient)`` for one storage kind: float32, float64,
    float16 or bfloat16.

    Each kind gets its own compiled twins: its loads and stores, and its lattice
    type ``lat`` (float64 for float64, else float32) for every scalar, so that
    no float32 input pays for double-precision math on the GPU. Built once per kind.
    """
    _load = {"bfloat16": _load_bf16, "float16": _load_f16}.get(kind, _load_plain)
    _store = _store_bf16 if kind == "bfloat16" else _store_plain
    lat = numba.float64 if kind == "float64" else numba.float32

    @cuda.jit
    def cuda_normalise(
        logits, labels, T_len, U_len, blank, fused, lse, blank_lp, emit_lp, bad_row
    ):
        """Stage 1: the two log-probs the lattice needs, one pass over V per node.

        logits ``(B, T, U1, V)`` storage array; labels ``(B, S)`` int64; T_len,
        U_len ``(B,)`` int64. Writes the lattice arrays ``lse`` ``(B, T, U1, 2)``
        (row max, log-sum; a ``(1, 1, 1, 2)`` dummy when no gradient is needed),
        ``(B, T, U1)`` ``blank_lp``, ``emit_lp``
        and the uint8 ``bad_row`` (NaN/+inf in the row, or a label outside [0, V)
        or equal to blank). Launch with a ``(threads_v, rows)`` block and
        ``2 * threads_v * rows`` lattice floats of dynamic shared memory.
        """
        B, T, U1, V = logits.shape
        # The dummy is (1, 1, 1, 2): checking B alone would write past it when B = 1.
        keep_lse = lse.shape[0] == B and lse.shape[1] == T and lse.shape[2] == U1
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
                valid = t < T_len[b] and u <= U_len[b]
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
            s = nx // 2
            while s > 0:
                if tx < s:
                    buf[me] = max(buf[me], buf[me + s])
                    buf[flags + me] = max(buf[flags + me], buf[flags + me + s])
                cuda.syncthreads()
                s //= 2
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
            s = nx // 2
            while s > 0:
                if tx < s:
                    buf[me] = buf[me] + buf[me + s]
                cuda.syncthreads()
                s //= 2
            if tx == 0 and row < nodes:
                if not valid:
                    blank_lp[b, t, u] = -math.inf
                    emit_lp[b, t, u] = -math.inf
                else:
                    x_row = logits[b, t, u]
                    hi = lat(0.0)
                    lo = lat(0.0)
                    if nonfinite:
                        lo = lat(math.nan)
                    elif fused:
                        hi = m
                        lo = math.log(buf[ty * nx])
                    if keep_lse:
                        lse[b, t, u, 0] = hi
                        lse[b, t, u, 1] = lo
                    blank_lp[b, t, u] = (_load(x_row, blank) - hi) - lo
                    emit = -math.inf
                    if u < U_len[b]:
                        y = labels[b, u]
                        if y < 0 or y >= V or y == blank:  # only without host validation
                            nonfinite = True
                            emit = math.nan
                        else:
                            emit = (_load(x_row, y) - hi) - lo
                    emit_lp[b, t, u] = emit
                    bad_row[b, t, u] = 1 if nonfinite else 0
            cuda.syncthreads()



    @cuda.jit
    def cuda_gradient(
        logits, labels, T_len, U_len, blank, fused, lse, blank_lp, emit_lp,
        alpha, beta, log_like, scale, fastemit_lambda, clamp, grad,
    ):
        """Stage 3: ``grad = scale[b] * clip(d loss_b / d logits)``, one fused pass over V per node.

        Same formula and arrays as ``cpu_gradient``; ``grad`` ``(B, T, U1, V)`` has
        the storage type of ``logits`` and every entry is written.
        """
        B, T, U1, V = logits.shape
        nodes = B * T * U1
        tx = cuda.threadIdx.x
        nx = cuda.blockDim.x
        ny = cuda.blockDim.y
        start = np.int64(cuda.blockIdx.x) * ny + cuda.threadIdx.y
        step = np.int64(cuda.gridDim.x) * ny
        for row in range(start, nodes, step):
            b, t, u = _node(row, T, U1)
            out = grad[b, t, u]
            ll = log_like[b]
            Tb = T_len[b]
            Ub = U_len[b]
            if t >= Tb or u > Ub or not abs(ll) < math.inf:
                for v in range(tx, V, nx):
                    _store(out, v, lat(0.0))
                continue
            x_row = logits[b, t, u]
            a = alpha[b, t, u]
            after_blank = -math.inf
            if t + 1 < Tb:
                after_blank = beta[b, t + 1, u]
            elif u == Ub:
                after_blank = 0.0
            p_blank = math.exp(a + blank_lp[b, t, u] + after_blank - ll)
            p_emit = 0.0
            y = -1
            if u < Ub:
                p_emit = (1.0 + fastemit_lambda) * math.exp(
                    a + emit_lp[b, t, u] + beta[b, t, u + 1] - ll
                )
                y = labels[b, u]
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
                    g = math.exp((_load(x_row, v) - hi) - lo) * occ
                if v == blank:
                    g -= pb
                if v == y:
                    g -= pe
                if c > 0:
                    g = min(max(g, -c), c)
                _store(out, v, g * s)



    return cuda_normalise, cuda_gradient


# --------------------------------------------------------------------------- host side
def device_check(logits: torch.Tensor) -> None:
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


def _as_kernel_array(x: torch.Tensor):
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


def _lattice_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_launch(nodes: int):
    tv, rows = CONFIG["threads_v"], CONFIG["rows_per_block"]
    blocks = max(1, min(CONFIG["max_blocks"], -(-nodes // rows)))
    return blocks, (tv, rows)


def cuda_forward(logits, targets, logit_lengths, target_lengths, blank, fused, need_grad):
    """Stages 1 and 2 on the GPU; same contract as ``cpu.cpu_forward``.

    Returns ``(log_like (B,) float64, bad (B,), saved)`` as torch tensors on the
    logits' device. Lengths outside the padded dims (possible only without host
    validation) make that utterance's loss NaN instead of reading out of bounds.
    """
    device_check(logits)
    B, T, U1, V = logits.shape
    dev = logits.device
    lat = _lattice_dtype(logits)
    targets = targets.to(dev, torch.int64)
    t_len = logit_lengths.to(dev, torch.int64)
    u_len = target_lengths.to(dev, torch.int64)
    S = targets.shape[1]
    bad_len = (t_len < 1) | (t_len > T) | (u_len < 0) | (u_len > min(U1 - 1, S))
    t_len = torch.where(bad_len, torch.ones_like(t_len), t_len)
    u_len = torch.where(bad_len, torch.zeros_like(u_len), u_len)
    if S == 0:  # kernels index labels[b, u] only for u < U_b = 0; keep a valid shape
        targets = torch.zeros(B, 1, dtype=torch.int64, device=dev)

    blank_lp = torch.empty(B, T, U1, dtype=lat, device=dev)
    emit_lp = torch.empty(B, T, U1, dtype=lat, device=dev)
    bad_row = torch.zeros(B, T, U1, dtype=torch.uint8, device=dev)
    lse = torch.empty((B, T, U1, 2) if need_grad else (1, 1, 1, 2), dtype=lat, device=dev)
    stream = _stream()
    cuda_normalise, _ = row_kernels(str(logits.dtype).removeprefix("torch."))
    blocks, block = _row_launch(B * T * U1)
    shared = 2 * block[0] * block[1] * lse.element_size()
    a = _as_kernel_array
    cuda_normalise[blocks, block, stream, shared](
        a(logits), a(targets), a(t_len), a(u_len), blank, fused,
        a(lse), a(blank_lp), a(emit_lp), a(bad_row),
    )
    # Stage 2 in float64 whatever the input, as on the CPU (see cpu.cpu_alpha_beta).
    alpha = torch.empty(B, T, U1, dtype=torch.float64, device=dev)
    beta = torch.empty((B, T, U1) if need_grad else (1, 1, 1), dtype=torch.float64, device=dev)
    log_like = torch.empty(B, dtype=torch.float64, device=dev)
    if B > 0:  # a grid of 0 blocks is a launch error
        cuda_alpha_beta[B, CONFIG["threads_diag"], stream](
            a(blank_lp), a(emit_lp), a(t_len), a(u_len), a(alpha), a(beta), a(log_like),
            need_grad,
        )
    bad = bad_row.flatten(1).any(dim=1).bool() | bad_len  # (view(B, -1) fails at B = 0)
    log_like = torch.where(bad, torch.full_like(log_like, math.nan), log_like)
    saved = (lse, blank_lp, emit_lp, alpha, beta, targets, t_len, u_len) if need_grad else None
    return log_like, bad, saved


def cuda_best_path(saved, logit_lengths, target_lengths):
    """Run ``cuda_viterbi`` on forward's saved arrays; ``(best (B,), from_emit (B, T, U1))``
    as torch tensors on the logits' device."""
    _, blank_lp, emit_lp, _, _, _, t_len, u_len = saved
    B = blank_lp.shape[0]
    delta = torch.empty(blank_lp.shape, dtype=torch.float64, device=blank_lp.device)
    from_emit = torch.zeros(blank_lp.shape, dtype=torch.uint8, device=blank_lp.device)
    best = torch.empty(B, dtype=torch.float64, device=blank_lp.device)
    a = _as_kernel_array
    if B > 0:
        cuda_viterbi[B, CONFIG["threads_diag"], _stream()](
            a(blank_lp), a(emit_lp), a(t_len), a(u_len), a(delta), a(from_emit), a(best),
        )
    return best, from_emit


def cuda_backward(
    logits, targets, logit_lengths, target_lengths, blank, fused, saved, log_like,
    scale, fastemit_lambda, clamp,
):
    """Stage 3 on the GPU; same contract as ``cpu.cpu_backward``.

    ``scale`` ``(B,)``: a tensor on any device (moved without a host sync).
    """
    B, T, U1, V = logits.shape
    lse, blank_lp, emit_lp, alpha, beta, targets, t_len, u_len = saved
    dev = logits.device
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=dev)
    scale = torch.as_tensor(scale).to(dev, lse.dtype)
    blocks, block = _row_launch(B * T * U1)
    a = _as_kernel_array
    _, cuda_gradient = row_kernels(str(logits.dtype).removeprefix("torch."))
    cuda_gradient[blocks, block, _stream()](
        a(logits), a(targets), a(t_len), a(u_len), blank, fused,
        a(lse), a(blank_lp), a(emit_lp), a(alpha), a(beta),
        a(torch.as_tensor(log_like)), a(scale), float(fastemit_lambda), float(clamp), a(grad),
    )
    return grad
