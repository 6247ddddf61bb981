"""Host <-> device movement: the one module that touches the caller's arrays.

Input rules: NumPy in -> NumPy out; CuPy in -> CuPy out with
no host copy; any other CUDA array (``__cuda_array_interface__`` or DLPack on
a CUDA device, e.g. a torch tensor) in -> the same type out, zero-copy.

An :class:`Operand` records what the caller passed (its kind, shape, dtype)
without moving it. :func:`device_view` gives a launch plan its argument (the
device pointer of a C-contiguous view on ``cuda``, copying only a host array
or a non-contiguous device array; a simulator array on ``sim``); :func:`empty`
allocates an output (CuPy on ``cuda``, Numba's simulator arrays on ``sim``);
:func:`to_caller` returns it in the caller's type.

Streams are :mod:`gpufc.runtime.streams` (re-exported here). Nothing here
synchronises except returning a result to a NumPy caller.

Call overhead: this module runs on every call, so its fast paths are the
common cases: an exact ``numpy.ndarray`` or ``cupy.ndarray`` is classified by a
dict lookup on its type; a C-contiguous CuPy array is passed on as its data
pointer (no view object, no stream, no synchronisation).
"""

from __future__ import annotations

import math
import sys

import numpy as np

from . import backend as _backend
from .streams import _NO_SCOPE, current_stream, stream_handle, stream_scope  # noqa: F401  (re-exported)

_KDL_CUDA = 2  # DLPack device types: 2 = CUDA, 13 = CUDA managed
_KDL_CUDA_MANAGED = 13


class Operand:
    """One argument as the caller passed it.

    kind: ``"numpy"`` (host memory), ``"cupy"``, or ``"device"`` (another CUDA array type).
    """

    __slots__ = ("dtype", "kind", "name", "shape", "value")

    def __init__(self, name: str, value, kind: str, shape: tuple, dtype: np.dtype):
        self.name = name
        self.value = value
        self.kind = kind
        self.shape = shape
        self.dtype = dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __repr__(self):
        return f"Operand({self.name!r}, kind={self.kind!r}, shape={self.shape}, dtype={self.dtype})"


def _module_root(obj) -> str:
    return type(obj).__module__.split(".", 1)[0]


def _is_cuda_dlpack(obj) -> bool:
    dev = getattr(obj, "__dlpack_device__", None)
    if dev is None:
        return False
    try:
        return dev()[0] in (_KDL_CUDA, _KDL_CUDA_MANAGED)
    except Exception:
        return False


# Exact array types seen before, and their kind: one dict lookup on the hot path.
_KIND_OF_TYPE: dict = {np.ndarray: "numpy"}


def operand(value, name: str) -> Operand:
    """Classify ``value`` (argument ``name``) without copying it."""
    kind = _KIND_OF_TYPE.get(type(value))
    if kind is not None:
        return Operand(name, value, kind, value.shape, value.dtype)
    if _module_root(value) == "cupy" and hasattr(value, "__cuda_array_interface__"):
        _KIND_OF_TYPE[type(value)] = "cupy"
        return Operand(name, value, "cupy", tuple(value.shape), np.dtype(value.dtype))
    cai = None
    try:
        cai = value.__cuda_array_interface__
    except AttributeError:
        pass
    except RuntimeError as err:  # e.g. torch: a tensor that requires grad refuses it
        raise TypeError(f"{name}: cannot read its CUDA array interface ({err})") from err
    if cai is not None:
        return Operand(name, value, "device", tuple(cai["shape"]), np.dtype(cai["typestr"]))
    if _is_cuda_dlpack(value):
        cupy = _require_cupy(name)
        arr = cupy.from_dlpack(value)
        return Operand(name, value, "device", tuple(arr.shape), np.dtype(arr.dtype))
    if isinstance(value, np.ndarray):
        return Operand(name, value, "numpy", value.shape, value.dtype)
    try:
        arr = np.asarray(value)
    except Exception as err:
        raise TypeError(
            f"{name} must be a NumPy, CuPy or CUDA array (or array-like), got {type(value).__name__}"
        ) from err
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got {type(value).__name__} of objects")
    return Operand(name, arr, "numpy", arr.shape, arr.dtype)


def _require_cupy(name: str):
    try:
        import cupy
    except ImportError as err:
        raise TypeError(f"{name} is a CUDA array; gpufc needs CuPy to take it (pip install 'gpufc[cuda13]')") from err
    return cupy


def host_array(op: Operand) -> np.ndarray:
    """The operand as a NumPy array (the ``cpu`` backend); device arrays are refused."""
    if op.kind != "numpy":
        raise TypeError(
            f"{op.name} is a CUDA array ({type(op.value).__name__}) but the gpufc backend is 'cpu'; "
            "pass a NumPy array or select the 'cuda' backend"
        )
    return op.value


def as_cupy(op: Operand):
    """A device operand as a CuPy array, zero-copy (any layout)."""
    cupy = _require_cupy(op.name)
    if op.kind == "cupy" or hasattr(op.value, "__cuda_array_interface__"):
        return cupy.asarray(op.value)
    return cupy.from_dlpack(op.value)


