"""Layers, container, optimizers and loss: gradients against finite differences, state, conversions, errors.

Gradient checks run in float64. On the ``cpu`` backend every element of every
gradient is checked against central differences. On the kernel backend (the
simulator here, so shapes stay a few elements) the kernels' gradients are
compared with the reference backend's and checked along a random direction
with one central difference (two forwards): each simulated launch costs
about 0.1 s.

Tolerances (float64, h = 1e-6 elementwise, 1e-5 along a direction): the
central difference's truncation error is O(h^2) and its rounding error
O(eps / h) ~ 1e-10, so rtol = 1e-6, atol = 1e-8 leave two orders of headroom.
"""

import contextlib

import numpy as np
import pytest
from conftest import requires_gpu
from helpers import assert_close, numeric_grad

import gpufc
from gpufc import reference as ref
from gpufc.nn.layers import DropoutLayer, FullyConnectedLayer, Module, Sequential
from gpufc.nn.losses import SoftmaxCrossEntropy, softmax_cross_entropy
from gpufc.nn.optim import SGD, Adam

pytestmark = pytest.mark.kernels

ACTIVATIONS = ref.ACTIVATIONS
FD_RTOL, FD_ATOL = 1e-6, 1e-8


@contextlib.contextmanager
def backend(name):
    previous = gpufc.set_backend(name)
    try:
        yield
    finally:
        gpufc.set_backend(previous)


def fixed_forward(layer, x, offset):
    """The layer's forward with its dropout offset pinned, so repeated calls draw one mask."""
    layer.offset = offset
    return layer.forward(x)


# ----------------------------------------------------------------------------
# Gradients: the reference backend, every element
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fc_gradients_finite_differences_cpu(cpu_backend, rng, activation, bias):
    layer = FullyConnectedLayer(4, 3, bias=bias, activation=activation, dtype=np.float64, seed=1)
    if bias:
        layer.biases[:] = rng.standard_normal(3)
    x = rng.standard_normal((2, 3, 4))  # N-D batch: leading dims are batch dims
    r = rng.standard_normal((2, 3, 3))  # loss = sum(y * r), so d loss / d y = r
    layer.forward(x)
    gx = layer.backward(r)
    loss = lambda: float(np.sum(layer.forward(x) * r))
    assert_close(gx, numeric_grad(loss, x), rtol=FD_RTOL, atol=FD_ATOL, what="grad_input")
    assert_close(layer.grad_weights, numeric_grad(loss, layer.weights), rtol=FD_RTOL, atol=FD_ATOL,
                 what="grad_weights")
    if bias:
        assert_close(layer.grad_biases, numeric_grad(loss, layer.biases), rtol=FD_RTOL, atol=FD_ATOL,
                     what="grad_biases")
    else:
        assert layer.grad_biases is None and layer.biases is None


def test_fc_with_dropout_gradients_cpu(cpu_backend, rng):
    layer = FullyConnectedLayer(5, 6, activation="tanh", dropout_rate=0.4, dtype=np.float64, seed=3)
    x = rng.standard_normal((4, 5))
    r = rng.standard_normal((4, 6))
    y = fixed_forward(layer, x, 8)
    assert (y == 0).any(), "p = 0.4 on 24 elements should drop some"
    gx = layer.backward(r)
    loss = lambda: float(np.sum(fixed_forward(layer, x, 8) * r))
    assert_close(gx, numeric_grad(loss, x), rtol=FD_RTOL, atol=FD_ATOL, what="grad_input")
    assert_close(layer.grad_weights, numeric_grad(loss, layer.weights), rtol=FD_RTOL, atol=FD_ATOL,
                 what="grad_weights")
    assert_close(layer.grad_biases, numeric_grad(loss, layer.biases), rtol=FD_RTOL, atol=FD_ATOL,
                 what="grad_biases")


