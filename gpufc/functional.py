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

``config=`` (linear ops) names a matmul configuration of the kernels' table
(:func:`config_names`; None picks one by shape); an unknown name, or one that
cannot run the dtype, is a ``ValueError`` naming the valid ones.

The device half is split in two so that :mod:`gpufc.nn.layers` reuses it with
parameters whose device arguments it keeps between calls: :func:`forward_device`
and :func:`backward_device` take launch arguments (device pointers on
``cuda``, simulator arrays on ``sim``), allocate one array per output, look up
the launch plans (:mod:`gpufc.runtime.plan`) and launch; the public functions
validate, make the arguments and return the caller's types.
"""

from __future__ import annotations

import math

import numpy as np

from . import precision as _prec
from . import reference as _ref
from .runtime import backend as _backend
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

    Built once per ``(p, seed)`` (cached) and moved along with :meth:`at`, so a
    call does not re-validate or recompute them.
    """

    __slots__ = ("_scales", "active", "key", "offset", "p", "seed", "threshold")

    def __init__(self, p: float, seed: int, offset: int, active: bool, key, threshold: int, scales: dict):
        self.p, self.seed, self.offset, self.active = p, seed, offset, active
        self.key, self.threshold, self._scales = key, threshold, scales

    @classmethod
    def make(cls, p, seed, offset, training) -> Dropout:
        base = _DROPOUTS.get((type(p), p, type(seed), seed))
        if base is None:
            pf = _ref.check_p(p)
            sd = _ref.check_seed(seed)
            base = cls(pf, sd, 0, True, _ref.philox_key(sd), _ref.dropout_threshold(pf), {})
            if len(_DROPOUTS) > 1024:
                _DROPOUTS.clear()
            _DROPOUTS[(type(p), p, type(seed), seed)] = base
        if type(offset) is not int or not 0 <= offset < 2**64:
            offset = _ref.check_offset(offset)
        return base.at(offset, bool(training))

    def at(self, offset: int, active: bool = True) -> Dropout:
        """The same ``(p, seed)`` at another offset; ``active=False`` is the identity."""
        return Dropout(self.p, self.seed, offset, active and self.p > 0.0, self.key, self.threshold, self._scales)

    def scale(self, dtype):
        dtype = np.dtype(dtype)
        s = self._scales.get(dtype)
        if s is None:
            s = self._scales[dtype] = _ref.dropout_scale(self.p, dtype)
        return s

    def words(self, dtype) -> tuple:
        """The kernels' dropout parameters ``(k0, k1, offset, threshold, scale)`` as Python numbers."""
        if not self.active:
            return _NO_WORDS
        return self.key[0], self.key[1], self.offset, self.threshold, float(self.scale(dtype))

    def kernel_args(self, dtype) -> dict:
        return {"key": self.key, "offset": self.offset, "threshold": self.threshold, "scale": self.scale(dtype)}


_DROPOUTS: dict = {}  # (p, seed) -> its validated Dropout at offset 0
_NO_WORDS = (0, 0, 0, 0, 0.0)


class _LinearArgs:
    __slots__ = ("b", "k", "n", "out_shape", "rows", "w", "x")

    def __init__(self, x, w, b, rows, k, n, out_shape):
        self.x, self.w, self.b, self.rows, self.k, self.n, self.out_shape = x, w, b, rows, k, n, out_shape


def _operand(value, name):
    """:func:`gpufc.runtime.transfer.operand`; torch bfloat16 tensors through :func:`gpufc.precision.operand`."""
    if type(value) in _tx._KIND_OF_TYPE:  # NumPy and CuPy arrays: one dict lookup
        return _tx.operand(value, name)
    return _prec.operand(value, name, _tx.operand)


def _linear_args(x, weights, biases, activation) -> _LinearArgs:
    xo = _operand(x, "x")
    wo = _operand(weights, "weights")
    if xo.dtype not in _FLOATS or wo.dtype != xo.dtype:  # one test on the common path; the messages below
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
        bo = _operand(biases, "biases")
        if bo.dtype != xo.dtype:
            _prec.check_float(bo)
            _check_same_dtype(xo, bo)
        if bo.shape != (n,):
            raise ValueError(f"biases must have shape ({n},) to match weights.shape={wo.shape}, got biases.shape={bo.shape}")
    if activation is not None:
        _check_activation(activation)
    lead = xo.shape[:-1]
    rows = lead[0] if len(lead) == 1 else math.prod(lead)
    return _LinearArgs(xo, wo, bo, rows, k, n, (*lead, n))


