"""Launch plans (gpufc/runtime/plan.py): one per call signature, reused, rebuilt when the signature
changes; ``config=`` validated; the host path measured by bench/host_path.py is the real one.

The ``cuda`` path runs here without a GPU in a clean process: a stand-in CuPy
(fake device pointers) and the recording launcher (gpufc/tools/hostpath.py),
which replaces only kernel loading and the final ``cuLaunchKernel``. The
recorded launches are checked against what the kernels need: the operands'
pointers, the grid of the chosen configuration, the dropout words.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_close, tolerance

import gpufc
from gpufc import reference as ref
from gpufc.runtime import plan as P
from gpufc.runtime.backend import kernels

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------
# config=
# ----------------------------------------------------------------------------


@pytest.mark.reference
def test_config_names_come_from_the_kernels_table():
    lin = kernels().linear
    assert gpufc.config_names() == lin.config_names()
    assert gpufc.config_names()[0] == "v1_t16" and set(lin.PREFERRED[np.dtype(np.float64)]) <= set(
        gpufc.config_names(np.float64))


@pytest.mark.parametrize("fn", ["linear", "linear_forward", "linear_backward"])
def test_unknown_config_is_a_value_error_naming_the_valid_ones(any_backend, fn, rng):
    x, w = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    args = (x, w, np.ones((3, 5), np.float32)) if fn == "linear_backward" else (x, w)
    with pytest.raises(ValueError, match=r"config must be one of \[.*'v1_t16'.*'t64x64'.*\], got config='t7x7'"):
        getattr(gpufc, fn)(*args, config="t7x7")
    with pytest.raises(TypeError, match="config must be a configuration name"):
        getattr(gpufc, fn)(*args, config=64)


def test_config_that_cannot_run_the_dtype_is_a_clear_error(any_backend, rng):
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((4, 5))  # float64
    with pytest.raises(ValueError, match=r"config='t128x128' cannot run float64: it needs \d+ bytes of shared"):
        gpufc.linear(x, w, config="t128x128")


@pytest.mark.kernels
@pytest.mark.parametrize("config", ["v1_t16", "t32x32", "t64x64"])
def test_every_config_gives_the_reference(device_backend, rng, config):
    m, k, n = 37, 11, 21
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,)))
    kw = dict(activation="relu", dropout_p=0.25, seed=9, offset=3)
    y = gpufc.linear(x, w, b, config=config, **kw)
    want = ref.linear(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **kw)
    rtol, atol = tolerance(np.float32, k)
    assert_close(y, want, rtol=rtol, atol=atol)
    before = P.PLANS.builds
    gpufc.linear(x, w, b, config=config, **kw)
    assert P.PLANS.builds == before, "a repeated call reuses its plan"


# ----------------------------------------------------------------------------
# Reuse and rebuild, in the simulator
# ----------------------------------------------------------------------------


@pytest.mark.kernels
def test_plan_reused_for_a_repeated_signature_and_rebuilt_when_it_changes(device_backend, rng):
    x = rng.standard_normal((5, 6)).astype(np.float32)
    w = rng.standard_normal((6, 7)).astype(np.float32)
    gpufc.linear(x, w)
    n0 = P.PLANS.builds
    gpufc.linear(x * 2, w + 1)  # other arrays, same signature
    assert P.PLANS.builds == n0
    gpufc.linear(x[:4], w)  # shape
    assert P.PLANS.builds == n0 + 1
    gpufc.linear(x.astype(np.float64), w.astype(np.float64))  # dtype
    assert P.PLANS.builds == n0 + 2
    gpufc.linear(x, w, config="v1_t16")  # configuration
    assert P.PLANS.builds == n0 + 3
    gpufc.linear(x, w, activation="relu")  # epilogue
    assert P.PLANS.builds == n0 + 4
    gpufc.linear(x, w, config="v1_t16")
    assert P.PLANS.builds == n0 + 4


@pytest.mark.reference
def test_plan_cache_is_a_bounded_lru():
    cache = P.PlanCache(capacity=3)
    built = []

    class Spec:  # a LaunchSpec with a stub kernel; the recorder builds and launches it
        def __init__(self, i):
            from gpufc.kernels.catalogue import KernelSpec, array

            self.kernel = KernelSpec(f"k{i}", None, "void()")
            self.grid, self.block = (1,), (32,)
            self.args = (array("a", (4,), np.float32),)

    from gpufc.runtime import launch

    previous = launch.use_launcher(launch.RecordingLauncher())
    try:
        for i in (1, 2, 3, 1, 4):  # 1 is used again before 4 arrives: 2 is the least recent
            cache.get((i, 0), lambda i=i: (built.append(i), Spec(i))[1])
        assert built == [1, 2, 3, 4] and len(cache) == 3
        assert (2, 0) not in cache and all((i, 0) in cache for i in (1, 3, 4))
    finally:
        launch.use_launcher(previous)


# ----------------------------------------------------------------------------
# The cuda path without a GPU: stand-in CuPy, recording launcher, a clean process
# ----------------------------------------------------------------------------

_HOST_PATH = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from gpufc.tools import hostpath
    rec = hostpath.install()
    import gpufc
    from gpufc.runtime import plan as P
    from gpufc.runtime.backend import kernels
    cp = sys.modules["cupy"]
    out = {}

    def params():
        return rec.last_launch()["params"]

    x, w, b = cp.empty((64, 48), np.float32), cp.empty((48, 40), np.float32), cp.empty((40,), np.float32)
    lin = kernels().linear
    n0 = rec.launches
    y = gpufc.linear(x, w, b)  # the default route: one pass, or split-K's two
    cfg_d, chunk_d, _ = lin.route(None, 64, 40, 48, np.float32, lin.epilogue.Epilogue(None, True), False, False, True)
    out["default_ok"] = (rec.launches - n0 == (1 if chunk_d is None else 2) and rec.last_launch()["kernel"].startswith(
        f"matmul/{cfg_d.name}/" if chunk_d is None else "splitk_reduce/float32/id+bias"))
    y = gpufc.linear(x, w, b, config="t32x32")  # version 2, one pass: the buffer's layout checked word by word
    import gc
    gc.collect()  # the plan's argument buffer must outlive everything but the plan (the driver reads it)
    out["type"] = type(y).__module__ + "." + type(y).__name__
    out["shape"] = list(y.shape)
    launch = rec.last_launch()
    cfg = lin.config_by_name("t32x32")
    out["kernel"] = launch["kernel"]
    out["cfg"] = cfg.name
    out["grid_ok"] = launch["grid"][:2] == cfg.grid(64, 40)
    p = params()
    # tiled kernel layout: a (7 words: meminfo, parent, nitems, itemsize, data, shape, strides), b (7), bias (7), y (9), z (9)
    out["ptrs_ok"] = [p[4], p[11], p[18], p[25]] == [x.data.ptr, w.data.ptr, b.data.ptr, y.data.ptr]
    out["k_ok"] = p[2] == 64 * 48 and p[3] == 4 and p[5] == 64 * 48

    c = "t32x32"  # one pass: one plan per signature
    builds = P.PLANS.builds
    gpufc.linear(cp.empty((64, 48), np.float32), w, b, config=c)
    out["reused"] = P.PLANS.builds == builds
    gpufc.linear(cp.empty((63, 48), np.float32), w, b, config=c)
    out["shape_rebuilds"] = P.PLANS.builds == builds + 1
    gpufc.linear(cp.empty((64, 48), np.float64), cp.empty((48, 40), np.float64), cp.empty((40,), np.float64), config=c)
    out["dtype_rebuilds"] = P.PLANS.builds == builds + 2
    gpufc.linear(x, w, b, stream=12345, config=c)
    out["stream_rebuilds"] = P.PLANS.builds == builds + 3
    out["stream_passed"] = rec.last_launch()["stream"] == 12345
    gpufc.linear(x, w, b, config="t64x64")
    out["config_rebuilds"] = P.PLANS.builds == builds + 4
    out["config_kernel"] = rec.last_launch()["kernel"]
    gpufc.linear(x, w, b, stream=12345, config=c)
    out["stream_reused"] = P.PLANS.builds == builds + 4

    # dropout: the words of the contract in the buffer
    d = gpufc.dropout(x, 0.25, seed=2**33 + 5, offset=8)
    q = params()
    out["dropout_kernel"] = rec.last_launch()["kernel"]
    out["dropout_words"] = q[-5:-1] == [5, 2, 8, int(0.25 * 2**32)]
    out["dropout_scale"] = abs(q[-1] - 1 / 0.75) < 1e-6

    layer = gpufc.FullyConnectedLayer(48, 40, activation="relu", dropout_rate=0.5, seed=3).to("cuda")
    n = rec.launches
    layer.forward(x)
    per_call = rec.launches - n
    layer.forward(x)
    out["layer_launches"] = (per_call, rec.launches - n)
    out["layer_offset_advanced"] = params()[-3] == 64 * 40
    print(json.dumps(out))
    """
)


