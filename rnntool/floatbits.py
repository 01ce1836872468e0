"""Float helpers of the CPU kernels that work at the level of bits.

``cpu.py`` reads as the three stages; what it needs below them lives here:

- bit casts (``f32_from_bits``, ``bits_from_f32``) and a branch-free float32 ``exp32``;
- float16 and bfloat16 conversions: numba has no half types on the CPU, so the
  kernels read and write them as their bits (float16 in ``uint16``, bfloat16 in
  ``int16``), through the CPU's conversion instructions where the compile
  target has them (``HARDWARE_HALF``), else in software, with the same bits;
- per-storage-type entries, chosen at compile time by ``@overload`` on the
  array's dtype: ``load``/``store`` (storage <-> lattice float), ``like``
  (a constant in the lattice float type), ``exp``, and ``row_max`` (a row's
  maximum through integer order keys, which vectorise);
- ``sum_exp``: a row's sum of exponentials in an order fixed by V alone.

Together they make an utterance's bits independent of the CPU's vector width,
the arrays' strides and the batch. The CUDA twins of ``row_max``/``sum_exp``
are ``cuda.py``'s block reductions; the bfloat16 rounding is shared with it
(``lattice.bf16_round``).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from . import lattice


# --------------------------------------------------------------------------- bit casts, exp
@intrinsic
def f32_from_bits(typingctx, bits):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def bits_from_f32(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(cache=True)
def exp32(x):
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
    scale = f32_from_bits(np.uint32((np.int32(n) + np.int32(127)) << np.int32(23)))
    res = p * scale
    return res if x > lo else np.float32(0.0)


def exp(x):  # typed by the overload below
    raise NotImplementedError


@overload(exp, jit_options={"cache": True})
def _exp_impl(x):
    if x == types.float32:
        return lambda x: exp32(x)
    return lambda x: math.exp(x)


def like(x, c):  # typed by the overload below
    raise NotImplementedError


@overload(like, jit_options={"cache": True})
def _like_impl(x, c):
    """Constant ``c`` in the float type of ``x`` (keeps float32 loops float32)."""
    if x == types.float32:
        return lambda x, c: np.float32(c)
    return lambda x, c: np.float64(c)


# --------------------------------------------------------------------------- 16-bit floats
@njit(cache=True)
def half_to_f32(h):
    """IEEE binary16 bits (uint16) -> float32, exact, subnormals included; branch-free.

    The half's exponent and mantissa, placed where float32 keeps them, read as a
    float32 and multiplied by 2**112, rebias the exponent from 15 to 127; the
    product is exact for normal and subnormal halves alike.
    """
    h32 = np.uint32(h)
    em = (h32 & np.uint32(0x7FFF)) << np.uint32(13)
    f = f32_from_bits(em) * np.float32(5.192296858534828e33)  # 2**112
    if (h32 & np.uint32(0x7C00)) == np.uint32(0x7C00):  # inf / NaN: exponent all ones
        f = f32_from_bits(em | np.uint32(0x7F800000))
    return f32_from_bits(bits_from_f32(f) | ((h32 & np.uint32(0x8000)) << np.uint32(16)))


@njit(cache=True)
def f32_to_half(x):
    """float32 -> IEEE binary16 bits, round to nearest even, with overflow to inf."""
    f = bits_from_f32(np.float32(x))
    sign = f & np.uint32(0x80000000)
    f = f ^ sign
    if f >= np.uint32((127 + 16) << 23):  # too big for half: inf, or NaN
        o = np.uint32(0x7E00) if f > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif f < np.uint32(113 << 23):  # half subnormal or zero: let the FPU round
        magic = np.uint32(((127 - 15) + (23 - 10) + 1) << 23)
        o = bits_from_f32(f32_from_bits(f) + f32_from_bits(magic)) - magic
    else:
        odd = (f >> np.uint32(13)) & np.uint32(1)
        f = f + np.uint32(((15 - 127) << 23) & 0xFFFFFFFF) + np.uint32(0xFFF) + odd
        o = f >> np.uint32(13)
    return np.uint16(o | (sign >> np.uint32(16)))


_bf16_round = njit(cache=True)(lattice.bf16_round)


@njit(cache=True)
def f32_to_bf16(x):
    """float32 -> bfloat16 bits (as int16), round to nearest even, NaN kept NaN."""
    return _bf16_round(bits_from_f32(np.float32(x)))


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
def half_to_f32_hw(typingctx, bits):
    """float16 bits -> float32 through LLVM's ``fpext half``: one vcvtph2ps on F16C."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def f32_to_half_hw(typingctx, x):
    """float32 -> float16 bits through LLVM's ``fptrunc`` (round to nearest even)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


# --------------------------------------------------------------------------- storage types
def load(a, i):  # typed by the overload below
    raise NotImplementedError


@overload(load, jit_options={"cache": True})
def _load_impl(a, i):
    """Element ``i`` of a 1-D storage array, as the lattice's float type."""
    if a.dtype == types.uint16:  # float16 bits
        if HARDWARE_HALF:
            return lambda a, i: half_to_f32_hw(a[i])
        return lambda a, i: half_to_f32(a[i])
    if a.dtype == types.int16:  # bfloat16 bits
        return lambda a, i: f32_from_bits(np.uint32(np.uint16(a[i])) << np.uint32(16))
    return lambda a, i: a[i]


def store(a, i, x):  # typed by the overload below
    raise NotImplementedError


