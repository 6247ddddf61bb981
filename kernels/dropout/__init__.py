"""Scale-and-mask dropout, forward and backward, with a counter-based Philox RNG.

Math (the dropout mask contract, docs/architecture.md), for a flat view of the tensor::

    y[e] = x[e] * scale   if philox_word(offset + e) >= threshold
    y[e] = 0              otherwise

``x (n,) -> y (n,)``; the backward is the same kernel applied to the incoming
gradient (the mask is regenerated from ``(seed, offset)``, never stored). The
fully connected backward's elementwise stage, ``g = dropout'(grad) * act'(z)``,
is the fused kernel ``act_dropout_backward``. ``dropout_mask`` writes the keep
mask packed 1 bit per element for users who want to see it.

Bytes moved: ``2 n itemsize`` (read x, write y; ``3 n itemsize`` for the fused
backward, which also reads z). Compute: one 10-round Philox block (20 32x32
multiplies) per 4 elements. Dropout is memory-bound once the RNG is drawn once
per 4 elements; the target is the device-to-device copy bandwidth.

Versions (kept side by side; ``launch_dropout(..., version=1)`` forces v1):

- ``v1``: one thread per element in a grid-stride loop, one Philox block per
  element (four times the RNG work needed). Simple, correct for any offset,
  the baseline.
- ``v2``: one Philox block per *group* of 4 elements. Group ``j`` is the 4
  absolute indices ``n = 4 (base + j) + lane`` (``base = offset // 4``), so
  element ``e = 4 j + lane - offset % 4`` reads word ``lane`` of block
  ``base + j``: exactly the contract's word ``n % 4`` of block ``n // 4``, for
  any offset. A 64-bit grid-stride loop hands each thread 2 groups per trip
  (1 with a transcendental activation derivative, see :func:`unroll_for`);
  both groups' loads are issued before either store (a load may not move
  above a store to y, which may alias x). Groups cut by the tensor's ends (the
  first when ``offset % 4 != 0``, the last when ``(n + offset % 4) % 4 != 0``)
  take a guarded path. The ``vec16`` specialisation moves a group with 16-byte
  accesses (PTX ``ld.global.v4.f32`` / ``v2.f64``, SASS ``LDG.E.128`` /
  ``STG.E.128``); it needs ``offset % 4 == 0`` and 16-byte aligned arrays,
  which the launcher checks, else it runs the ``scalar`` specialisation
  (one access per element, same groups, same mask). The grid is the number of
  blocks resident on the device at once (the driver's occupancy calculator,
  i.e. SMs x blocks per SM), so every block loops the same number of trips and
  there is no second, partial wave. The forward is the fused kernel without
  activation, launched as ``(x, x, y, ...)``.

  Static evidence (sm_90, ptxas 13, not measured on a GPU): the float32
  forward uses 32 registers (full occupancy at 256 threads), no spills, and its
  main loop is 2 ``LDG.E.128`` + 2 ``STG.E.128`` + 40 ``IMAD.WIDE.U32`` in
  about 180 instructions per 8 elements. ptxas places both loads after the
  first group's Philox rounds, so the second load overlaps the second group's
  rounds; the other warps hide the rest.

Files: :mod:`.philox` (the RNG), :mod:`.v1`, :mod:`.v2` (the kernel versions, 16-byte
access intrinsics with simulator twins), :mod:`.mask` (the packed keep mask); this
module holds the signatures, the kernel factories, the launch geometry and the launchers.
"""

# ruff: noqa: F401  (the op's names, gathered here from its files)

import functools

import numba
import numpy as np
from numba import cuda

from gpufc.runtime.launch import fast, serialised_in_sim

from . import philox
from .mask import _MASK_SIG, MASK_BITS, dropout_mask_source
from .v1 import act_dropout_backward_source, dropout_v1_source
from .v2 import (
    _SIM,
    GROUP,
    UNROLL,
    VECTOR_BYTES,
    act_dropout_backward_v2_source,
    dropout_v2_source,
    load_vec,
    store_vec,
    unroll_for,
)

THREADS = 256  # per block; a multiple of the warp size
MAX_BLOCKS = 65535 * 4  # v1: grid-stride past this; plenty to fill any current GPU
SIM_BLOCKS = 2  # the simulator runs every thread in Python: a small grid keeps it quick
FALLBACK_BLOCKS_PER_SM = 4  # when the occupancy API is unavailable


def _flat_sig(dtype) -> str:
    t = numba.from_dtype(np.dtype(dtype))
    return f"void({t}[::1], {t}[::1], uint32, uint32, uint64, uint64, {t})"