@pytest.mark.kernels
def test_cuda_path_without_a_gpu_launches_what_the_kernels_need():
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPUFC_BACKEND")}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "-c", _HOST_PATH], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["type"] == "cupy.FakeArray" and r["shape"] == [64, 40]
    assert r["default_ok"]
    assert r["kernel"] == f"matmul/{r['cfg']}/float32/NN/id+bias" and r["grid_ok"]
    assert r["ptrs_ok"] and r["k_ok"]
    for what in ("reused", "shape_rebuilds", "dtype_rebuilds", "stream_rebuilds", "stream_passed", "config_rebuilds",
                 "stream_reused", "dropout_words", "dropout_scale", "layer_offset_advanced"):
        assert r[what], what
    assert r["config_kernel"].startswith("matmul/t64x64/")
    assert r["dropout_kernel"] == "dropout/v2_vec16/float32"
    per_call, two_calls = r["layer_launches"]
    assert per_call in (1, 2) and two_calls == 2 * per_call  # one pass, or split-K's two launches


@pytest.mark.reference
def test_host_path_benchmark_says_what_it_stubs():
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPUFC_BACKEND")}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "host_path.py"), "--calls", "200", "--repeats", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ONLY the driver launch (cuLaunchKernel)" in run.stdout and "not measured on a GPU" in run.stdout
    assert run.stdout.count(" -> ") == 3 and "CPU us/call" in run.stdout