@overload(store, jit_options={"cache": True})
def _store_impl(a, i, x):
    """Write lattice float ``x`` into storage array ``a`` at ``i`` in its own type."""
    if a.dtype == types.uint16:
        if HARDWARE_HALF:
            def impl(a, i, x):
                a[i] = f32_to_half_hw(np.float32(x))
        else:
            def impl(a, i, x):
                a[i] = f32_to_half(x)
        return impl
    if a.dtype == types.int16:
        def impl(a, i, x):
            a[i] = f32_to_bf16(x)
        return impl

    def impl(a, i, x):
        a[i] = x
    return impl


# --------------------------------------------------------------------------- row maximum
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
        b = np.int32(bits_from_f32(load(row, v)))
        k = b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))
        hi = max(hi, k)
        lo = min(lo, k)
    m = f32_from_bits(np.uint32(hi ^ ((hi >> np.int32(31)) & np.int32(0x7FFFFFFF))))
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
    return half_to_f32(_key16_bits(hi)), hi >= _F16_POS_INF or lo < _F16_NEG_INF


@njit(cache=True, error_model="numpy")
def _row_max_bf16(row):
    """(max, nonfinite) of a row of bfloat16 bits (int16)."""
    hi, lo = _row_keys16(row)
    m = f32_from_bits(np.uint32(_key16_bits(hi)) << np.uint32(16))
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


def row_max(row):  # typed by the overload below
    raise NotImplementedError


@overload(row_max, jit_options={"cache": True})
def _row_max_impl(row):
    """(max, nonfinite: NaN or +inf present) of one row of ``V`` storage values."""
    if row.dtype == types.float64:
        return lambda row: _row_max64(row)
    if row.dtype == types.uint16:
        return lambda row: _row_max_f16(row)
    if row.dtype == types.int16:
        return lambda row: _row_max_bf16(row)
    return lambda row: _row_max32(row)


# --------------------------------------------------------------------------- sum of exponentials
LANES = 16  # partial sums of sum_exp: element v always goes to lane v % LANES


@njit(cache=True, error_model="numpy")
def sum_exp(row, m, scratch):
    """sum over v of exp(row[v] - m), row a 1-D storage array of ``V``, in an order
    fixed by ``V`` alone.

    Element v is added to partial sum v % 16, the 16 partial sums are combined
    pairwise, always in the same tree. No re-association flag is used, so the bits do
    not depend on the CPU's vector width or on the row's strides (a memory-mapped
    slab, a padded batch and a contiguous tensor give the same loss); the 16
    independent lanes still vectorise. The last, partial block is padded with -inf
    (exp = 0). ``scratch``: ``2 * LANES`` lattice floats, reused between calls.
    """
    V = row.shape[0]
    acc = scratch[:LANES]
    tail = scratch[LANES:]
    for k in range(LANES):
        acc[k] = 0.0
    full = V - V % LANES
    for v in range(0, full, LANES):
        for k in range(LANES):
            acc[k] += exp(load(row, v + k) - m)
    if full < V:
        _load_tail(row, full, tail)
        for k in range(LANES):
            acc[k] += exp(tail[k] - m)
    return _lanes_total(acc)


@njit(cache=True, error_model="numpy", inline="always")
def _load_tail(row, full, tail):
    """The last, partial block of ``row`` from ``full`` on into ``tail``, padded with -inf."""
    for k in range(LANES):
        tail[k] = load(row, full + k) if full + k < row.shape[0] else -np.inf


@njit(cache=True, error_model="numpy", inline="always")
def _lanes_total(acc):
    """The ``LANES`` partial sums combined pairwise, always in the same tree."""
    w = LANES // 2
    while w >= 1:
        for k in range(w):
            acc[k] = acc[k] + acc[k + w]
        w //= 2
    return acc[0]


@njit(cache=True, error_model="numpy")
def sum_sq_probs(row, hi, lo, skip1, skip2, scratch):
    """sum over v not in {skip1, skip2} of p_v**2, with log p_v = (row[v] - hi) - lo (the
    normaliser split as stage 1 keeps it), in ``sum_exp``'s order: element v to lane
    v % 16, one fixed combining tree, the last block padded with -inf.

    Summing only the other entries, rather than subtracting the two large ones from
    the full sum afterwards, keeps the small sum of a peaked row accurate. The two
    skipped entries add an exact 0, in the (at most two) blocks that hold them; every
    other block runs the plain loop, which vectorises.
    ``scratch``: ``2 * LANES`` lattice floats.
    """
    V = row.shape[0]
    acc = scratch[:LANES]
    tail = scratch[LANES:]
    zero = like(hi, 0.0)
    lo = like(hi, lo)  # in the lattice type (math.log gave float64): the loop stays float32
    for k in range(LANES):
        acc[k] = zero
    full = V - V % LANES
    for v0 in range(0, full, LANES):
        if (v0 <= skip1 < v0 + LANES) or (v0 <= skip2 < v0 + LANES):
            for k in range(LANES):  # one of at most two blocks: the masked loop
                v = v0 + k
                lp = (load(row, v) - hi) - lo
                e = exp(lp + lp)
                acc[k] += e if (v != skip1) & (v != skip2) else zero
        else:
            for k in range(LANES):  # every other block: the same sums, vectorised
                lp = (load(row, v0 + k) - hi) - lo
                acc[k] += exp(lp + lp)
    if full < V:
        _load_tail(row, full, tail)
        for k in range(LANES):
            v = full + k
            lp = (tail[k] - hi) - lo
            e = exp(lp + lp)
            acc[k] += e if (v != skip1) & (v != skip2) else zero
    return _lanes_total(acc)
