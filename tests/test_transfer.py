"""Data movement and streams: classifying the caller's arrays, ``stream=``, and the cached parameter views."""

import numpy as np
import pytest
from conftest import requires_gpu

import gpufc
from gpufc import reference as ref
from gpufc.runtime import transfer as tx
from gpufc.nn.layers import DropoutLayer, FullyConnectedLayer

pytestmark = pytest.mark.kernels


# ----------------------------------------------------------------------------
# Classifying arguments
# ----------------------------------------------------------------------------


class FakeCudaArray:
    """Exposes only the CUDA array interface, like an array type gpufc has never heard of."""

    def __init__(self, shape, typestr):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (0, False), "version": 3}


def test_operand_kinds():
    a = np.ones((2, 3), np.float32)
    op = tx.operand(a, "x")
    assert (op.kind, op.shape, op.dtype, op.size, op.value is a) == ("numpy", (2, 3), np.float32, 6, True)
    op = tx.operand([[1.0, 2.0]], "x")
    assert op.kind == "numpy" and op.shape == (1, 2) and op.dtype == np.float64
    op = tx.operand(FakeCudaArray((4, 5), "<f8"), "w")
    assert op.kind == "device" and op.shape == (4, 5) and op.dtype == np.float64
    with pytest.raises(TypeError, match="w must be a numeric array"):
        tx.operand([object()], "w")


def test_operand_subclass_of_ndarray_is_numpy():
    class Sub(np.ndarray):
        pass

    op = tx.operand(np.ones(3).view(Sub), "x")
    assert op.kind == "numpy"


def test_host_array_refuses_device_operands():
    with pytest.raises(TypeError, match="backend is 'cpu'"):
        tx.host_array(tx.operand(FakeCudaArray((2,), "<f4"), "x"))


# ----------------------------------------------------------------------------
# stream=
# ----------------------------------------------------------------------------


class ProtocolStream:
    """The CUDA stream protocol: ``__cuda_stream__()`` returns ``(version, handle)``."""

    def __init__(self, handle):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


class CupyLikeStream:
    ptr = 0x5678


class TorchLikeStream:
    cuda_stream = 0x9ABC


@pytest.mark.parametrize(
    "stream,handle",
    [(0, 0), (np.int64(7), 7), (ProtocolStream(0x1234), 0x1234), (CupyLikeStream(), 0x5678), (TorchLikeStream(), 0x9ABC)],
)
def test_stream_handle_accepts_every_spelling(stream, handle):
    assert tx.stream_handle(stream) == handle


def test_stream_handle_errors_name_the_value():
    with pytest.raises(TypeError, match="got stream=True"):
        tx.stream_handle(True)
    with pytest.raises(ValueError, match="got stream=-1"):
        tx.stream_handle(-1)
    with pytest.raises(TypeError, match="got str"):
        tx.stream_handle("default")


def test_stream_argument_on_every_backend(any_backend, rng):
    """On cpu and the simulator a stream changes nothing (they run synchronously); a bad one is an error everywhere."""
    x = rng.standard_normal((3, 4))
    w = rng.standard_normal((4, 2))
    s = ProtocolStream(0) if any_backend == "cpu" else 0
    np.testing.assert_allclose(gpufc.linear(x, w, stream=s), x @ w, rtol=1e-12)
    np.testing.assert_array_equal(gpufc.dropout(x, 0.5, seed=1, stream=s), ref.dropout(x, 0.5, seed=1))
    layer = FullyConnectedLayer(4, 2, dtype=np.float64, seed=0)
    np.testing.assert_allclose(layer.forward(x, stream=s), x @ layer.weights + layer.biases, rtol=1e-12)
    assert layer.backward(np.ones((3, 2)), stream=s).shape == (3, 4)
    drop = DropoutLayer(0.5, seed=1)
    np.testing.assert_array_equal(drop.forward(x, stream=s), ref.dropout(x, 0.5, seed=1))
    with pytest.raises(TypeError, match="got str"):
        gpufc.linear(x, w, stream="s1")
    with pytest.raises(TypeError, match="got str"):
        layer.forward(x, stream="s1")


# ----------------------------------------------------------------------------
# Call overhead: what a layer's forward does per call
# ----------------------------------------------------------------------------