# ----------------------------------------------------------------------------
# Device halves, shared with gpufc.layers
# ----------------------------------------------------------------------------

_cache: dict = {}  # the kernels package and the epilogues, built once


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
    """A 1-element Numba device array for the tensor-core launchers without a bias (never read)."""
    key = ("dummy", _backend.get_backend(), np.dtype(dtype))
    entry = _cache.get(key)
    if entry is None:
        entry = _cache[key] = _tx.numba_empty((1,), dtype)
    return entry[0]


def config_names(dtype=None) -> tuple:
    """The matmul configuration names ``config=`` takes (with ``dtype``: those that can run it)."""
    return _kernels().linear.config_names(dtype)


def _check_config(config, dtype):
    """``config`` validated for ``dtype``: None, or a name of the kernels' table."""
    if config is None:
        return None
    if (config, dtype) in _VALID_CONFIGS:
        return config
    if not isinstance(config, str):
        raise TypeError(f"config must be a configuration name (str) or None, got config={config!r}")
    lin = _kernels().linear
    lin.check_config(lin.config_by_name(config), dtype)
    _VALID_CONFIGS.add((config, dtype))
    return config


_VALID_CONFIGS: set = set()


def forward_device(x, w, b, rows: int, k: int, n: int, dtype, activation, drop: Dropout, save: bool, scope,
                   config=None, kind=None):
    """Launch ``y = dropout(act(x @ w + b))`` on launch arguments; one allocation per output.

    Shapes: x (rows, K), w (K, N), b (N,) or None; rows, N > 0. ``scope`` is the
    call's :func:`gpufc.runtime.transfer.stream_scope`.
    Returns ``(y_holder, z_arg, z_holder)``: the output and, when ``save``,
    the pre-activation ``x @ w + b`` (else None, None). ``kind`` ("tf32", "f16",
    "bf16"; :func:`gpufc.precision.kind`) runs the tensor-core kernels instead, which
    launch through Numba (x, w, b Numba views: :func:`gpufc.runtime.transfer.numba_view`).
    """
    if kind is not None:
        return _prec.forward_device(x, w, b, rows, n, dtype, kind, activation, drop, save,
                                    _tx.numba_stream(scope.stream), _tx.numba_empty, _dummy_bias)
    ep = _epilogue(activation, b is not None, drop.active, save)
    lin = _kernels().linear
    plan = lin.matmul_plan(rows, n, k, dtype, False, False, ep, config, scope.device, scope.stream, lin.aligned(x, w))
    y, yh = _tx.empty((rows, n), dtype)
    z, zh = _tx.empty((rows, n), dtype) if save else (y, None)
    plan.launch(x, w, b, y, z, *drop.words(dtype))
    return yh, (z if save else None), zh


def _aligned(*args) -> bool:
    """Whether every argument's data is 16-byte aligned (v2 dropout's 16-byte accesses)."""
    kd = _kernels().dropout
    return all(kd.address(a) % kd.VECTOR_BYTES == 0 for a in args)


def _dropout_into(x, y, size: int, dtype, drop: Dropout, scope) -> None:
    """``y = dropout(x)`` on flat launch arguments of ``size`` elements (v2; 16-byte accesses where aligned)."""
    kd = _kernels().dropout
    if kd.VERSION == 1:
        kd.dropout_plan(size, dtype, 1, False, 0, None, kd.THREADS, scope.device, scope.stream)(x, y, *drop.words(dtype))
        return
    head = drop.offset & 3
    vec = head == 0 and _aligned(x, y)
    plan = kd.dropout_plan(size, dtype, 2, vec, head, None, kd.THREADS, scope.device, scope.stream)
    plan.launch(x, x, y, *drop.words(dtype))


