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

from gpufc.runtime import launch as _launch
from gpufc.runtime import plan as _plan

from ..catalogue import KernelSpec, LaunchSpec, array, scalar

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

VERSION = 2  # the version the host API runs (gpufc.dropout, the fused backward); tests route it to 1
THREADS = 256  # per block; a multiple of the warp size
MAX_BLOCKS = 65535 * 4  # v1: grid-stride past this; plenty to fill any current GPU


def _flat_sig(dtype) -> str:
    t = numba.from_dtype(np.dtype(dtype))
    return f"void({t}[::1], {t}[::1], uint32, uint32, uint64, uint64, {t})"


def _act_bwd_sig(dtype) -> str:
    t = numba.from_dtype(np.dtype(dtype))
    return f"void({t}[::1], {t}[::1], {t}[::1], uint32, uint32, uint64, uint64, {t})"


# ----------------------------------------------------------------------------
# Kernels (cached: Numba freezes closures at the first compile)
# ----------------------------------------------------------------------------


@functools.cache
def dropout_spec(dtype, version=2, vector=True) -> KernelSpec:
    """The forward: v1, or v2's ``vec16`` / ``scalar`` specialisation (the fused kernel without activation)."""
    dtype = np.dtype(dtype)
    if version == 1:
        return KernelSpec(f"dropout/v1/{dtype.name}", dropout_v1_source(dtype.type), _flat_sig(dtype))
    io = "vec16" if vector else "scalar"
    return KernelSpec(f"dropout/v2_{io}/{dtype.name}", dropout_v2_source(dtype.type, bool(vector)), _act_bwd_sig(dtype))


@functools.cache
def act_dropout_backward_spec(dtype, activation, dropout, version=2) -> KernelSpec:
    """``g = dropout'(grad) * act'(z)``: v1, or v2's ``vec16`` specialisation (the one the launchers run)."""
    dtype = np.dtype(dtype)
    if version == 1:
        name = f"act_dropout_backward/{dtype.name}/{activation or 'id'}" + ("+drop" if dropout else "")
        return KernelSpec(name, act_dropout_backward_source(dtype.type, activation, bool(dropout)), _act_bwd_sig(dtype))
    name = f"act_dropout_backward/v2_vec16/{dtype.name}/{activation}" + ("+drop" if dropout else "")
    return KernelSpec(name, act_dropout_backward_v2_source(dtype.type, activation, bool(dropout), True),
                      _act_bwd_sig(dtype))


@functools.cache
def mask_spec() -> KernelSpec:
    return KernelSpec("dropout_mask/v1/uint8", dropout_mask_source(), _MASK_SIG)


def make_dropout_kernel(dtype, version=2, vector=True):
    """The Numba dispatcher of :func:`dropout_spec` (kernel-level tests)."""
    return _jit(dropout_spec(dtype, version, vector))


def make_act_dropout_backward_kernel(dtype, activation, dropout, version=2):
    return _jit(act_dropout_backward_spec(dtype, activation, dropout, version))


def make_dropout_mask_kernel():
    return _jit(mask_spec())


@functools.cache
def _jit(spec: KernelSpec):
    return cuda.jit(spec.signature)(spec.pyfunc)


# ----------------------------------------------------------------------------
# Launch geometry
# ----------------------------------------------------------------------------


