"""Numba CPU kernels of the loss engine: the three stages of DESIGN.md.

Twins of ``cuda.py`` (same stage names, same arrays):

1. ``cpu_normalise``   one pass over V per lattice node: the compact log-probs.
2. ``cpu_alpha_beta``  forward-backward over the compact arrays, one utterance
                       per thread; ``cpu_alpha_loss`` is the forward-only variant
                       that keeps one row of alpha, for scoring without gradients.
3. ``cpu_gradient``    one fused pass over V per node, in ``backward()``.

Shapes: ``B`` utterances, padded to ``T`` frames and ``U1 = U+1`` label
positions, vocabulary ``V``. Logits arrive in their *storage* type:
float32 or float64 as they are, float16 as its bits in a ``uint16`` array and
bfloat16 as its bits in an ``int16`` array (numba has no half types on the CPU).
Stages 1 and 3 compute in float64 for float64 input and float32 otherwise; stage 2
(alpha, beta, log P) always in float64.

``-inf`` logits (masked tokens) are legal, so no fastmath flag that assumes
finite values is used, and none that re-associates: every sum runs in an order
fixed by the shapes alone, so an utterance's bits do not depend on the CPU's
vector width, the arrays' strides, the batch it shares or the thread count.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import lattice
from .threads import kernel_lock, select_layer

select_layer()

# error_model="numpy": IEEE results for x/0 rather than exceptions (and no checks in hot loops).
_PAR = dict(parallel=True, cache=True, nogil=True, error_model="numpy")


# --------------------------------------------------------------------------- numerics
@intrinsic
def _f32_from_bits(typingctx, bits):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _bits_from_f32(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(cache=True)
def _exp32(x):
    """exp for float32, branch-free so that loops over V vectorise.

    Cody-Waite range reduction and a degree-7 polynomial (Cephes' expf
    coefficients): relative error below 3 ulp on (-87, 88] (1 ulp near 0,
    2.5 near -87, measured); exp(x) = 0 for
    x <= -87 (where float32 turns subnormal), exp(-inf) = 0.
    NaN is not propagated: stage 1 detects non-finite rows separately.
    """
    lo = np.float32(-87.0)
    hi = np.float32(88.5)
    xc = x if x > lo else lo
    xc = xc if xc < hi else hi
    n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    scale = _f32_from_bits(np.uint32((np.int32(n) + np.int32(127)) << np.int32(23)))
    res = p * scale
    return res if x > lo else np.float32(0.0)


def _exp(x):  # typed by the overload below
    raise NotImplementedError


@overload(_exp, jit_options={"cache": True})
def _exp_impl(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: math.exp(x)


@njit(cache=True)
def _half_bits_to_f32(h):
    """IEEE binary16 bits (uint16) -> float32, exact, subnormals included; branch-free.

    The half's exponent and mantissa, placed where float32 keeps them, read as a
    float32 and multiplied by 2**112, rebias the exponent from 15 to 127; the
    product is exact for normal and subnormal halves alike.
    """
    h32 = np.uint32(h)
    em = (h32 & np.uint32(0x7FFF)) << np.uint32(13)
    f = _f32_from_bits(em) * np.float32(5.192296858534828e33)  # 2**112
    if (h32 & np.uint32(0x7C00)) == np.uint32(0x7C00):  # inf / NaN: exponent all ones
        f = _f32_from_bits(em | np.uint32(0x7F800000))
    return _f32_from_bits(_bits_from_f32(f) | ((h32 & np.uint32(0x8000)) << np.uint32(16)))


@njit(cache=True)
def _f32_to_half_bits(x):
    """float32 -> IEEE binary16 bits, round to nearest even, with overflow to inf."""
    f = _bits_from_f32(np.float32(x))
    sign = f & np.uint32(0x80000000)
    f = f ^ sign
    if f >= np.uint32((127 + 16) << 23):  # too big for half: inf, or NaN
        o = np.uint32(0x7E00) if f > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif f < np.uint32(113 << 23):  # half subnormal or zero: let the FPU round
        magic = np.uint32(((127 - 15) + (23 - 10) + 1) << 23)
        o = _bits_from_f32(_f32_from_bits(f) + _f32_from_bits(magic)) - magic
    else:
        odd = (f >> np.uint32(13)) & np.uint32(1)
        f = f + np.uint32(((15 - 127) << 23) & 0xFFFFFFFF) + np.uint32(0xFFF) + odd
        o = f >> np.uint32(13)
    return np.uint16(o | (sign >> np.uint32(16)))


@njit(cache=True)
def _f32_to_bf16_bits(x):
    """float32 -> bfloat16 bits (as int16), round to nearest even, NaN kept NaN."""
    f = _bits_from_f32(np.float32(x))
    if (f & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        r = (f >> np.uint32(16)) | np.uint32(0x40)  # quiet NaN
    else:
        r = (f + np.uint32(0x7FFF) + ((f >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    # uint16 -> int16 with wrap-around: the same 16 bits.
    return np.int16(np.int32(r) - 65536 if r >= np.uint32(0x8000) else np.int32(r))


def _like(x, c):  # typed by the overload below
    raise NotImplementedError


@overload(_like, jit_options={"cache": True})
def _like_impl(x, c):
    """Constant ``c`` in the float type of ``x`` (keeps float32 loops float32)."""
    if x == types.float32:
        return lambda x, c: np.float32(c)
    return lambda x, c: np.float64(c)


def _target_converts_half() -> bool:
    """Whether the CPU the kernels are compiled for converts float16 in hardware
    (x86 F16C, or any aarch64).

    As numba picks the target: ``NUMBA_CPU_FEATURES`` when set, else the host's
    features, unless ``NUMBA_CPU_NAME`` names another CPU without features (then
    the portable path: fpext to half on a target without F16C needs a runtime
    library call that numba cannot link). Both paths give the same bits.
    """
    import platform

    import llvmlite.binding as llvm
    from numba.core import config

    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    if config.CPU_FEATURES is not None:
        return "+f16c" in config.CPU_FEATURES.split(",")
    if config.CPU_NAME and config.CPU_NAME != "host":
        return False
    try:
        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except Exception:  # noqa: BLE001 (unknown host: use the portable path)
        return False


HARDWARE_HALF = _target_converts_half()


@intrinsic
def _half_hw_to_f32(typingctx, bits):
    """float16 bits -> float32 through LLVM's ``fpext half``: one vcvtph2ps on F16C."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_half_hw(typingctx, x):
    """float32 -> float16 bits through LLVM's ``fptrunc`` (round to nearest even)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


def _load(a, i):  # typed by the overload below
    raise NotImplementedError


@overload(_load, jit_options={"cache": True})
def _load_impl(a, i):
    """Element ``i`` of a 1-D storage array, as the lattice's float type."""
    if a.dtype == types.uint16:  # float16 bits
        if HARDWARE_HALF:
            return lambda a, i: _half_hw_to_f32(a[i])
        return lambda a, i: _half_bits_to_f32(a[i])
    if a.dtype == types.int16:  # bfloat16 bits
        return lambda a, i: _f32_from_bits(np.uint32(np.uint16(a[i])) << np.uint32(16))
    return lambda a, i: a[i]