def backward_device(x, w, go, z, rows: int, k: int, n: int, dtype, activation, drop: Dropout, scope,
                    need_x: bool = True, need_b: bool = True, config=None, kind=None):
    """Launch the backward of :func:`forward_device` on launch arguments.

    Shapes: x (rows, K), w (K, N), go and z (rows, N) (z only read with an
    activation); rows, K, N > 0. ``g = dropout'(grad) * act'(z)`` is one fused
    elementwise kernel, then ``grad_x = g @ w.T`` and ``grad_w = x.T @ g`` read
    the operands in their stored layouts, and ``grad_b = g.sum(0)``.
    Returns holders ``(grad_x or None, grad_w, grad_b or None)``. ``kind``: the
    tensor-core kernels, as in :func:`forward_device`.
    """
    if kind is not None:
        return _prec.backward_device(x, w, go, z, rows, k, n, dtype, kind, activation, drop,
                                     _tx.numba_stream(scope.stream), _tx.numba_empty, _dummy_bias, need_x, need_b)
    kk = _kernels()
    lin, kd = kk.linear, kk.dropout
    dev, stream = scope.device, scope.stream
    g = go
    if activation is not None or drop.active:
        g, _gh = _tx.empty((rows, n), dtype)
        size = rows * n
        if activation is None:
            _dropout_into(go, g, size, dtype, drop, scope)
        else:
            vec16 = kd.VERSION == 2 and (not drop.active or drop.offset & 3 == 0) and _aligned(go, z, g)
            plan = kd.act_dropout_backward_plan(size, dtype, activation, drop.active, vec16, None, kd.THREADS, dev,
                                                stream)
            plan.launch(go, z, g, *drop.words(dtype))
    plain = lin.epilogue.PLAIN
    gxh = None
    if need_x:
        gx, gxh = _tx.empty((rows, k), dtype)
        # grad_x = g @ w.T: w is read in its stored (K, N) layout as the (N, K) operand.
        lin.matmul_plan(rows, k, n, dtype, False, True, plain, config, dev, stream, lin.aligned(g, w)).launch(
            g, w, None, gx, gx, *_NO_WORDS)
    gw, gwh = _tx.empty((k, n), dtype)
    # grad_w = x.T @ g: x is read in its stored (M, K) layout as the (K, M) operand.
    lin.matmul_plan(k, n, rows, dtype, True, False, plain, config, dev, stream, lin.aligned(x, g)).launch(
        x, g, None, gw, gw, *_NO_WORDS)
    gbh = None
    if need_b:
        gb, gbh = _tx.empty((n,), dtype)
        lin.bias_grad_plan(rows, n, dtype, lin.bias_grad_version(config), dev, stream).launch(g, gb)
    return gxh, gwh, gbh


# ----------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------


