"""Functional ops: ``linear``, ``dropout`` and their backward passes.

Each call validates its arguments, picks the backend (:mod:`gpufc.backend`),
moves data as :mod:`gpufc.transfer` says, launches the kernels of
:mod:`gpufc.kernels` (or runs :mod:`gpufc.reference` on ``cpu``) and returns
the caller's array type. Shapes use one scheme::

    x (..., K) @ weights (K, N) + biases (N) -> act -> dropout -> y (..., N)

Leading dims of ``x`` are batch dims; the dropout mask is indexed over the
``(rows, N)`` output with ``rows = prod(x.shape[:-1])``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import backend as _backend
from . import reference as _ref
from . import transfer as _tx

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def _check_float(op: _tx.Operand) -> None:
    if op.dtype not in _FLOATS:
        raise TypeError(f"{op.name} must be float32 or float64, got {op.name}.dtype={op.dtype}")


def _check_same_dtype(a: _tx.Operand, b: _tx.Operand) -> None:
    if a.dtype != b.dtype:
        raise TypeError(
            f"{a.name} and {b.name} must share one dtype, got {a.name}.dtype={a.dtype} "
            f"and {b.name}.dtype={b.dtype}"
        )


def _check_activation(activation) -> None:
    if activation not in _ref.ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ref.ACTIVATIONS}, got activation={activation!r}")


@dataclasses.dataclass(frozen=True)
class _Dropout:
    """A validated dropout request: the kernels' integer threshold and dtype scale."""

    p: float
    seed: int
    offset: int
    active: bool

    @classmethod
    def make(cls, p, seed, offset, training) -> _Dropout:
        p = _ref.check_p(p)
        seed = _ref.check_seed(seed)
        offset = _ref.check_offset(offset)
        return cls(p, seed, offset, bool(training) and p > 0.0)

    @property
    def key(self) -> tuple[int, int]:
        return self.seed & 0xFFFFFFFF, (self.seed >> 32) & 0xFFFFFFFF

    @property
    def threshold(self) -> int:
        return _ref.dropout_threshold(self.p)

    def scale(self, dtype):
        return _ref.dropout_scale(self.p, dtype)

    def kernel_args(self, dtype) -> dict:
        return dict(key=self.key, offset=self.offset, threshold=self.threshold, scale=self.scale(dtype))


@dataclasses.dataclass
class _LinearArgs:
    x: _tx.Operand
    w: _tx.Operand
    b: _tx.Operand | None
    rows: int
    k: int
    n: int
    out_shape: tuple


def _linear_args(x, weights, biases, activation) -> _LinearArgs:
    xo = _tx.operand(x, "x")
    wo = _tx.operand(weights, "weights")
    _check_float(xo)
    _check_float(wo)
    _check_same_dtype(xo, wo)
    if len(wo.shape) != 2:
        raise ValueError(f"weights must have shape (input_size, output_size), got weights.shape={wo.shape}")
    k, n = wo.shape
    if len(xo.shape) < 1 or xo.shape[-1] != k:
        raise ValueError(
            f"x must have shape (..., {k}) to match weights.shape={wo.shape}, got x.shape={xo.shape}"
        )
    bo = None
    if biases is not None:
        bo = _tx.operand(biases, "biases")
        _check_float(bo)
        _check_same_dtype(xo, bo)
        if bo.shape != (n,):
            raise ValueError(f"biases must have shape ({n},) to match weights.shape={wo.shape}, got biases.shape={bo.shape}")
    _check_activation(activation)
    rows = int(np.prod(xo.shape[:-1], dtype=np.int64))
    return _LinearArgs(xo, wo, bo, rows, k, n, tuple(xo.shape[:-1]) + (n,))


# ----------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------


def linear(x, weights, biases=None, *, activation=None, dropout_p=0.0, training=True, seed=0, offset=0):
    """Fully connected layer: ``dropout(act(x @ weights + biases))``, fused in one kernel.

    Args:
        x: ``(..., input_size)``, float32 or float64; NumPy, CuPy or any CUDA array.
        weights: ``(input_size, output_size)``, the same dtype (the seed article's
            and Keras' layout: the transpose of torch's ``nn.Linear.weight``).
        biases: ``(output_size,)`` or None.
        activation: None, ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"tanh"`` or ``"sigmoid"``.
        dropout_p: probability of zeroing an output element, in [0, 1].
        training: dropout is the identity when False.
        seed, offset: the Philox key and element offset of the dropout mask.

    Returns:
        ``(..., output_size)`` in the caller's array type.

    Example:
        >>> y = gpufc.linear(np.ones((2, 3), np.float32), np.ones((3, 4), np.float32))
    """
    y, _ = linear_forward(
        x, weights, biases, activation=activation, dropout_p=dropout_p, training=training,
        seed=seed, offset=offset, save_preact=False,
    )
    return y