def _store(a, i, x):  # typed by the overload below
    raise NotImplementedError


@overload(_store, jit_options={"cache": True})
def _store_impl(a, i, x):
    """Write lattice float ``x`` into storage array ``a`` at ``i`` in its own type."""
    if a.dtype == types.uint16:
        if HARDWARE_HALF:
            def impl(a, i, x):
                a[i] = _f32_to_half_hw(np.float32(x))
        else:
            def impl(a, i, x):
                a[i] = _f32_to_half_bits(x)
        return impl
    if a.dtype == types.int16:
        def impl(a, i, x):
            a[i] = _f32_to_bf16_bits(x)
        return impl

    def impl(a, i, x):
        a[i] = x
    return impl


@njit(cache=True)
def _shifted(x, hi, lo):
    """``(x - hi) - lo`` in this order: ``x - (hi + lo)`` loses the small ``lo``
    when logits are large (float32 keeps ~7 digits of a logit of 75)."""
    return (x - hi) - lo


_KEY_POS_INF = np.int32(0x7F800000)  # order key of +inf; NaNs with the sign bit clear lie above
_KEY_NEG_INF = np.int32(-2139095041)  # order key of -inf; NaNs with the sign bit set lie below


@njit(cache=True, error_model="numpy")
def _row_max32(row):
    """(max, nonfinite) of a row read as float32, through integer order keys.

    A float32's bits, with the lower 31 flipped when negative, order like the
    floats themselves; integer max/min reductions vectorise where float ones
    (with NaN semantics) do not. NaN and +inf sort outside [-inf, +inf)'s keys.
    """
    hi = np.int32(-2147483648)
    lo = np.int32(2147483647)
    for v in range(row.shape[0]):
        b = np.int32(_bits_from_f32(_load(row, v)))
        k = b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))
        hi = max(hi, k)
        lo = min(lo, k)
    m = _f32_from_bits(np.uint32(hi ^ ((hi >> np.int32(31)) & np.int32(0x7FFFFFFF))))
    return m, hi >= _KEY_POS_INF or lo < _KEY_NEG_INF


