"""The host API's input rules, on both the cpu backend and the kernel backend."""

import numpy as np
import pytest

import gpufc
from gpufc import reference as ref

pytestmark = pytest.mark.kernels


def test_numpy_in_numpy_out_nd(any_backend, rng):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    y = gpufc.linear(x, w)
    assert isinstance(y, np.ndarray) and y.shape == (2, 3, 5) and y.dtype == np.float32
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)


def test_one_dimensional_x_is_one_row(any_backend, rng):
    x = rng.standard_normal(4)
    w = rng.standard_normal((4, 3))
    np.testing.assert_allclose(gpufc.linear(x, w), x @ w, rtol=1e-12)


def test_non_contiguous_inputs(any_backend, rng):
    x = rng.standard_normal((6, 8))[:, ::2]  # (6, 4), strided
    w = np.asfortranarray(rng.standard_normal((4, 3)))
    b = rng.standard_normal(6)[::2]
    np.testing.assert_allclose(gpufc.linear(x, w, b), x @ w + b, rtol=1e-12)
    xd = rng.standard_normal((5, 6)).T  # (6, 5) transposed view
    np.testing.assert_array_equal(gpufc.dropout(xd, 0.5, seed=3), ref.dropout(np.ascontiguousarray(xd), 0.5, seed=3))


@pytest.mark.parametrize("shape", [(0, 4), (3, 0, 4)])
def test_empty_batch(any_backend, shape):
    w = np.ones((4, 2), np.float32)
    y = gpufc.linear(np.ones(shape, np.float32), w, np.ones(2, np.float32))
    assert y.shape == shape[:-1] + (2,) and y.dtype == np.float32
    assert gpufc.dropout(np.ones(shape, np.float32), 0.5).shape == shape


def test_zero_input_size_gives_activation_of_bias(any_backend):
    y = gpufc.linear(np.ones((3, 0)), np.ones((0, 2)), np.array([-1.0, 2.0]), activation="relu")
    np.testing.assert_array_equal(y, [[0.0, 2.0]] * 3)


def test_dtype_mismatch_names_both(any_backend):
    with pytest.raises(TypeError, match=r"x\.dtype=float32.*weights\.dtype=float64"):
        gpufc.linear(np.ones((2, 3), np.float32), np.ones((3, 4), np.float64))


@pytest.mark.parametrize("dtype", [np.int32, np.float16, np.complex64])
def test_unsupported_dtype(any_backend, dtype):
    if dtype != np.float16:  # linear takes float16 (tensor cores, tests/test_precision_api.py); dropout does not
        with pytest.raises(TypeError, match="float32 or float64"):
            gpufc.linear(np.ones((2, 3), dtype), np.ones((3, 4), dtype))
    with pytest.raises(TypeError, match="float32 or float64"):
        gpufc.dropout(np.ones(3, dtype), 0.5)


def test_shape_mismatch_names_shapes(any_backend):
    with pytest.raises(ValueError, match=r"x.shape=\(2, 5\)"):
        gpufc.linear(np.ones((2, 5)), np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"biases.shape=\(3,\)"):
        gpufc.linear(np.ones((2, 3)), np.ones((3, 4)), np.ones(3))
    with pytest.raises(ValueError, match="weights must have shape"):
        gpufc.linear(np.ones((2, 3)), np.ones(3))


@pytest.mark.parametrize("p", [-0.5, 1.01, float("nan")])
def test_bad_p(any_backend, p):
    with pytest.raises(ValueError, match="p="):
        gpufc.dropout(np.ones(3), p)
    with pytest.raises(ValueError, match="p="):
        gpufc.linear(np.ones((1, 3)), np.ones((3, 1)), dropout_p=p)


def test_bad_activation(any_backend):
    with pytest.raises(ValueError, match="activation='swish'"):
        gpufc.linear(np.ones((1, 3)), np.ones((3, 1)), activation="swish")


def test_backends_agree(rng):
    x = rng.standard_normal((5, 7)).astype(np.float32)
    w = rng.standard_normal((7, 3)).astype(np.float32)
    kw = dict(activation="tanh", dropout_p=0.3, seed=9)
    prev = gpufc.set_backend("cpu")
    try:
        want = gpufc.linear(x, w, **kw)
    finally:
        gpufc.set_backend(prev)
    np.testing.assert_allclose(gpufc.linear(x, w, **kw), want, rtol=1e-5, atol=1e-6)


def test_backend_info_reports_versions():
    info = gpufc.backend_info()
    assert info["backend"] in ("cuda", "sim", "cpu")
    for key in ("numpy", "numba", "numba_cuda", "device"):
        assert info[key]


def test_set_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="'tpu'"):
        gpufc.set_backend("tpu")


def test_switching_to_cpu_does_not_start_the_requested_backend():
    # GPUFC_BACKEND=cuda with the simulator switched on: 'cuda' cannot start in that
    # process, and set_backend("cpu") must still be a way out.
    import os
    import subprocess
    import sys

    env = dict(os.environ, GPUFC_BACKEND="cuda", NUMBA_ENABLE_CUDASIM="1")
    code = (
        "import numpy as np, gpufc\n"
        "print(gpufc.set_backend('cpu'), gpufc.get_backend(), gpufc.linear(np.ones((1, 2)), np.ones((2, 1)))[0, 0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cuda", "cpu", "2.0"]
