"""Matmul precision: the process default, per-call resolution, and the tensor-core route.

``precision=`` on :func:`gpufc.linear`, ``linear_forward``, ``linear_backward``
and ``FullyConnectedLayer``:

- ``"ieee"``: float32 and float64 on the SIMT kernels, IEEE arithmetic;
- ``"tf32"``: float32 in and out, operands rounded to TF32, FP32 accumulation
  on the tensor cores;
- None (the default): from :func:`set_matmul_precision`, with torch's meaning:
  ``"highest"`` (the default) is ``"ieee"``, ``"high"`` is ``"tf32"``.

float64 ignores the precision. float16 data always run on the FP16 tensor
cores and bfloat16 (torch tensors; NumPy arrays of ``ml_dtypes.bfloat16``) on
the BF16 ones, FP32 accumulation, the epilogue in float32 and one rounding to
the dtype. The cpu backend runs the same model in NumPy (gpufc.reference).
Tensor cores need compute capability 8.0 or newer: on an older GPU a
tensor-core request is a RuntimeError naming the device (use
``precision="ieee"`` with float32 data there). docs/precision.md states the
numerics.
"""

from __future__ import annotations

import threading

import numpy as np

from . import reference as _ref
from .runtime import backend as _backend

MATMUL_PRECISIONS = ("highest", "high")
_DEFAULT_OF = {"highest": "ieee", "high": "tf32"}

_lock = threading.Lock()
_state = {"matmul": "highest"}


def set_matmul_precision(precision: str) -> None:
    """Process-wide default for float32 matmuls, as ``torch.set_float32_matmul_precision``:
    ``"highest"`` (IEEE float32, the default) or ``"high"`` (TF32 tensor cores)."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision must be one of {MATMUL_PRECISIONS}, got {precision!r}")
    with _lock:
        _state["matmul"] = precision


def get_matmul_precision() -> str:
    """The process-wide default set by :func:`set_matmul_precision` (``"highest"`` or ``"high"``)."""
    return _state["matmul"]


def resolve(precision) -> str:
    """A call's ``precision=`` as ``"ieee"`` or ``"tf32"`` (None: the process default)."""
    if precision is None:
        return _DEFAULT_OF[_state["matmul"]]
    if precision == "ieee" or precision == "tf32":  # the common cases, without the validation's cost
        return precision
    return _ref.check_precision(precision)


def is_bfloat16(dtype) -> bool:
    return np.dtype(dtype).name == "bfloat16"


FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def check_float(op) -> None:
    """An operand's dtype is one gpufc computes in: float16, bfloat16, float32 or float64."""
    if op.dtype in FLOATS or is_bfloat16(op.dtype):
        return
    raise TypeError(f"{op.name} must be float16, bfloat16, float32 or float64, got {op.name}.dtype={op.dtype} "
                    "(CuPy has no bfloat16: pass bfloat16 data as torch tensors, or NumPy arrays of "
                    "ml_dtypes.bfloat16 on the cpu backend)")


_KINDS: dict = {}  # (dtype, precision) -> kind: one dict lookup per call


def kind(dtype, precision: str):
    """The tensor-core format (``"tf32"``, ``"f16"``, ``"bf16"``) or None for the SIMT kernels."""
    key = (dtype, precision)
    try:
        return _KINDS[key]
    except KeyError:
        k = _KINDS[key] = _ref.tensor_core_kind(dtype, precision)
        return k


_checked: dict = {}


def require_tensor_cores() -> None:
    """Raise RuntimeError when the ``cuda`` backend's device is older than compute capability 8.0."""
    if _backend.get_backend() != "cuda":
        return
    cuda = _backend.numba_cuda()
    dev = cuda.get_current_device()
    ok = _checked.get(dev.id)
    if ok is None:
        ok = _checked[dev.id] = tuple(dev.compute_capability) >= (8, 0)
    if not ok:
        raise RuntimeError(
            f"tensor-core matmuls (float16, bfloat16, precision='tf32') need compute capability 8.0 or newer; "
            f"{dev.name} is {dev.compute_capability}: use float32 data with precision='ieee'"
        )


def _tc():
    kernels = _backend.kernels()
    from importlib import import_module

    return kernels, import_module(kernels.__name__ + ".linear.tensorcore")


def forward_device(xv, wv, bv, rows: int, n: int, dtype, kind_: str, activation, drop, save: bool, stream, empty,
                   dummy_bias):
    """The tensor-core forward on device views: ``(y_holder, z_view, z_holder)`` as
    ``gpufc.functional.forward_device`` returns; ``empty`` and ``dummy_bias`` are its allocators."""
    require_tensor_cores()
    _, tc = _tc()
    dtype = storage_dtype(dtype)
    yv, yh = empty((rows, n), dtype)
    zv, zh = empty((rows, n), dtype) if save else (yv, None)
    ep = tc.Epilogue(activation, bv is not None, drop.active, save)
    tc.launch_mma(xv, wv, dummy_bias(dtype) if bv is None else bv, yv, zv, kind=kind_, ep=ep, stream=stream,
                  **drop.kernel_args(np.float32))
    return yh, (zv if save else None), zh