def _key16(bits: int) -> np.int16:
    """Order key of a 16-bit sign-magnitude float's bits (as for float32 above)."""
    b = np.int16(np.uint16(bits).view(np.int16))
    return np.int16(b ^ ((b >> 15) & 0x7FFF))


_F16_POS_INF, _F16_NEG_INF = _key16(0x7C00), _key16(0xFC00)
_BF16_POS_INF, _BF16_NEG_INF = _key16(0x7F80), _key16(0xFF80)


@njit(cache=True, error_model="numpy")
def _row_keys16(row):
    """(max key, min key) of a row of 16-bit float bits, in 16-bit lanes (twice as
    many per vector as float32, and no decoding)."""
    hi = np.int16(-32768)
    lo = np.int16(32767)
    for v in range(row.shape[0]):
        b = np.int16(row[v])
        k = np.int16(b ^ np.int16(np.int16(b >> np.int16(15)) & np.int16(0x7FFF)))
        hi = max(hi, k)
        lo = min(lo, k)
    return hi, lo


@njit(cache=True, error_model="numpy")
def _key16_bits(k):
    return np.uint16(np.int16(k ^ np.int16(np.int16(k >> np.int16(15)) & np.int16(0x7FFF))))


@njit(cache=True, error_model="numpy")
def _row_max_f16(row):
    """(max, nonfinite) of a row of float16 bits (uint16)."""
    hi, lo = _row_keys16(row)
    return _half_bits_to_f32(_key16_bits(hi)), hi >= _F16_POS_INF or lo < _F16_NEG_INF


@njit(cache=True, error_model="numpy")
def _row_max_bf16(row):
    """(max, nonfinite) of a row of bfloat16 bits (int16)."""
    hi, lo = _row_keys16(row)
    m = _f32_from_bits(np.uint32(_key16_bits(hi)) << np.uint32(16))
    return m, hi >= _BF16_POS_INF or lo < _BF16_NEG_INF


@njit(cache=True, error_model="numpy")
def _row_max64(row):
    """(max, nonfinite) of a float64 row: the plain loop (float64 is the exact path)."""
    m = row[0]
    nonfinite = False
    for v in range(row.shape[0]):
        x = row[v]
        nonfinite |= not (x < np.inf)
        m = x if x > m else m
    return m, nonfinite


def _row_max(row):  # typed by the overload below
    raise NotImplementedError


@overload(_row_max, jit_options={"cache": True})
def _row_max_impl(row):
    """(max, nonfinite: NaN or +inf present) of one row of ``V`` storage values."""
    if row.dtype == types.float64:
        return lambda row: _row_max64(row)
    if row.dtype == types.uint16:
        return lambda row: _row_max_f16(row)
    if row.dtype == types.int16:
        return lambda row: _row_max_bf16(row)
    return lambda row: _row_max32(row)


_LANES = 16  # partial sums of _sum_exp: element v always goes to lane v % _LANES


@njit(cache=True, error_model="numpy")
def _sum_exp(row, m, scratch):
    """sum over v of exp(row[v] - m), row a 1-D storage array of ``V``, in an order
    fixed by ``V`` alone.

    Element v is added to partial sum v % 16, the 16 partial sums are combined
    pairwise, always in the same tree. No re-association flag is used, so the bits do
    not depend on the CPU's vector width or on the row's strides (a memory-mapped
    slab, a padded batch and a contiguous tensor give the same loss); the 16
    independent lanes still vectorise. The last, partial block is padded with -inf
    (exp = 0). ``scratch``: ``2 * _LANES`` lattice floats, reused between calls.
    """
    V = row.shape[0]
    acc = scratch[:_LANES]
    tail = scratch[_LANES:]
    for k in range(_LANES):
        acc[k] = 0.0
    full = V - V % _LANES
    for v in range(0, full, _LANES):
        for k in range(_LANES):
            acc[k] += _exp(_load(row, v + k) - m)
    if full < V:
        for k in range(_LANES):
            tail[k] = _load(row, full + k) if full + k < V else -np.inf
        for k in range(_LANES):
            acc[k] += _exp(tail[k] - m)
    w = _LANES // 2
    while w >= 1:
        for k in range(w):
            acc[k] = acc[k] + acc[k + w]
        w //= 2
    return acc[0]