def test_dropout_layer_gradient_cpu(cpu_backend, rng):
    layer = DropoutLayer(0.5, seed=11)
    x = rng.standard_normal((3, 5))
    r = rng.standard_normal((3, 5))
    layer.forward(x)
    g = layer.backward(r)
    loss = lambda: float(np.sum(fixed_forward(layer, x, 0) * r))
    assert_close(g, numeric_grad(loss, x), rtol=FD_RTOL, atol=FD_ATOL, what="dropout grad_input")


def test_nd_batches_through_a_layer(any_backend, rng):
    layer = FullyConnectedLayer(4, 2, activation="relu", dtype=np.float64, seed=2)
    x = rng.standard_normal((2, 3, 4))
    r = rng.standard_normal((2, 3, 2))
    y = layer.forward(x)
    gx = layer.backward(r)
    want = ref.linear_backward(x, layer.weights, r, biases=layer.biases, activation="relu")
    assert y.shape == (2, 3, 2) and gx.shape == (2, 3, 4)
    assert_close(y, ref.linear(x, layer.weights, layer.biases, activation="relu"), rtol=1e-12, atol=1e-12)
    assert_close(gx, want[0], rtol=1e-12, atol=1e-12, what="grad_input")
    assert_close(layer.grad_weights, want[1], rtol=1e-12, atol=1e-12, what="grad_weights")
    assert_close(layer.grad_biases, want[2], rtol=1e-12, atol=1e-12, what="grad_biases")


def test_eval_mode_backward_recomputes_preactivation(any_backend, rng):
    layer = FullyConnectedLayer(3, 2, activation="sigmoid", dtype=np.float64, seed=2).eval()
    x = rng.standard_normal((2, 3))
    r = rng.standard_normal((2, 2))
    layer.forward(x)
    gx = layer.backward(r)
    want = ref.linear_backward(x, layer.weights, r, biases=layer.biases, activation="sigmoid")
    assert_close(gx, want[0], rtol=1e-12, atol=1e-12, what="grad_input")
    assert_close(layer.grad_weights, want[1], rtol=1e-12, atol=1e-12, what="grad_weights")


# ----------------------------------------------------------------------------
# Gradients: the kernels (simulator or GPU) against the reference and along a direction
# ----------------------------------------------------------------------------


def _layer_pair(activation, bias, dropout_rate):
    kw = {"bias": bias, "activation": activation, "dropout_rate": dropout_rate, "dtype": np.float64, "seed": 5}
    return FullyConnectedLayer(3, 4, **kw), FullyConnectedLayer(3, 4, **kw)


@pytest.mark.parametrize(
    "activation,bias,dropout_rate",
    [(a, True, 0.0) for a in ACTIVATIONS] + [(None, False, 0.0), ("relu", False, 0.0), ("gelu", True, 0.3)],
)
def test_fc_gradients_on_kernels(device_backend, rng, activation, bias, dropout_rate):
    dev, host = _layer_pair(activation, bias, dropout_rate)
    x = rng.standard_normal((2, 3))
    r = rng.standard_normal((2, 4))
    if bias:
        dev.biases[:] = host.biases[:] = rng.standard_normal(4)
    y = dev.forward(x)
    gx = dev.backward(r)
    with backend("cpu"):
        assert_close(y, host.forward(x), rtol=1e-12, atol=1e-12, what="forward vs reference")
        want_gx = host.backward(r)
    assert_close(gx, want_gx, rtol=1e-12, atol=1e-12, what="grad_input vs reference")
    assert_close(dev.grad_weights, host.grad_weights, rtol=1e-12, atol=1e-12, what="grad_weights vs reference")
    if bias:
        assert_close(dev.grad_biases, host.grad_biases, rtol=1e-12, atol=1e-12, what="grad_biases vs reference")

    # One central difference of the kernels' forward along a random direction of (x, w, b).
    h = 1e-5
    vx, vw = rng.standard_normal(x.shape), rng.standard_normal(dev.weights.shape)
    vb = rng.standard_normal(4) if bias else None
    w0, b0 = dev.weights.copy(), None if not bias else dev.biases.copy()

    def loss_at(t):
        dev.weights[:] = w0 + t * vw
        if bias:
            dev.biases[:] = b0 + t * vb
        return float(np.sum(fixed_forward(dev, x + t * vx, 0) * r))

    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
    analytic = np.sum(gx * vx) + np.sum(dev.grad_weights * vw) + (np.sum(dev.grad_biases * vb) if bias else 0.0)
    assert numeric == pytest.approx(analytic, rel=FD_RTOL, abs=FD_ATOL)


