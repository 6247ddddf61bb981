"""Functional ops: ``linear``, ``dropout`` and their backward passes.

Each call validates its arguments, picks the backend (:mod:`gpufc.backend`),
moves data as :mod:`gpufc.transfer` says, launches the kernels of
:mod:`gpufc.kernels` (or runs :mod:`gpufc.reference` on ``cpu``) and returns
the caller's array type. Shapes use one scheme::

    x (..., K) @ weights (K, N) + biases (N) -> act -> dropout -> y (..., N)

Leading dims of ``x`` are batch dims; the dropout mask is indexed over the
``(rows, N)`` output with ``rows = prod(x.shape[:-1])``.

Every function takes ``stream=``: None queues the kernels on CuPy's current
stream; a CuPy, torch or Numba stream, anything with ``__cuda_stream__``, or a
raw ``cudaStream_t`` int queues them (and the outputs' allocations) on that
stream instead. Nothing synchronises unless a NumPy caller needs its result.

The device half is split in two so that :mod:`gpufc.layers` can reuse it with
parameters whose device views it keeps between calls: :func:`forward_device`
and :func:`backward_device` take Numba views, allocate one array per output
and launch; the public functions validate, make the views and return the
caller's types.
"""

from __future__ import annotations

import math

import numpy as np

from .runtime import backend as _backend
from . import precision as _prec
from . import reference as _ref
from .runtime import transfer as _tx

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


class Dropout:
    """A validated dropout request: the kernels' key, integer threshold and per-dtype scale.

    Built once per ``(p, seed)`` by a layer and moved along with :meth:`at`, so
    a training step does not re-validate or recompute them.
    """

    __slots__ = ("_scales", "active", "key", "offset", "p", "seed", "threshold")

    def __init__(self, p: float, seed: int, offset: int, active: bool, key, threshold: int, scales: dict):
        self.p, self.seed, self.offset, self.active = p, seed, offset, active
        self.key, self.threshold, self._scales = key, threshold, scales

    @classmethod
    def make(cls, p, seed, offset, training) -> Dropout:
        p = _ref.check_p(p)
        seed = _ref.check_seed(seed)
        offset = _ref.check_offset(offset)
        return cls(p, seed, offset, bool(training) and p > 0.0, _ref.philox_key(seed), _ref.dropout_threshold(p), {})

    def at(self, offset: int, active: bool = True) -> Dropout:
        """The same ``(p, seed)`` at another offset; ``active=False`` is the identity."""
        return Dropout(self.p, self.seed, offset, active and self.p > 0.0, self.key, self.threshold, self._scales)

    def scale(self, dtype):
        dtype = np.dtype(dtype)
        s = self._scales.get(dtype)
        if s is None:
            s = self._scales[dtype] = _ref.dropout_scale(self.p, dtype)
        return s

    def kernel_args(self, dtype) -> dict:
        return {"key": self.key, "offset": self.offset, "threshold": self.threshold, "scale": self.scale(dtype)}


class _LinearArgs:
    __slots__ = ("b", "k", "n", "out_shape", "rows", "w", "x")

    def __init__(self, x, w, b, rows, k, n, out_shape):
        self.x, self.w, self.b, self.rows, self.k, self.n, self.out_shape = x, w, b, rows, k, n, out_shape


def _linear_args(x, weights, biases, activation) -> _LinearArgs:
    xo = _prec.operand(x, "x", _tx.operand)
    wo = _prec.operand(weights, "weights", _tx.operand)
    _prec.check_float(xo)
    _prec.check_float(wo)
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
        bo = _prec.operand(biases, "biases", _tx.operand)
        _prec.check_float(bo)
        _check_same_dtype(xo, bo)
        if bo.shape != (n,):
            raise ValueError(f"biases must have shape ({n},) to match weights.shape={wo.shape}, got biases.shape={bo.shape}")
    _check_activation(activation)
    rows = math.prod(xo.shape[:-1])
    return _LinearArgs(xo, wo, bo, rows, k, n, tuple(xo.shape[:-1]) + (n,))


# ----------------------------------------------------------------------------
# Device halves, shared with gpufc.layers
# ----------------------------------------------------------------------------

_cache: dict = {}  # the kernels module, epilogues and 1-element dummy biases, built once


def _kernels():
    k = _cache.get("kernels")
    if k is None:
        k = _cache["kernels"] = _backend.kernels()
    return k


def _epilogue(activation, bias: bool, dropout: bool, save: bool):
    key = (activation, bias, dropout, save)
    ep = _cache.get(key)
    if ep is None:
        ep = _cache[key] = _kernels().linear.epilogue.Epilogue(activation, bias, dropout, save)
    return ep


