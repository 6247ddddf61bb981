"""A leaner kernel launch for explicit-signature Numba kernels.

``kern[grid, block, stream](*args)`` does, on every call in numba-cuda 0.30,
a typeof of every argument, an overload lookup, then ``_Kernel._prepare_args``
per argument. (Measured on an H200, bench/results/2026-11-28_NVIDIA-H200: one
whole ``gpufc.linear`` call on a (64, 512) CuPy batch took ~195 us of host
time, against ~37 us for CuPy's ``x @ w + b``; with this module, ~164 us in the
follow-up run, bench/results/2026-11-28_NVIDIA-H200_followup.) gpufc's kernels have exactly one
compiled signature, so :class:`FastKernel` resolves that overload once and
flattens the arguments itself into the same list ``_Kernel.launch`` builds:

- an array: ``0, 0, size, itemsize, data pointer, *shape, *strides in bytes``
  (meminfo and parent are always 0; plain Python ints),
- an integer: ``ctypes.c_<type>(value)``, float32 ``c_float``, float64
  ``c_double``, boolean the value itself,

then calls ``cuda.core.launch`` exactly as ``_Kernel.launch`` does.

Numba's own launch runs instead when the simulator is active, when
``GPUFC_FAST_LAUNCH=0``, when the kernel has anything the flattening does not
cover (debug, cooperative, extensions, other argument types), and, per call,
when an argument is not a Numba device array of the signature's dtype and rank
(Numba then converts it or raises its usual TypeError). A strided array for a
C-order slot is a :class:`LayoutError`, never passed on.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading

import numba
import numpy as np

_FAST = os.environ.get("GPUFC_FAST_LAUNCH", "1") != "0"

# Numba's CUDA simulator runs one kernel per process at a time: the running kernel's
# fake ``cuda`` module is a module global, swapped into the kernel's globals, and the
# grid is stored on the shared kernel object. Two threads launching at once (Dask's
# threaded scheduler, a distributed worker) crash with "'Thread' object has no attribute
# 'threadIdx'". Every simulated launch holds this lock; real GPU launches never take it.
_SIM_LAUNCH_LOCK = threading.RLock()


def launch_lock():
    """The context every kernel launch runs in: the process-wide simulator lock when the
    simulator is on, else a no-op (a real GPU takes concurrent launches from many threads)."""
    return _SIM_LAUNCH_LOCK if numba.config.ENABLE_CUDASIM else contextlib.nullcontext()


def serialised_in_sim(launcher):
    """Decorator for a launcher (builds its kernel on first use, then launches): in the simulator
    the whole call holds :func:`launch_lock`, because while a simulated kernel runs, the module
    that defines it sees the simulator's fake ``cuda`` (no ``jit``), so a concurrent build there
    fails. On a real GPU the launcher is returned unchanged (no cost per call)."""
    if not numba.config.ENABLE_CUDASIM:
        return launcher

    @functools.wraps(launcher)
    def locked(*args, **kwargs):
        with _SIM_LAUNCH_LOCK:
            return launcher(*args, **kwargs)

    return locked


class _Mismatch(Exception):
    """An argument the packer does not take as is: this call goes through Numba."""


class LayoutError(TypeError):
    """A strided array for a C-order slot. Never handed to Numba: numba-cuda 0.30.4
    launches it against a ``[:, ::1]`` signature as if it were contiguous (seen on an
    H200, 2026-11-28), which would read the wrong elements."""


def _array_packer(ty):
    """Packer for one ``types.Array`` argument, or None where Numba's path is needed."""
    if ty.ndim == 0 or ty.layout not in ("C", "A"):
        return None
    from numba.cuda.np import numpy_support

    dtype = np.dtype(numpy_support.as_dtype(ty.dtype))
    ndim = ty.ndim
    itemsize = dtype.itemsize
    contiguous = ty.layout == "C"

    def pack(a, out):
        shape = a.shape
        strides = a.strides
        if len(shape) != ndim or a.dtype != dtype:
            raise _Mismatch
        if contiguous:
            # C order exactly (Numba may call more layouts "C"; those go through Numba)
            step = itemsize
            for d in range(ndim - 1, -1, -1):
                if strides[d] != step and shape[d] > 1:
                    raise LayoutError(
                        f"kernel argument of shape {shape} has strides {strides}, but the kernel's "
                        f"signature {ty} needs C order: copy it (ascontiguousarray) first"
                    )
                step *= shape[d]
        out += (0, 0, a.size, itemsize, a.device_ctypes_pointer.value)
        out += shape
        out += strides

    return pack