def test_dropout_layer_on_kernels(device_backend, rng):
    layer = DropoutLayer(0.3, seed=21)
    x = rng.standard_normal((2, 3, 5))
    r = rng.standard_normal((2, 3, 5))
    y = layer.forward(x)
    g = layer.backward(r)
    np.testing.assert_array_equal(y, ref.dropout(x, 0.3, seed=21, offset=0))
    np.testing.assert_array_equal(g, ref.dropout(r, 0.3, seed=21, offset=0))


# ----------------------------------------------------------------------------
# Dropout state (the mask contract's offset rule, docs/architecture.md)
# ----------------------------------------------------------------------------


def test_dropout_layer_offsets_and_masks(cpu_backend):
    layer = DropoutLayer(0.5, seed=7)
    x = np.ones((3, 5))  # 15 elements: the offset advances by 16
    y1 = layer.forward(x)
    assert layer.offset == 16
    y2 = layer.forward(x)
    assert layer.offset == 32
    np.testing.assert_array_equal(y1 != 0, ref.dropout_keep_mask(x.shape, 0.5, 7, 0))
    np.testing.assert_array_equal(y2 != 0, ref.dropout_keep_mask(x.shape, 0.5, 7, 16))
    g = layer.backward(np.ones((3, 5)))  # the last forward's mask, regenerated
    np.testing.assert_array_equal(g, y2)
    np.testing.assert_array_equal(layer.forward(x, training=False), x)
    assert layer.offset == 32, "an evaluation call draws no mask"
    layer.eval()
    np.testing.assert_array_equal(layer.forward(x), x)


def test_fc_layer_advances_offset_only_when_dropping(cpu_backend):
    layer = FullyConnectedLayer(3, 5, dropout_rate=0.2, seed=0)
    x = np.ones((3, 3), np.float32)
    layer.forward(x)
    assert layer.offset == 16
    layer.eval().forward(x)
    assert layer.offset == 16
    plain = FullyConnectedLayer(3, 5, seed=0)
    plain.forward(x)
    assert plain.offset == 0


# ----------------------------------------------------------------------------
# Construction, init and errors
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("init,bound", [("glorot_uniform", np.sqrt(6 / 300)), ("he_uniform", np.sqrt(6 / 200)),
                                        ("torch", 1 / np.sqrt(200))])
def test_uniform_inits_respect_their_bounds(init, bound):
    layer = FullyConnectedLayer(200, 100, init=init, seed=0)
    w = layer.weights
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert abs(float(w.std()) - bound / np.sqrt(3)) < 0.02 * bound  # uniform(-a, a) has std a / sqrt(3)
    assert (np.abs(layer.biases) <= bound).all()
    assert (layer.biases != 0).any() == (init == "torch")


@pytest.mark.parametrize("init,std", [("glorot_normal", np.sqrt(2 / 300)), ("he_normal", np.sqrt(2 / 200)),
                                      ("randn", 1.0)])
def test_normal_inits_have_their_std(init, std):
    w = FullyConnectedLayer(200, 100, init=init, seed=0).weights
    assert abs(float(w.std()) - std) < 0.02 * std
    assert abs(float(w.mean())) < 0.02 * std


