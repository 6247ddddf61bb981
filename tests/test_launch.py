"""gpufc.runtime.launch: the argument buffer a plan hands the CUDA driver is what the kernel takes.

Without a GPU, two checks hold the driver launcher's layout (``launch.flatten``)
to what numba-cuda does: against numba-cuda's own ``_Kernel._prepare_args`` on
Numba device arrays whose data pointer is a stub, and against the parameter
list of the compiled PTX (count and size of every ``.param``), for every kind
of launch the ops build. The GPU tier launches real kernels through the driver
launcher and through Numba's own launch and compares the outputs bit for bit.
"""

import textwrap

import numpy as np
import pytest
from conftest import ON_GPU, requires_gpu
from helpers import run_clean_python

from gpufc.runtime import launch

# Launch specs of every kind the ops build, at small odd shapes: (expression, per-call array shapes are the specs').
_LAUNCHES = """
lin, kd = kernels().linear, kernels().dropout
Ep = lin.epilogue.Epilogue
cfg = lin.config_by_name
launches = [
    lin.matmul_launch(5, 3, 7, np.float32, cfg=cfg("t32x32")),
    lin.matmul_launch(5, 3, 7, np.float64, False, True, Ep(None, True, True, True), cfg=cfg("t32x32")),
    lin.matmul_launch(5, 3, 7, np.float32, True, False, cfg=cfg("v1_t16")),
    lin.matmul_launch(5, 3, 7, np.float32, ep=Ep("relu", True, True, False), cfg=cfg("v3_t32x32"), vec=False),
    lin.partial_launch(5, 3, 512, np.float32, False, False, cfg("v3_t32x32"), False, 256),
    lin.reduce_launch(5, 3, np.float32, Ep("relu", True, True, False), 2),
    lin.bias_grad_launch(6, 9, np.float32, 1),
    lin.bias_grad_launch(6, 9, np.float64, 2),
    kd.dropout_launch(1000, np.float32, 1),
    kd.dropout_launch(1000, np.float64, 2, True),
    kd.act_dropout_backward_launch(77, np.float32, "tanh", True, True),
    kd.act_dropout_backward_launch(77, np.float64, "relu", False, False),
    kd.mask_launch(100),
]
"""

_PREPARE_ARGS = textwrap.dedent(
    """
    import ctypes
    import numpy as np
    from numba.cuda.core import sigutils
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    from numba.cuda.dispatcher import _Kernel
    from gpufc.runtime.backend import kernels
    from gpufc.runtime import launch
    """) + _LAUNCHES + textwrap.dedent("""
    class Data:  # stands in for device memory: Numba's path reads only its pointer
        def __init__(self, ptr):
            self.device_ctypes_pointer = ctypes.c_void_p(ptr)

    class NumbaSelf:
        extensions = []

    def norm(seq):
        return [(type(v).__name__, v.value) if isinstance(v, ctypes._SimpleCData) else ("int", int(v)) for v in seq]

    n = 0
    for ls in launches:
        types, _ = sigutils.normalize_signature(ls.kernel.signature)
        values, numba_args, ptr = [], [], 4096
        for a, t in zip(ls.args, types):
            if a.shape is not None:
                arr = DeviceNDArray(a.shape, np.empty(a.shape, a.dtype).strides, a.dtype, gpu_data=Data(ptr))
                values.append(ptr)
                numba_args.append(arr)
                ptr += 4096
            else:
                v = a.value if a.value is not None else {"float32": 1.25, "float64": 0.1}.get(a.dtype.name, 2**31 + 7)
                if a.value is None:
                    values.append(v)
                numba_args.append(np.dtype(a.dtype).type(v))
        want = []
        for t, v in zip(types, numba_args):
            _Kernel._prepare_args(NumbaSelf(), t, v, 0, [], want)
        got = [ctype(v) for ctype, v in launch.flatten(ls.args, values)]
        # Numba passes array words as Python ints (8 bytes each in cuda.core); the driver buffer holds c_uint64
        got_n = [("int", x[1]) if x[0] == "c_ulong" else x for x in norm(got)]
        want_n = [("int", x[1]) if x[0] == "c_ulong" else x for x in norm(want)]
        assert got_n == want_n, (ls.kernel.name, got_n, want_n)
        n += 1
    print("OK", n)
    """
)

