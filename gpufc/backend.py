"""``gpufc.backend``, the backend choice at its first import path; the module is :mod:`gpufc.runtime.backend`."""

from .runtime.backend import (  # noqa: F401  (re-exported)
    ENV_VAR,
    NAMES,
    backend_info,
    cupy_or_none,
    driver_device_count,
    get_backend,
    kernels,
    numba_cuda,
    set_backend,
)
