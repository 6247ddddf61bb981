"""Launchers: how a plan's kernel is loaded and launched on the active backend.

A launcher has four methods, used by :class:`gpufc.runtime.plan.Plan`:
``load(kernel_spec)`` (the compiled kernel), ``resident_blocks(kernel, threads)``
(blocks of it the device holds at once, for grids sized to one wave),
``bind(kernel, grid, block, args, stream)`` (a function that launches with
the per-call values) and nothing else; plans never touch Numba or the driver
directly.

- :class:`DriverLauncher` (the ``cuda`` backend): the kernel's PTX and cubin
  come from numba-cuda's public ``compile_ptx`` through the on-disk cache
  (:mod:`gpufc.runtime.cache`) and are loaded with cuda.core's
  ``ObjectCode``; each launch is one ``cuLaunchKernel`` (cuda-bindings) with
  a ``kernelParams`` array built once per plan. A call writes the operands'
  device pointers and the per-call scalars into that array and launches: no
  Numba device array, no typeof, no overload lookup.
- :class:`NumbaLauncher` (``GPUFC_LAUNCHER=numba`` on the ``cuda`` backend):
  Numba's own compile and launch, the route before plans; a fallback, and the
  peer the GPU tier checks the driver launches against.
- :class:`SimLauncher` (the ``sim`` backend): Numba's simulator, as
  ``kernel[grid, block, stream](*args)``, under the process-wide simulator
  lock (:func:`launch_lock`).

The argument layout a Numba kernel expects (numba-cuda 0.30, the pinned
range) is one parameter per word: an array is ``meminfo, parent, nitems,
itemsize, data, *shape, *strides`` (8 bytes each; meminfo and parent 0,
strides in bytes), a scalar is its C type. :func:`flatten` states it;
tests/test_launch.py holds it to numba-cuda's own ``_Kernel._prepare_args``
and to the parameter list of the compiled PTX.

The seam for measuring the host path without a GPU:
:class:`RecordingLauncher` is :class:`DriverLauncher` with kernel loading and
the final ``cuLaunchKernel`` replaced by a recorder; :func:`use_launcher`
installs it. Everything before that call (validation, plan lookup,
allocation, the argument buffer writes) is the real path.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading

import numpy as np

# Numba's CUDA simulator runs one kernel per process at a time: the running kernel's
# fake ``cuda`` module is a module global, swapped into the kernel's globals, and the
# grid is stored on the shared kernel object. Two threads launching at once (Dask's
# threaded scheduler, a distributed worker) crash with "'Thread' object has no attribute
# 'threadIdx'". Every simulated launch holds this lock; real GPU launches never take it.
_SIM_LAUNCH_LOCK = threading.RLock()


def launch_lock():
    """The context every kernel launch runs in: the process-wide simulator lock when the
    simulator is on, else a no-op (a real GPU takes concurrent launches from many threads)."""
    import numba

    return _SIM_LAUNCH_LOCK if numba.config.ENABLE_CUDASIM else contextlib.nullcontext()


def serialised_in_sim(launcher):
    """Decorator for a launcher (builds its kernel on first use, then launches): in the simulator
    the whole call holds :func:`launch_lock`, because while a simulated kernel runs, the module
    that defines it sees the simulator's fake ``cuda`` (no ``jit``), so a concurrent build there
    fails. On a real GPU the launcher is returned unchanged (no cost per call)."""
    import numba

    if not numba.config.ENABLE_CUDASIM:
        return launcher

    @functools.wraps(launcher)
    def locked(*args, **kwargs):
        with _SIM_LAUNCH_LOCK:
            return launcher(*args, **kwargs)

    return locked


class LayoutError(TypeError):
    """A strided array for a C-order kernel parameter. Never launched: numba-cuda 0.30.4
    launches one against a ``[:, ::1]`` signature as if it were contiguous (seen on an
    H200, 2026-11-28), which reads the wrong elements."""


class LaunchError(RuntimeError):
    """The CUDA driver refused a launch."""


# ----------------------------------------------------------------------------
# The argument layout
# ----------------------------------------------------------------------------

_CTYPES = {
    "int32": ctypes.c_int32, "uint32": ctypes.c_uint32, "int64": ctypes.c_int64, "uint64": ctypes.c_uint64,
    "float32": ctypes.c_float, "float64": ctypes.c_double,
}


def scalar_ctype(dtype):
    """The C type Numba passes a scalar parameter of ``dtype`` as."""
    name = np.dtype(dtype).name
    try:
        return _CTYPES[name]
    except KeyError:
        raise TypeError(f"no launch layout for a {name} scalar parameter (gpufc's kernels use {sorted(_CTYPES)})") \
            from None


def array_words(shape, dtype, data: int = 0) -> list[int]:
    """The parameter words of a C-contiguous array: meminfo, parent, nitems, itemsize, data, shape, strides."""
    itemsize = np.dtype(dtype).itemsize
    strides = []
    step = itemsize
    for s in reversed(shape):
        strides.append(step)
        step *= s
    size = 1
    for s in shape:
        size *= s
    return [0, 0, size, itemsize, int(data), *shape, *reversed(strides)]


def flatten(args, values) -> list:
    """The kernel's parameter list for ``args`` (:class:`~gpufc.kernels.catalogue.Arg`) and the
    per-call ``values`` (data pointers for arrays): ``[(ctype, value), ...]``, one per parameter."""
    out = []
    it = iter(values)
    for a in args:
        if a.shape is not None:
            out += [(ctypes.c_uint64, w) for w in array_words(a.shape, a.dtype, next(it))]
        else:
            out.append((scalar_ctype(a.dtype), next(it) if a.value is None else a.value))
    return out


# ----------------------------------------------------------------------------
# The CUDA driver
# ----------------------------------------------------------------------------


class _Bound:
    """A plan's argument buffer and its launch function.

    ``call(*values)`` writes the per-call values into the buffer, then
    launches. The function is generated per launch signature (one statement
    per value, no loop: half the host time of a loop over the slots); a lock
    keeps one thread's writes and launch together, since the driver reads the
    buffer during ``cuLaunchKernel``.
    """

    __slots__ = ("_objs", "_params", "call")

    def __init__(self, launch_fn, handle, grid, block, args, stream, success):
        objs, var, is_array = [], [], []
        for a in args:
            if a.shape is not None:
                words = [ctypes.c_uint64(w) for w in array_words(a.shape, a.dtype)]
                objs += words
                var.append(words[4])  # the data pointer
                is_array.append(True)
            else:
                c = scalar_ctype(a.dtype)(0 if a.value is None else a.value)
                objs.append(c)
                if a.value is None:
                    var.append(c)
                    is_array.append(False)
        self._objs = objs
        self._params = (ctypes.c_void_p * len(objs))(*[ctypes.addressof(o) for o in objs])
        names = [f"v{i}" for i in range(len(var))]
        body = [f"        s{i}.value = {n}{' or 0' if arr else ''}" for i, (n, arr) in enumerate(zip(names, is_array))]
        src = "\n".join([
            f"def call({', '.join(names)}):",
            "    with lock:",
            *body,
            "        err = launch_fn(handle, gx, gy, gz, bx, by, bz, 0, stream, params, 0)[0]",
            "    if err != success:",
            "        raise LaunchError(f'cuLaunchKernel failed: {err!r} (grid {grid}, block {block})')",
        ])
        env = {f"s{i}": slot for i, slot in enumerate(var)}
        # the function's globals own the buffer: the driver reads these addresses at every launch
        env["_buffer"] = (objs, self._params)
        env.update(lock=threading.Lock(), launch_fn=launch_fn, handle=handle, stream=stream, success=success,
                   params=ctypes.addressof(self._params), grid=grid, block=block, LaunchError=LaunchError)
        env["gx"], env["gy"], env["gz"] = grid
        env["bx"], env["by"], env["bz"] = block
        exec(compile(src, f"<gpufc launch {len(var)} values>", "exec"), env)  # noqa: S102 (our own source)
        self.call = env["call"]


class DriverLauncher:
    """The ``cuda`` backend's launcher: cached PTX/cubin loaded by cuda.core, launched by ``cuLaunchKernel``."""

    name = "cuda driver"

    def __init__(self):
        self._kernels: dict = {}
        self._lock = threading.Lock()
        self._device = None

    # -- device ---------------------------------------------------------------------

    def _dev(self):
        if self._device is None:
            from cuda.core import Device

            self._device = Device()
        return self._device

    def compute_capability(self) -> tuple[int, int]:
        cc = self._dev().compute_capability
        return int(cc[0]), int(cc[1])

    # -- the four methods a plan uses ---------------------------------------------

    def load(self, spec):
        """The cuda.core ``Kernel`` of ``spec`` on the current device (compiled through the disk cache)."""
        cc = self.compute_capability()
        key = (spec.name, spec.signature, cc)
        kernel = self._kernels.get(key)
        if kernel is None:
            from cuda.core import ObjectCode

            from . import cache

            entry = cache.default().get(spec, cc)
            code = ObjectCode.from_cubin(entry.cubin) if entry.cubin else ObjectCode.from_ptx(entry.ptx)
            kernel = code.get_kernel(entry.name)
            with self._lock:
                kernel = self._kernels.setdefault(key, kernel)
        return kernel

    def resident_blocks(self, kernel, threads: int) -> int:
        """SMs x the occupancy calculator's blocks per SM for ``threads`` threads per block."""
        try:
            per_sm = kernel.occupancy.max_active_blocks_per_multiprocessor(threads, 0)
            sms = self._dev().properties.multiprocessor_count
            return max(1, int(per_sm) * int(sms))
        except Exception:  # noqa: BLE001 -- no occupancy query: 4 blocks on each of an H100's 132 SMs
            return 4 * 132

    def launch_function(self):
        from cuda.bindings import driver

        return driver.cuLaunchKernel, driver.CUresult.CUDA_SUCCESS

    def bind(self, kernel, grid, block, args, stream):
        from cuda.bindings import driver

        fn, success = self.launch_function()
        # a cuda.core Kernel's handle is a CUkernel, which cuLaunchKernel takes where a CUfunction goes
        return _Bound(fn, driver.CUfunction(int(kernel.handle)), grid, block, args, stream, success).call

    def workspace(self, shape, dtype):
        """A scratch device array for one call (split-K's partial sums): ``(pointer, holder)``."""
        import sys

        cupy = sys.modules.get("cupy")
        if cupy is None:
            import cupy
        arr = cupy.empty(shape, dtype=dtype)
        return arr.data.ptr, arr

    # -- kernel-level launchers (device arrays of any kind) ------------------------

    def arg(self, a) -> int:
        """The device pointer of a C-contiguous CUDA array (anything with ``__cuda_array_interface__``)."""
        return device_pointer(a)

    def stream(self, stream) -> int:
        """A stream as the plans key and launch it here: its ``cudaStream_t`` as an int."""
        return stream_int(stream)


