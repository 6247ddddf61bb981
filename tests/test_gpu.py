"""GPU tier: needs a real GPU. CuPy and torch interop, streams, large shapes."""

import numpy as np
import pytest
from conftest import requires_gpu

import gpufc
from gpufc import reference as ref

pytestmark = [pytest.mark.gpu, requires_gpu]


@pytest.fixture
def cp(device_backend):
    return pytest.importorskip("cupy", reason="CuPy is not installed")


def test_cupy_in_cupy_out_no_host_copy(cp, rng):
    x = cp.asarray(rng.standard_normal((64, 96)).astype(np.float32))
    w = cp.asarray(rng.standard_normal((96, 80)).astype(np.float32))
    b = cp.asarray(rng.standard_normal(80).astype(np.float32))
    y = gpufc.linear(x, w, b, activation="relu")
    assert isinstance(y, cp.ndarray) and y.dtype == cp.float32
    want = ref.linear(cp.asnumpy(x).astype(np.float64), cp.asnumpy(w).astype(np.float64), cp.asnumpy(b).astype(np.float64), activation="relu")
    np.testing.assert_allclose(cp.asnumpy(y), want, rtol=1e-4, atol=1e-4)


def test_cupy_dropout_bit_exact(cp, rng):
    x = cp.asarray(rng.standard_normal((257, 129)).astype(np.float32))
    y = gpufc.dropout(x, 0.3, seed=5, offset=3)
    assert isinstance(y, cp.ndarray)
    assert np.array_equal(cp.asnumpy(y), ref.dropout(cp.asnumpy(x), 0.3, seed=5, offset=3))


def test_torch_in_torch_out(device_backend, rng):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    x = torch.randn(33, 17, device="cuda", dtype=torch.float64)
    w = torch.randn(17, 9, device="cuda", dtype=torch.float64)
    y = gpufc.linear(x, w)
    assert isinstance(y, torch.Tensor) and y.is_cuda and y.dtype == torch.float64
    torch.testing.assert_close(y, x @ w)
    d = gpufc.dropout(x, 0.5, seed=2)
    assert isinstance(d, torch.Tensor)
    assert np.array_equal(d.cpu().numpy(), ref.dropout(x.cpu().numpy(), 0.5, seed=2))


def test_work_on_a_non_default_cupy_stream(cp, rng):
    x = cp.asarray(rng.standard_normal((512, 256)).astype(np.float32))
    w = cp.asarray(rng.standard_normal((256, 128)).astype(np.float32))
    with cp.cuda.Stream(non_blocking=True) as s:
        y = gpufc.linear(x, w)
        z = y * 2  # queued after gpufc's kernel on the same stream
    s.synchronize()
    np.testing.assert_allclose(cp.asnumpy(z), 2 * (cp.asnumpy(x) @ cp.asnumpy(w)), rtol=1e-4, atol=1e-3)


def test_large_dropout_past_grid_limit(cp):
    n = 65535 * 256 * 4 + 13  # more blocks than one grid-stride pass launches
    x = cp.ones(n, cp.float32)
    y = gpufc.dropout(x, 0.5, seed=1, offset=1)
    head = cp.asnumpy(y[:4096])
    tail = cp.asnumpy(y[-4096:])
    assert np.array_equal(head != 0, ref.dropout_keep_mask(4096, 0.5, 1, 1))
    assert np.array_equal(tail != 0, ref.dropout_keep_mask(4096, 0.5, 1, 1 + n - 4096))


def test_many_rows(cp):
    m = 70_000  # beyond 65535 rows of tiles in grid.y, if rows were mapped there
    x = cp.ones((m, 8), cp.float32)
    w = cp.ones((8, 3), cp.float32)
    y = gpufc.linear(x, w)
    assert float(y.min()) == float(y.max()) == 8.0
