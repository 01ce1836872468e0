"""The CPU kernels' bit-level building blocks (``floatbits``), checked exhaustively or
against numpy."""

import numpy as np
import pytest
import torch
from numba import njit

from rnntool import cpu, floatbits

HALF_DECODERS = {"software": floatbits.half_to_f32}
HALF_ENCODERS = {"software": floatbits.f32_to_half}
if floatbits.HARDWARE_HALF:
    HALF_DECODERS["hardware"] = floatbits.half_to_f32_hw
    HALF_ENCODERS["hardware"] = floatbits.f32_to_half_hw


def _vectorise(fn, out_dtype):
    @njit
    def run(a):
        out = np.empty(a.size, out_dtype)
        for i in range(a.size):
            out[i] = fn(a[i])
        return out

    return run


def same_floats(a, b):
    return np.array_equal(a, b) or bool(((a == b) | (np.isnan(a) & np.isnan(b))).all())


@pytest.mark.parametrize("kind", list(HALF_DECODERS))
def test_half_decode_every_bit_pattern(kind):
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = _vectorise(HALF_DECODERS[kind], np.float32)(bits)
    assert same_floats(got, bits.view(np.float16).astype(np.float32))


def _float32_probe():
    rng = np.random.default_rng(0)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 1e-8, 6e-8,
                      5.96e-8, 2.98e-8, 3e-8, -6.1e-5, 6.1035e-5, 1 + 2**-11, 1 + 3 * 2**-11],
                     np.float32)
    return np.concatenate([edges, rng.standard_normal(200_000).astype(np.float32) * 100,
                           (rng.standard_normal(200_000) * 1e-5).astype(np.float32)])


@pytest.mark.parametrize("kind", list(HALF_ENCODERS))
def test_half_encode_rounds_like_numpy(kind):
    x = _float32_probe()
    got = _vectorise(HALF_ENCODERS[kind], np.uint16)(x)
    with np.errstate(over="ignore"):  # values past 65520 become inf, as they should
        want = x.astype(np.float16)
    assert same_floats(got.view(np.float16), want)


def test_bfloat16_encode_rounds_like_torch():
    x = _float32_probe()
    got = _vectorise(floatbits.f32_to_bf16, np.int16)(x)
    want = torch.from_numpy(x).bfloat16().view(torch.int16).numpy()
    finite = np.isfinite(x)
    assert np.array_equal(got[finite], want[finite])
    assert np.isnan(torch.from_numpy(got[~np.isfinite(x) & np.isnan(x)]).view(torch.bfloat16)
                    .float().numpy()).all()


def test_exp32_accuracy():
    # Below -87 the result would be (nearly) subnormal: _exp32 returns 0 there, by design.
    x = np.linspace(-86.99, 0, 1_000_001).astype(np.float32)
    got = _vectorise(floatbits.exp32, np.float32)(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    # Measured: 1 ulp near 0, up to 2.5 ulp near -87 (the range reduction's rounding).
    assert (np.abs(got - want) / want).max() < 3 * np.finfo(np.float32).eps
    special = _vectorise(floatbits.exp32, np.float32)(np.array([-np.inf, -200, -87, 0], np.float32))
    assert special.tolist() == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_row_max_and_nonfinite(dtype):
    @njit
    def row_max(r):
        return floatbits.row_max(r)

    cases = [([1.0, -3.0, 2.5], 2.5, False), ([-np.inf, -5.0], -5.0, False),
             ([np.inf, 1.0], np.inf, True), ([np.nan, 1.0], None, True),
             ([-0.0, -1.0], 0.0, False), ([-np.inf, -np.inf], -np.inf, False)]
    for vals, m, bad in cases:
        t = torch.tensor(vals, dtype=getattr(torch, dtype))
        got_m, got_bad = row_max(cpu.storage_view(t))
        assert got_bad == bad, vals
        if m is not None:
            assert got_m == m, vals
