"""The host path of a call, measured without a GPU: everything gpufc does per call except the launch.

:func:`install` puts a stand-in CuPy (:class:`FakeCupy`: arrays with fake
device pointers, allocation without memory) in ``sys.modules``, makes
``cuda`` the active backend without starting it, and installs a
:class:`~gpufc.runtime.launch.RecordingLauncher`: the driver launcher with
kernel loading and ``cuLaunchKernel`` replaced by a recorder. Then
``gpufc.linear``, ``FullyConnectedLayer.forward`` and ``gpufc.dropout`` run
their real code (validation, stream scope, plan lookup, allocation call,
argument buffer writes, the result in the caller's type) up to the driver
call. :func:`measure` times them; ``bench/host_path.py`` prints the figures.

Call it in a process of its own: it replaces CuPy and the backend for the
rest of the process.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import sys
import time
import types

import numpy as np


class _Flags:
    __slots__ = ("c_contiguous",)

    def __init__(self, c):
        self.c_contiguous = c


class _Memory:
    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


_C = _Flags(True)
_next_ptr = itertools.count(1 << 32, 256)  # 256-byte aligned, like CuPy's pool


class FakeArray:
    """A C-contiguous "device" array: shape, dtype, a fake pointer; no memory behind it."""

    __module__ = "cupy"  # gpufc classifies arrays by their module, as it does CuPy's
    __slots__ = ("data", "dtype", "shape", "size")
    flags = _C

    def __init__(self, shape, dtype, ptr=None):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.size = math.prod(self.shape)
        self.data = _Memory(next(_next_ptr) if ptr is None else ptr)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.data.ptr, False), "strides": None,
                "version": 3}

    @property
    def ndim(self):
        return len(self.shape)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return FakeArray(shape, self.dtype, self.data.ptr)

    def get(self):
        return np.zeros(self.shape, self.dtype)


class _Stream:
    ptr = 0
    device_id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fake_cupy() -> types.ModuleType:
    cp = types.ModuleType("cupy")
    cp.__gpufc_stand_in__ = True
    cp.ndarray = FakeArray
    cp.float32, cp.float64, cp.uint8 = np.float32, np.float64, np.uint8
    cp.empty = lambda shape, dtype=np.float32: FakeArray(shape if isinstance(shape, tuple) else (shape,), dtype)
    cp.asarray = lambda a, dtype=None: a if isinstance(a, FakeArray) else FakeArray(np.shape(a), dtype or a.dtype)
    cp.ascontiguousarray = lambda a: a
    null = _Stream()
    cuda = types.SimpleNamespace(
        get_current_stream=lambda: null,
        Stream=types.SimpleNamespace(null=null),
        ExternalStream=lambda handle: null,
        runtime=types.SimpleNamespace(memcpyAsync=lambda *a: None, memcpyDeviceToDevice=3),
    )
    cp.cuda = cuda
    return cp


def install():
    """Stand-in CuPy, the ``cuda`` backend unstarted, a recording launcher; returns the launcher."""
    if "cupy" in sys.modules and not getattr(sys.modules["cupy"], "__gpufc_stand_in__", False):
        raise RuntimeError("CuPy is already imported in this process: run the host-path measurement in its own")
    sys.modules["cupy"] = _fake_cupy()
    from gpufc.runtime import backend, launch

    backend._set_unchecked("cuda")
    recorder = launch.RecordingLauncher()
    launch.use_launcher(recorder)
    return recorder


def _per_call(fn, calls: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per call over ``repeats`` runs of ``calls`` calls: (wall clock, this process's CPU time).

    On a machine shared with other work the wall clock also counts time the
    process waited for a core; the CPU time counts only the work of the calls.
    """
    for _ in range(200):
        fn()  # builds the plans, fills the caches
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        wall.append((time.perf_counter() - t0) / calls)
        cpu.append((time.process_time() - c0) / calls)
    return wall, cpu


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(m: int = 64, k: int = 512, n: int = 512, p: float = 0.1, calls: int = 20000, repeats: int = 7) -> dict:
    """Seconds per call (median and spread over ``repeats`` runs of ``calls`` calls) of the three paths."""
    recorder = install()
    import gpufc

    cp = sys.modules["cupy"]
    x, w, b = cp.empty((m, k), np.float32), cp.empty((k, n), np.float32), cp.empty((n,), np.float32)
    layer = gpufc.FullyConnectedLayer(k, n, seed=0).to("cuda")
    xd = cp.empty((m, k), np.float32)
    paths = {
        f"gpufc.linear(x, w, b), x ({m}, {k}), w ({k}, {n})": lambda: gpufc.linear(x, w, b),
        f"FullyConnectedLayer({k}, {n}).forward(x), parameters on the device": lambda: layer.forward(x),
        f"gpufc.dropout(x, {p}, seed=1), x ({m}, {k})": lambda: gpufc.dropout(xd, p, seed=1),
    }
    out = {}
    for name, fn in paths.items():
        before = recorder.launches
        fn()
        launch = recorder.last_launch()
        launches = recorder.launches - before
        if launches < 1:
            raise AssertionError(f"{name}: no launch recorded")
        wall, cpu = _per_call(fn, calls, repeats)
        out[name] = {"cpu_median_s": float(np.median(cpu)), "cpu_min_s": min(cpu), "cpu_max_s": max(cpu),
                     "wall_median_s": float(np.median(wall)), "wall_min_s": min(wall),
                     "kernel": launch["kernel"], "grid": launch["grid"], "block": launch["block"],
                     "launches": launches}
    out["_env"] = {"python": sys.version.split()[0], "machine": platform.machine(),
                   "processor": _cpu_name(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
                   "launches_recorded": recorder.launches, "calls": calls, "repeats": repeats}
    return out