class RecordingLauncher(DriverLauncher):
    """:class:`DriverLauncher` with kernel loading and ``cuLaunchKernel`` replaced by a recorder.

    For the host-path benchmark and tests without a GPU: plans, argument
    buffers and their per-call writes are the real ones; ``launches`` counts
    the calls that would have reached the driver and ``last`` keeps the last
    one's ``(kernel name, grid, block, stream, parameter values)``.
    """

    name = "recorder (no driver)"

    def __init__(self, sms: int = 132, compute_capability=(9, 0)):
        super().__init__()
        self.sms = sms
        self.cc = tuple(compute_capability)
        self.launches = 0
        self.last = None
        self._names: dict = {}
        self._layouts: dict = {}
        self.keep_last = True

    def compute_capability(self):
        return self.cc

    def bind(self, kernel, grid, block, args, stream):
        fn, success = self.launch_function()
        self._layouts[kernel.handle] = [ctype for ctype, _ in flatten(args, [0] * len(args))]
        return _Bound(fn, kernel.handle, grid, block, args, stream, success).call

    def load(self, spec):
        handle = len(self._names) + 1
        self._names[handle] = spec.name
        return _Stub(handle)

    def resident_blocks(self, kernel, threads: int) -> int:
        return self.sms * max(1, 2048 // max(threads, 1))

    def launch_function(self):
        def record(handle, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
            self.launches += 1
            if self.keep_last:
                self.last = (handle, (gx, gy, gz), (bx, by, bz), stream, params)
            return (0,)

        return record, 0

    def last_launch(self) -> dict:
        """The last launch as data: kernel name, grid, block, stream and every parameter's value,
        read back from the argument buffer the driver would have read."""
        handle, grid, block, stream, params = self.last
        layout = self._layouts[handle]
        addresses = (ctypes.c_void_p * len(layout)).from_address(params)
        values = [ctype.from_address(a).value for ctype, a in zip(layout, addresses)]
        return {"kernel": self._names[handle], "grid": grid, "block": block, "stream": stream, "params": values}


class _Stub:
    __slots__ = ("handle",)

    def __init__(self, handle):
        self.handle = handle


# ----------------------------------------------------------------------------
# The simulator
# ----------------------------------------------------------------------------

SIM_BLOCKS = 2  # the simulator runs every thread in Python: one-wave grids stay small


class SimLauncher:
    """The ``sim`` backend's launcher: Numba's simulator, ``kernel[grid, block, stream](*args)``."""

    name = "Numba CUDA simulator"

    def __init__(self):
        self._kernels: dict = {}

    def load(self, spec):
        key = (spec.name, spec.signature)
        kernel = self._kernels.get(key)
        if kernel is None:
            from numba import cuda

            kernel = self._kernels.setdefault(key, cuda.jit(spec.signature)(spec.pyfunc))
        return kernel

    def resident_blocks(self, kernel, threads: int) -> int:
        return SIM_BLOCKS

    def arg(self, a):
        return a

    def stream(self, stream):
        return stream

    def workspace(self, shape, dtype):
        from numba import cuda

        arr = cuda.device_array(shape, dtype)
        return arr, arr

    def bind(self, kernel, grid, block, args, stream):
        from numba import cuda

        makers = []
        n = 0
        for a in args:
            if a.shape is not None:
                shape = tuple(a.shape)
                makers.append(("array", shape, np.dtype(a.dtype)))
                n += 1
            elif a.value is None:
                makers.append(("scalar", np.dtype(a.dtype).type, None))
                n += 1
            else:
                makers.append(("fixed", np.dtype(a.dtype).type(a.value), None))
        dummies: dict = {}
        size_of = {m[1]: int(np.prod(m[1], dtype=np.int64)) for m in makers if m[0] == "array"}
        launch = kernel[grid, block, stream]

        def call(*values):
            if len(values) != n:
                raise TypeError(f"this launch takes {n} per-call values, got {len(values)}")
            it = iter(values)
            out = []
            for kind, x, dtype in makers:
                if kind == "array":
                    v = next(it)
                    if v is None:  # an operand the kernel does not read (no bias)
                        v = dummies.get(x)
                        if v is None:
                            v = dummies[x] = cuda.device_array(x, dtype)
                    elif v.shape != x and (v.size == size_of[x] or len(v.shape) != len(x)):
                        v = v.reshape(x)  # a flat parameter of a 2-D array, or the other way round
                    # else: an operand the kernel does not read, passed as given (a bias of any length)
                    out.append(v)
                elif kind == "scalar":
                    out.append(x(next(it)))
                else:
                    out.append(x)
            with launch_lock():
                launch(*out)

        return call


class NumbaLauncher(DriverLauncher):
    """Numba's own compile and launch on a GPU (``GPUFC_LAUNCHER=numba``): the previous route, kept
    as a fallback and as the peer the GPU tier compares the driver launches with, bit for bit.
    Slower per call: it builds a Numba device view of every operand."""

    name = "Numba dispatcher"

    def load(self, spec):
        key = (spec.name, spec.signature)
        kernel = self._kernels.get(key)
        if kernel is None:
            from numba import cuda

            options = {"launch_bounds": spec.launch_bounds} if spec.launch_bounds else {}
            kernel = self._kernels.setdefault(key, cuda.jit(spec.signature, **options)(spec.pyfunc))
        return kernel

    def resident_blocks(self, kernel, threads: int) -> int:
        try:
            return max(1, int(next(iter(kernel.overloads.values())).max_cooperative_grid_blocks(threads)))
        except Exception:  # noqa: BLE001
            return 4 * 132

    def bind(self, kernel, grid, block, args, stream):
        from numba import cuda

        nstream = cuda.default_stream() if stream == 0 else cuda.external_stream(stream)
        launch = kernel[grid, block, nstream]
        makers = []
        for a in args:
            if a.shape is not None:
                makers.append(("array", tuple(a.shape), np.dtype(a.dtype).str))
            elif a.value is None:
                makers.append(("scalar", np.dtype(a.dtype).type, None))
            else:
                makers.append(("fixed", np.dtype(a.dtype).type(a.value), None))

        def call(*values):
            it = iter(values)
            out = []
            for kind, x, typestr in makers:
                if kind == "array":
                    ptr = next(it) or 0
                    desc = {"shape": x, "strides": None, "data": (ptr, False), "typestr": typestr, "version": 3}
                    out.append(cuda.from_cuda_array_interface(desc, owner=None, sync=False))
                elif kind == "scalar":
                    out.append(x(next(it)))
                else:
                    out.append(x)
            launch(*out)

        return call


def device_pointer(a) -> int:
    """The data pointer of a C-contiguous CUDA array; a strided one is a :class:`LayoutError`."""
    if a is None:
        return 0
    cai = a.__cuda_array_interface__
    strides = cai.get("strides")
    if strides is not None:
        step = np.dtype(cai["typestr"]).itemsize
        shape = cai["shape"]
        for d in range(len(shape) - 1, -1, -1):
            if strides[d] != step and shape[d] > 1:
                raise LayoutError(f"kernel argument of shape {tuple(shape)} has strides {tuple(strides)}; the "
                                  "kernels need C order: copy it (ascontiguousarray) first")
            step *= shape[d]
    return int(cai["data"][0])


def stream_int(stream) -> int:
    """A ``cudaStream_t`` as an int from an int, a Numba stream, or anything :mod:`gpufc.runtime.streams` takes."""
    if isinstance(stream, int):
        return stream
    handle = getattr(stream, "handle", None)
    if handle is not None and hasattr(handle, "value"):  # a Numba stream: a ctypes handle
        return int(handle.value or 0)
    from .streams import stream_handle

    return stream_handle(stream)


# ----------------------------------------------------------------------------
# The active launcher
# ----------------------------------------------------------------------------

ENV_LAUNCHER = "GPUFC_LAUNCHER"  # "driver" (default) or "numba" on the cuda backend
_active: list = []
_active_lock = threading.Lock()


def launcher():
    """The launcher plans are built with: :func:`use_launcher`'s, else the backend's own."""
    if _active:
        return _active[0]
    from . import backend

    with _active_lock:
        if not _active:
            if backend.get_backend() == "sim":
                _active.append(SimLauncher())
            elif os.environ.get(ENV_LAUNCHER, "driver").strip().lower() == "numba":
                _active.append(NumbaLauncher())
            else:
                _active.append(DriverLauncher())
    return _active[0]


def use_launcher(new):
    """Install ``new`` (e.g. a :class:`RecordingLauncher`) for plans built from now on; returns the
    previous one (None: the backend's own). Built plans are dropped, so none launches through the old one."""
    from . import plan

    with _active_lock:
        previous = _active[0] if _active else None
        _active.clear()
        if new is not None:
            _active.append(new)
    plan.PLANS.clear()
    return previous