def test_device_parameter_views_are_built_once(device_backend, monkeypatch, rng):
    """Parameters that are device arrays (CuPy on a GPU) get their Numba views once, until reassigned.

    The simulator has no CuPy, so this stands a recorder in for :func:`transfer.device_view`
    that reports the parameters as used in place, the way it does for C-contiguous CuPy arrays.
    """
    layer = FullyConnectedLayer(4, 3, seed=0)
    on_gpu = device_backend == "cuda"
    if on_gpu:
        layer.to("cuda")  # real CuPy parameters: the recorder only records
    made = []
    real = tx.device_view

    def recording_view(op, shape=None):
        view, keep = real(op, shape)
        made.append(op.name)
        return view, (op.value if op.name in ("weights", "biases") and not on_gpu else keep)

    monkeypatch.setattr(tx, "device_view", recording_view)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    for _ in range(3):
        layer.forward(x)
    assert made == ["x", "weights", "biases", "x", "x"]
    made.clear()
    layer.weights = layer.weights.copy()  # a new array: its views must be rebuilt
    layer.forward(x)
    assert made == ["x", "weights", "biases"]


def test_host_parameters_are_copied_every_call(device_backend, monkeypatch, rng):
    """NumPy parameters may change in place between calls, so nothing of them is cached."""
    layer = FullyConnectedLayer(4, 3, seed=0)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    y0 = layer.forward(x)
    layer.weights *= 2  # in place, on the host
    layer.biases[:] = 1
    np.testing.assert_allclose(layer.forward(x), 2 * y0 + 1, rtol=1e-5, atol=1e-5)  # biases started at 0


# ----------------------------------------------------------------------------
# GPU tier: streams for real
# ----------------------------------------------------------------------------


@pytest.fixture
def cp(device_backend):
    return pytest.importorskip("cupy", reason="CuPy is not installed")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("spelling", ["cupy", "int", "protocol", "current"])
def test_work_is_queued_on_the_given_stream(cp, rng, spelling):
    x = cp.asarray(rng.standard_normal((512, 256)).astype(np.float32))
    layer = FullyConnectedLayer(256, 128, activation="relu", seed=1).to("cuda")
    s = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()  # the inputs were written on the default stream, which s does not wait for
    arg = {"cupy": s, "int": s.ptr, "protocol": ProtocolStream(s.ptr), "current": None}[spelling]
    if spelling == "current":
        with s:
            y = layer.forward(x)
            z = y * 2
    else:
        y = layer.forward(x, stream=arg)
        assert cp.cuda.get_current_stream().ptr != s.ptr, "the caller's current stream is restored"
        with s:
            z = y * 2  # ordered after gpufc's kernel on the same stream, without synchronising
    s.synchronize()
    want = np.maximum(cp.asnumpy(x) @ cp.asnumpy(layer.weights) + cp.asnumpy(layer.biases), 0)
    np.testing.assert_allclose(cp.asnumpy(z), 2 * want, rtol=1e-4, atol=1e-3)
    g = layer.backward(cp.ones_like(y), stream=arg)
    s.synchronize()
    assert g.shape == x.shape


@requires_gpu
@pytest.mark.gpu
def test_functional_ops_on_a_stream(cp, rng):
    x = cp.asarray(rng.standard_normal((300, 40)).astype(np.float32))
    w = cp.asarray(rng.standard_normal((40, 30)).astype(np.float32))
    s = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    y = gpufc.linear(x, w, stream=s)
    d = gpufc.dropout(x, 0.5, seed=3, stream=s)
    s.synchronize()
    np.testing.assert_allclose(cp.asnumpy(y), cp.asnumpy(x) @ cp.asnumpy(w), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(cp.asnumpy(d), ref.dropout(cp.asnumpy(x), 0.5, seed=3))


@requires_gpu
@pytest.mark.gpu
def test_torch_stream(device_backend, rng):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    s = torch.cuda.Stream()
    x = torch.randn(64, 32, device="cuda")
    w = torch.randn(32, 16, device="cuda")
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = gpufc.linear(x, w, stream=s)
    s.synchronize()
    torch.testing.assert_close(y, x @ w, rtol=1e-4, atol=1e-3)
