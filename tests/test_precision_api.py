"""precision= and the 16-bit dtypes through the public API (gpufc.linear, linear_backward,
FullyConnectedLayer, set_matmul_precision), on the cpu backend (gpufc.reference's model) and
on the kernels (the simulator without a GPU). Tolerances: docs/precision.md."""

import numpy as np
import pytest

import gpufc
from gpufc import reference as ref

pytestmark = pytest.mark.kernels

SEED, P = 11, 0.25
EPS_OUT = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def _bf16():
    dt = ref.bfloat16_dtype()
    if dt is None:
        pytest.skip("bfloat16 NumPy arrays need ml_dtypes")
    return dt


def _dtype(name):
    return _bf16() if name == "bfloat16" else np.dtype(name)


def _within(got, want, x, w, k, what):
    """docs/precision.md: 2 eps_out |ref| + 8 eps32 sqrt(K) (|x| @ |w|)."""
    got64, want64 = np.asarray(got).astype(np.float64), np.asarray(want).astype(np.float64)
    scale = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64))
    bound = 2 * EPS_OUT[np.asarray(want).dtype.name] * np.abs(want64) + 8 * 2.0**-23 * np.sqrt(k) * scale + 1e-6
    err = np.abs(got64 - want64)
    assert (err <= bound).all(), f"{what}: max error {err.max()}, {np.count_nonzero(err > bound)} outside the bound"


@pytest.fixture
def restore_precision():
    before = gpufc.get_matmul_precision()
    yield
    gpufc.set_matmul_precision(before)


def test_set_and_get_matmul_precision(restore_precision):
    assert gpufc.get_matmul_precision() == "highest"
    gpufc.set_matmul_precision("high")
    assert gpufc.get_matmul_precision() == "high"
    with pytest.raises(ValueError, match=r"one of \('highest', 'high'\), got 'medium'"):
        gpufc.set_matmul_precision("medium")


def test_tf32_rounds_the_operands(any_backend, restore_precision):
    # 1 + 2**-11 is a tie on the TF32 grid: TF32 gives 1 + 2**-10, IEEE float32 keeps 1 + 2**-11.
    x = np.full((2, 1), 1 + 2**-11, np.float32)
    w = np.ones((1, 3), np.float32)
    assert (gpufc.linear(x, w, precision="tf32") == np.float32(1 + 2**-10)).all()
    assert (gpufc.linear(x, w, precision="ieee") == np.float32(1 + 2**-11)).all()
    gpufc.set_matmul_precision("high")  # the process default, as torch's "high"
    assert (gpufc.linear(x, w) == np.float32(1 + 2**-10)).all()
    assert (gpufc.linear(x.astype(np.float64), w.astype(np.float64)) == 1 + 2**-11).all()  # float64 ignores it


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_linear_forward_every_format(any_backend, rng, dtype):
    dt = _dtype(dtype)
    m, k, n = 11, 24, 9
    x = rng.standard_normal((m, k)).astype(np.float32).astype(dt)
    w = rng.standard_normal((k, n)).astype(np.float32).astype(dt)
    b = rng.standard_normal(n).astype(np.float32).astype(dt)
    y, z = gpufc.linear_forward(x, w, b, activation="gelu", dropout_p=P, seed=SEED, offset=1, save_preact=True,
                                precision="tf32")
    assert y.dtype == dt and z.dtype == dt
    want = ref.linear(x, w, b, activation="gelu", dropout_p=P, seed=SEED, offset=1, precision="tf32")
    keep = ref.dropout_keep_mask((m, n), P, SEED, 1)
    assert np.array_equal(np.asarray(y).astype(np.float32) != 0, keep & (want.astype(np.float32) != 0))
    _within(y, want, x, w, k, f"{dtype} y")
    _within(z, ref.round_to(ref.linear_preact(x, w, b, precision="tf32"), dt), x, w, k, f"{dtype} preact")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_linear_backward_every_format(any_backend, rng, dtype):
    dt = _dtype(dtype)
    m, k, n = 10, 13, 7  # ragged in every dimension (the element-by-element K loop)
    x = rng.standard_normal((m, k)).astype(np.float32).astype(dt)
    w = rng.standard_normal((k, n)).astype(np.float32).astype(dt)
    go = rng.standard_normal((m, n)).astype(np.float32).astype(dt)
    kw = {"activation": "tanh", "dropout_p": P, "seed": SEED, "offset": 4, "precision": "tf32"}
    _, z = gpufc.linear_forward(x, w, None, save_preact=True, **kw)
    got = gpufc.linear_backward(x, w, go, z, **kw)
    want = ref.linear_backward(x, w, go, z, **kw)
    for g, r, what, (a, bm, kk) in zip(got, want, ("grad_x", "grad_w", "grad_b"),
                                       ((go, w.T, n), (x.T, go, m), (np.ones((1, m)), go, m))):
        assert g.dtype == dt, what
        _within(g, r, a, bm, kk, f"{dtype} {what}")


def test_layer_precision(any_backend, rng):
    layer = gpufc.FullyConnectedLayer(12, 6, activation="relu", seed=3, precision="tf32")
    x = rng.standard_normal((5, 12)).astype(np.float32)
    y = layer.forward(x)
    want = ref.linear(x, layer.weights, layer.biases, activation="relu", precision="tf32")
    _within(y, want, x, layer.weights, 12, "layer forward")
    gx = layer.backward(np.ones_like(y))
    assert gx.shape == x.shape and layer.grad_weights.shape == (12, 6)


def test_bad_precision_and_mixed_16_bit_dtypes(cpu_backend):
    x = np.ones((2, 3), np.float32)
    w = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"precision must be one of \('ieee', 'tf32'\), got precision='fp8'"):
        gpufc.linear(x, w, precision="fp8")
    bf16 = _bf16()  # skips here without ml_dtypes, after the precision check
    with pytest.raises(TypeError, match=r"x\.dtype=float16 and weights\.dtype=bfloat16"):
        gpufc.linear(x.astype(np.float16), w.astype(bf16))


def test_tensor_cores_refused_below_sm80(monkeypatch):
    # A pre-Ampere GPU (here a stand-in reporting compute capability 7.5) has no mma.sync for
    # these formats: a tensor-core request is a RuntimeError naming the device.
    from gpufc import precision

    class Device:
        id, name, compute_capability = 99, "Tesla T4", (7, 5)

    class Cuda:
        @staticmethod
        def get_current_device():
            return Device()

    monkeypatch.setattr(precision._backend, "get_backend", lambda: "cuda")
    monkeypatch.setattr(precision._backend, "numba_cuda", lambda: Cuda)
    with pytest.raises(RuntimeError, match=r"compute capability 8\.0 or newer; Tesla T4 is \(7, 5\)"):
        precision.require_tensor_cores()