_logaddexp = njit(cache=True)(lattice.logaddexp)
_emission_wins = njit(cache=True)(lattice.emission_wins)


# --------------------------------------------------------------------------- stage 1
@njit(**_PAR)
def cpu_normalise(logits, labels, T_len, U_len, blank, fused, lse, blank_lp, emit_lp, bad_row):
    """Stage 1: the two log-probs the lattice needs, one pass over V per node.

    logits: ``(B, T, U1, V)`` storage array; labels ``(B, S)`` int64;
    T_len, U_len ``(B,)`` int64. Writes, in the lattice float type:
    ``lse`` ``(B, T, U1, 2)``, the log-normaliser split as (row max, log of the
    sum of exp(x - max)), zeros when ``fused`` is False, or a ``(1, 1, 1, 2)``
    dummy when no gradient is needed; and ``(B, T, U1)`` ``blank_lp`` and
    ``emit_lp`` (-inf where u = U_b or outside the lengths), computed as
    ``(x - max) - logsum`` so that float32 keeps its precision for large logits.
    ``bad_row[b, t, u]`` is set where the row holds NaN or +inf: the loss of that utterance is NaN.
    """
    B, T, U1, V = logits.shape
    # The dummy is (1, 1, 1, 2): checking B alone would write past it when B = 1.
    keep_lse = lse.shape[:3] == (B, T, U1)
    # One (b, t) frame per iteration: no divisions per node, rows read in order.
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        scratch = np.empty(2 * _LANES, blank_lp.dtype)
        for u in range(U1):
            if t >= T_len[b] or u > U_len[b]:
                blank_lp[b, t, u] = -np.inf
                emit_lp[b, t, u] = -np.inf
            else:
                _normalise_node(logits[b, t, u], labels, b, t, u, U_len[b], blank, fused,
                                keep_lse, lse, blank_lp, emit_lp, bad_row, scratch)


@njit(cache=True, error_model="numpy", inline="always")
def _normalise_node(row, labels, b, t, u, Ub, blank, fused, keep_lse, lse, blank_lp, emit_lp,
                    bad_row, scratch):
    """Stage 1 for one node: ``row`` is its ``(V,)`` logits."""
    m, nonfinite = _row_max(row)
    hi = _like(m, 0.0)
    lo = _like(m, 0.0)
    nonfinite |= fused and m == -np.inf  # all -inf: no distribution
    if fused and not nonfinite:
        hi = m
        lo = math.log(_sum_exp(row, m, scratch))
    if nonfinite:
        lo = _like(m, np.nan)
    bad_row[b, t, u] = nonfinite
    if keep_lse:
        lse[b, t, u, 0] = hi
        lse[b, t, u, 1] = lo
    blank_lp[b, t, u] = _shifted(_load(row, blank), hi, lo)
    if u < Ub:
        emit_lp[b, t, u] = _shifted(_load(row, labels[b, u]), hi, lo)
    else:
        emit_lp[b, t, u] = -np.inf


# --------------------------------------------------------------------------- stage 2
@njit(**_PAR)
def cpu_alpha_beta(blank_lp, emit_lp, T_len, U_len, alpha, beta, log_like):
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
        Tb = T_len[b]
        Ub = U_len[b]
        alpha[b] = -np.inf
        beta[b] = -np.inf
        for t in range(Tb):
            for u in range(Ub + 1):
                if t == 0 and u == 0:
                    alpha[b, 0, 0] = 0.0
                    continue
                a = -np.inf
                if t > 0:
                    a = alpha[b, t - 1, u] + blank_lp[b, t - 1, u]
                if u > 0:
                    a = _logaddexp(a, alpha[b, t, u - 1] + emit_lp[b, t, u - 1])
                alpha[b, t, u] = a
        for t in range(Tb - 1, -1, -1):
            for u in range(Ub, -1, -1):
                if t == Tb - 1 and u == Ub:
                    beta[b, t, u] = blank_lp[b, t, u]
                    continue
                e = -np.inf
                if t < Tb - 1:
                    e = beta[b, t + 1, u] + blank_lp[b, t, u]
                if u < Ub:
                    e = _logaddexp(e, beta[b, t, u + 1] + emit_lp[b, t, u])
                beta[b, t, u] = e
        log_like[b] = alpha[b, Tb - 1, Ub] + blank_lp[b, Tb - 1, Ub]