def test_default_init_follows_the_activation():
    assert FullyConnectedLayer(4, 4, activation="relu").init == "he_uniform"
    assert FullyConnectedLayer(4, 4, activation="tanh").init == "glorot_uniform"
    assert FullyConnectedLayer(4, 4).init == "glorot_uniform"


def test_seed_makes_weights_reproducible():
    a, b = FullyConnectedLayer(5, 3, seed=9), FullyConnectedLayer(5, 3, seed=9)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.weights.dtype == np.float32 and a.weights.shape == (5, 3) and a.biases.shape == (3,)
    c = FullyConnectedLayer(5, 3, seed=9, dtype=np.float64)
    assert c.weights.dtype == np.float64


def test_wrong_input_size_names_shapes(any_backend):
    layer = FullyConnectedLayer(4, 2, seed=0)
    with pytest.raises(ValueError, match=r"input_size=4.*x\.shape=\(3, 5\)"):
        layer.forward(np.ones((3, 5), np.float32))


def test_wrong_dtype_names_both(any_backend):
    layer = FullyConnectedLayer(4, 2, seed=0)
    with pytest.raises(TypeError, match=r"x\.dtype=float64.*weights\.dtype=float32"):
        layer.forward(np.ones((3, 4)))
    with pytest.raises(TypeError, match=r"x\.dtype=int64"):
        layer.forward(np.ones((3, 4), np.int64))


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="FullyConnectedLayer.backward called before forward"):
        FullyConnectedLayer(2, 2).backward(np.ones((1, 2), np.float32))
    with pytest.raises(RuntimeError, match="DropoutLayer.backward called before forward"):
        DropoutLayer(0.1).backward(np.ones(2))
    with pytest.raises(RuntimeError, match="before forward"):
        SoftmaxCrossEntropy().backward()


def test_backward_checks_grad_output(cpu_backend):
    layer = FullyConnectedLayer(3, 2, seed=0)
    layer.forward(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 3\)"):
        layer.backward(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match="grad_output.dtype=float64"):
        layer.backward(np.ones((4, 2)))


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_dropout_rate_out_of_range_names_value(p):
    with pytest.raises(ValueError, match=r"dropout_rate: .*p=(-0\.1|1\.5|nan)"):
        DropoutLayer(p)
    with pytest.raises(ValueError, match=r"dropout_rate: .*p="):
        FullyConnectedLayer(2, 2, dropout_rate=p)


def test_constructor_errors_name_values():
    with pytest.raises(ValueError, match="input_size=0"):
        FullyConnectedLayer(0, 2)
    with pytest.raises(ValueError, match="output_size=2.5"):
        FullyConnectedLayer(2, 2.5)
    with pytest.raises(ValueError, match="init='xavier'"):
        FullyConnectedLayer(2, 2, init="xavier")
    with pytest.raises(ValueError, match="activation='swish'"):
        FullyConnectedLayer(2, 2, activation="swish")
    with pytest.raises(TypeError, match="dtype=float16"):
        FullyConnectedLayer(2, 2, dtype=np.float16)
    with pytest.raises(ValueError, match="device='gpu'"):
        FullyConnectedLayer(2, 2, device="gpu")


def test_device_cuda_needs_the_cuda_backend(cpu_backend):
    with pytest.raises(RuntimeError, match="needs the 'cuda' backend"):
        FullyConnectedLayer(2, 2).to("cuda")


def test_reassigned_parameters_are_checked(any_backend):
    layer = FullyConnectedLayer(3, 2, seed=0)
    layer.weights = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"weights must have shape \(3, 2\), got weights.shape=\(2, 3\)"):
        layer.forward(np.ones((1, 3), np.float32))