def _scalar_packer(ty):
    """Packer for one scalar argument, mirroring ``_Kernel._prepare_args``; None if not covered."""
    from numba.cuda import types

    if isinstance(ty, types.Boolean):
        return lambda v, out: out.append(v)
    if isinstance(ty, types.Integer):
        ctor = getattr(ctypes, f"c_{ty}")
    elif ty == types.float32:
        ctor = ctypes.c_float
    elif ty == types.float64:
        ctor = ctypes.c_double
    else:
        return None
    return lambda v, out: out.append(ctor(v))


def make_packer(argument_types):
    """``pack(args) -> list``: the flat kernel arguments for ``argument_types`` (Numba types),
    or None when some argument type is not covered. ``pack`` raises :class:`_Mismatch` for an
    argument it does not take as is."""
    from numba.cuda import types

    packers = []
    for ty in argument_types:
        p = _array_packer(ty) if isinstance(ty, types.Array) else _scalar_packer(ty)
        if p is None:
            return None
        packers.append(p)
    n = len(packers)
    pairs = tuple(packers)

    def pack(args):
        if len(args) != n:
            raise _Mismatch
        out = []
        for p, v in zip(pairs, args):
            p(v, out)
        return out

    return pack


class FastKernel:
    """Wraps an explicit-signature Numba CUDA kernel: ``fk(grid, block, stream, *args)``
    launches like ``kern[grid, block, stream](*args)``, with less host work.

    The fast path is chosen once, at the first call; :attr:`fast` says which
    path it took (None before the first call).
    """

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.fast = None
        self._kernel = None
        self._pack = None
        self._configs: dict = {}
        self._streams: dict = {}

    def _prepare(self):
        self.fast = False
        if not _FAST or numba.config.ENABLE_CUDASIM:
            return
        try:
            from cuda.core import LaunchConfig, launch
            from numba.cuda._compat import CUDA_CORE_GE_1_0
            from numba.cuda.cudadrv import driver
            from numba.cuda.errors import normalize_kernel_dimensions

            d = self.dispatcher
            if d.targetoptions.get("extensions") or len(d.overloads) != 1:
                return
            kernel = next(iter(d.overloads.values()))
            if kernel.debug or kernel.cooperative or kernel.extensions:
                return
            pack = make_packer(kernel.argument_types)
            if pack is None or not hasattr(kernel._codelibrary, "get_cufunc"):
                return
        except (ImportError, AttributeError):  # another numba-cuda: Numba's own launch
            return
        self._kernel = kernel
        self._pack = pack
        self._launch = launch
        self._launch_config = LaunchConfig
        self._ge_1_0 = CUDA_CORE_GE_1_0
        self._normalize = normalize_kernel_dimensions
        self._to_core_stream = driver._to_core_stream
        self.fast = True

    def _config(self, grid, block):
        key = (grid, block)
        config = self._configs.get(key)
        if config is None:
            g, b = self._normalize(grid, block)
            if self._ge_1_0:
                config = self._launch_config(grid=g, block=b, shmem_size=0, is_cooperative=False)
            else:
                config = self._launch_config(grid=g, block=b, shmem_size=0, cooperative_launch=False)
            if len(self._configs) > 256:
                self._configs.clear()
            self._configs[key] = config
        return config

    def _core_stream(self, stream):
        # keyed by the stream object: gpufc keeps one Numba stream per handle (transfer._numba_stream)
        core = self._streams.get(stream)
        if core is None:
            core = self._to_core_stream(stream)
            if len(self._streams) > 64:
                self._streams.clear()
            self._streams[stream] = core
        return core

    def __call__(self, grid, block, stream, *args):
        if self.fast is None:
            self._prepare()
        if self.fast:
            try:
                kernelargs = self._pack(args)
            except LayoutError:
                raise
            except (_Mismatch, AttributeError, TypeError):
                kernelargs = None
            if kernelargs is not None:
                cufunc = self._kernel._codelibrary.get_cufunc()
                self._launch(self._core_stream(stream), self._config(grid, block), cufunc.kernel, *kernelargs)
                return
        with launch_lock():
            self.dispatcher[grid, block, stream](*args)


_wrapped: dict = {}


def fast(dispatcher) -> FastKernel:
    """The (cached) :class:`FastKernel` of ``dispatcher``."""
    fk = _wrapped.get(dispatcher)
    if fk is None:
        fk = _wrapped[dispatcher] = FastKernel(dispatcher)
    return fk