@njit(**_PAR)
def cpu_alpha_loss(blank_lp, emit_lp, T_len, U_len, log_like):
    """Stage 2 without gradients: alpha keeping one row of ``U1`` per utterance.

    Writes only ``log_like[b] = log P(y|x)`` (float64, as in ``cpu_alpha_beta``);
    O(B * U1) scratch memory.
    """
    B, T, U1 = blank_lp.shape
    for b in prange(B):
        Tb = T_len[b]
        Ub = U_len[b]
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
def cpu_viterbi(blank_lp, emit_lp, T_len, U_len, delta, from_emit, best):
    """The max-product twin of stage 2: the best alignment's log-prob into each node.

    Writes ``delta`` ``(B, T, U1)``, ``from_emit`` ``(B, T, U1)`` uint8 (1 where
    the best way into (t, u) is the emission from (t, u-1), 0 for the blank from
    (t-1, u); ties go to the blank, on every backend) and ``best[b]``, the best
    path's log-prob ``delta[T_b-1, U_b] + blank_lp[T_b-1, U_b]``.
    """
    B, T, U1 = blank_lp.shape
    for b in prange(B):
        Tb = T_len[b]
        Ub = U_len[b]
        for t in range(Tb):
            for u in range(Ub + 1):
                if t == 0 and u == 0:
                    delta[b, 0, 0] = 0.0
                    from_emit[b, 0, 0] = 0
                    continue
                a = -np.inf
                e = -np.inf
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
        best[b] = delta[b, Tb - 1, Ub] + blank_lp[b, Tb - 1, Ub]


