"""Split-K matmul with a deterministic reduction, for small and skinny shapes.

Math: ``y (M, N) = epilogue(sum_z P_z)``, ``P_z = op(a)[:, K_z] @ op(b)[K_z, :]``, where the
K range is cut into chunks ``K_z = [z * chunk, min((z + 1) * chunk, K))``,
``z = 0 .. splits - 1``, ``splits = ceil(K / chunk)``.

Why: a (64, 512) @ (512, 512) product has 16 tiles of 128 x 128 (4 x 4 grid
of t128x128, 16 x 16 of t32x32), far fewer than an H200's 132 SMs; cutting
K gives ``splits`` times the blocks, each with ``chunk`` of the K work.

Two kernels:

1. the version-3 main loop (:mod:`kernels.linear.v3_pipelined`, ``split=True``)
   with ``blockIdx.z = z``: the block tile's partial sum over chunk z into the
   workspace ``ws[z]`` (float, (splits, M, N)), no epilogue;
2. :func:`reduce_source`: one thread per run of 4 consecutive outputs of a row
   sums ``ws[0] + ws[1] + ... + ws[splits - 1]`` in that order and applies the
   epilogue once, through :func:`kernels.epilogue.make_group_store` (bias,
   activation, dropout, pre-activation: the mask contract is unchanged).

Determinism: the bits of ``y`` depend on the inputs and ``chunk`` only, not on
the launch geometry. Every partial ``P_z[i, j]`` is a chain of fused
multiply-adds in ascending k from +0, whatever the tile configuration (block
or thread tile, K step: the version-3 loop's order); the reduction adds the
splits in index order in one thread, whatever the reduction's block size. With
``chunk >= K`` (one split) the result equals the unsplit version-3 kernel bit
for bit. ``chunk`` is data chosen by the caller from the shape (``choose_chunk``),
never from the grid or the device.

Cost: the workspace is written and read once: ``2 splits M N`` extra element
moves, against ``M N K`` FMA; worth it while ``splits`` is small against K / 64.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import cuda, uint64

from .epilogue import PLAIN, Epilogue, make_group_store

CHUNK_QUANTUM = 256  # chunks are multiples of this many k (whole K slices of every config)
REDUCE_THREADS = 256  # threads per block of the reduction
SPLIT_K_CONFIGS = ("v3_t32x32", "v3_t64x64")  # the version-3 tiles the default table may split


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def splits_for(k: int, chunk: int) -> int:
    """The number of K chunks (at least 1, also for K = 0)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of k, got chunk={chunk}")
    return max(1, ceil_div(k, chunk))


def choose_chunk(m: int, n: int, k: int, tiles: int, sms: int) -> int | None:
    """The K chunk for an ``(M, K) @ (K, N)`` product whose grid has ``tiles`` blocks on a
    device of ``sms`` SMs, or None when splitting does not pay.

    Split only when the grid leaves more than half the SMs idle and K is long
    enough for at least two chunks of :data:`CHUNK_QUANTUM`; aim at about one
    wave (``sms`` blocks), never below one quantum per split. The chunk is a
    multiple of the quantum, so the partition of K (and the bits) changes only
    with the shape and this rule, not with the launch geometry.
    """
    if tiles * 2 > sms or k < 2 * CHUNK_QUANTUM:
        return None
    want = max(2, min(sms // max(tiles, 1), k // CHUNK_QUANTUM))
    return ceil_div(ceil_div(k, want), CHUNK_QUANTUM) * CHUNK_QUANTUM


def reduce_source(dtype, ep: Epilogue):
    """The reduction kernel: ``y = epilogue(ws[0] + ws[1] + ... )``, splits added in index order.

    ``ws`` is (splits, M, N); ``y`` and ``zout`` are (M, N); ``bias`` (N). Thread ``e`` of the
    grid-stride loop owns row ``e // runs``, columns ``4 (e % runs) .. + 3`` (``runs = ceil(N / 4)``);
    columns past N read the last column (never stored).
    """
    store = make_group_store(ep, np.dtype(dtype).type)
    one, two, three, four = uint64(1), uint64(2), uint64(3), uint64(4)

    def splitk_reduce(ws, bias, y, zout, k0, k1, offset, threshold, scale):
        splits = uint64(ws.shape[0])
        m = uint64(y.shape[0])
        n = uint64(y.shape[1])
        runs = (n + three) // four
        start = uint64(cuda.grid(1))
        stride = uint64(cuda.gridsize(1))
        last = n - one
        for e in range(start, m * runs, stride):
            r = e // runs
            c = (e % runs) * four
            c1 = min(c + one, last)
            c2 = min(c + two, last)
            c3 = min(c + three, last)
            v0 = ws[0, r, c]
            v1 = ws[0, r, c1]
            v2 = ws[0, r, c2]
            v3 = ws[0, r, c3]
            for z in range(one, splits):
                v0 += ws[z, r, c]
                v1 += ws[z, r, c1]
                v2 += ws[z, r, c2]
                v3 += ws[z, r, c3]
            store(y, zout, bias, r, c, v0, v1, v2, v3, n, k0, k1, offset, threshold, scale)

    return splitk_reduce


def reduce_signature(dtype) -> str:
    """(ws, bias, y, zout, k0, k1, offset, threshold, scale)"""
    t = numba.from_dtype(np.dtype(dtype))
    return f"void({t}[:, :, ::1], {t}[::1], {t}[:, ::1], {t}[:, ::1], uint32, uint32, uint64, uint64, {t})"


def partial_signature(dtype) -> str:
    """(a, b, ws, K, chunk): flat operands, the (splits, M, N) workspace."""
    t = numba.from_dtype(np.dtype(dtype))
    return f"void({t}[::1], {t}[::1], {t}[:, :, ::1], uint64, uint64)"


@functools.cache
def make_reduce_kernel(dtype, ep: Epilogue = PLAIN):
    return cuda.jit(reduce_signature(dtype))(reduce_source(np.dtype(dtype).type, ep))


def reduce_grid(m: int, n: int, threads: int = REDUCE_THREADS, sms: int = 132) -> int:
    """Blocks of the reduction: enough for every run of 4, at most 8 waves of ``sms`` blocks
    (the grid-stride loop covers the rest; the bits do not depend on it)."""
    return max(1, min(ceil_div(m * ceil_div(n, 4), threads), 8 * sms))


__all__ = ["CHUNK_QUANTUM", "SPLIT_K_CONFIGS", "choose_chunk", "make_reduce_kernel", "partial_signature", "reduce_grid",
           "reduce_signature", "reduce_source", "splits_for"]