def device_view(op: Operand, shape=None):
    """``op`` as a kernel argument, copying only when needed: ``(arg, keepalive)``.

    ``arg`` is what a launch plan takes: on ``cuda`` the device pointer (an
    int) of a C-contiguous copy-free view of ``op``; on ``sim`` a simulator
    device array of ``shape`` (default ``op.shape``). Hold ``keepalive`` until
    the kernels that read it are queued. A host (NumPy) operand is copied to
    the device once per call, on the current stream; a strided device operand
    is copied to C order.
    """
    if op.kind == "numpy":
        host = np.ascontiguousarray(op.value)
        cupy = _backend.cupy_or_none()
        if cupy is None:
            dev = _backend.numba_cuda().to_device(host.reshape(op.shape if shape is None else shape))
            return dev, dev
        arr = cupy.asarray(host)
        return arr.data.ptr, arr
    arr = op.value if op.kind == "cupy" else as_cupy(op)
    if not arr.flags.c_contiguous:
        arr = _require_cupy(op.name).ascontiguousarray(arr)  # a copy only when strided
    return arr.data.ptr, arr


def empty(shape, dtype):
    """Allocate an uninitialised device array: ``(arg, holder)``, ``arg`` as :func:`device_view` gives it."""
    cupy = _backend.cupy_or_none()
    if cupy is None:
        dev = _backend.numba_cuda().device_array(shape, dtype=dtype)
        return dev, dev
    arr = cupy.empty(shape, dtype=dtype)
    return arr.data.ptr, arr


# The tensor-core route (gpufc/precision.py) still launches through Numba: Numba device views.


def numba_view(op: Operand, shape=None):
    """``op`` as a Numba device view (the simulator's array on ``sim``): ``(view, keepalive)``."""
    arg, keep = device_view(op, shape)
    if not isinstance(arg, int):
        return arg, keep
    shape = op.shape if shape is None else shape
    arr = keep if tuple(keep.shape) == tuple(shape) else keep.reshape(shape)
    return _numba_view(arr), arr


def numba_empty(shape, dtype):
    """Allocate an uninitialised device array: ``(Numba view, holder)``."""
    arg, holder = empty(shape, dtype)
    return (_numba_view(holder) if isinstance(arg, int) else arg), holder


def _numba_view(arr):
    """Numba's view of a C-contiguous CuPy array, zero-copy, without a stream (no synchronisation)."""
    desc = {"shape": tuple(arr.shape), "strides": None, "data": (arr.data.ptr, False),
            "typestr": arr.dtype.str, "version": 3}
    return _backend.numba_cuda().from_cuda_array_interface(desc, owner=arr, sync=False)


_numba_streams: dict = {}


def numba_stream(handle):
    """The Numba stream object of a stream handle (one per handle; 0: the default stream)."""
    stream = _numba_streams.get(handle)
    if stream is None:
        cuda = _backend.numba_cuda()
        stream = cuda.default_stream() if not handle else cuda.external_stream(handle)
        _numba_streams[handle] = stream
    return stream


def copy(dst_arg, src_arg, nbytes: int, stream) -> None:
    """``dst = src`` for two device arguments of ``nbytes`` each, queued on ``stream``."""
    cupy = _backend.cupy_or_none()
    if cupy is None:
        dst_arg.reshape(dst_arg.size).copy_to_device(src_arg.reshape(src_arg.size))
    elif nbytes:
        cupy.cuda.runtime.memcpyAsync(dst_arg, src_arg, nbytes, cupy.cuda.runtime.memcpyDeviceToDevice, stream)


def to_host(op: Operand) -> np.ndarray:
    """A NumPy copy of any operand (small or empty results only: this synchronises)."""
    if op.kind == "numpy":
        return np.asarray(op.value)
    return _require_cupy(op.name).asnumpy(as_cupy(op))


def from_host(arr: np.ndarray, like: Operand):
    """A host result returned in the caller's type (uploaded when ``like`` is a device array)."""
    if like.kind == "numpy":
        return arr
    cupy = _require_cupy(like.name)
    return to_caller(cupy.asarray(arr), like)


def to_caller(holder, like: Operand, shape=None):
    """Return ``holder`` (the result) in the type of the caller's ``like`` operand."""
    if shape is not None and holder.shape != shape:
        holder = holder.reshape(shape)
    if like.kind == "numpy":
        if type(holder) is np.ndarray:
            return holder
        if _module_root(holder) == "cupy":
            return holder.get()
        return holder.copy_to_host(stream=current_stream())
    if like.kind == "cupy":
        return holder
    return _foreign(holder, like.value)


def _foreign(holder, like):
    """Wrap a CuPy result as the caller's device array type, zero-copy."""
    root = _module_root(like)
    if root == "torch":
        import torch

        return torch.from_dlpack(holder)
    if root == "numba":
        from numba import cuda

        return cuda.as_cuda_array(holder)
    module = sys.modules.get(root)
    from_dlpack = getattr(module, "from_dlpack", None)
    if from_dlpack is not None:
        return from_dlpack(holder)
    return holder  # unknown CUDA array type: CuPy exposes the same interface