# --------------------------------------------------------------------------- stage 3
@njit(**_PAR)
def cpu_gradient(
    logits, labels, T_len, U_len, blank, fused, lse, blank_lp, emit_lp,
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
            _gradient_node(logits[b, t, u], grad[b, t, u], labels, b, t, u, T_len[b], U_len[b],
                           blank, fused, lse, blank_lp, emit_lp, alpha, beta, log_like[b],
                           scale[b], 1.0 + fastemit_lambda, clamp)


@njit(cache=True, error_model="numpy", inline="always")
def _gradient_node(row, out, labels, b, t, u, Tb, Ub, blank, fused, lse, blank_lp, emit_lp,
                   alpha, beta, ll, scale_b, emit_w, clamp):
    """Stage 3 for one node: ``row``, ``out`` are its ``(V,)`` logits and gradient."""
    V = row.shape[0]
    if t >= Tb or u > Ub or not (abs(ll) < np.inf):
        for v in range(V):
            _store(out, v, 0.0)
        return
    a = alpha[b, t, u]
    if t + 1 < Tb:
        after_blank = beta[b, t + 1, u]
    else:
        after_blank = 0.0 if u == Ub else -np.inf
    p_blank = math.exp(a + blank_lp[b, t, u] + after_blank - ll)
    p_emit = 0.0
    y = -1
    if u < Ub:
        p_emit = emit_w * math.exp(a + emit_lp[b, t, u] + beta[b, t, u + 1] - ll)
        y = labels[b, u]
    hi = lse[b, t, u, 0]
    lo = lse[b, t, u, 1]
    s = _like(hi, scale_b)
    zero = _like(hi, 0.0)
    occ = _like(hi, p_blank + p_emit)
    c = _like(hi, clamp)
    # Branches outside the loops over V, so that each loop vectorises.
    if not fused:
        for v in range(V):
            _store(out, v, zero)
    elif clamp > 0:
        for v in range(V):
            g = _exp(_shifted(_load(row, v), hi, lo)) * occ
            _store(out, v, min(max(g, -c), c) * s)
    else:
        occ_s = occ * s
        for v in range(V):
            _store(out, v, _exp(_shifted(_load(row, v), hi, lo)) * occ_s)
    # The two arcs' own terms: recompute those entries from scratch.
    for k in range(2):
        v = blank if k == 0 else y
        if v < 0:
            continue
        g = zero
        if fused:
            g = _exp(_shifted(_load(row, v), hi, lo)) * occ
        g = g - _like(hi, p_blank if k == 0 else p_emit)
        if clamp > 0:
            g = min(max(g, -c), c)
        _store(out, v, g * s)


# --------------------------------------------------------------------------- host side
def cpu_best_path(saved, logit_lengths, target_lengths):
    """Run ``cpu_viterbi`` on forward's saved arrays; ``(best (B,), from_emit (B, T, U1))``."""
    _, blank_lp, emit_lp, _, _ = saved
    T_len, U_len = np.asarray(logit_lengths), np.asarray(target_lengths)
    delta = np.empty(blank_lp.shape, np.float64)
    from_emit = np.zeros(blank_lp.shape, np.uint8)
    best = np.empty(blank_lp.shape[0], np.float64)
    with kernel_lock():
        cpu_viterbi(blank_lp, emit_lp, T_len, U_len, delta, from_emit, best)
    return best, from_emit



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


def cpu_forward(logits, targets, logit_lengths, target_lengths, blank, fused, need_grad):
    """Stages 1 and 2 on the CPU.

    logits: ``(B, T, U1, V)`` torch tensor (any float dtype, any strides) or numpy
    array; targets ``(B, S)`` and lengths ``(B,)`` int64 tensors or arrays, already
    validated (``loss.check_inputs``).
    Returns ``(log_like (B,) float64, bad (B,), saved)`` where ``saved`` holds the
    compact ``(B, T, U1[, 2])`` arrays the gradient needs (``None`` without
    ``need_grad``): ``lse``, ``blank_lp``, ``emit_lp`` in the lattice type, alpha
    and beta in float64.
    """
    x = storage_view(logits)
    B, T, U1, _ = x.shape
    lat = np.float64 if x.dtype == np.float64 else np.float32
    # Stage 2 always runs in float64 (see cpu_alpha_beta).
    y, T_len, U_len = (np.asarray(a) for a in (targets, logit_lengths, target_lengths))
    blank_lp = np.empty((B, T, U1), lat)
    emit_lp = np.empty((B, T, U1), lat)
    bad_row = np.zeros((B, T, U1), np.bool_)
    lse = np.empty((B, T, U1, 2) if need_grad else (1, 1, 1, 2), lat)
    log_like = np.empty(B, np.float64)
    saved = None
    with kernel_lock():
        cpu_normalise(x, y, T_len, U_len, blank, fused, lse, blank_lp, emit_lp, bad_row)
        if need_grad:
            alpha = np.empty((B, T, U1), np.float64)
            beta = np.empty((B, T, U1), np.float64)
            cpu_alpha_beta(blank_lp, emit_lp, T_len, U_len, alpha, beta, log_like)
            saved = (lse, blank_lp, emit_lp, alpha, beta)
        else:
            cpu_alpha_loss(blank_lp, emit_lp, T_len, U_len, log_like)
    bad = bad_row.any(axis=(1, 2))  # (also for B = 0, where reshape(B, -1) fails)
    log_like[bad] = np.nan
    return log_like, bad, saved


def cpu_backward(
    logits, targets, logit_lengths, target_lengths, blank, fused, saved, log_like,
    scale, fastemit_lambda, clamp,
):
    """Stage 3 on the CPU: the gradient ``(B, T, U1, V)`` in ``logits``' dtype, contiguous.

    ``scale`` ``(B,)`` (torch or numpy): d(returned value)/d loss_b times grad_output.
    """
    import torch

    grad = torch.empty(logits.shape, dtype=logits.dtype)
    lse, blank_lp, emit_lp, alpha, beta = saved
    with kernel_lock():
        cpu_gradient(
            storage_view(logits), targets.numpy(), logit_lengths.numpy(), target_lengths.numpy(),
            blank, fused, lse, blank_lp, emit_lp, alpha, beta, log_like,
            np.ascontiguousarray(np.asarray(scale), dtype=lse.dtype), float(fastemit_lambda),
            float(clamp), storage_view(grad),
        )
    return grad
