"""Assertions and tolerances shared by the test modules."""

import os
import subprocess
import sys

import numpy as np
import pytest


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