def grid_for(n: int, threads: int = THREADS) -> int:
    """v1: one thread per element, capped; the grid-stride loop covers the rest."""
    return max(1, min(MAX_BLOCKS, -(-n // threads)))


def v2_grid(resident: int, n: int, head: int, unroll: int, threads: int = THREADS, blocks=None) -> int:
    """v2 blocks: one wave of the ``resident`` blocks the device holds at once (the driver's
    occupancy calculator for the compiled kernel), fewer when there are fewer trips to hand out."""
    if blocks is not None:
        return int(blocks)
    groups = -(-(n + head) // GROUP)
    return max(1, min(resident, -(-groups // (threads * unroll))))


def address(a) -> int:
    """Device address of ``a``'s first element (the host address in the simulator); ints are addresses."""
    if isinstance(a, int):
        return a
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
# Launches (data) and their plans
# ----------------------------------------------------------------------------

_U32, _U64, _I64, _U8 = np.dtype(np.uint32), np.dtype(np.uint64), np.dtype(np.int64), np.dtype(np.uint8)


def _tail(dtype, scale=True):
    t = (scalar("k0", _U32), scalar("k1", _U32), scalar("offset", _U64), scalar("threshold", _U64))
    return t + ((scalar("scale", dtype),) if scale else ())


def dropout_launch(n: int, dtype, version=2, vector=False, head=0, blocks=None, threads=THREADS) -> LaunchSpec:
    """``y = dropout(x)`` on flat (n,) arrays, n > 0. Per-call values: x, y (v1) or x, x, y (v2), then
    k0, k1, offset, threshold, scale. ``head`` is ``offset % 4`` (v2's first group is cut by it)."""
    _check_version(version)
    dtype = np.dtype(dtype)
    if version == 1:
        args = (array("x", (n,), dtype), array("y", (n,), dtype)) + _tail(dtype)
        return LaunchSpec(dropout_spec(dtype, 1), (blocks or grid_for(n, threads),), (threads,), args)
    args = (array("x", (n,), dtype), array("z", (n,), dtype), array("y", (n,), dtype)) + _tail(dtype)
    unroll = unroll_for(None)
    return LaunchSpec(dropout_spec(dtype, 2, vector), lambda resident: (v2_grid(resident, n, head, unroll, threads,
                                                                                blocks),), (threads,), args)


def dropout_plan(n: int, dtype, version=2, vector=False, head=0, blocks=None, threads=THREADS, device=0, stream=0):
    key = ("dropout", n, dtype, version, vector, head, blocks, threads, device, stream)
    return _plan.get(key, dropout_launch, n, dtype, version, vector, head, blocks, threads)


def act_dropout_backward_launch(n: int, dtype, activation, dropout, vec16=True, blocks=None,
                                threads=THREADS) -> LaunchSpec:
    """``g = dropout'(grad) * act'(z)`` on flat (n,) arrays, n > 0, an activation given. ``vec16``: v2's vec16
    kernel (16-byte aligned arrays, offset % 4 == 0 with dropout), else v1. Per-call values: grad, z, g,
    k0, k1, offset, threshold, scale."""
    dtype = np.dtype(dtype)
    args = (array("grad", (n,), dtype), array("z", (n,), dtype), array("g", (n,), dtype)) + _tail(dtype)
    if vec16:
        unroll = unroll_for(activation)
        return LaunchSpec(act_dropout_backward_spec(dtype, activation, dropout, 2),
                          lambda resident: (v2_grid(resident, n, 0, unroll, threads, blocks),), (threads,), args)
    return LaunchSpec(act_dropout_backward_spec(dtype, activation, dropout, 1), (blocks or grid_for(n, threads),),
                      (threads,), args)


def act_dropout_backward_plan(n: int, dtype, activation, dropout, vec16=True, blocks=None, threads=THREADS, device=0,
                              stream=0):
    key = ("act_dropout_backward", n, dtype, activation, dropout, vec16, blocks, threads, device, stream)
    return _plan.get(key, act_dropout_backward_launch, n, dtype, activation, dropout, vec16, blocks, threads)


def mask_launch(size: int, blocks=None, threads=THREADS) -> LaunchSpec:
    """The packed keep mask of ``size`` elements into ``ceil(size / 8)`` bytes, size > 0. Per-call values:
    mask, k0, k1, offset, threshold."""
    nbytes = -(-size // MASK_BITS)
    args = (array("mask", (nbytes,), _U8), scalar("n", _I64, size)) + _tail(None, scale=False)
    grid = (lambda resident: (blocks or max(1, min(resident, -(-nbytes // threads))),))
    return LaunchSpec(mask_spec(), grid, (threads,), args)


def mask_plan(size: int, blocks=None, threads=THREADS, device=0, stream=0):
    return _plan.get(("dropout_mask", size, blocks, threads, device, stream), mask_launch, size, blocks, threads)


# ----------------------------------------------------------------------------
# Launchers on device arrays (kernel-level: tests, benchmarks); the host API calls the plans
# ----------------------------------------------------------------------------


def launch_dropout(x, y, *, key, offset, threshold, scale, stream=0, version=2, vector=None,
                   blocks=None, threads=THREADS):
    """``y = dropout(x)`` on flat (n,) device arrays x, y, n > 0.

    ``version`` 1 or 2 (default). v2's ``vector``: None uses 16-byte accesses
    when they apply (:func:`vector_ok`), False never, True always (raises when
    they cannot apply). ``blocks`` / ``threads`` override the geometry (tests,
    benchmarks); the output never depends on them.
    """
    _check_version(version)
    ln = _launch.launcher()
    n, dtype = x.size, np.dtype(x.dtype)
    tail = (int(key[0]), int(key[1]), int(offset), int(threshold), float(scale))
    s = ln.stream(stream)
    if version == 1:
        dropout_plan(n, dtype, 1, False, 0, blocks, threads, 0, s)(ln.arg(x), ln.arg(y), *tail)
        return
    vec = _pick_vector(vector, offset, (x, y))
    xa = ln.arg(x)
    dropout_plan(n, dtype, 2, vec, offset % GROUP, blocks, threads, 0, s)(xa, xa, ln.arg(y), *tail)


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
    ln = _launch.launcher()
    vec16 = version == 2 and vector_ok(offset, dropout, grad, z, g)
    plan = act_dropout_backward_plan(grad.size, np.dtype(grad.dtype), activation, dropout, vec16, blocks, threads, 0,
                                     ln.stream(stream))
    plan(ln.arg(grad), ln.arg(z), ln.arg(g), int(key[0]), int(key[1]), int(offset), int(threshold), float(scale))


def launch_dropout_mask(mask, *, size, key, offset, threshold, stream=0, blocks=None, threads=THREADS):
    """Packed keep mask of ``size`` elements into ``mask`` (ceil(size / 8),) uint8 on the device."""
    nbytes = -(-size // MASK_BITS)
    if mask.size != nbytes:
        raise ValueError(f"mask must have ceil(size / 8) = {nbytes} bytes for size={size}, got mask.size={mask.size}")
    if nbytes == 0:
        return
    ln = _launch.launcher()
    mask_plan(size, blocks, threads, 0, ln.stream(stream))(ln.arg(mask), int(key[0]), int(key[1]), int(offset),
                                                           int(threshold))


def catalogue():
    """KernelSpec entries for every dropout kernel the launchers can run (see kernels.catalogue)."""
    from ..activations import NAMES

    for dt in (np.float32, np.float64):
        yield dropout_spec(dt, 1)
        for act in NAMES:
            yield act_dropout_backward_spec(dt, act, True, 1)
        for act in NAMES[1:]:  # v1 without dropout: the fused backward's fallback for misaligned arrays
            yield act_dropout_backward_spec(dt, act, False, 1)
        for vec in (True, False):
            yield dropout_spec(dt, 2, vec)
        for act in NAMES[1:]:  # None + dropout is the v2 forward above
            for drop in (True, False):
                yield act_dropout_backward_spec(dt, act, drop, 2)
    yield mask_spec()
