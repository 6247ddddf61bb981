"""Reference tier: gpufc.reference against float64 math, Random123 and the contracts."""

import math

import numpy as np
import pytest
from helpers import KAT, numeric_grad

from gpufc import reference as ref

pytestmark = pytest.mark.reference



@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    out = ref.philox4x32_10(np.array(counter, np.uint32), np.array(key, np.uint32))
    assert [int(v) for v in out] == list(expected)


def test_philox_batched_rows_and_per_row_keys():
    counters = np.array([c for c, _, _ in KAT], np.uint32)
    keys = np.array([k for _, k, _ in KAT], np.uint32)
    out = ref.philox4x32_10(counters, keys)
    assert out.tolist() == [list(e) for _, _, e in KAT]


def test_philox_rejects_wrong_dtype_and_shape():
    with pytest.raises(TypeError, match="uint32"):
        ref.philox4x32_10(np.zeros(4, np.int64), np.zeros(2, np.uint32))
    with pytest.raises(ValueError, match="counter"):
        ref.philox4x32_10(np.zeros((2, 3), np.uint32), np.zeros(2, np.uint32))
    with pytest.raises(ValueError, match="key"):
        ref.philox4x32_10(np.zeros((2, 4), np.uint32), np.zeros(3, np.uint32))


def _mask_from_definition(size, p, seed, offset):
    """The contract's steps 1-4 written element by element."""
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32)
    t = math.floor(p * 2**32)
    out = np.empty(size, bool)
    for e in range(size):
        n = offset + e
        blk = n // 4
        word = ref.philox4x32_10(np.array([blk & 0xFFFFFFFF, blk >> 32, 0, 0], np.uint32), key)[n % 4]
        out[e] = int(word) >= t
    return out


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 5, 2**32 * 4 - 3, 2**40 + 7])
@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 2**64 - 1])
def test_keep_mask_matches_contract_definition(seed, offset):
    size, p = 23, 0.37
    expected = _mask_from_definition(size, p, seed, offset)
    assert np.array_equal(ref.dropout_keep_mask((size,), p, seed, offset), expected)


def test_keep_mask_is_row_major_over_the_shape():
    m = ref.dropout_keep_mask((5, 7), 0.5, 3, 9)
    assert np.array_equal(m.reshape(-1), ref.dropout_keep_mask(35, 0.5, 3, 9))


def test_keep_mask_of_split_calls_equals_one_call():
    whole = ref.dropout_keep_mask(100, 0.3, 11, 2)
    parts = [ref.dropout_keep_mask(n, 0.3, 11, 2 + start) for start, n in ((0, 13), (13, 50), (63, 37))]
    assert np.array_equal(whole, np.concatenate(parts))


def test_threshold_is_exact():
    assert ref.dropout_threshold(0.0) == 0
    assert ref.dropout_threshold(1.0) == 2**32
    assert ref.dropout_threshold(0.5) == 2**31
    p = 0.1  # not representable: floor of the exact float64 product
    assert ref.dropout_threshold(p) == int(np.floor(np.float64(p) * np.float64(2**32)))


def test_p_zero_keeps_all_and_p_one_drops_all():
    assert ref.dropout_keep_mask(1000, 0.0, 1, 0).all()
    assert not ref.dropout_keep_mask(1000, 1.0, 1, 0).any()


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), float("inf")])
def test_p_out_of_range_names_p(p):
    with pytest.raises(ValueError, match="p="):
        ref.dropout(np.ones(3, np.float32), p)