def _dummy_bias(dtype):
    """A 1-element device array for kernels launched without a bias (never read)."""
    key = ("dummy", _backend.get_backend(), np.dtype(dtype))
    entry = _cache.get(key)
    if entry is None:
        entry = _cache[key] = _tx.empty((1,), dtype)
    return entry[0]


def forward_device(xv, wv, bv, rows: int, n: int, dtype, activation, drop: Dropout, save: bool, stream,
                   kind=None):
    """Launch ``y = dropout(act(x @ w + b))`` on device views; one allocation per output.

    Shapes: xv (rows, K), wv (K, N), bv (N,) or None; rows, K, N > 0.
    Returns ``(y_holder, z_view, z_holder)``: the output and, when ``save``,
    the pre-activation ``x @ w + b`` (else None, None). ``kind`` ("tf32", "f16",
    "bf16"; :func:`gpufc.precision.kind`) runs the tensor-core kernels instead.
    """
    if kind is not None:
        return _prec.forward_device(xv, wv, bv, rows, n, dtype, kind, activation, drop, save, stream, _tx.empty,
                                    _dummy_bias)
    k = _kernels()
    yv, yh = _tx.empty((rows, n), dtype)
    zv, zh = _tx.empty((rows, n), dtype) if save else (yv, None)
    ep = _epilogue(activation, bv is not None, drop.active, save)
    k.linear.launch_matmul(xv, wv, _dummy_bias(dtype) if bv is None else bv, yv, zv, ep=ep, stream=stream,
                           **drop.kernel_args(dtype))
    return yh, (zv if save else None), zh


def backward_device(xv, wv, gov, zv, rows: int, k: int, n: int, dtype, activation, drop: Dropout, stream,
                    need_x: bool = True, need_b: bool = True, kind=None):
    """Launch the backward of :func:`forward_device` on device views.

    Shapes: xv (rows, K), wv (K, N), gov and zv (rows, N) (zv only read with an
    activation); rows, K, N > 0. ``g = dropout'(grad) * act'(z)`` is one fused
    elementwise kernel, then ``grad_x = g @ w.T`` and ``grad_w = x.T @ g`` read
    the operands in their stored layouts, and ``grad_b = g.sum(0)``.
    Returns holders ``(grad_x or None, grad_w, grad_b or None)``. ``kind``: the
    tensor-core kernels, as in :func:`forward_device`.
    """
    if kind is not None:
        return _prec.backward_device(xv, wv, gov, zv, rows, k, n, dtype, kind, activation, drop, stream, _tx.empty,
                                     _dummy_bias, need_x, need_b)
    kk = _kernels()
    if activation is not None or drop.active:
        gv, _gh = _tx.empty((rows * n,), dtype)
        zflat = zv.reshape(rows * n) if activation is not None else gv
        kk.dropout.launch_act_dropout_backward(
            gov.reshape(rows * n), zflat, gv, activation=activation, dropout=drop.active, stream=stream,
            **drop.kernel_args(dtype),
        )
        g2 = gv.reshape(rows, n)
    else:
        g2 = gov
    dummy = _dummy_bias(dtype)
    gxh = None
    if need_x:
        gxv, gxh = _tx.empty((rows, k), dtype)
        # grad_x = g @ w.T: w is read in its stored (K, N) layout as the (N, K) operand.
        kk.linear.launch_matmul(g2, wv, dummy, gxv, gxv, trans_b=True, stream=stream)
    gwv, gwh = _tx.empty((k, n), dtype)
    # grad_w = x.T @ g: x is read in its stored (M, K) layout as the (K, M) operand.
    kk.linear.launch_matmul(xv, g2, dummy, gwv, gwv, trans_a=True, stream=stream)
    gbh = None
    if need_b:
        gbv, gbh = _tx.empty((n,), dtype)
        kk.linear.launch_bias_grad(g2, gbv, stream=stream)
    return gxh, gwh, gbh


# ----------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------