def linear(x, weights, biases=None, *, activation=None, dropout_p=0.0, training=True, seed=0, offset=0,
           stream=None, config=None, precision=None):
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
        config: a matmul configuration name (:func:`config_names`, e.g. ``"t64x64"`` or
            ``"v1_t16"``, the version-1 kernels); None picks one by shape. The ``cpu``
            backend validates it and runs NumPy.
        precision: float32 matmuls in ``"ieee"`` or ``"tf32"`` (tensor cores); None: the
            process default (:func:`gpufc.set_matmul_precision`). float64 ignores it; float16
            and bfloat16 always run on the tensor cores (:mod:`gpufc.precision`).

    Returns:
        ``(..., output_size)`` in the caller's array type.

    Example:
        >>> y = gpufc.linear(np.ones((2, 3), np.float32), np.ones((3, 4), np.float32))
    """
    return _forward(x, weights, biases, activation, dropout_p, training, seed, offset, False, stream, config,
                    precision)[0]


def linear_forward(x, weights, biases=None, *, activation=None, dropout_p=0.0, training=True,
                   seed=0, offset=0, save_preact=False, stream=None, config=None, precision=None):
    """:func:`linear` that also returns the pre-activation ``x @ weights + biases`` when asked.

    Returns ``(y, preact)``; ``preact`` is None unless ``save_preact`` (the layers
    keep it for the activation's derivative in backward).
    """
    return _forward(x, weights, biases, activation, dropout_p, training, seed, offset, save_preact, stream, config,
                    precision)


def _forward(x, weights, biases, activation, dropout_p, training, seed, offset, save_preact, stream, config,
             precision):
    a = _linear_args(x, weights, biases, activation)
    drop = Dropout.make(dropout_p, seed, offset, training)
    save = bool(save_preact)
    config = _check_config(config, a.x.dtype)
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
        if kind is not None:
            return _forward_tensor_cores(a, activation, drop, save, s, kind)
        xv, _xk = _tx.device_view(a.x, (a.rows, a.k))
        wv, _wk = _tx.device_view(a.w)
        bv, _bk = _tx.device_view(a.b) if a.b is not None else (None, None)
        yh, _zv, zh = forward_device(xv, wv, bv, a.rows, a.k, a.n, a.x.dtype, activation, drop, save, s, config)
        y = _tx.to_caller(yh, a.x, a.out_shape)
        return y, (_tx.to_caller(zh, a.x, a.out_shape) if save else None)


def _forward_tensor_cores(a: _LinearArgs, activation, drop: Dropout, save: bool, s, kind):
    """The tensor-core forward (:mod:`gpufc.precision`): Numba views, bfloat16 as int16 bit patterns."""
    dev = _prec.device_operand
    xv, _xk = _tx.numba_view(dev(a.x), (a.rows, a.k))
    wv, _wk = _tx.numba_view(dev(a.w))
    bv, _bk = _tx.numba_view(dev(a.b)) if a.b is not None else (None, None)
    yh, _zv, zh = forward_device(xv, wv, bv, a.rows, a.k, a.n, a.x.dtype, activation, drop, save, s, kind=kind)
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
                    dropout_p=0.0, training=True, seed=0, offset=0, stream=None, config=None, precision=None):
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
        config: the configuration of both backward products, as in :func:`linear`
            (``"v1_t16"`` also runs the version-1 bias gradient).
        precision: as in :func:`linear` (the tensor cores compute ``grad_x`` and ``grad_weights``).

    Returns:
        ``(grad_x (..., K), grad_weights (K, N), grad_biases (N,))`` in the caller's type.
        The dropout mask is regenerated from ``(seed, offset)``, never stored.
    """
    a = _linear_args(x, weights, biases, activation)
    go = _operand(grad_output, "grad_output")
    _prec.check_float(go)
    _check_same_dtype(a.x, go)
    prec = _prec.resolve(precision)
    kind = _prec.kind(a.x.dtype, prec)
    if go.shape != a.out_shape:
        raise ValueError(f"grad_output must have shape {a.out_shape} (the forward's output), got {go.shape}")
    drop = Dropout.make(dropout_p, seed, offset, training)
    config = _check_config(config, a.x.dtype)
    if activation is not None and preact is None:
        _, preact = linear_forward(x, weights, biases, activation=activation, training=False, save_preact=True,
                                   stream=stream, config=config, precision=prec)
    po = None
    if activation is not None:
        po = _operand(preact, "preact")
        _check_same_dtype(a.x, po)
        if po.shape != a.out_shape:
            raise ValueError(f"preact must have shape {a.out_shape}, got {po.shape}")

    with _tx.stream_scope(stream) as s:
        if _backend.get_backend() == "cpu" or a.rows == 0 or a.n == 0 or a.k == 0:
            return _linear_backward_host(a, go, po, activation, drop, prec)
        # the tensor cores launch through Numba: Numba views, bfloat16 as int16 bit patterns
        view, dev = (_tx.device_view, _same) if kind is None else (_tx.numba_view, _prec.device_operand)
        xv, _xk = view(dev(a.x), (a.rows, a.k))
        wv, _wk = view(dev(a.w))
        gov, _gk = view(dev(go), (a.rows, a.n))
        zv, _zk = view(dev(po), (a.rows, a.n)) if po is not None else (None, None)
        gxh, gwh, gbh = backward_device(xv, wv, gov, zv, a.rows, a.k, a.n, a.x.dtype, activation, drop, s,
                                        config=config, kind=kind)
        dt = a.x.dtype
        return (
            _prec.as_dtype(_tx.to_caller(gxh, a.x, a.x.shape), dt),
            _prec.as_dtype(_tx.to_caller(gwh, a.x), dt),
            _prec.as_dtype(_tx.to_caller(gbh, a.x), dt),
        )


def _same(op):
    return op


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
        x, _keep = _tx.device_view(xo, (size,))
        y, yh = _tx.empty(xo.shape, xo.dtype)
        if drop.active:
            _dropout_into(x, y, size, xo.dtype, drop, s)
        else:
            _tx.copy(y, x, size * xo.dtype.itemsize, s.stream)
        return _tx.to_caller(yh, xo)
