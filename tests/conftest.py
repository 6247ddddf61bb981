"""Test tiers and backends.

One command, ``pytest``, runs every tier the machine allows (docs/testing.md):

- ``reference``: the NumPy reference against float64 math and the contracts;
- ``kernels``: the Numba kernels on a GPU, or in the CUDA simulator when the
  driver reports no GPU. The switch must happen before numba is first
  imported, so it happens here, at collection time;
- ``compile``: PTX/SASS checks in a subprocess without the simulator;
- ``gpu``: real-GPU only; skipped with a reason elsewhere.
"""

import os
import zlib

import numpy as np
import pytest

from gpufc.runtime import backend as _backend

ON_GPU = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") in ("", "0") and _backend.driver_device_count() > 0
DEVICE_BACKEND = "cuda" if ON_GPU else "sim"
if not ON_GPU:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before anything imports numba
os.environ["GPUFC_BACKEND"] = DEVICE_BACKEND

requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a real CUDA GPU (none reported by the driver)")


def pytest_report_header(config):
    return f"gpufc device backend: {DEVICE_BACKEND} ({'real GPU' if ON_GPU else 'Numba CUDA simulator'})"


@pytest.fixture
def device_backend():
    """Run the test on the kernels: the real GPU, or the simulator."""
    previous = _backend.set_backend(DEVICE_BACKEND)
    yield DEVICE_BACKEND
    _backend.set_backend(previous)


@pytest.fixture
def cpu_backend():
    previous = _backend.set_backend("cpu")
    yield "cpu"
    _backend.set_backend(previous)


@pytest.fixture(params=["cpu", DEVICE_BACKEND])
def any_backend(request):
    """Both the NumPy reference backend and the kernel backend."""
    previous = _backend.set_backend(request.param)
    yield request.param
    _backend.set_backend(previous)


@pytest.fixture
def rng(request):
    """A seeded generator, different per test but the same on every run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))  # hash() is salted per process