def test_repr_reads_like_the_constructor():
    r = repr(FullyConnectedLayer(64, 128, activation="relu", dropout_rate=0.1))
    assert r == "FullyConnectedLayer(input_size=64, output_size=128, bias=True, activation='relu', dropout_rate=0.1, dtype=float32)"
    assert repr(DropoutLayer(0.2, seed=3)) == "DropoutLayer(dropout_rate=0.2, seed=3)"
    model = Sequential(FullyConnectedLayer(2, 3, bias=False), DropoutLayer(0.5, seed=1))
    assert repr(model).splitlines() == [
        "Sequential(",
        "  (0): FullyConnectedLayer(input_size=2, output_size=3, bias=False, dtype=float32)",
        "  (1): DropoutLayer(dropout_rate=0.5, seed=1)",
        ")",
    ]


# ----------------------------------------------------------------------------
# State: dicts, .npz files, torch and Keras layouts
# ----------------------------------------------------------------------------


def test_state_dict_round_trip_keeps_identity(cpu_backend, rng):
    a = FullyConnectedLayer(4, 3, seed=1)
    b = FullyConnectedLayer(4, 3, seed=2)
    w_id = id(b.weights)
    b.load_state_dict(a.state_dict())
    assert id(b.weights) == w_id, "loading copies in place, so optimizers keep their references"
    x = rng.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    sd = a.state_dict()
    sd["weights"][:] = 0
    assert (a.weights != 0).any(), "state_dict returns copies"


def test_state_dict_mismatch_is_an_error():
    layer = FullyConnectedLayer(4, 3, seed=1)
    with pytest.raises(KeyError, match=r"missing keys \['biases'\]"):
        layer.load_state_dict({"weights": np.zeros((4, 3))})
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        layer.load_state_dict({"weights": np.zeros((3, 4)), "biases": np.zeros(3)})
    layer.load_state_dict({"weights": np.zeros((4, 3))}, strict=False)
    assert (layer.weights == 0).all()


def test_layer_save_load_npz(cpu_backend, tmp_path, rng):
    layer = FullyConnectedLayer(4, 3, activation="gelu", dropout_rate=0.25, seed=4, dtype=np.float64)
    layer.forward(rng.standard_normal((2, 4)))  # advances the dropout offset, which is saved too
    path = tmp_path / "layer.npz"
    layer.save(path)
    back = FullyConnectedLayer.load(path)
    assert repr(back) == repr(layer) and back.offset == layer.offset and back.seed == layer.seed
    x = rng.standard_normal((5, 4))
    np.testing.assert_array_equal(back.forward(x), layer.forward(x))  # same weights, same next mask


def test_sequential_save_load_npz(cpu_backend, tmp_path, rng):
    model = Sequential(FullyConnectedLayer(4, 5, activation="relu", seed=1), DropoutLayer(0.5, seed=2),
                       FullyConnectedLayer(5, 2, bias=False, seed=3))
    path = tmp_path / "model.npz"
    model.save(path)
    assert sorted(np.load(path).files) == ["0.biases", "0.weights", "2.weights", "__gpufc__"]
    back = Module.load(path)
    assert isinstance(back, Sequential) and repr(back) == repr(model)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(back.eval().forward(x), model.eval().forward(x))
    with pytest.raises(TypeError, match="holds a Sequential, not a FullyConnectedLayer"):
        FullyConnectedLayer.load(path)
    fresh = Sequential(FullyConnectedLayer(4, 5, seed=9), DropoutLayer(0.5), FullyConnectedLayer(5, 2, bias=False))
    fresh.load_state_dict(np.load(path))  # the metadata entry is ignored
    np.testing.assert_array_equal(fresh[2].weights, model[2].weights)


