"""Kernels tier: the version-1 kernels against gpufc.reference, on the GPU or in the simulator.

The host API is routed to the version-1 kernels here (the baseline is kept
forever and must stay correct): the linear ops take ``config=V1`` (the public
keyword; the backward then also runs the version-1 bias gradient), and the
dropout kernels' ``VERSION`` (which version the host API runs) is set to 1.
The later versions have their own files.
Shapes are awkward on purpose (0, 1, primes, below one tile, several tiles)
and small, because the simulator runs every thread in Python.
"""

import numpy as np
import pytest
from helpers import assert_close, tolerance

import gpufc
from gpufc.runtime import backend
from gpufc import reference as ref

pytestmark = pytest.mark.kernels

# (M, K, N): one element; a prime below one 16-tile; K below one tile; several tiles with ragged edges.
SHAPES = [(1, 1, 1), (7, 3, 5), (2, 17, 3), (33, 19, 18)]
ACTS = list(ref.ACTIVATIONS)


V1 = "v1_t16"  # the version-1 configuration's name


@pytest.fixture(autouse=True)
def version_1(device_backend, monkeypatch):
    """Every dropout launch of the host API in this file goes to version 1."""
    monkeypatch.setattr(backend.kernels().dropout, "VERSION", 1)


def test_routing_reaches_version_1(rng):
    from gpufc.runtime import plan

    plan.PLANS.clear()
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((4, 5))
    gpufc.linear_backward(x, w, np.ones((3, 5)), biases=np.ones(5), activation="relu", dropout_p=0.5, config=V1)
    gpufc.dropout(x, 0.5)
    names = {p.spec.kernel.name for p in plan.PLANS._plans.values()}
    assert {n.split("/")[0] + "/" + n.split("/")[1] for n in names if n.startswith(("matmul", "bias_grad"))} == {
        "matmul/v1_t16", "bias_grad/v1"}
    assert {"dropout/v1/float64", "act_dropout_backward/float64/relu+drop"} <= names


def _data(rng, m, k, n, dtype):
    x = rng.standard_normal((m, k)).astype(dtype)
    w = rng.standard_normal((k, n)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_linear_v1_matches_reference(device_backend, rng, m, k, n, dtype):
    x, w, b = _data(rng, m, k, n, dtype)
    y = gpufc.linear(x, w, b, config=V1)
    assert y.dtype == dtype and y.shape == (m, n)
    rtol, atol = tolerance(dtype, k)
    assert_close(y, ref.linear(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)), rtol=rtol, atol=atol)


@pytest.mark.parametrize("activation", ACTS)
def test_linear_v1_epilogue_activation_and_dropout(device_backend, rng, activation):
    m, k, n = 9, 7, 11
    x, w, b = _data(rng, m, k, n, np.float32)
    kw = dict(activation=activation, dropout_p=0.25, seed=2**33 + 1, offset=5)
    y = gpufc.linear(x, w, b, **kw, config=V1)
    expected = ref.linear(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **kw)
    rtol, atol = tolerance(np.float32, k)
    assert_close(y, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("offset", [0, 1, 3, 2**32 + 2])
def test_fused_dropout_mask_is_bit_exact(device_backend, offset):
    # x = 0 and b = 1 make every pre-dropout output exactly 1, so the output is
    # exactly scale where kept and exactly 0 where dropped: the mask, bit for bit.
    m, k, n, p = 13, 4, 10, 0.3
    x = np.zeros((m, k), np.float32)
    w = np.ones((k, n), np.float32)
    b = np.ones(n, np.float32)
    y = gpufc.linear(x, w, b, dropout_p=p, seed=77, offset=offset, config=V1)
    keep = ref.dropout_keep_mask((m, n), p, 77, offset)
    assert np.array_equal(y != 0, keep)
    assert (y[keep] == ref.dropout_scale(p, np.float32)).all()


def test_linear_v1_save_preact(device_backend, rng):
    x, w, b = _data(rng, 5, 6, 7, np.float64)
    y, z = gpufc.linear_forward(x, w, b, activation="gelu", save_preact=True, config=V1)
    assert_close(z, x @ w + b, rtol=1e-12, atol=1e-12, what="preact")
    assert_close(y, ref.activation(x @ w + b, "gelu"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_linear_v1_backward_matches_reference(device_backend, rng, activation, dropout_p):
    m, k, n = 11, 6, 9
    x, w, b = _data(rng, m, k, n, np.float64)
    go = rng.standard_normal((m, n))
    kw = dict(activation=activation, dropout_p=dropout_p, seed=3, offset=8)
    _, z = gpufc.linear_forward(x, w, b, save_preact=True, **kw, config=V1)
    got = gpufc.linear_backward(x, w, go, z, biases=b, **kw, config=V1)
    want = ref.linear_backward(x, w, go, biases=b, **kw)
    for name, g, e in zip(("grad_x", "grad_weights", "grad_biases"), got, want):
        assert_close(g, e, rtol=1e-12, atol=1e-12, what=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 3, 4, 5, 257, 1001])
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 2**32 - 1])
def test_dropout_v1_is_bit_exact(device_backend, rng, dtype, size, offset):
    x = rng.standard_normal(size).astype(dtype)
    x[::7] = np.nan
    y = gpufc.dropout(x, 0.4, seed=12345, offset=offset)
    assert y.dtype == dtype
    assert np.array_equal(y, ref.dropout(x, 0.4, seed=12345, offset=offset), equal_nan=True)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_dropout_v1_extreme_p(device_backend, rng, p):
    x = rng.standard_normal((6, 5)).astype(np.float32)
    x[0, 0] = np.inf
    y = gpufc.dropout(x, p, seed=1)
    assert np.array_equal(y, ref.dropout(x, p, seed=1))


def test_dropout_v1_nd_and_eval(device_backend, rng):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    assert np.array_equal(gpufc.dropout(x, 0.5, seed=4, offset=2), ref.dropout(x, 0.5, seed=4, offset=2))
    assert np.array_equal(gpufc.dropout(x, 0.5, training=False), x)
    g = rng.standard_normal((3, 4, 5)).astype(np.float32)
    assert np.array_equal(gpufc.dropout_backward(g, 0.5, seed=4, offset=2), ref.dropout(g, 0.5, seed=4, offset=2))


def test_relu_propagates_nan_like_the_reference(device_backend):
    x = np.array([[np.nan, 1.0], [-1.0, 2.0]], np.float32)
    w = np.eye(2, dtype=np.float32)
    y = gpufc.linear(x, w, activation="relu", config=V1)
    np.testing.assert_array_equal(y, ref.linear(x, w, activation="relu"))  # NaN where the reference has NaN