def linear(x, weights, biases=None, *, activation=None, dropout_p=0.0, training=True, seed=0, offset=0,
           stream=None, precision=None):
    """Fully connected layer: ``dropout(act(x @ weights + biases))``, fused in one kernel.

    Args:
        x: ``(..., input_size)``, float32, float64, float16 or bfloat16; NumPy, CuPy or any CUDA array.
        weights: ``(input_size, output_size)``, the same dtype (the seed article's
            and Keras' layout: the transpose of torch's ``nn.Linear.weight``).
        biases: ``(output_size,)`` or None.
        activation: None, ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"tanh"`` or ``"sigmoid"``.
        dropout_p: probability of zeroing an output element, in [0, 1].
        training: dropout is the identity when False.
        seed, offset: the Philox key and element offset of the dropout mask.
        stream: where to queue the work (see the module docstring); None is CuPy's current stream.
        precision: float32 matmuls in ``"ieee"`` or ``"tf32"`` (tensor cores); None: the
            process default (:func:`gpufc.set_matmul_precision`). float64 ignores it; float16
            and bfloat16 always run on the tensor cores (:mod:`gpufc.precision`).

    Returns:
        ``(..., output_size)`` in the caller's array type.

    Example:
        >>> y = gpufc.linear(np.ones((2, 3), np.float32), np.ones((3, 4), np.float32))
    """
    y, _ = linear_forward(
        x, weights, biases, activation=activation, dropout_p=dropout_p, training=training,
        seed=seed, offset=offset, save_preact=False, stream=stream, precision=precision,
    )
    return y


def linear_forward(x, weights, biases=None, *, activation=None, dropout_p=0.0, training=True,
                   seed=0, offset=0, save_preact=False, stream=None, precision=None):
    """:func:`linear` that also returns the pre-activation ``x @ weights + biases`` when asked.

    Returns ``(y, preact)``; ``preact`` is None unless ``save_preact`` (the layers
    keep it for the activation's derivative in backward).
    """
    a = _linear_args(x, weights, biases, activation)
    drop = Dropout.make(dropout_p, seed, offset, training)
    save = bool(save_preact)
    prec = _prec.resolve(precision)
    kind = _prec.kind(a.x.dtype, prec)
    with _tx.stream_scope(stream) as s:
        if _backend.get_backend() == "cpu":
            b = None if a.b is None else _tx.host_array(a.b)
            x2, w = _tx.host_array(a.x).reshape(a.rows, a.k), _tx.host_array(a.w)
            if kind is None:
                y, z = _ref_forward(x2, w, b, activation, drop)
            else:
                y, z = _prec.ref_forward(x2, w, b, activation, drop, prec)
            return y.reshape(a.out_shape), (z.reshape(a.out_shape) if save else None)
        if a.rows == 0 or a.n == 0 or a.k == 0:
            return _empty_linear(a, activation, drop, save)
        dev = _prec.device_operand  # bfloat16 data as their int16 bit patterns; the rest as is
        xv, _xk = _tx.device_view(dev(a.x), (a.rows, a.k))
        wv, _wk = _tx.device_view(dev(a.w))
        bv, _bk = _tx.device_view(dev(a.b)) if a.b is not None else (None, None)
        yh, _zv, zh = forward_device(xv, wv, bv, a.rows, a.n, a.x.dtype, activation, drop, save, s, kind)
        y = _prec.as_dtype(_tx.to_caller(yh, a.x, a.out_shape), a.x.dtype)
        return y, (_prec.as_dtype(_tx.to_caller(zh, a.x, a.out_shape), a.x.dtype) if save else None)


def _ref_forward(x2, w, b, activation, drop: Dropout):
    """The cpu backend's forward: ``(y, z)`` for ``x2 (rows, K)``, NumPy throughout."""
    z = x2 @ w
    if b is not None:
        z += b
    y = _ref.activation(z, activation)
    if drop.active:
        y = _ref.dropout(y, drop.p, seed=drop.seed, offset=drop.offset)
    return y, z


