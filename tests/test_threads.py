"""Concurrent calls from several threads (Dask's threaded scheduler, distributed workers).

Numba's CUDA simulator runs one kernel per process at a time; gpufc serialises
simulated launches (and the kernel builds next to them) with one lock in
``gpufc.kernels.launch``. Without it these tests crash inside the simulator
("'Thread' object has no attribute 'threadIdx'", or "'FakeCUDAModule' object
has no attribute 'jit'" when a kernel is built while another runs).
"""

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import ON_GPU

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
@pytest.mark.skipif(not ON_GPU, reason="on the simulator test_concurrent_first_calls_in_a_fresh_process runs "
                                       "these calls, with cold kernel builds too")
def test_concurrent_calls_on_the_device_backend(device_backend):
    """16 calls from 8 threads at once on the GPU, each equal to the reference."""
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
    """4 layers stepped in 4 threads at once, each equal to the reference at its own seed."""
    def step(seed):
        layer = gpufc.FullyConnectedLayer(6, 4, activation="relu", dropout_rate=0.3, seed=seed)
        x = np.random.default_rng(seed).standard_normal((3, 6)).astype(np.float32)
        y = layer.forward(x)
        gx = layer.backward(np.ones_like(y))
        return layer, x, y, gx

    with ThreadPoolExecutor(4) as pool:
        steps = list(pool.map(step, range(4)))
    tol = {"rtol": 1e-5, "atol": 1e-5}
    for seed, (layer, x, y, gx) in enumerate(steps):
        kw = {"biases": layer.biases, "activation": "relu", "dropout_p": 0.3, "seed": seed, "offset": 0}
        want = ref.linear(x, layer.weights, **kw)
        assert (y[~ref.dropout_keep_mask(y.shape, 0.3, seed, 0)] == 0).all()
        np.testing.assert_allclose(y, want, **tol)
        want_gx, want_gw, _ = ref.linear_backward(x, layer.weights, np.ones_like(want), **kw)
        np.testing.assert_allclose(gx, want_gx, **tol)
        np.testing.assert_allclose(layer.grad_weights, want_gw, **tol)


_COLD = """
import sys, threading
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, {tests!r})
import test_threads as t
barrier = threading.Barrier(t.THREADS)
with ThreadPoolExecutor(t.THREADS) as pool:
    results = [f.result() for f in [pool.submit(t._run, i, barrier) for i in range(t.CALLS)]]
for i, result in enumerate(results):
    t._check(i, result)
print("ok", len(results))
"""


@pytest.mark.kernels
@pytest.mark.skipif(ON_GPU, reason="the cold-build race is the simulator's (a GPU's builds are Numba compiles, "
                                   "serialised by Numba's compiler lock, and take seconds each)")
def test_concurrent_first_calls_in_a_fresh_process():
    """Every kernel built for the first time while other threads' kernels run (a fresh simulator process)."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "GPUFC_BACKEND": "sim"}
    code = _COLD.format(tests=os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0 and out.stdout.split() == ["ok", str(CALLS)], out.stderr[-3000:]
