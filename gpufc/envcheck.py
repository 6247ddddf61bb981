"""Which install extra the running environment matches, and what it lacks.

gpufc ships three install lines (README, "Install"):

==========================  =====================================  ================================
machine                     install                                brings
==========================  =====================================  ================================
no GPU                      ``pip install gpufc`` (+ ``[dev]``)    the cpu and sim backends
CUDA 12 driver (>= 12.0)    ``pip install 'gpufc[cuda12]'``        CuPy 12.x, numba-cuda[cu12], ptxas
CUDA 13 driver (>= 13.0)    ``pip install 'gpufc[cuda13]'``        CuPy 13.x, numba-cuda[cu13], ptxas
==========================  =====================================  ================================

The toolkit's major version must not exceed the driver's: a CUDA 12 driver
cannot load PTX that CUDA 13's NVVM emits. :func:`report` reads the driver's
version through ctypes and the installed distributions' metadata, and imports
neither numba nor CuPy, so ``gpufc info`` can say what is wrong even when the
import of either would fail.

:func:`version_problems` compares the installed versions with the ranges gpufc
was tested on (``TESTED``, the same bounds as ``pyproject.toml``'s
dependencies); the device backends warn once when they start outside them.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import warnings

# The ranges the test suite ran on (keep equal to pyproject.toml's dependencies).
# numba-cuda: gpufc's launch packer and simulator twins rely on 0.30.x details.
# NumPy: 2.5 removed np.row_stack, which numba-cuda 0.30.4 calls when it compiles a kernel.
TESTED = {
    "numba-cuda": ">=0.30.4,<0.31",
    "numpy": ">=1.24,<2.5",
}

# cupy distribution -> the CUDA major version it is built for
_CUPY_DISTS = {"cupy-cuda12x": 12, "cupy-cuda13x": 13}


def installed(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the driver supports, ``(major, minor)``, or None without a driver."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cu = ctypes.CDLL(lib)
        except OSError:
            continue
        v = ctypes.c_int(0)
        if cu.cuDriverGetVersion(ctypes.byref(v)) != 0 or v.value <= 0:
            return None
        return v.value // 1000, (v.value % 1000) // 10
    return None


def _major(version: str | None) -> int | None:
    if not version:
        return None
    try:
        return int(version.split(".", 1)[0])
    except ValueError:
        return None


def toolkit_major() -> int | None:
    """The CUDA major version of the toolkit wheels numba-cuda's extra brought (NVVM, NVRTC), or None.

    None means no toolkit from pip: numba-cuda then looks for a system CUDA toolkit.
    """
    if installed("nvidia-cuda-nvcc-cu12") or installed("nvidia-cuda-nvrtc-cu12"):
        return 12
    if installed("nvidia-nvvm") or installed("nvidia-cuda-nvrtc"):
        return _major(installed("nvidia-nvvm") or installed("nvidia-cuda-nvrtc"))
    return None


def cupy_dist() -> tuple[str, int] | None:
    """``(distribution, CUDA major)`` of the installed CuPy wheel, or None."""
    for dist, major in _CUPY_DISTS.items():
        if installed(dist):
            return dist, major
    return None


def version_problems() -> list[str]:
    """One line per installed distribution outside the range gpufc was tested on."""
    from packaging.specifiers import SpecifierSet

    problems = []
    for dist, spec in TESTED.items():
        v = installed(dist)
        if v is not None and v not in SpecifierSet(spec):
            problems.append(f"{dist} {v} is outside the tested range {spec}")
    return problems


def report() -> dict:
    """What ``gpufc info`` prints under "environment": the matching extra and what is missing.

    Keys: ``driver_cuda`` ("13.0" or None), ``toolkit_cuda``, ``cupy``,
    ``matches`` (``"cuda12"``, ``"cuda13"`` or ``"none (cpu/sim only)"``),
    ``missing`` (list of sentences, empty when nothing is), ``versions``
    (list of tested-range problems).
    """
    driver = driver_cuda_version()
    toolkit = toolkit_major()
    cupy = cupy_dist()
    missing = []
    if cupy and toolkit and cupy[1] != toolkit:
        missing.append(f"{cupy[0]} is built for CUDA {cupy[1]} but numba-cuda's toolkit is CUDA {toolkit}: "
                       f"install one extra, gpufc[cuda{toolkit}] or gpufc[cuda{cupy[1]}], in a fresh environment")
    matches = f"cuda{cupy[1]}" if cupy and toolkit == cupy[1] else "none (cpu/sim only)"
    if driver is not None:
        want = f"cuda{min(driver[0], 13)}"
        if cupy is None:
            missing.append(f"CuPy: a CUDA {driver[0]}.{driver[1]} driver is present but CuPy is not installed, "
                           f"so the cuda backend has no output arrays: pip install 'gpufc[{want}]'")
        if toolkit is not None and toolkit > driver[0]:
            missing.append(f"the CUDA {toolkit} toolkit wheels emit PTX that this CUDA {driver[0]}.{driver[1]} "
                           f"driver cannot load: reinstall with 'gpufc[cuda{driver[0]}]'")
        if cupy is not None and cupy[1] > driver[0]:
            missing.append(f"{cupy[0]} needs a CUDA {cupy[1]} driver; this one supports {driver[0]}.{driver[1]}")
    if toolkit is not None and not (installed("nvidia-cuda-nvdisasm") or installed("nvidia-cuda-nvdisasm-cu12")):
        missing.append("nvdisasm (the compile tier's SASS checks are skipped): pip install nvidia-cuda-nvdisasm")
    return {
        "driver_cuda": f"{driver[0]}.{driver[1]}" if driver else None,
        "toolkit_cuda": toolkit,
        "cupy": f"{cupy[0]} {installed(cupy[0])}" if cupy else None,
        "matches": matches,
        "missing": missing,
        "versions": version_problems(),
    }


_warned = []


def warn_once_if_untested() -> None:
    """Warn once per process when numba-cuda or NumPy is outside the tested range."""
    if _warned:
        return
    _warned.append(True)
    problems = version_problems()
    if problems:
        warnings.warn("gpufc was not tested with this environment: " + "; ".join(problems)
                      + " (see `gpufc info`)", RuntimeWarning, stacklevel=3)
