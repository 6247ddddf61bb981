"""Streams: where a call's kernels, allocations and copies are queued.

:func:`stream_scope` turns a caller's ``stream=`` (None, a CuPy or torch
stream, a Numba stream, anything with ``__cuda_stream__``, or a raw
``cudaStream_t`` int) into the stream handle the kernels are queued on, and makes it
CuPy's current stream for the call so that the outputs' allocations and any
copies are ordered on it too. Nothing here synchronises.
"""

from __future__ import annotations

import numpy as np

from . import backend as _backend


def _module_root(obj) -> str:
    return type(obj).__module__.split(".", 1)[0]


_cupy_streams: dict = {}  # cudaStream_t handle -> cupy ExternalStream


def current_stream():
    """The stream to launch on: CuPy's current stream's handle (an int) on ``cuda``; 0 (the
    default stream) on ``sim``, whose launches run synchronously anyway."""
    cupy = _backend.cupy_or_none()
    if cupy is None:
        return 0
    return cupy.cuda.get_current_stream().ptr


def stream_handle(stream) -> int:
    """The ``cudaStream_t`` of a caller's ``stream=`` argument, as an int.

    Accepts a raw handle (int >= 0; 0 is the default stream), anything with
    ``__cuda_stream__`` (the CUDA stream protocol: ``(version, handle)``; Numba
    and cuda.core streams), a CuPy stream (``.ptr``) or a torch stream
    (``.cuda_stream``).
    """
    if isinstance(stream, (bool, np.bool_)):
        raise TypeError(f"stream must be a CUDA stream or an int handle, got stream={stream!r}")
    if isinstance(stream, (int, np.integer)):
        handle = int(stream)
    else:
        proto = getattr(stream, "__cuda_stream__", None)
        if proto is not None:
            value = proto() if callable(proto) else proto
            handle = value[1]
        elif hasattr(stream, "ptr"):
            handle = stream.ptr
        elif hasattr(stream, "cuda_stream"):
            handle = stream.cuda_stream
        else:
            raise TypeError(
                "stream must be None, a CuPy, torch or Numba stream, an object with __cuda_stream__, "
                f"or an int handle; got {type(stream).__name__}"
            )
        handle = int(handle)
    if handle < 0:
        raise ValueError(f"stream handle must be >= 0, got stream={stream!r}")
    return handle


class _Scope:
    """One call's context: ``stream`` (what plans launch on: a ``cudaStream_t`` int; 0 on ``sim``),
    ``device`` (the CUDA device id; 0 on ``sim``), and CuPy's current stream while inside."""

    __slots__ = ("_cupy_stream", "device", "stream")

    def __init__(self, stream, device=0, cupy_stream=None):
        self.stream = stream
        self.device = device
        self._cupy_stream = cupy_stream

    def __enter__(self):
        if self._cupy_stream is not None:
            self._cupy_stream.__enter__()
        return self

    def __exit__(self, *exc):
        if self._cupy_stream is not None:
            self._cupy_stream.__exit__(*exc)
        return False


class _NoScope:
    """The ``cpu`` backend: there is no stream; the argument was only validated."""

    __slots__ = ()
    stream = None
    device = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_SCOPE = _NoScope()
_SIM_SCOPE = _Scope(0)


def stream_scope(stream=None):
    """``with stream_scope(stream) as s:`` launch on ``s.stream``; allocations follow it.

    ``stream=None`` is CuPy's current stream (``cuda``) or the default stream
    (``sim``). On ``sim`` and ``cpu`` a given stream is validated and ignored:
    the simulator and NumPy run synchronously.
    """
    name = _backend.get_backend()
    if stream is not None:
        handle = stream_handle(stream)
    if name == "cpu":
        return _NO_SCOPE
    if name == "sim":
        return _SIM_SCOPE
    cupy = _backend.cupy_or_none()
    if cupy is None:
        return _Scope(0 if stream is None else handle)
    current = cupy.cuda.get_current_stream()
    if stream is None or current.ptr == handle:
        return _Scope(current.ptr, getattr(current, "device_id", 0))
    if _module_root(stream) == "cupy" and hasattr(stream, "__enter__"):
        cupy_stream = stream
    else:
        cupy_stream = _cupy_streams.get(handle)
        if cupy_stream is None:
            cupy_stream = _cupy_streams[handle] = (
                cupy.cuda.Stream.null if handle == 0 else cupy.cuda.ExternalStream(handle)
            )
    return _Scope(handle, getattr(current, "device_id", 0), cupy_stream)
