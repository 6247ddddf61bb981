"""kernels.launch: the fast launch path flattens arguments exactly as Numba does.

The flattening is compared, without a GPU, against numba-cuda's own
``_Kernel._prepare_args`` on Numba device arrays whose data pointer is a stub
(a subprocess without the simulator). The GPU tier launches real kernels
through both paths and compares the outputs bit for bit.
"""

import textwrap

import numpy as np
import pytest
from conftest import ON_GPU, requires_gpu
from helpers import run_clean_python

_PACKER_SCRIPT = textwrap.dedent(
    """
    import ctypes
    import numpy as np
    from numba.cuda.core import sigutils
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    from numba.cuda.dispatcher import _Kernel
    from gpufc.runtime import backend
    backend.kernels()  # registers gpufc.kernels (also when run from a source tree)
    from gpufc.runtime import launch
    from gpufc.kernels.dropout import _MASK_SIG, _act_bwd_sig, _flat_sig
    from gpufc.kernels.linear import _bias_grad_sig, signature
    from gpufc.kernels.linear.v2_register_tiled import signature as tiled_signature

    class Data:  # stands in for device memory: Numba's path reads only its pointer
        def __init__(self, ptr):
            self.device_ctypes_pointer = ctypes.c_void_p(ptr)

    def dev(shape, dtype, ptr=4096, strides=None):
        dtype = np.dtype(dtype)
        if strides is None:
            strides = np.empty(shape, dtype).strides
        return DeviceNDArray(shape, strides, dtype, gpu_data=Data(ptr))

    def norm(seq):
        return [(type(v).__name__, v.value) if isinstance(v, ctypes._SimpleCData) else (type(v).__name__, v)
                for v in seq]

    class NumbaSelf:
        extensions = []

    def numba_args(types, args):
        out = []
        for t, v in zip(types, args):
            _Kernel._prepare_args(NumbaSelf(), t, v, 0, [], out)
        return out

    def check(sig, args):
        types, _ = sigutils.normalize_signature(sig)
        pack = launch.make_packer(types)
        assert pack is not None, sig
        got, want = pack(args), numba_args(types, args)
        assert norm(got) == norm(want), (sig, norm(got), norm(want))

    def tail(dt):
        return (np.uint32(0x12345678), np.uint32(0xFFFFFFFF), np.uint64(2**63 + 5), np.uint64(2**40), dt(1.25))

    n = 0
    for dt in (np.float32, np.float64):
        check(signature(dt), (dev((5, 7), dt, 256), dev((7, 3), dt, 512), dev((3,), dt, 768),
                              dev((5, 3), dt, 1024), dev((5, 3), dt, 1024)) + tail(dt))
        check(tiled_signature(dt), (dev((35,), dt, 256), dev((21,), dt, 512), dev((1,), dt, 768),
                                    dev((5, 3), dt, 1024), dev((5, 3), dt, 2048), np.uint64(7)) + tail(dt))
        check(_flat_sig(dt), (dev((1000,), dt, 256), dev((1000,), dt, 8192)) + tail(dt))
        check(_act_bwd_sig(dt), (dev((9,), dt, 16), dev((9,), dt, 32), dev((9,), dt, 48)) + tail(dt))
        check(_bias_grad_sig(dt), (dev((64, 512), dt, 256), dev((512,), dt, 2**40)))
        n += 5
    check(_MASK_SIG, (dev((13,), np.uint8), np.int64(100), np.uint32(1), np.uint32(2), np.uint64(3), np.uint64(4)))
    check("void(float32[:, :], int8, int16, uint16, int32, boolean, float64, float32)",
          (dev((4, 6), np.float32, strides=(48, 8)), np.int8(-3), np.int16(-300), np.uint16(65535), np.int32(-7),
           True, 0.1, 0.1))
    check("void(float64[:, ::1], int64, uint64)", (dev((3, 4), np.float64), 5, 2**64 - 1))  # Python ints
    n += 3

    # arguments the packer does not take as is: that call goes through Numba's path
    types, _ = sigutils.normalize_signature(_bias_grad_sig(np.float32))
    pack = launch.make_packer(types)
    bad = [(dev((4, 6), np.float64), dev((6,), np.float32)),                 # dtype
           (dev((24,), np.float32), dev((6,), np.float32)),                  # rank
           (dev((4, 6), np.float32),)]                                       # count
    for args in bad:
        try:
            pack(args)
        except launch._Mismatch:
            n += 1
        else:
            raise AssertionError(f"packed a mismatched argument list: {norm(pack(args))}")
    # a strided array for a C-order slot is an error, never passed on
    try:
        pack((dev((4, 6), np.float32, strides=(48, 8)), dev((6,), np.float32)))
    except launch.LayoutError as err:
        assert "C order" in str(err)
        n += 1
    # a size-1 dimension's stride does not matter (Numba's own contiguity rule)
    pack((dev((1, 6), np.float32, strides=(96, 4)), dev((6,), np.float32)))
    # types the packer leaves to Numba
    for sig in ("void(complex64)", "void(float32[::1, :])", "void(float16)", "void(UniTuple(int32, 2))"):
        assert launch.make_packer(sigutils.normalize_signature(sig)[0]) is None, sig
    print("OK", n)
    """
)