def linear_forward(x, weights, biases=None, *, activation=None, dropout_p=0.0, training=True,
                   seed=0, offset=0, save_preact=False):
    """:func:`linear` that also returns the pre-activation ``x @ weights + biases`` when asked.

    Returns ``(y, preact)``; ``preact`` is None unless ``save_preact`` (the layers
    keep it for the activation's derivative in backward).
    """
    a = _linear_args(x, weights, biases, activation)
    drop = _Dropout.make(dropout_p, seed, offset, training)
    save = bool(save_preact)
    if _backend.get_backend() == "cpu":
        xh = _tx.host_array(a.x).reshape(a.rows, a.k)
        w = _tx.host_array(a.w)
        z = xh @ w
        if a.b is not None:
            z = z + _tx.host_array(a.b)
        y = _ref.activation(z, activation)
        if drop.active:
            y = _ref.dropout(y, drop.p, seed=drop.seed, offset=drop.offset)
        return y.reshape(a.out_shape), (z.reshape(a.out_shape) if save else None)

    if a.rows == 0 or a.n == 0 or a.k == 0:
        return _empty_linear(a, activation, drop, save)
    k = _backend.kernels()
    stream = _tx.current_stream()
    xv, _xk = _tx.device_view(a.x, (a.rows, a.k))
    wv, _wk = _tx.device_view(a.w)
    bv, _bk = _tx.device_view(a.b) if a.b is not None else (wv.reshape(-1), None)
    yv, yh = _tx.empty((a.rows, a.n), a.x.dtype)
    zv, zh = _tx.empty((a.rows, a.n), a.x.dtype) if save else (yv, None)
    ep = k.epilogue.Epilogue(activation, a.b is not None, drop.active, save)
    k.matmul.launch_matmul(xv, wv, bv, yv, zv, ep=ep, stream=stream, **drop.kernel_args(a.x.dtype))
    y = _tx.to_caller(yh, a.x, a.out_shape)
    return y, (_tx.to_caller(zh, a.x, a.out_shape) if save else None)


def _empty_linear(a: _LinearArgs, activation, drop: _Dropout, save: bool):
    """K == 0 gives act(biases) broadcast (dropped where the mask says); empty shapes give empties."""
    dtype = a.x.dtype
    if a.rows == 0 or a.n == 0:
        z = np.zeros((a.rows, a.n), dtype)
    else:
        bias = np.zeros(a.n, dtype) if a.b is None else _tx.to_host(a.b)
        z = np.broadcast_to(bias, (a.rows, a.n)).copy()
    y = _ref.activation(z, activation)
    if drop.active:
        y = _ref.dropout(y, drop.p, seed=drop.seed, offset=drop.offset)
    out = _tx.from_host(y.reshape(a.out_shape), a.x)
    return out, (_tx.from_host(z.reshape(a.out_shape), a.x) if save else None)


