"""Every kernel specialisation gpufc ships, as data, for the compile tier and the static report.

``specs()`` lists :class:`KernelSpec` entries: a name, the uncompiled Python
function and its launch signature, which is what ``numba.cuda.compile_ptx``
takes. Each op module contributes its own ``catalogue()``; this module only
gathers them, so adding a configuration to an op adds it here.

A launch is data too: :class:`LaunchSpec` is a kernel, its grid and block,
and its parameters (:class:`Arg`), which the runtime turns into a launch plan
(:mod:`gpufc.runtime.plan`). The ops build them (``linear.forward_launch``,
``dropout.dropout_launch``, ...); kernels never launch themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str  # unique, e.g. "matmul/v1_t16/float32/NN/gelu+bias+drop+z"
    pyfunc: object  # the Python function before cuda.jit
    signature: str  # the launch signature, e.g. "void(float32[:, ::1], ...)"
    main_loop: bool = False  # True where the static report should measure the main loop's FFMA (HMMA) share
    launch_bounds: tuple | None = None  # cuda.jit(launch_bounds=...) the kernel is compiled with, if any
    threads: int | None = None  # threads per block it launches with (the static report's occupancy), if fixed
    archs: tuple | None = None  # the compute capabilities the compile tier checks it for, e.g. ((9, 0),); None: all
    default: bool = True  # False for candidate configurations: `gpufc warmup` compiles the default ones


@dataclasses.dataclass(frozen=True)
class Arg:
    """One kernel parameter of a launch.

    An array (``shape`` given; C order, ``dtype`` its elements) is passed per
    call as a device pointer; a scalar (``shape`` None) is passed per call,
    unless ``value`` fixes it for the launch (e.g. K).
    """

    name: str
    dtype: np.dtype
    shape: tuple | None = None
    value: int | float | None = None


def array(name: str, shape, dtype) -> Arg:
    return Arg(name, np.dtype(dtype), tuple(int(s) for s in shape))


def scalar(name: str, dtype, value=None) -> Arg:
    return Arg(name, np.dtype(dtype), None, value)


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """A launch as data: the kernel, its grid and block, its parameters in order.

    ``grid`` is a tuple, or a function of the blocks of this kernel the device
    holds at once (for grids sized to one wave), called once when the plan is built.
    """

    kernel: KernelSpec
    grid: tuple | Callable[[int], tuple]
    block: tuple
    args: tuple


def specs():
    from . import dropout, linear
    from .linear import tensorcore, v3_pipelined

    return (list(linear.catalogue()) + list(dropout.catalogue()) + list(tensorcore.catalogue())
            + list(v3_pipelined.catalogue()))