@pytest.mark.compile
def test_packer_matches_numba_prepare_args():
    out = run_clean_python(_PACKER_SCRIPT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK 17" in out.stdout, out.stdout


@pytest.mark.compile
def test_env_switch_forces_numba_path():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env.update(GPUFC_FAST_LAUNCH="0", GPUFC_BACKEND="cpu")
    code = "from gpufc.runtime import backend; backend.kernels(); from gpufc.runtime import launch; print(launch._FAST)"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


@pytest.mark.kernels
@pytest.mark.skipif(ON_GPU, reason="the simulator's fallback")
def test_simulator_uses_numba_path(device_backend):
    from numba import cuda

    from gpufc.runtime import backend

    backend.kernels()
    from gpufc.runtime import launch
    from gpufc.kernels.dropout import make_dropout_mask_kernel

    kern = make_dropout_mask_kernel()
    args = (np.int64(20), np.uint32(1), np.uint32(2), np.uint64(0), np.uint64(2**31))
    mask, want = cuda.device_array(3, np.uint8), cuda.device_array(3, np.uint8)
    fk = launch.FastKernel(kern)
    fk(1, 32, 0, mask, *args)
    kern[1, 32, 0](want, *args)
    assert fk.fast is False
    np.testing.assert_array_equal(mask.copy_to_host(), want.copy_to_host())


# ---------------------------------------------------------------------------- GPU tier


def _bits(a):
    h = a.copy_to_host()
    return h.view(np.dtype(f"u{h.dtype.itemsize}"))


def _both_paths(kern, grid, block, make_args, out_index):
    """Launch once through FastKernel and once through Numba's own launch; outputs as bits."""
    from numba import cuda

    from gpufc.runtime import backend

    backend.kernels()
    from gpufc.runtime import launch

    fk = launch.FastKernel(kern)
    a1, a2 = make_args(), make_args()
    fk(grid, block, 0, *a1)
    kern[grid, block, 0](*a2)
    cuda.synchronize()
    assert fk.fast is True
    return _bits(a1[out_index]), _bits(a2[out_index])


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_fast_path_matches_numba_launch(dtype, device_backend, rng):
    from gpufc.kernels.dropout import THREADS, make_dropout_kernel, make_dropout_mask_kernel
    from gpufc.kernels.linear import make_bias_grad_kernel, make_matmul_kernel, resolve_config
    from numba import cuda

    n = 4099
    x = rng.standard_normal(n).astype(dtype)
    tail = (np.uint32(7), np.uint32(11), np.uint64(4), np.uint64(2**31), dtype(2.0))
    kern = make_dropout_kernel(dtype, 2, True)
    fast_bits, numba_bits = _both_paths(
        kern, 8, THREADS, lambda: (cuda.to_device(x), cuda.to_device(x), cuda.device_array(n, dtype)) + tail, 2)
    np.testing.assert_array_equal(fast_bits, numba_bits)

    m, k, nn = 70, 33, 65
    a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, nn)).astype(dtype)
    bias = rng.standard_normal(nn).astype(dtype)
    cfg = resolve_config(None, m, nn, k, np.dtype(dtype))
    mm = make_matmul_kernel(cfg, dtype)

    def mm_args():
        y = cuda.device_array((m, nn), dtype)
        return (cuda.to_device(a.reshape(-1)), cuda.to_device(b.reshape(-1)), cuda.to_device(bias), y, y,
                np.uint64(k), np.uint32(0), np.uint32(0), np.uint64(0), np.uint64(0), dtype(0))

    fast_bits, numba_bits = _both_paths(mm, cfg.grid(m, nn), cfg.block(), mm_args, 3)
    np.testing.assert_array_equal(fast_bits, numba_bits)
    np.testing.assert_allclose(fast_bits.view(dtype), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)

    g = rng.standard_normal((37, nn)).astype(dtype)
    bg = make_bias_grad_kernel(dtype, 2)
    fast_bits, numba_bits = _both_paths(bg, 3, 256, lambda: (cuda.to_device(g), cuda.device_array(nn, dtype)), 1)
    np.testing.assert_array_equal(fast_bits, numba_bits)

    mk = make_dropout_mask_kernel()
    fast_bits, numba_bits = _both_paths(
        mk, 2, THREADS,
        lambda: (cuda.device_array(513, np.uint8), np.int64(4100), np.uint32(3), np.uint32(5), np.uint64(6),
                 np.uint64(2**30)), 0)
    np.testing.assert_array_equal(fast_bits, numba_bits)


@pytest.mark.gpu
@requires_gpu
def test_gpu_launchers_take_fast_path_and_refuse_strided_operands(device_backend, rng):
    from numba import cuda

    from gpufc.runtime import backend

    backend.kernels()
    from gpufc.runtime import launch
    from gpufc.kernels.dropout import launch_dropout, make_dropout_kernel
    from gpufc.kernels.linear import _bias_grad_sig, make_bias_grad_kernel

    x = cuda.to_device(rng.standard_normal(1024).astype(np.float32))
    y = cuda.device_array(1024, np.float32)
    launch_dropout(x, y, key=(1, 2), offset=0, threshold=2**31, scale=2.0, version=2, vector=True)
    cuda.synchronize()
    assert launch.fast(make_dropout_kernel(np.float32, 2, True)).fast is True

    # a strided operand for a C-order slot is refused by gpufc (Numba would launch it as contiguous)
    assert "[:, ::1]" in _bias_grad_sig(np.float32)
    g = cuda.to_device(rng.standard_normal((8, 64)).astype(np.float32))[:, ::2]
    with pytest.raises(launch.LayoutError, match="C order"):
        launch.fast(make_bias_grad_kernel(np.float32, 2))(1, 256, 0, g, cuda.device_array(32, np.float32))
