"""Version 1 of the matmul: the textbook shared-memory tiling, kept forever as the baseline.

A block of T x T threads owns a T x T tile of the output, one element per
thread; it walks K in steps of T, staging a T x T tile of each operand in
shared memory (``2 T^2 itemsize`` bytes: 2 KiB for float32 at T = 16). Each
fused multiply-add costs two shared loads, so it is bound by shared-memory
bandwidth at a small fraction of peak: every later version is measured
against it.

Grid: blockIdx.x walks the row tiles (limit 2**31 - 1, so M has no practical
limit), blockIdx.y the column tiles (65535 * T columns). Its configuration is
:data:`.configs.V1`.
"""

import numba
import numpy as np
from numba import cuda

from .configs import V1Config
from .epilogue import Epilogue, make_epilogue


def signature(dtype, trans_a=False, trans_b=False) -> str:
    """The one launch signature every matmul version shares (C-contiguous operands).

    (a, b, bias, y, zout, k0, k1, offset, threshold, scale)
    """
    t = numba.from_dtype(np.dtype(dtype))
    return (
        f"void({t}[:, ::1], {t}[:, ::1], {t}[::1], {t}[:, ::1], {t}[:, ::1], "
        f"uint32, uint32, uint64, uint64, {t})"
    )


def _v1_source(cfg: V1Config, dtype, trans_a: bool, trans_b: bool, ep: Epilogue):
    """The Python function of a version-1 kernel (not yet compiled)."""
    T = cfg.tile
    nbtype = numba.from_dtype(np.dtype(dtype))
    zero = np.dtype(dtype).type(0)
    store = make_epilogue(ep, dtype)

    def matmul_v1(a, b, bias, y, zout, k0, k1, offset, threshold, scale):
        # a is (M, K) ((K, M) if trans_a), b is (K, N) ((N, K) if trans_b), y and zout (M, N)
        m, n = y.shape
        k = a.shape[0] if trans_a else a.shape[1]
        a_tile = cuda.shared.array((T, T), nbtype)
        b_tile = cuda.shared.array((T, T), nbtype)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        row = cuda.blockIdx.x * T + ty
        col = cuda.blockIdx.y * T + tx
        acc = zero
        for k0_tile in range(0, k, T):
            # Populate the shared tiles; out-of-range elements are zeros so the
            # inner loop needs no bounds checks. tx runs along rows in memory
            # for the untransposed operands, so those loads coalesce.
            ka = k0_tile + tx
            if row < m and ka < k:
                a_tile[ty, tx] = a[ka, row] if trans_a else a[row, ka]
            else:
                a_tile[ty, tx] = zero
            kb = k0_tile + ty
            if kb < k and col < n:
                b_tile[ty, tx] = b[col, kb] if trans_b else b[kb, col]
            else:
                b_tile[ty, tx] = zero
            # Both tiles must be complete before any thread reads them.
            cuda.syncthreads()
            for kk in range(T):
                acc += a_tile[ty, kk] * b_tile[kk, tx]
            # Every thread must be done reading before the next step overwrites the tiles.
            cuda.syncthreads()
        if row < m and col < n:
            store(y, zout, bias, row, col, acc, n, k0, k1, offset, threshold, scale)

    return matmul_v1
