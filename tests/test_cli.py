"""The gpufc command: `gpufc info` and `gpufc demo` on the cpu and kernel backends."""

import os
import re
import subprocess
import sys

import pytest
from conftest import DEVICE_BACKEND

pytestmark = pytest.mark.kernels


def _run(*args, backend):
    env = dict(os.environ, GPUFC_BACKEND=backend)
    if backend != "sim":
        env.pop("NUMBA_ENABLE_CUDASIM", None)
    out = subprocess.run([sys.executable, "-m", "gpufc", *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_info_names_backend():
    text = _run("info", backend="cpu")
    assert re.search(r"^backend\s+cpu$", text, re.MULTILINE)


def _numbers(text):
    return [float(v) for v in re.findall(r"-?\d+\.\d+", text)]


def test_demo_device_backend_matches_cpu():
    cpu = _run("demo", backend="cpu")
    dev = _run("demo", backend=DEVICE_BACKEND)
    assert f"backend: {DEVICE_BACKEND}" in dev
    # Same layer output to float32 tolerance, and the same dropout mask and values.
    a, b = _numbers(cpu.split("\n", 1)[1]), _numbers(dev.split("\n", 1)[1])
    assert len(a) == len(b)
    assert all(abs(u - v) <= 1e-5 * max(1.0, abs(u)) for u, v in zip(a, b))
    mask = lambda t: t.split("mask (1 = kept) =")[1].split("training: output")[0]
    assert mask(cpu) == mask(dev)