def test_torch_layout_round_trip_without_torch(cpu_backend, rng):
    layer = FullyConnectedLayer(4, 3, seed=1)
    sd = layer.torch_state_dict()
    assert sd["weight"].shape == (3, 4) and sd["bias"].shape == (3,)
    np.testing.assert_array_equal(sd["weight"], layer.weights.T)
    back = FullyConnectedLayer.from_torch(sd)
    np.testing.assert_array_equal(back.weights, layer.weights)
    np.testing.assert_array_equal(back.biases, layer.biases)
    # torch computes x @ weight.T + bias: the same numbers as our x @ weights + biases
    x = rng.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(x @ sd["weight"].T + sd["bias"], layer.forward(x), rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(output_size, input_size\) = \(3, 4\), got \(4, 3\)"):
        layer.load_torch_state_dict({"weight": np.zeros((4, 3)), "bias": np.zeros(3)})
    with pytest.raises(ValueError, match="has bias=True but the torch state lacks one"):
        layer.load_torch_state_dict({"weight": np.zeros((3, 4))})
    nobias = FullyConnectedLayer.from_torch({"weight": rng.standard_normal((2, 4))})
    assert nobias.biases is None and nobias.weights.dtype == np.float64


def test_torch_module_round_trip(cpu_backend, rng):
    torch = pytest.importorskip("torch", reason="torch is not installed (the array-level conversion is tested above)")
    lin = torch.nn.Linear(4, 3, dtype=torch.float64)
    layer = FullyConnectedLayer.from_torch(lin)
    x = rng.standard_normal((2, 4))
    np.testing.assert_allclose(layer.forward(x), lin(torch.from_numpy(x)).detach().numpy(), rtol=1e-12)
    back = layer.to_torch()
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)


def test_keras_layout_round_trip(cpu_backend):
    layer = FullyConnectedLayer(4, 3, activation="relu", seed=1)
    kernel, bias = layer.keras_weights()
    assert kernel.shape == (4, 3)  # Keras' Dense kernel is (input, output): our layout, no transpose
    np.testing.assert_array_equal(kernel, layer.weights)

    class FakeDense:  # the two methods of keras.layers.Dense that from_keras reads
        def get_weights(self):
            return [kernel, bias]

        def get_config(self):
            return {"activation": "relu"}

    back = FullyConnectedLayer.from_keras(FakeDense())
    assert back.activation == "relu"
    np.testing.assert_array_equal(back.weights, layer.weights)
    with pytest.raises(ValueError, match=r"expected 2 arrays"):
        layer.load_keras_weights([kernel])


# ----------------------------------------------------------------------------
# Sequential, loss, optimizers
# ----------------------------------------------------------------------------


def test_sequential_matches_layer_by_layer(any_backend, rng):
    l1 = FullyConnectedLayer(3, 4, activation="tanh", dtype=np.float64, seed=1)
    l2 = FullyConnectedLayer(4, 2, dtype=np.float64, seed=2)
    model = Sequential(l1, l2)
    x = rng.standard_normal((2, 3))
    r = rng.standard_normal((2, 2))
    y = model.forward(x)
    gx = model.backward(r)
    gw1, gw2 = l1.grad_weights.copy(), l2.grad_weights.copy()
    want = l2.forward(l1.forward(x))
    want_gx = l1.backward(l2.backward(r))
    assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert_close(gx, want_gx, rtol=1e-12, atol=1e-12)
    assert_close(gw1, l1.grad_weights, rtol=1e-12, atol=1e-12)
    assert_close(gw2, l2.grad_weights, rtol=1e-12, atol=1e-12)
    assert model.backward(r, input_grad=False) is None
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.weights", "0.biases", "1.weights", "1.biases"]
    assert [g.shape for g in model.gradients()] == [p.shape for p in model.parameters()]
    model.eval()
    assert not l1.training and not l2.training
    model.zero_grad()
    assert model.gradients() == [None] * 4


def test_softmax_cross_entropy_against_float64_math(rng):
    z = rng.standard_normal((5, 4)) * 3
    t = np.array([0, 3, 1, 1, 2])
    loss, grad = softmax_cross_entropy(z, t)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert float(loss) == pytest.approx(-np.mean(np.log(p[np.arange(5), t])), rel=1e-12)
    assert_close(grad, (p - np.eye(4)[t]) / 5, rtol=1e-12, atol=1e-14)
    num = numeric_grad(lambda: float(softmax_cross_entropy(z, t)[0]), z)
    assert_close(grad, num, rtol=FD_RTOL, atol=FD_ATOL, what="loss gradient")
    soft_loss, soft_grad = softmax_cross_entropy(z, np.eye(4)[t])
    assert float(soft_loss) == pytest.approx(float(loss), rel=1e-12)
    assert_close(soft_grad, grad, rtol=1e-12, atol=1e-15)