def linear_backward(x, weights, grad_output, preact=None, *, biases=None, activation=None,
                    dropout_p=0.0, training=True, seed=0, offset=0):
    """Backward of :func:`linear`.

    Args:
        x: ``(..., K)``, the forward's input.
        weights: ``(K, N)``.
        grad_output: ``(..., N)``, d loss / d y.
        preact: ``(..., N)``, the forward's ``x @ weights + biases`` (from
            :func:`linear_forward` with ``save_preact=True``); needed when
            ``activation`` is not None, recomputed if omitted.
        biases, activation, dropout_p, training, seed, offset: as in the forward.

    Returns:
        ``(grad_x (..., K), grad_weights (K, N), grad_biases (N,))`` in the caller's type.
        The dropout mask is regenerated from ``(seed, offset)``, never stored.
    """
    a = _linear_args(x, weights, biases, activation)
    go = _tx.operand(grad_output, "grad_output")
    _check_float(go)
    _check_same_dtype(a.x, go)
    if go.shape != a.out_shape:
        raise ValueError(f"grad_output must have shape {a.out_shape} (the forward's output), got {go.shape}")
    drop = _Dropout.make(dropout_p, seed, offset, training)
    if activation is not None and preact is None:
        _, preact = linear_forward(x, weights, biases, activation=activation, training=False, save_preact=True)
    po = None
    if activation is not None:
        po = _tx.operand(preact, "preact")
        _check_same_dtype(a.x, po)
        if po.shape != a.out_shape:
            raise ValueError(f"preact must have shape {a.out_shape}, got {po.shape}")

    if _backend.get_backend() == "cpu" or a.rows == 0 or a.n == 0 or a.k == 0:
        return _linear_backward_host(a, go, po, activation, drop)

    k = _backend.kernels()
    dtype = a.x.dtype
    stream = _tx.current_stream()
    xv, _xk = _tx.device_view(a.x, (a.rows, a.k))
    wv, _wk = _tx.device_view(a.w)
    gov, _gk = _tx.device_view(go, (a.rows * a.n,))
    if activation is not None or drop.active:
        zv, _zk = _tx.device_view(po, (a.rows * a.n,)) if po is not None else (gov, None)
        gv, _g = _tx.empty((a.rows * a.n,), dtype)
        k.dropout.launch_act_dropout_backward(
            gov, zv, gv, activation=activation, dropout=drop.active, stream=stream, **drop.kernel_args(dtype)
        )
    else:
        gv = gov
    g2 = gv.reshape(a.rows, a.n)
    gxv, gxh = _tx.empty((a.rows, a.k), dtype)
    gwv, gwh = _tx.empty((a.k, a.n), dtype)
    gbv, gbh = _tx.empty((a.n,), dtype)
    # grad_x = g @ w.T: w is read in its stored (K, N) layout as the (N, K) operand.
    k.matmul.launch_matmul(g2, wv, gbv, gxv, gxv, trans_b=True, stream=stream)
    # grad_w = x.T @ g: x is read in its stored (M, K) layout as the (K, M) operand.
    k.matmul.launch_matmul(xv, g2, gbv, gwv, gwv, trans_a=True, stream=stream)
    k.matmul.launch_bias_grad(g2, gbv, stream=stream)
    return (
        _tx.to_caller(gxh, a.x, a.x.shape),
        _tx.to_caller(gwh, a.x),
        _tx.to_caller(gbh, a.x),
    )


def _linear_backward_host(a: _LinearArgs, go: _tx.Operand, po, activation, drop: _Dropout):
    on_cpu = _backend.get_backend() == "cpu"
    get = _tx.host_array if on_cpu else _tx.to_host
    gx, gw, gb = _ref.linear_backward(
        get(a.x).reshape(a.rows, a.k), get(a.w), get(go).reshape(a.rows, a.n),
        None if po is None else get(po).reshape(a.rows, a.n),
        activation=activation, dropout_p=drop.p, training=drop.active, seed=drop.seed, offset=drop.offset,
    )
    gx = gx.reshape(a.x.shape)
    if on_cpu:
        return gx, gw, gb
    return _tx.from_host(gx, a.x), _tx.from_host(gw, a.x), _tx.from_host(gb, a.x)


# ----------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------


def dropout(x, p, *, seed=0, offset=0, training=True):
    """Inverted dropout: ``x * scale`` where kept, exactly 0 where dropped.

    Args:
        x: any shape, float32 or float64; NumPy, CuPy or any CUDA array.
        p: probability of dropping an element, in [0, 1].
        seed: Philox key, ``0 <= seed < 2**64``.
        offset: Philox element offset; element ``e`` (row-major) uses ``offset + e``.
        training: the identity (a copy) when False.

    Returns:
        An array of ``x``'s shape and type. The mask equals
        :func:`gpufc.reference.dropout_keep_mask` ``(x.shape, p, seed, offset)`` bit for bit.
    """
    xo = _tx.operand(x, "x")
    _check_float(xo)
    drop = _Dropout.make(p, seed, offset, training)
    return _dropout_apply(xo, drop)


def dropout_backward(grad_output, p, *, seed=0, offset=0, training=True):
    """Gradient of :func:`dropout`: the forward's mask and scale, regenerated, applied to ``grad_output``."""
    go = _tx.operand(grad_output, "grad_output")
    _check_float(go)
    return _dropout_apply(go, _Dropout.make(p, seed, offset, training))


def _dropout_apply(xo: _tx.Operand, drop: _Dropout):
    if _backend.get_backend() == "cpu":
        return _ref.dropout(_tx.host_array(xo), drop.p, seed=drop.seed, offset=drop.offset, training=drop.active)
    if xo.size == 0:
        return _tx.from_host(np.zeros(xo.shape, xo.dtype), xo)
    k = _backend.kernels()
    stream = _tx.current_stream()
    xv, _keep = _tx.device_view(xo, (xo.size,))
    yv, yh = _tx.empty((xo.size,), xo.dtype)
    if drop.active:
        k.dropout.launch_dropout(xv, yv, stream=stream, **drop.kernel_args(xo.dtype))
    else:
        yv.copy_to_device(xv, stream=stream)
    return _tx.to_caller(yh, xo, xo.shape)