def _empty_linear(a: _LinearArgs, activation, drop: Dropout, save: bool):
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
                    dropout_p=0.0, training=True, seed=0, offset=0, stream=None, precision=None):
    """Backward of :func:`linear`.

    Args:
        x: ``(..., K)``, the forward's input.
        weights: ``(K, N)``.
        grad_output: ``(..., N)``, d loss / d y.
        preact: ``(..., N)``, the forward's ``x @ weights + biases`` (from
            :func:`linear_forward` with ``save_preact=True``); needed when
            ``activation`` is not None, recomputed if omitted.
        biases, activation, dropout_p, training, seed, offset: as in the forward.
        stream: where to queue the work, as in :func:`linear`.
        precision: as in :func:`linear` (the tensor cores compute ``grad_x`` and ``grad_weights``).

    Returns:
        ``(grad_x (..., K), grad_weights (K, N), grad_biases (N,))`` in the caller's type.
        The dropout mask is regenerated from ``(seed, offset)``, never stored.
    """
    a = _linear_args(x, weights, biases, activation)
    go = _prec.operand(grad_output, "grad_output", _tx.operand)
    _prec.check_float(go)
    _check_same_dtype(a.x, go)
    prec = _prec.resolve(precision)
    kind = _prec.kind(a.x.dtype, prec)
    if go.shape != a.out_shape:
        raise ValueError(f"grad_output must have shape {a.out_shape} (the forward's output), got {go.shape}")
    drop = Dropout.make(dropout_p, seed, offset, training)
    if activation is not None and preact is None:
        _, preact = linear_forward(x, weights, biases, activation=activation, training=False, save_preact=True,
                                   stream=stream, precision=prec)
    po = None
    if activation is not None:
        po = _prec.operand(preact, "preact", _tx.operand)
        _check_same_dtype(a.x, po)
        if po.shape != a.out_shape:
            raise ValueError(f"preact must have shape {a.out_shape}, got {po.shape}")

    with _tx.stream_scope(stream) as s:
        if _backend.get_backend() == "cpu" or a.rows == 0 or a.n == 0 or a.k == 0:
            return _linear_backward_host(a, go, po, activation, drop, prec)
        dev = _prec.device_operand
        xv, _xk = _tx.device_view(dev(a.x), (a.rows, a.k))
        wv, _wk = _tx.device_view(dev(a.w))
        gov, _gk = _tx.device_view(dev(go), (a.rows, a.n))
        zv, _zk = _tx.device_view(dev(po), (a.rows, a.n)) if po is not None else (None, None)
        gxh, gwh, gbh = backward_device(xv, wv, gov, zv, a.rows, a.k, a.n, a.x.dtype, activation, drop, s,
                                        kind=kind)
        dt = a.x.dtype
        return (
            _prec.as_dtype(_tx.to_caller(gxh, a.x, a.x.shape), dt),
            _prec.as_dtype(_tx.to_caller(gwh, a.x), dt),
            _prec.as_dtype(_tx.to_caller(gbh, a.x), dt),
        )


def _linear_backward_host(a: _LinearArgs, go: _tx.Operand, po, activation, drop: Dropout, precision="ieee"):
    on_cpu = _backend.get_backend() == "cpu"
    get = _tx.host_array if on_cpu else _tx.to_host
    gx, gw, gb = _ref.linear_backward(
        get(a.x).reshape(a.rows, a.k), get(a.w), get(go).reshape(a.rows, a.n),
        None if po is None else get(po).reshape(a.rows, a.n),
        activation=activation, dropout_p=drop.p, training=drop.active, seed=drop.seed, offset=drop.offset,
        precision=precision,
    )
    gx = gx.reshape(a.x.shape)
    if on_cpu:
        return gx, gw, gb
    return _tx.from_host(gx, a.x), _tx.from_host(gw, a.x), _tx.from_host(gb, a.x)


# ----------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------


def dropout(x, p, *, seed=0, offset=0, training=True, stream=None):
    """Inverted dropout: ``x * scale`` where kept, exactly 0 where dropped.

    Args:
        x: any shape, float32 or float64; NumPy, CuPy or any CUDA array.
        p: probability of dropping an element, in [0, 1].
        seed: Philox key, ``0 <= seed < 2**64``.
        offset: Philox element offset; element ``e`` (row-major) uses ``offset + e``.
        training: the identity (a copy) when False.
        stream: where to queue the work, as in :func:`linear`.

    Returns:
        An array of ``x``'s shape and type. The mask equals
        :func:`gpufc.reference.dropout_keep_mask` ``(x.shape, p, seed, offset)`` bit for bit.
    """
    xo = _tx.operand(x, "x")
    _check_float(xo)
    return dropout_apply(xo, Dropout.make(p, seed, offset, training), stream)


def dropout_backward(grad_output, p, *, seed=0, offset=0, training=True, stream=None):
    """Gradient of :func:`dropout`: the forward's mask and scale, regenerated, applied to ``grad_output``."""
    go = _tx.operand(grad_output, "grad_output")
    _check_float(go)
    return dropout_apply(go, Dropout.make(p, seed, offset, training), stream)


def dropout_apply(xo: _tx.Operand, drop: Dropout, stream=None):
    """Apply a validated dropout to a classified float operand; returns the caller's type."""
    with _tx.stream_scope(stream) as s:
        if _backend.get_backend() == "cpu":
            return _ref.dropout(_tx.host_array(xo), drop.p, seed=drop.seed, offset=drop.offset,
                                training=drop.active)
        size = xo.size
        if size == 0:
            return _tx.from_host(np.zeros(xo.shape, xo.dtype), xo)
        xv, _keep = _tx.device_view(xo, (size,))
        yv, yh = _tx.empty((size,), xo.dtype)
        if drop.active:
            _kernels().dropout.launch_dropout(xv, yv, stream=s, **drop.kernel_args(xo.dtype))
        else:
            yv.copy_to_device(xv, stream=s)
        return _tx.to_caller(yh, xo, xo.shape)