def test_softmax_cross_entropy_is_stable_and_keeps_dtype():
    z = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, 1e4]], np.float32)
    loss, grad = softmax_cross_entropy(z, np.array([0, 2]))
    assert np.isfinite(loss) and float(loss) == 0.0 and grad.dtype == np.float32 and np.isfinite(grad).all()
    loss, _ = softmax_cross_entropy(z, np.array([1, 0]))
    assert float(loss) == pytest.approx(1.5e4, rel=1e-6)


def test_softmax_cross_entropy_errors():
    with pytest.raises(ValueError, match=r"got label 4"):
        softmax_cross_entropy(np.zeros((2, 4)), np.array([0, 4]))
    with pytest.raises(ValueError, match=r"labels.shape=\(3,\)"):
        softmax_cross_entropy(np.zeros((2, 4)), np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="logits.dtype=int64"):
        softmax_cross_entropy(np.zeros((2, 4), np.int64), np.array([0, 1]))


class _Param(Module):
    """A module with one parameter and a gradient set by hand."""

    _param_names = ("weights",)

    def __init__(self, w):
        self.weights, self.grad_weights = w, None


def test_sgd_momentum_follows_torchs_rule(rng):
    w0 = rng.standard_normal(5)
    grads = [rng.standard_normal(5) for _ in range(3)]
    m = _Param(w0.copy())
    opt = SGD(m, lr=0.1, momentum=0.9, weight_decay=0.01)
    w, buf = w0.copy(), None
    ident = id(m.weights)
    for g in grads:
        m.grad_weights = g
        opt.step()
        d = g + 0.01 * w
        buf = d if buf is None else 0.9 * buf + d
        w = w - 0.1 * buf
    assert id(m.weights) == ident, "updated in place"
    assert_close(m.weights, w, rtol=1e-12, atol=1e-12)
    opt.zero_grad()
    assert m.grad_weights is None
    opt.step()  # no gradient: nothing moves
    assert_close(m.weights, w, rtol=1e-12, atol=1e-12)


def test_adam_follows_the_paper_with_bias_correction(rng):
    w0 = rng.standard_normal(4).astype(np.float32)
    grads = [rng.standard_normal(4).astype(np.float32) for _ in range(4)]
    m = _Param(w0.copy())
    opt = Adam(m, lr=0.01)
    w, mm, vv = w0.astype(np.float64), np.zeros(4), np.zeros(4)
    for t, g in enumerate(grads, 1):
        m.grad_weights = g
        opt.step()
        mm = 0.9 * mm + 0.1 * g
        vv = 0.999 * vv + 0.001 * g.astype(np.float64) ** 2
        w = w - 0.01 * (mm / (1 - 0.9**t)) / (np.sqrt(vv / (1 - 0.999**t)) + 1e-8)
    assert m.weights.dtype == np.float32
    assert_close(m.weights, w, rtol=1e-5, atol=1e-6)


def test_optimizer_errors():
    with pytest.raises(ValueError, match="lr=0"):
        SGD(_Param(np.zeros(2)), lr=0)
    with pytest.raises(ValueError, match=r"betas=\(0\.9, 1\.0\)"):
        Adam(_Param(np.zeros(2)), betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="gpufc modules"):
        SGD([np.zeros(2)])


