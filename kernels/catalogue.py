"""Every kernel specialisation gpufc ships, as data, for the compile tier and the static report.

``specs()`` lists :class:`KernelSpec` entries: a name, the uncompiled Python
function and its launch signature, which is what ``numba.cuda.compile_ptx``
takes. Each op module contributes its own ``catalogue()``; this module only
gathers them, so adding a configuration to an op adds it here.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str  # unique, e.g. "matmul/v1_t16/float32/NN/gelu+bias+drop+z"
    pyfunc: object  # the Python function before cuda.jit
    signature: str  # the launch signature, e.g. "void(float32[:, ::1], ...)"
    main_loop: bool = False  # True where the static report should measure the main loop's FFMA (HMMA) share
    launch_bounds: tuple | None = None  # cuda.jit(launch_bounds=...) the kernel is compiled with, if any
    threads: int | None = None  # threads per block it launches with (the static report's occupancy), if fixed
    archs: tuple | None = None  # the compute capabilities the compile tier checks it for, e.g. ((9, 0),); None: all


def specs():
    from . import dropout, linear
    from .linear import tensorcore, v3_pipelined

    return (list(linear.catalogue()) + list(dropout.catalogue()) + list(tensorcore.catalogue())
            + list(v3_pipelined.catalogue()))