def _act_bwd_sig(dtype) -> str:
    t = numba.from_dtype(np.dtype(dtype))
    return f"void({t}[::1], {t}[::1], {t}[::1], uint32, uint32, uint64, uint64, {t})"


# ----------------------------------------------------------------------------
# Kernel factories (cached: Numba freezes closures at the first compile)
# ----------------------------------------------------------------------------


@functools.cache
def make_dropout_kernel(dtype, version=2, vector=True):
    dtype = np.dtype(dtype).type
    if version == 1:
        return cuda.jit(_flat_sig(dtype))(dropout_v1_source(dtype))
    # v2's forward is the fused kernel without activation, launched as (x, x, y, ...)
    return make_act_dropout_backward_kernel(dtype, None, True, 2, vector)


@functools.cache
def make_act_dropout_backward_kernel(dtype, activation, dropout, version=2, vector=True):
    """v1, or v2 (``vector``: the vec16 or the scalar specialisation); the launchers run only the
    combinations :func:`catalogue` lists."""
    dtype = np.dtype(dtype).type
    if version == 1:
        return cuda.jit(_act_bwd_sig(dtype))(act_dropout_backward_source(dtype, activation, dropout))
    return cuda.jit(_act_bwd_sig(dtype))(act_dropout_backward_v2_source(dtype, activation, dropout, vector))


@functools.cache
def make_dropout_mask_kernel():
    return cuda.jit(_MASK_SIG)(dropout_mask_source())


# ----------------------------------------------------------------------------
# Launch geometry
# ----------------------------------------------------------------------------