def test_seed_out_of_range():
    with pytest.raises(ValueError, match="seed"):
        ref.dropout_keep_mask(3, 0.5, 2**64, 0)
    with pytest.raises(ValueError, match="seed"):
        ref.dropout_keep_mask(3, 0.5, -1, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_values_follow_the_contract(dtype):
    x = np.linspace(-3, 3, 1001).astype(dtype)
    x[::97] = np.nan
    x[5] = np.inf
    p = 0.3
    y = ref.dropout(x, p, seed=7, offset=4)
    keep = ref.dropout_keep_mask(x.shape, p, 7, 4)
    scale = dtype(1.0 / (1.0 - p))  # computed in float64, rounded once
    assert y.dtype == dtype
    assert np.array_equal(y[keep], x[keep] * scale, equal_nan=True)
    assert (y[~keep] == 0).all()  # NaN and inf included


def test_dropout_p_one_is_all_zero_even_for_nan():
    x = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    assert np.array_equal(ref.dropout(x, 1.0), np.zeros(4, np.float32))


def test_dropout_eval_is_identity():
    x = np.arange(10, dtype=np.float32)
    assert np.array_equal(ref.dropout(x, 0.9, training=False), x)


def test_keep_rate_is_close_to_one_minus_p():
    n = 200_000
    for p in (0.1, 0.5, 0.9):
        kept = ref.dropout_keep_mask(n, p, 123, 0).sum()
        # 6 sigma binomial bound: fails with probability ~2e-9 on a correct generator
        assert abs(kept - n * (1 - p)) < 6 * math.sqrt(n * p * (1 - p))


# ---------------------------------------------------------------------------
# activations and linear
# ---------------------------------------------------------------------------

ACTS = [a for a in ref.ACTIVATIONS]


@pytest.mark.parametrize("name", ACTS)
def test_activation_grad_matches_finite_differences(name):
    z = np.linspace(-4, 4, 81) + 0.013  # avoid relu's kink at exactly 0
    h = 1e-6
    fd = (ref.activation(z + h, name) - ref.activation(z - h, name)) / (2 * h)
    np.testing.assert_allclose(ref.activation_grad(z, name), fd, rtol=1e-6, atol=1e-8)


def test_activation_values():
    z = np.array([-2.0, -0.5, 0.0, 0.5, 2.0])
    assert np.array_equal(ref.activation(z, "relu"), np.maximum(z, 0))
    gelu = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in z])
    np.testing.assert_allclose(ref.activation(z, "gelu"), gelu, rtol=1e-15)
    np.testing.assert_allclose(ref.activation(z, "sigmoid"), 1 / (1 + np.exp(-z)), rtol=1e-15)
    np.testing.assert_allclose(ref.activation(z, "tanh"), np.tanh(z), rtol=1e-15)
    with pytest.raises(ValueError, match="activation="):
        ref.activation(z, "swish")


def test_linear_matches_float64_math(rng):
    x = rng.standard_normal((4, 5, 6))
    w = rng.standard_normal((6, 3))
    b = rng.standard_normal(3)
    y = ref.linear(x, w, b, activation="tanh")
    expected = np.tanh(np.einsum("abk,kn->abn", x, w) + b)
    np.testing.assert_allclose(y, expected, rtol=1e-12)


def test_linear_dropout_mask_is_over_rows_by_n(rng):
    x = rng.standard_normal((2, 3, 4))
    w = rng.standard_normal((4, 5))
    y = ref.linear(x, w, None, dropout_p=0.5, seed=9, offset=1)
    keep = ref.dropout_keep_mask((6, 5), 0.5, 9, 1).reshape(2, 3, 5)
    np.testing.assert_allclose(y[keep], (x @ w)[keep] * 2.0, rtol=1e-12)
    assert (y[~keep] == 0).all()


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_linear_backward_matches_finite_differences(rng, activation, dropout_p):
    x = rng.standard_normal((3, 4)) + 0.01
    w = rng.standard_normal((4, 5))
    b = rng.standard_normal(5)
    go = rng.standard_normal((3, 5))
    kw = dict(activation=activation, dropout_p=dropout_p, seed=5, offset=2)

    def loss(x_, w_, b_):
        return float((ref.linear(x_, w_, b_, **kw) * go).sum())

    gx, gw, gb = ref.linear_backward(x, w, go, biases=b, **kw)
    for arr, grad in ((x, gx), (w, gw), (b, gb)):
        np.testing.assert_allclose(grad, numeric_grad(lambda: loss(x, w, b), arr), rtol=1e-5, atol=1e-6)