def backward_device(xv, wv, gov, zv, rows: int, k: int, n: int, dtype, kind_: str, activation, drop, stream, empty,
                    dummy_bias, need_x: bool = True, need_b: bool = True):
    """The tensor-core backward on device views (shapes as ``gpufc.functional.backward_device``).

    ``g = dropout'(grad) * act'(z)`` in float32, stored in the dtype; ``grad_x = g @ w.T``
    (NT) and ``grad_w = x.T @ g`` (TN) on the tensor cores; ``grad_b = g.sum(0)``.
    """
    require_tensor_cores()
    kk, tc = _tc()
    dtype = storage_dtype(dtype)
    if activation is not None or drop.active:
        gv, _gh = empty((rows * n,), dtype)
        zflat = zv.reshape(rows * n) if activation is not None else gv
        if kind_ == "tf32":
            kk.dropout.launch_act_dropout_backward(gov.reshape(rows * n), zflat, gv, activation=activation,
                                                   dropout=drop.active, stream=stream, **drop.kernel_args(dtype))
        else:
            tc.launch_act_dropout_backward16(gov.reshape(rows * n), zflat, gv, kind=kind_, activation=activation,
                                             dropout=drop.active, stream=stream, **drop.kernel_args(np.float32))
        g2 = gv.reshape(rows, n)
    else:
        g2 = gov
    dummy = dummy_bias(dtype)
    gxh = None
    if need_x:
        gxv, gxh = empty((rows, k), dtype)
        tc.launch_mma(g2, wv, dummy, gxv, gxv, kind=kind_, trans_b=True, stream=stream)
    gwv, gwh = empty((k, n), dtype)
    tc.launch_mma(xv, g2, dummy, gwv, gwv, kind=kind_, trans_a=True, stream=stream)
    gbh = None
    if need_b:
        gbv, gbh = empty((n,), dtype)
        if kind_ == "tf32":
            kk.linear.launch_bias_grad(g2, gbv, stream=stream)
        else:
            tc.launch_bias_grad16(g2, gbv, kind=kind_, stream=stream)
    return gxh, gwh, gbh


def ref_forward(x2, w, b, activation, drop, precision: str):
    """The cpu backend's tensor-core forward: ``(y, z)`` in the dtype (gpufc.reference's model)."""
    z = _ref.linear_preact(x2, w, b, precision=precision)
    y = _ref.activation(z, activation)
    if drop.active:
        y = _ref.dropout(y, drop.p, seed=drop.seed, offset=drop.offset)
    return _ref.round_to(y, x2.dtype), _ref.round_to(z, x2.dtype)


# ----------------------------------------------------------------------------
# bfloat16 operands: NumPy has no bfloat16 (ml_dtypes adds one), CuPy has none,
# and torch exports none through the CUDA array interface, so bfloat16 data
# travel as int16 bit patterns and are viewed back as bfloat16 for the caller.
# ----------------------------------------------------------------------------


def _bf16_dtype():
    dt = _ref.bfloat16_dtype()
    if dt is None:
        raise TypeError("bfloat16 data need the ml_dtypes package (pip install ml_dtypes)")
    return dt


def operand(value, name: str, classify):
    """``classify(value, name)`` (gpufc's operand classifier), except that a torch bfloat16
    tensor is classified through its int16 view and labelled bfloat16."""
    t = type(value)
    if t is not np.ndarray and t.__module__.startswith("torch") and str(getattr(value, "dtype", "")) == "torch.bfloat16":
        import torch

        op = classify(value.view(torch.int16), name)
        bf16 = _bf16_dtype()
        if op.kind == "numpy":  # a host tensor, taken as a NumPy array as any host tensor is
            return type(op)(name, np.asarray(op.value).view(bf16), "numpy", op.shape, bf16)
        return type(op)(name, value, op.kind, op.shape, bf16)
    return classify(value, name)


def device_operand(op):
    """The operand as the kernels read it: bfloat16 data as their int16 bit patterns."""
    if not is_bfloat16(op.dtype):
        return op
    value = op.value
    if op.kind == "numpy":
        value = np.asarray(value).view(np.int16)
    elif type(value).__module__.split(".", 1)[0] == "torch":
        import torch

        value = value.view(torch.int16)
    return type(op)(op.name, value, op.kind, op.shape, np.dtype(np.int16))


def storage_dtype(dtype):
    """The dtype gpufc allocates a result of ``dtype`` in: int16 bit patterns for bfloat16."""
    return np.dtype(np.int16) if is_bfloat16(dtype) else np.dtype(dtype)


def as_dtype(result, dtype):
    """A result allocated with :func:`storage_dtype`, viewed back as ``dtype`` (bfloat16)."""
    if result is None or not is_bfloat16(dtype):
        return result
    if isinstance(result, np.ndarray):
        return result.view(dtype)
    if type(result).__module__.split(".", 1)[0] == "torch":
        import torch

        return result.view(torch.bfloat16)
    return result
