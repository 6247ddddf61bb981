"""Backend detection: the one place that decides where gpufc runs.

=========  ====================================================  ==========================
name       runs                                                  used for
=========  ====================================================  ==========================
``cuda``   the Numba kernels on a real GPU, outputs from CuPy    users
``sim``    the same kernels in the Numba CUDA simulator          tests and demos, no GPU
``cpu``    :mod:`gpufc.reference`, pure NumPy                    no GPU; the test oracle
=========  ====================================================  ==========================

Chosen by ``GPUFC_BACKEND=cuda|sim|cpu``; otherwise ``sim`` when
``NUMBA_ENABLE_CUDASIM=1`` is already set, ``cuda`` when the CUDA driver
reports a device, else ``cpu``. Detection is lazy: ``import gpufc`` touches
neither numba nor CuPy, so it is cheap and works on machines with neither a
GPU nor CuPy. The simulator must be switched on before numba is first
imported, which :func:`numba_cuda` does.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import threading

NAMES = ("cuda", "sim", "cpu")
ENV_VAR = "GPUFC_BACKEND"

_lock = threading.Lock()
_state: dict = {"name": None, "device": None}


def driver_device_count() -> int:
    """CUDA devices the driver reports (0 without a driver), without importing numba or CuPy."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cu = ctypes.CDLL(lib)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cu.cuInit(0) != 0 or cu.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def _sim_requested() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _resolve_auto() -> str:
    if _sim_requested():
        return "sim"
    return "cuda" if driver_device_count() > 0 else "cpu"


def _parse(name) -> str:
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    return name


def _device_backend() -> str | None:
    """'sim' or 'cuda' once numba has been imported one way or the other in this process."""
    if "numba" not in sys.modules:
        return None
    from numba import config

    return "sim" if config.ENABLE_CUDASIM else "cuda"


def _activate(name: str) -> None:
    if name != "cpu":
        from ..envcheck import warn_once_if_untested

        warn_once_if_untested()  # numba-cuda or NumPy outside the tested range: say so before it matters
    if name == "sim":
        imported = _device_backend()
        if imported == "cuda":
            raise RuntimeError(
                "backend 'sim' needs NUMBA_ENABLE_CUDASIM=1 before numba is first imported, "
                "but numba was already imported without it; set GPUFC_BACKEND=sim in the environment"
            )
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    elif name == "cuda":
        if _device_backend() == "sim" or (_device_backend() is None and _sim_requested()):
            raise RuntimeError(
                "backend 'cuda' is unavailable: the Numba CUDA simulator is switched on "
                "(NUMBA_ENABLE_CUDASIM=1) in this process"
            )
        from numba import cuda

        if not cuda.is_available():
            raise RuntimeError("backend 'cuda' is unavailable: Numba finds no usable CUDA GPU")


def _requested() -> str:
    """The backend ``GPUFC_BACKEND`` or auto-detection asks for (nothing is started)."""
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return _parse(env) if env else _resolve_auto()


def get_backend() -> str:
    """The active backend name, resolving ``GPUFC_BACKEND`` or auto-detection on first use."""
    if _state["name"] is None:
        with _lock:
            if _state["name"] is None:
                name = _requested()
                _activate(name)
                _state["name"] = name
    return _state["name"]


def set_backend(name: str) -> str:
    """Switch backends; returns the previous one.

    ``cpu`` is always available. ``cuda`` and ``sim`` exclude each other in
    one process (numba is imported one way or the other).
    """
    name = _parse(name)
    # Not get_backend(): switching away must not first start the requested backend
    # (GPUFC_BACKEND=cuda on a machine without a GPU would then refuse the way to cpu).
    previous = _state["name"] or _requested()
    with _lock:
        _activate(name)
        _state["name"] = name
    return previous


def numba_cuda():
    """``numba.cuda``, imported after the simulator switch is settled for this process."""
    get_backend()
    from numba import cuda

    return cuda


def kernels():
    """The :mod:`gpufc.kernels` package, imported after the backend is settled.

    Installed, it is the subpackage ``gpufc.kernels`` (package-dir mapping of the
    repository folder ``kernels/``). Run from a source tree without installing
    (the lent GPU's check script), the folder is loaded under the same name.
    """
    numba_cuda()
    try:
        return importlib.import_module("gpufc.kernels")
    except ModuleNotFoundError as err:
        if err.name != "gpufc.kernels":
            raise
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the gpufc package
    src = os.path.join(os.path.dirname(here), "kernels")
    spec = importlib.util.spec_from_file_location(
        "gpufc.kernels", os.path.join(src, "__init__.py"), submodule_search_locations=[src]
    )
    if spec is None or not os.path.isfile(os.path.join(src, "__init__.py")):
        raise ModuleNotFoundError("gpufc.kernels is not installed and no source-tree kernels/ folder was found")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpufc.kernels"] = module
    spec.loader.exec_module(module)
    return module


def cupy_or_none():
    """CuPy when the ``cuda`` backend is active and CuPy imports, else None."""
    if get_backend() != "cuda":
        return None
    cupy = sys.modules.get("cupy")  # every call asks: the dict lookup, not the import statement
    if cupy is None:
        try:
            import cupy
        except ImportError:
            return None
    return cupy


def _set_unchecked(name: str) -> str:
    """Make ``name`` the active backend without starting it; returns the previous one.

    The seam of the host-path benchmark and its tests (bench/host_path.py,
    tests/test_plans.py): with a stand-in CuPy in ``sys.modules`` and a
    recording launcher (:func:`gpufc.runtime.launch.use_launcher`), the
    ``cuda`` path runs on a machine without a GPU. Nothing else calls it.
    """
    with _lock:
        previous = _state["name"]
        _state["name"] = _parse(name)
    return previous


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cupy_dist() -> str | None:
    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy"):
        v = _version(dist)
        if v:
            return f"{v} ({dist})"
    return None


def backend_info() -> dict:
    """Backend, device and versions: what ran, for logs and benchmark rows."""
    import numpy

    name = get_backend()
    info = {
        "backend": name,
        "device": None,
        "compute_capability": None,
        "numpy": numpy.__version__,
        "numba": _version("numba"),
        "numba_cuda": _version("numba-cuda"),
        "cupy": _cupy_dist(),
        "python": sys.version.split()[0],
    }
    if name == "cuda":
        cuda = numba_cuda()
        dev = cuda.get_current_device()
        raw = dev.name
        info["device"] = raw.decode() if isinstance(raw, bytes) else str(raw)
        info["compute_capability"] = ".".join(map(str, dev.compute_capability))
        try:
            info["cuda_driver"] = ".".join(map(str, cuda.cudadrv.driver.driver.get_version()))
        except Exception:  # older numba-cuda spells it differently; the rest still holds
            info["cuda_driver"] = None
    elif name == "sim":
        info["device"] = "Numba CUDA simulator (CPU)"
    else:
        info["device"] = "CPU (NumPy reference)"
    return info