_PTX_PARAMS = textwrap.dedent(
    """
    import ctypes, re
    import numpy as np
    from numba import cuda
    from gpufc.runtime.backend import kernels
    from gpufc.runtime import launch
    """) + _LAUNCHES + textwrap.dedent("""
    SIZES = {"u64": 8, "b64": 8, "s64": 8, "f64": 8, "u32": 4, "b32": 4, "s32": 4, "f32": 4, "u8": 1, "b8": 1}
    n = 0
    for ls in launches:
        s = ls.kernel
        ptx, _ = cuda.compile_ptx(s.pyfunc, s.signature, cc=(8, 0), launch_bounds=s.launch_bounds)
        entry = ptx[ptx.index(".entry"):]
        params = re.findall(r"\\.param\\s+\\.(\\w+)\\s", entry[: entry.index(")")])
        got = [ctypes.sizeof(ctype) for ctype, _ in launch.flatten(ls.args, [0] * len(ls.args))]
        assert [SIZES[p] for p in params] == got, (s.name, params, got)
        n += 1
    print("OK", n)
    """
)


@pytest.mark.compile
def test_driver_buffer_matches_numba_prepare_args():
    out = run_clean_python(_PREPARE_ARGS, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK 13" in out.stdout, out.stdout


@pytest.mark.compile
def test_driver_buffer_matches_the_ptx_parameter_list():
    out = run_clean_python(_PTX_PARAMS, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK 13" in out.stdout, out.stdout


@pytest.mark.reference
def test_array_words_are_c_order():
    assert launch.array_words((3, 5), np.float32, 4096) == [0, 0, 15, 4, 4096, 3, 5, 20, 4]
    assert launch.array_words((7,), np.float64) == [0, 0, 7, 8, 0, 7, 8]


class _Cai:
    def __init__(self, shape, strides, typestr="<f4", ptr=4096):
        self.__cuda_array_interface__ = {"shape": shape, "strides": strides, "typestr": typestr,
                                         "data": (ptr, False), "version": 3}


@pytest.mark.reference
def test_a_strided_operand_is_refused_never_launched():
    assert launch.device_pointer(_Cai((4, 6), None)) == 4096
    assert launch.device_pointer(_Cai((4, 6), (24, 4))) == 4096  # C order spelled out
    assert launch.device_pointer(_Cai((1, 6), (96, 4))) == 4096  # a size-1 dimension's stride does not matter
    with pytest.raises(launch.LayoutError, match="C order"):
        launch.device_pointer(_Cai((4, 6), (48, 8)))


@pytest.mark.kernels
@pytest.mark.skipif(ON_GPU, reason="the simulator's launcher")
def test_simulator_plans_launch_through_numba(device_backend):
    from gpufc.runtime import plan
    from gpufc.runtime.backend import kernels

    assert isinstance(launch.launcher(), launch.SimLauncher)
    kd = kernels().dropout
    p = kd.mask_plan(20000)
    assert isinstance(p, plan.Plan) and p.grid == (2, 1, 1)  # the simulator's small one-wave grid
    assert launch.launcher().load(p.spec.kernel) is launch.launcher().load(kd.mask_spec())


# ---------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_driver_launches_match_numba_launches(dtype, device_backend, rng):
    """The same plans through the driver launcher and through Numba's: identical bits."""
    import gpufc
    from gpufc.runtime import plan

    x = rng.standard_normal((70, 33)).astype(dtype)
    w = rng.standard_normal((33, 65)).astype(dtype)
    b = rng.standard_normal(65).astype(dtype)
    g = rng.standard_normal((70, 65)).astype(dtype)

    def run():
        y = gpufc.linear(x, w, b, activation="gelu", dropout_p=0.3, seed=5, offset=4)
        grads = gpufc.linear_backward(x, w, g, biases=b, activation="gelu", dropout_p=0.3, seed=5, offset=4)
        d = gpufc.dropout(g, 0.4, seed=3, offset=1)
        m = gpufc.dropout_mask(g.shape, 0.4, seed=3, offset=1)
        return [y, *grads, d, m]

    assert isinstance(launch.launcher(), launch.DriverLauncher)
    driver = run()
    previous = launch.use_launcher(launch.NumbaLauncher())
    try:
        numba_out = run()
    finally:
        launch.use_launcher(previous)
        plan.PLANS.clear()
    for a, b_ in zip(driver, numba_out):
        np.testing.assert_array_equal(a, b_)


@pytest.mark.gpu
@requires_gpu
def test_gpu_kernel_level_launcher_refuses_strided_operands(device_backend, rng):
    from numba import cuda

    from gpufc.runtime.backend import kernels

    g = cuda.to_device(rng.standard_normal((8, 64)).astype(np.float32))[:, ::2]
    with pytest.raises(launch.LayoutError, match="C order"):
        kernels().linear.launch_bias_grad(g, cuda.device_array(32, np.float32))
