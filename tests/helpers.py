"""Assertions and tolerances shared by the test modules."""

import os
import subprocess
import sys

import numpy as np
import pytest

# Random123's kat_vectors for philox4x32_10: (counter, key, expected).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def assert_close(actual, expected, *, rtol, atol, what="result"):
    """allclose with a failure message that shows the count, first indices and values."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    ok = np.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    if not ok.all():
        bad = np.argwhere(~ok)
        first = [tuple(int(i) for i in b) for b in bad[:5]]
        vals = [(actual[i], expected[i]) for i in first]
        pytest.fail(
            f"{what}: {len(bad)} of {ok.size} elements differ beyond rtol={rtol}, atol={atol}; "
            f"first at {first}: (actual, expected) = {vals}"
        )


def tolerance(dtype, k: int):
    """(rtol, atol) for a length-k dot product in ``dtype`` against a float64 reference.

    dtype     rtol = atol
    float32   32 eps32 sqrt(k) + 1e-6   (random-sign rounding grows like sqrt(k); 32x headroom)
    float64   32 eps64 sqrt(k)
    """
    eps = float(np.finfo(dtype).eps)
    tol = 32 * eps * float(np.sqrt(max(k, 1))) + (1e-6 if np.dtype(dtype) == np.float32 else 0.0)
    return tol, tol


def run_clean_python(code: str, timeout: int = 900):
    """Run ``code`` in a fresh interpreter without the simulator (the compile tier)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPUFC_BACKEND")}
    env["GPUFC_BACKEND"] = "cpu"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


def numeric_grad(f, arr, h=1e-6):
    """Central differences of the scalar ``f()`` with respect to every element of ``arr`` (in place)."""
    g = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
        old = arr[idx]
        arr[idx] = old + h
        fp = f()
        arr[idx] = old - h
        fm = f()
        arr[idx] = old
        g[idx] = (fp - fm) / (2 * h)
    return g


class StandIn:
    """Stands in for a float32 device array in a launcher's checks: a shape, a size, an address
    (no memory: a launch limit can be tested at 2**32 elements)."""

    def __init__(self, *shape):
        self.shape, self.dtype = shape, np.dtype(np.float32)
        self.size = int(np.prod(shape, dtype=object))
        self.__cuda_array_interface__ = {"data": (0, False)}

    def reshape(self, *shape):
        return self


class Launched(Exception):
    """Raised in place of compiling a kernel: the launch checks let the call through."""