def test_a_few_steps_reduce_the_loss(any_backend, rng):
    model = Sequential(FullyConnectedLayer(3, 4, activation="relu", seed=1, dtype=np.float64),
                       FullyConnectedLayer(4, 2, seed=2, dtype=np.float64))
    opt = Adam(model, lr=0.05)
    x = rng.standard_normal((4, 3))
    t = np.array([0, 1, 1, 0])
    losses = []
    for _ in range(3):
        loss, grad = softmax_cross_entropy(model.forward(x), t)
        model.backward(grad, input_grad=False)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------
# GPU tier: parameters on the device, CuPy and torch interop
# ----------------------------------------------------------------------------


@pytest.fixture
def cp(device_backend):
    return pytest.importorskip("cupy", reason="CuPy is not installed")


@requires_gpu
@pytest.mark.gpu
def test_cuda_layer_trains_in_place_on_the_device(cp, rng):
    layer = FullyConnectedLayer(96, 80, activation="relu", dropout_rate=0.1, seed=3).to("cuda")
    assert isinstance(layer.weights, cp.ndarray) and layer.device == "cuda"
    host = FullyConnectedLayer(96, 80, activation="relu", dropout_rate=0.1, seed=3, dtype=np.float64)
    x = rng.standard_normal((64, 96)).astype(np.float32)
    r = rng.standard_normal((64, 80)).astype(np.float32)
    y = layer.forward(cp.asarray(x))
    gx = layer.backward(cp.asarray(r))
    assert isinstance(y, cp.ndarray) and isinstance(gx, cp.ndarray) and isinstance(layer.grad_weights, cp.ndarray)
    with backend("cpu"):
        want_y = host.forward(x.astype(np.float64))
        want_gx = host.backward(r.astype(np.float64))
    assert_close(cp.asnumpy(y), want_y, rtol=1e-4, atol=1e-4, what="forward")
    assert_close(cp.asnumpy(gx), want_gx, rtol=1e-4, atol=1e-4, what="grad_input")
    assert_close(cp.asnumpy(layer.grad_weights), host.grad_weights, rtol=1e-4, atol=1e-3, what="grad_weights")
    views = layer._views
    ptr = layer.weights.data.ptr
    SGD(layer, lr=0.1).step()
    layer.forward(cp.asarray(x))
    assert layer.weights.data.ptr == ptr and layer._views is views, "updated in place; views reused"
    y_np = layer.eval().forward(x)  # NumPy in, NumPy out, even with device parameters
    assert isinstance(y_np, np.ndarray) and y_np.shape == (64, 80)
    layer.to("cpu")
    assert isinstance(layer.weights, np.ndarray)


@requires_gpu
@pytest.mark.gpu
def test_cuda_sequential_numpy_batch_copied_once(cp, rng):
    model = Sequential(FullyConnectedLayer(8, 16, activation="gelu", seed=1),
                       FullyConnectedLayer(16, 4, seed=2)).to("cuda")
    x = rng.standard_normal((32, 8)).astype(np.float32)
    y = model.forward(x)
    assert isinstance(y, np.ndarray)
    loss, grad = softmax_cross_entropy(cp.asarray(y), cp.zeros(32, cp.int64))
    assert isinstance(grad, cp.ndarray) and float(loss) > 0
    gx = model.backward(grad)
    assert isinstance(gx, np.ndarray) and gx.shape == (32, 8), "grad_input comes back in the forward input's type"
    assert all(isinstance(g, cp.ndarray) for g in model.gradients())


@requires_gpu
@pytest.mark.gpu
def test_torch_tensors_through_a_layer(device_backend, rng):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    lin = torch.nn.Linear(17, 9, dtype=torch.float64).cuda()
    layer = FullyConnectedLayer.from_torch(lin)
    x = torch.randn(5, 3, 17, device="cuda", dtype=torch.float64)
    y = layer.forward(x)
    assert isinstance(y, torch.Tensor) and y.is_cuda and y.shape == (5, 3, 9)
    torch.testing.assert_close(y, lin(x).detach())
    gx = layer.backward(torch.ones_like(y))
    assert isinstance(gx, torch.Tensor) and gx.shape == x.shape
