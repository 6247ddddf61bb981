"""Column sums for the bias gradient: ``out (N,) = g (M, N).sum(0)``.

``bias_grad_v1`` (one thread per column, the baseline) and ``bias_grad_v2``
(32 columns x 8 row lanes per block, four independent sums per thread, a
shared-memory reduction; deterministic).
"""

import functools

import numba
import numpy as np
from numba import cuda, uint32, uint64

from gpufc.runtime import launch as _launch
from gpufc.runtime import plan as _plan

from ..catalogue import KernelSpec, LaunchSpec, array
from .configs import ceil_div


def bias_grad_v1_source(dtype):
    zero = np.dtype(dtype).type(0)

    def bias_grad_v1(g, out):
        # g is (M, N), out is (N,): out[j] = sum_i g[i, j]. One thread per column;
        # consecutive threads read consecutive columns of a row, so loads coalesce.
        j = cuda.grid(1)
        if j < out.size:
            acc = zero
            for i in range(g.shape[0]):
                acc += g[i, j]
            out[j] = acc

    return bias_grad_v1


def _bias_grad_sig(dtype) -> str:
    t = numba.from_dtype(np.dtype(dtype))
    return f"void({t}[:, ::1], {t}[::1])"


BIAS_COLS = 32  # columns per block: a warp reads 32 consecutive elements of a row
BIAS_LANES = 8  # row lanes per block: 256 threads; lane l sums rows l, l + 8, ...
BIAS_UNROLL = 4  # independent partial sums per thread, so 4 loads are in flight


def bias_grad_v2_source(dtype):
    nbtype = numba.from_dtype(np.dtype(dtype))
    zero = np.dtype(dtype).type(0)
    cols, lanes = np.uint64(BIAS_COLS), np.uint64(BIAS_LANES)
    step = np.uint64(BIAS_LANES * BIAS_UNROLL)
    two, three = np.uint64(2), np.uint64(3)

    def bias_grad_v2(g, out):
        # g is (M, N), out is (N,): out[j] = sum_i g[i, j]. Block: BIAS_COLS columns x
        # BIAS_LANES row lanes; a warp reads 32 consecutive columns of one row.
        partial = cuda.shared.array((BIAS_LANES, BIAS_COLS), nbtype)
        c = uint64(uint32(cuda.threadIdx.x)) % cols
        lane = uint64(uint32(cuda.threadIdx.x)) // cols
        j = uint64(uint32(cuda.blockIdx.x)) * cols + c
        m = uint64(g.shape[0])
        n = uint64(g.shape[1])
        s0 = s1 = s2 = s3 = zero
        if j < n:
            i = lane
            while i + three * lanes < m:
                s0 += g[i, j]
                s1 += g[i + lanes, j]
                s2 += g[i + two * lanes, j]
                s3 += g[i + three * lanes, j]
                i += step
            while i < m:
                s0 += g[i, j]
                i += lanes
        partial[lane, c] = (s0 + s1) + (s2 + s3)
        # Every lane's partial sum must be in shared memory before lane 0 adds them.
        cuda.syncthreads()
        if lane == uint64(0) and j < n:
            acc = zero
            for r in range(BIAS_LANES):
                acc += partial[r, c]
            out[j] = acc

    return bias_grad_v2


@functools.cache
def make_bias_grad_kernel(dtype, version=2):
    src = bias_grad_v2_source if version == 2 else bias_grad_v1_source
    return cuda.jit(_bias_grad_sig(dtype))(src(np.dtype(dtype).type))


BIAS_GRAD_THREADS = 128  # v1


@functools.cache
def bias_grad_spec(dtype, version=2) -> KernelSpec:
    dtype = np.dtype(dtype)
    src = bias_grad_v2_source if version == 2 else bias_grad_v1_source
    return KernelSpec(f"bias_grad/v{version}/{dtype.name}", src(dtype.type), _bias_grad_sig(dtype),
                      threads=BIAS_COLS * BIAS_LANES if version == 2 else BIAS_GRAD_THREADS)


def bias_grad_launch(m: int, n: int, dtype, version=2) -> LaunchSpec:
    """The launch of ``out (N,) = g (M, N).sum(0)``, N > 0; per-call values: g, out."""
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got version={version!r}")
    args = (array("g", (m, n), dtype), array("out", (n,), dtype))
    if version == 1:
        return LaunchSpec(bias_grad_spec(dtype, 1), (ceil_div(n, BIAS_GRAD_THREADS),), (BIAS_GRAD_THREADS,), args)
    return LaunchSpec(bias_grad_spec(dtype, 2), (ceil_div(n, BIAS_COLS),), (BIAS_COLS * BIAS_LANES,), args)


def bias_grad_plan(m: int, n: int, dtype, version=2, device=0, stream=0):
    return _plan.get(("bias_grad", m, n, dtype, version, device, stream), bias_grad_launch, m, n, dtype, version)


def launch_bias_grad(g, out, *, stream=0, version=2):
    """``out (N,) = g (M, N).sum(0)`` on device arrays, N > 0 (M may be 0: the sum is then 0).
    ``version=1`` runs the baseline."""
    ln = _launch.launcher()
    m, n = g.shape
    bias_grad_plan(m, n, np.dtype(g.dtype), version, 0, ln.stream(stream))(ln.arg(g), ln.arg(out))
