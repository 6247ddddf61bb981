"""Reference tier: gpufc.reference's reduced-precision model (TF32, float16, bfloat16)
against independent float64 statements of the rounding rules."""

import numpy as np
import pytest

from gpufc import reference as ref

pytestmark = pytest.mark.reference


def _random_float32(rng, n):
    # every exponent, both signs, random mantissas; no NaN/inf
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    bits = bits[(bits & np.uint32(0x7F800000)) != np.uint32(0x7F800000)]
    return bits.view(np.float32)


def _nearest(x, lo_bits, step, ties):
    """Round float32 ``x`` to the grid of ``step``-spaced bit patterns: the nearer of the two
    neighbours (by float64 distance); ``ties`` picks on a tie: "away" or "even"."""
    lo = lo_bits.view(np.float32).astype(np.float64)
    hi_bits = (lo_bits.astype(np.uint64) + step).astype(np.uint32)
    hi = hi_bits.view(np.float32).astype(np.float64)
    x64 = x.astype(np.float64)
    d_lo, d_hi = np.abs(x64 - lo), np.abs(hi - x64)
    if ties == "away":
        pick_hi = d_hi <= d_lo
    else:
        odd = (lo_bits // np.uint32(step)) % 2 == 1
        pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & odd)
    return np.where(pick_hi, hi_bits, lo_bits).view(np.float32)


def test_round_tf32_is_nearest_ties_away(rng):
    x = _random_float32(rng, 200_000)
    x = x[np.abs(x) < 3.0e38]  # the next TF32 value above would be inf
    lo_bits = x.view(np.uint32) & np.uint32(0xFFFFE000)
    assert np.array_equal(ref.round_tf32(x).view(np.uint32), _nearest(x, lo_bits, 0x2000, "away").view(np.uint32))


def test_round_tf32_ties_and_specials():
    x = np.array([1 + 2**-11, -(1 + 2**-11), 1 + 3 * 2**-11, 1 + 2**-12, np.inf, -np.inf], np.float32)
    want = np.array([1 + 2**-10, -(1 + 2**-10), 1 + 2**-9, 1.0, np.inf, -np.inf], np.float32)
    assert np.array_equal(ref.round_tf32(x), want)
    assert np.isnan(ref.round_tf32(np.array([np.nan], np.float32))).all()


def test_round_bf16_is_nearest_ties_even(rng):
    x = _random_float32(rng, 200_000)
    x = x[np.abs(x) < 3.3e38]
    lo_bits = x.view(np.uint32) & np.uint32(0xFFFF0000)
    assert np.array_equal(ref.round_bf16(x).view(np.uint32), _nearest(x, lo_bits, 0x10000, "even").view(np.uint32))


def test_round_to_bfloat16_matches_ml_dtypes(rng):
    bf16 = ref.bfloat16_dtype()
    if bf16 is None:
        pytest.skip("ml_dtypes is not installed")
    x = rng.standard_normal(10_000).astype(np.float32) * 1e3
    assert np.array_equal(ref.round_to(x, bf16).astype(np.float32), x.astype(bf16).astype(np.float32))


def test_matmul_lowp_rounds_operands_and_sums_exactly(rng):
    a = rng.standard_normal((5, 33)).astype(np.float32)
    b = rng.standard_normal((33, 4)).astype(np.float32)
    want = (ref.round_tf32(a).astype(np.float64) @ ref.round_tf32(b).astype(np.float64)).astype(np.float32)
    assert np.array_equal(ref.matmul_lowp(a, b, "tf32"), want)
    ai = rng.integers(-20, 21, (5, 33)).astype(np.float16)
    bi = rng.integers(-20, 21, (33, 4)).astype(np.float16)
    assert np.array_equal(ref.matmul_lowp(ai, bi, "f16"), ai.astype(np.float64) @ bi.astype(np.float64))


def test_linear_float16_epilogue_in_float32_rounded_once(rng):
    x = rng.standard_normal((6, 9)).astype(np.float16)
    w = rng.standard_normal((9, 5)).astype(np.float16)
    b = rng.standard_normal(5).astype(np.float16)
    y = ref.linear(x, w, b, activation="tanh", dropout_p=0.3, seed=3, offset=1)
    assert y.dtype == np.float16
    z = (x.astype(np.float64) @ w.astype(np.float64)).astype(np.float32) + b.astype(np.float32)
    keep = ref.dropout_keep_mask((6, 5), 0.3, 3, 1)
    want = np.where(keep, np.tanh(z) * ref.dropout_scale(0.3, np.float32), 0).astype(np.float32).astype(np.float16)
    assert np.array_equal(y, want)


def test_tensor_core_kind_and_precision_errors():
    assert ref.tensor_core_kind(np.float32, "tf32") == "tf32"
    assert ref.tensor_core_kind(np.float32, "ieee") is None
    assert ref.tensor_core_kind(np.float64, "tf32") is None  # float64 ignores the precision
    assert ref.tensor_core_kind(np.float16) == "f16"
    with pytest.raises(ValueError, match=r"precision must be one of \('ieee', 'tf32'\), got precision='fp8'"):
        ref.tensor_core_kind(np.float32, "fp8")


def test_linear_backward_tf32_against_float64(rng):
    x = rng.standard_normal((7, 6)).astype(np.float32)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    go = rng.standard_normal((7, 3)).astype(np.float32)
    gx, gw, gb = ref.linear_backward(x, w, go, precision="tf32")
    t = lambda a: ref.round_tf32(a).astype(np.float64)
    assert np.array_equal(gx, (t(go) @ t(w).T).astype(np.float32))
    assert np.array_equal(gw, (t(x).T @ t(go)).astype(np.float32))
    assert np.array_equal(gb, go.astype(np.float64).sum(0).astype(np.float32))
