"""Concurrent calls from several threads (Dask's threaded scheduler, distributed workers).

Numba's CUDA simulator runs one kernel per process at a time; gpufc serialises
simulated launches (and the kernel builds next to them) with one lock in
``gpufc.kernels.launch``. Without it these tests crash inside the simulator
("'Thread' object has no attribute 'threadIdx'", or "'FakeCUDAModule' object
has no attribute 'jit'" when a kernel is built while another runs).
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import gpufc
from gpufc import reference as ref

ACTIVATIONS = [None, "relu", "gelu", "tanh", "sigmoid", "gelu_tanh"]
CALLS = 16
THREADS = 8


def _case(i):
    """Call i: a small linear, dropout and backward with its own dtype, activation, seed and offset."""
    dtype = (np.float32, np.float64)[i % 2]
    activation = ACTIVATIONS[(i // 2) % len(ACTIVATIONS)]
    rng = np.random.default_rng(1000 + i)
    rows = 2 + i % 5  # 2..6 rows, 7 inputs, 5 outputs: below one tile, quick in the simulator
    x = rng.standard_normal((rows, 7)).astype(dtype)
    w = rng.standard_normal((7, 5)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    return dtype, activation, x, w, b


def _run(i, barrier):
    _, activation, x, w, b = _case(i)
    barrier.wait()  # every thread starts its first launch at the same moment
    y = gpufc.linear(x, w, b, activation=activation, dropout_p=0.25, seed=i, offset=3 * i)
    d = gpufc.dropout(x, 0.4, seed=i, offset=i + 1)
    grads = None
    if i % 4 == 0:  # the backward's five launches are slow in the simulator: every fourth call runs one
        grads = gpufc.linear_backward(x, w, np.ones_like(y), biases=b, activation=activation, dropout_p=0.25,
                                      seed=i, offset=3 * i)
    return y, d, grads


def _check(i, result):
    dtype, activation, x, w, b = _case(i)
    y, d, grads = result
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}
    want = ref.linear(x, w, b, activation=activation, dropout_p=0.25, seed=i, offset=3 * i)
    assert y.dtype == dtype
    assert (y[~ref.dropout_keep_mask(y.shape, 0.25, i, 3 * i)] == 0).all()  # the mask is exact
    np.testing.assert_allclose(y, want, **tol)
    assert np.array_equal(d, ref.dropout(x, 0.4, seed=i, offset=i + 1))
    if grads is None:
        return
    want_g = ref.linear_backward(x, w, np.ones_like(want), None, biases=b, activation=activation, dropout_p=0.25,
                                 seed=i, offset=3 * i)
    for got, exp in zip(grads, want_g):
        np.testing.assert_allclose(got, exp, **tol)


@pytest.mark.kernels
def test_concurrent_calls_on_the_device_backend(device_backend):
    """16 calls from 8 threads at once on the kernels (the simulator here), each equal to the reference."""
    barrier = threading.Barrier(THREADS)
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(_run, i, barrier) for i in range(CALLS)]
        results = [f.result() for f in futures]
    for i, result in enumerate(results):
        _check(i, result)


def test_concurrent_calls_on_the_cpu_backend(cpu_backend):
    barrier = threading.Barrier(THREADS)
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(_run, i, barrier) for i in range(CALLS)]
        results = [f.result() for f in futures]
    for i, result in enumerate(results):
        _check(i, result)


@pytest.mark.kernels
def test_concurrent_layers_on_the_device_backend(device_backend):
    """Separate layers stepped in 4 threads at once give what the same layers give one after another."""
    def step(seed):
        layer = gpufc.FullyConnectedLayer(6, 4, activation="relu", dropout_rate=0.3, seed=seed)
        x = np.random.default_rng(seed).standard_normal((3, 6)).astype(np.float32)
        y = layer.forward(x)
        gx = layer.backward(np.ones_like(y))
        return y, gx, layer.grad_weights

    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(step, range(4)))
    for seed, got in enumerate(concurrent):
        for a, b in zip(got, step(seed)):
            assert np.array_equal(a, b)