def grid_for(n: int, threads: int = THREADS) -> int:
    """v1: one thread per element, capped; the grid-stride loop covers the rest."""
    return max(1, min(MAX_BLOCKS, -(-n // threads)))


_resident: dict = {}


def resident_blocks(kern, threads: int) -> int:
    """Blocks of ``kern`` that fit on the current device at once: SMs x blocks per SM (cached).

    Blocks per SM come from the driver's occupancy calculator for the compiled
    kernel; the simulator gets a small grid (it runs each thread in Python).
    """
    if _SIM:
        return SIM_BLOCKS
    dev = cuda.get_current_device()
    key = (kern, threads, dev.id)
    if key not in _resident:
        try:
            compiled = next(iter(kern.overloads.values()))
            _resident[key] = max(1, int(compiled.max_cooperative_grid_blocks(threads)))
        except Exception:  # noqa: BLE001 -- no occupancy query in this numba-cuda: a safe guess
            _resident[key] = int(dev.MULTIPROCESSOR_COUNT) * FALLBACK_BLOCKS_PER_SM
    return _resident[key]


def v2_grid(kern, n: int, head: int, unroll: int, threads: int = THREADS, blocks=None) -> int:
    """v2 blocks: one wave of resident blocks, fewer when there are fewer trips to hand out."""
    if blocks is not None:
        return int(blocks)
    groups = -(-(n + head) // GROUP)
    return max(1, min(resident_blocks(kern, threads), -(-groups // (threads * unroll))))


def address(a) -> int:
    """Device address of ``a``'s first element (the host address in the simulator)."""
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        return int(a.__array_interface__["data"][0])
    return int(cai["data"][0])


def vector_ok(offset: int, dropout: bool, *arrays) -> bool:
    """Whether v2's 16-byte accesses apply: groups start at element 0 and every array is 16-byte aligned."""
    return (not dropout or offset % GROUP == 0) and all(address(a) % VECTOR_BYTES == 0 for a in arrays)


def _pick_vector(vector, offset, arrays) -> bool:
    ok = vector_ok(offset, True, *arrays)
    if vector is None:
        return ok
    if vector and not ok:
        raise ValueError(
            f"vector=True needs offset % 4 == 0 and 16-byte aligned arrays, got offset={offset} and "
            f"addresses % 16 = {[address(a) % VECTOR_BYTES for a in arrays]}"
        )
    return bool(vector)


def _check_version(version):
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got version={version!r}")


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------


@serialised_in_sim
def launch_dropout(x, y, *, key, offset, threshold, scale, stream=0, version=2, vector=None,
                   blocks=None, threads=THREADS):
    """``y = dropout(x)`` on flat (n,) device arrays x, y, n > 0.

    ``version`` 1 or 2 (default). v2's ``vector``: None uses 16-byte accesses
    when they apply (:func:`vector_ok`), False never, True always (raises when
    they cannot apply). ``blocks`` / ``threads`` override the geometry (tests,
    benchmarks); the output never depends on them.
    """
    _check_version(version)
    dtype = np.dtype(x.dtype).type
    args = (np.uint32(key[0]), np.uint32(key[1]), np.uint64(offset), np.uint64(threshold), dtype(scale))
    if version == 1:
        fast(make_dropout_kernel(dtype, 1))(blocks or grid_for(x.size, threads), threads, stream, x, y, *args)
        return
    kern = make_dropout_kernel(dtype, 2, _pick_vector(vector, offset, (x, y)))
    grid = v2_grid(kern, x.size, offset % GROUP, unroll_for(None), threads, blocks)
    fast(kern)(grid, threads, stream, x, x, y, *args)


@serialised_in_sim
def launch_act_dropout_backward(grad, z, g, *, activation, dropout, key, offset, threshold, scale, stream=0,
                                version=2, blocks=None, threads=THREADS):
    """``g = dropout'(grad) * act'(z)`` on flat (n,) device arrays, n > 0 (z unused without activation).

    Without activation this is :func:`launch_dropout` (or a copy). With one, v2
    runs only its ``vec16`` specialisation; where that does not apply (an
    offset that is not a multiple of 4 with dropout, or a misaligned array) v1
    runs instead: correct for any offset and layout, at four times the RNG work.
    ``version``, ``blocks``, ``threads`` as in :func:`launch_dropout`.
    """
    _check_version(version)
    dropout = bool(dropout)
    if activation is None:
        if dropout:
            launch_dropout(grad, g, key=key, offset=offset, threshold=threshold, scale=scale, stream=stream,
                           version=version, blocks=blocks, threads=threads)
        else:
            g.copy_to_device(grad, stream=stream)
        return
    dtype = np.dtype(grad.dtype).type
    args = (grad, z, g, np.uint32(key[0]), np.uint32(key[1]), np.uint64(offset), np.uint64(threshold),
            dtype(scale))
    if version == 2 and vector_ok(offset, dropout, grad, z, g):
        kern = make_act_dropout_backward_kernel(dtype, activation, dropout, 2)
        grid = v2_grid(kern, grad.size, 0, unroll_for(activation), threads, blocks)
    else:
        kern = make_act_dropout_backward_kernel(dtype, activation, dropout, 1)
        grid = blocks or grid_for(grad.size, threads)
    fast(kern)(grid, threads, stream, *args)


@serialised_in_sim
def launch_dropout_mask(mask, *, size, key, offset, threshold, stream=0, blocks=None, threads=THREADS):
    """Packed keep mask of ``size`` elements into ``mask`` (ceil(size / 8),) uint8 on the device."""
    nbytes = -(-size // MASK_BITS)
    if mask.size != nbytes:
        raise ValueError(f"mask must have ceil(size / 8) = {nbytes} bytes for size={size}, got mask.size={mask.size}")
    if nbytes == 0:
        return
    kern = make_dropout_mask_kernel()
    grid = blocks or max(1, min(resident_blocks(kern, threads), -(-nbytes // threads)))
    fast(kern)(grid, threads, stream, mask, np.int64(size), np.uint32(key[0]), np.uint32(key[1]), np.uint64(offset),
               np.uint64(threshold))


def catalogue():
    """KernelSpec entries for every dropout kernel the launchers can run (see kernels.catalogue)."""
    from ..activations import NAMES
    from ..catalogue import KernelSpec

    for dt in (np.float32, np.float64):
        dn = np.dtype(dt).name
        yield KernelSpec(f"dropout/v1/{dn}", dropout_v1_source(dt), _flat_sig(dt))
        for act in NAMES:
            yield KernelSpec(f"act_dropout_backward/{dn}/{act or 'id'}+drop",
                             act_dropout_backward_source(dt, act, True), _act_bwd_sig(dt))
        for act in NAMES[1:]:  # v1 without dropout: the fused backward's fallback for misaligned arrays
            yield KernelSpec(f"act_dropout_backward/{dn}/{act}", act_dropout_backward_source(dt, act, False),
                             _act_bwd_sig(dt))
        for vec in (True, False):
            io = "vec16" if vec else "scalar"
            yield KernelSpec(f"dropout/v2_{io}/{dn}", dropout_v2_source(dt, vec), _act_bwd_sig(dt))
        for act in NAMES[1:]:  # None + dropout is the v2 forward above
            for drop in (True, False):
                yield KernelSpec(f"act_dropout_backward/v2_vec16/{dn}/{act}{'+drop' if drop else ''}",
                                 act_dropout_backward_v2_source(dt, act, drop, True), _act_bwd_sig(dt))
    yield KernelSpec("dropout_mask/v1/uint8", dropout_mask_source(), _MASK_SIG)
