"""Scale-and-mask dropout, forward and backward, with a counter-based Philox RNG.

Math (ARCHITECTURE.md, dropout mask contract), for a flat view of the tensor::

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

Numba has no float4 type: the 16-byte accesses are two small LLVM intrinsics
(``load_vec`` / ``store_vec``, below). The simulator runs plain-Python twins.
"""

import functools

import numba
import numpy as np
from numba import config, cuda, int64, uint8, uint32, uint64

from .activations import make_activation
from .launch import fast, serialised_in_sim
from .philox import THREE, TWO, keep_word, philox_block, select_word

THREADS = 256  # per block; a multiple of the warp size
MAX_BLOCKS = 65535 * 4  # v1: grid-stride past this; plenty to fill any current GPU
GROUP = 4  # v2: elements per Philox block, one call per group
UNROLL = 2  # v2: groups per thread per trip: 2 (float32) or 4 (float64) 16-byte loads before the first store
VECTOR_BYTES = 16  # v2 vec16 specialisation: bytes per load / store instruction
SIM_BLOCKS = 2  # the simulator runs every thread in Python: a small grid keeps it quick
FALLBACK_BLOCKS_PER_SM = 4  # when the occupancy API is unavailable
MASK_BITS = 8  # dropout_mask: elements per output byte

_SIM = bool(config.ENABLE_CUDASIM)


# ----------------------------------------------------------------------------
# 16-byte loads and stores
# ----------------------------------------------------------------------------

if _SIM:

    def load_vec(a, i):
        """Simulator twin: the ``16 // itemsize`` elements from ``a[i]``."""
        return tuple(a[i + k] for k in range(VECTOR_BYTES // a.dtype.itemsize))

    def store_vec(a, i, values):
        for k, v in enumerate(values):
            a[i + k] = v

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    def _vec_type(context, array_type):
        elem = context.get_value_type(array_type.dtype)
        return elem, ir.VectorType(elem, VECTOR_BYTES // (array_type.dtype.bitwidth // 8))

    @intrinsic
    def load_vec(typingctx, a, i):
        """``a[i : i + w]`` as a w-tuple in one 16-byte load (w = 16 // itemsize).

        ``a`` is a C-contiguous 1-D array; ``&a[i]`` must be 16-byte aligned (the caller's duty).
        """
        width = VECTOR_BYTES // (a.dtype.bitwidth // 8)
        sig = types.UniTuple(a.dtype, width)(a, i)

        def codegen(context, builder, sig, args):
            array_type = sig.args[0]
            _, vec = _vec_type(context, array_type)
            arr = context.make_array(array_type)(context, builder, args[0])
            ptr = builder.bitcast(builder.gep(arr.data, [args[1]]), vec.as_pointer())
            v = builder.load(ptr, align=VECTOR_BYTES)
            vals = [builder.extract_element(v, ir.Constant(ir.IntType(32), k)) for k in range(vec.count)]
            return context.make_tuple(builder, sig.return_type, vals)

        return sig, codegen

    @intrinsic
    def store_vec(typingctx, a, i, values):
        """``a[i : i + w] = values`` in one 16-byte store; ``&a[i]`` must be 16-byte aligned."""
        sig = types.void(a, i, values)

        def codegen(context, builder, sig, args):
            array_type, _, values_type = sig.args
            _, vec = _vec_type(context, array_type)
            v = ir.Constant(vec, ir.Undefined)
            for k in range(vec.count):
                item = context.cast(builder, builder.extract_value(args[2], k), values_type[k], array_type.dtype)
                v = builder.insert_element(v, item, ir.Constant(ir.IntType(32), k))
            arr = context.make_array(array_type)(context, builder, args[0])
            ptr = builder.bitcast(builder.gep(arr.data, [args[1]]), vec.as_pointer())
            builder.store(v, ptr, align=VECTOR_BYTES)
            return context.get_dummy_value()

        return sig, codegen


# ----------------------------------------------------------------------------
# Signatures
# ----------------------------------------------------------------------------


def _flat_sig(dtype) -> str:
    t = numba.from_dtype(np.dtype(dtype))
    return f"void({t}[::1], {t}[::1], uint32, uint32, uint64, uint64, {t})"


def _act_bwd_sig(dtype) -> str:
    t = numba.from_dtype(np.dtype(dtype))
    return f"void({t}[::1], {t}[::1], {t}[::1], uint32, uint32, uint64, uint64, {t})"


_MASK_SIG = "void(uint8[::1], int64, uint32, uint32, uint64, uint64)"


# ----------------------------------------------------------------------------
# Version 1: one Philox block per element
# ----------------------------------------------------------------------------


def dropout_v1_source(dtype):
    zero = np.dtype(dtype).type(0)

    def dropout_v1(x, y, k0, k1, offset, threshold, scale):
        # x, y are (n,); y[e] = keep(offset + e) ? x[e] * scale : 0
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for e in range(start, x.size, stride):
            y[e] = x[e] * scale if keep_word(offset + uint64(e), k0, k1, threshold) else zero

    return dropout_v1


def act_dropout_backward_source(dtype, activation, dropout):
    """g = (keep ? grad * scale : 0) * act'(z): the FC backward's elementwise stage."""
    zero = np.dtype(dtype).type(0)
    _, dact = make_activation(activation, dtype)
    has_act = activation is not None

    def act_dropout_backward(grad, z, g, k0, k1, offset, threshold, scale):
        # grad, z, g are the flat (M * N,) views of (M, N) tensors
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for e in range(start, grad.size, stride):
            v = grad[e]
            if dropout:
                v = v * scale if keep_word(offset + uint64(e), k0, k1, threshold) else zero
            if has_act:
                v = v * dact(z[e])
            g[e] = v

    return act_dropout_backward


# ----------------------------------------------------------------------------
# Version 2: one Philox block per 4 elements, 2 groups per thread per trip
# ----------------------------------------------------------------------------


def _group_io(dtype, vector):
    """``(load4, store4)``: the 4 consecutive elements from ``a[i]``, in 16-byte accesses when
    ``vector`` (``&a[i]`` must be 16-byte aligned), else one access per element."""
    itemsize = np.dtype(dtype).itemsize
    if vector and itemsize == 4:

        @cuda.jit(device=True, inline=True)
        def load4(a, i):
            return load_vec(a, i)

        @cuda.jit(device=True, inline=True)
        def store4(a, i, v0, v1, v2, v3):
            store_vec(a, i, (v0, v1, v2, v3))

    elif vector:  # float64: a group is two 16-byte halves

        @cuda.jit(device=True, inline=True)
        def load4(a, i):
            v0, v1 = load_vec(a, i)
            v2, v3 = load_vec(a, i + 2)
            return v0, v1, v2, v3

        @cuda.jit(device=True, inline=True)
        def store4(a, i, v0, v1, v2, v3):
            store_vec(a, i, (v0, v1))
            store_vec(a, i + 2, (v2, v3))

    else:

        @cuda.jit(device=True, inline=True)
        def load4(a, i):
            return a[i], a[i + 1], a[i + 2], a[i + 3]

        @cuda.jit(device=True, inline=True)
        def store4(a, i, v0, v1, v2, v3):
            a[i] = v0
            a[i + 1] = v1
            a[i + 2] = v2
            a[i + 3] = v3

    return load4, store4


def unroll_for(activation) -> int:
    """Groups per thread per trip: 2 where the work per element is a select and a multiply;
    1 with a transcendental derivative, whose inlined copies cost registers and so occupancy
    (float64 gelu: 240 registers at 2 groups, 208 at 1) in a kernel that is no longer memory-bound."""
    return UNROLL if activation in (None, "relu") else 1


def act_dropout_backward_v2_source(dtype, activation, dropout, vector):
    """v2 kernel ``(x, z, y, k0, k1, offset, threshold, scale)``: ``y = (keep ? x * scale : 0) * act'(z)``.

    The forward dropout is ``activation=None`` (z is not read: launch with z = x);
    the fused FC backward passes ``grad, z, g``; ``dropout=False`` skips the RNG.
    ``vector`` moves whole groups with 16-byte accesses (needs ``offset % 4 == 0``
    when ``dropout``, and 16-byte aligned arrays). The loop is written out here,
    not in a device function: Numba's inliner copies a big callee's IR at a high
    compile-time cost.
    """
    t = np.dtype(dtype).type
    zero = t(0)
    _, dact = make_activation(activation, t)
    has_act = activation is not None
    dropout = bool(dropout)
    pairs = unroll_for(activation) == 2
    load4, store4 = _group_io(t, bool(vector))
    no_word = uint32(0)

    @cuda.jit(device=True, inline=True)
    def words(block, k0, k1):
        if dropout:
            return philox_block(block, k0, k1)
        return no_word, no_word, no_word, no_word

    @cuda.jit(device=True, inline=True)
    def apply(v, zv, word, threshold, scale):
        if dropout:
            # select, not multiply by a 0/1 mask: a dropped NaN or inf must give exactly 0
            v = v * scale if uint64(word) >= threshold else zero
        if has_act:
            v = v * dact(zv)
        return v

    def act_dropout_backward_v2(x, z, y, k0, k1, offset, threshold, scale):
        # x, z, y are (n,) (flat views of (M, N) tensors for the FC backward)
        n = x.size
        # group j holds absolute indices 4 (base + j) + lane, i.e. elements e = 4 j + lane - head
        head = int64(offset & THREE) if dropout else int64(0)
        base = offset >> TWO
        j_end = (n + head) // GROUP  # groups in [j_lo, j_end) lie wholly inside the tensor
        j_lo = int64(1) if head > 0 else int64(0)
        tid = int64(cuda.grid(1))
        stride = int64(cuda.gridsize(1))
        j = j_lo + tid
        while pairs and j + stride < j_end:
            ia = GROUP * j - head
            ib = ia + GROUP * stride
            # both groups' loads first: no load may move above a store to y (y may alias x)
            a0, a1, a2, a3 = load4(x, ia)
            b0, b1, b2, b3 = load4(x, ib)
            za0, za1, za2, za3 = load4(z, ia) if has_act else (a0, a1, a2, a3)
            zb0, zb1, zb2, zb3 = load4(z, ib) if has_act else (b0, b1, b2, b3)
            ra0, ra1, ra2, ra3 = words(base + uint64(j), k0, k1)
            rb0, rb1, rb2, rb3 = words(base + uint64(j + stride), k0, k1)
            store4(y, ia, apply(a0, za0, ra0, threshold, scale), apply(a1, za1, ra1, threshold, scale),
                   apply(a2, za2, ra2, threshold, scale), apply(a3, za3, ra3, threshold, scale))
            store4(y, ib, apply(b0, zb0, rb0, threshold, scale), apply(b1, zb1, rb1, threshold, scale),
                   apply(b2, zb2, rb2, threshold, scale), apply(b3, zb3, rb3, threshold, scale))
            j += 2 * stride
        while j < j_end:
            ia = GROUP * j - head
            a0, a1, a2, a3 = load4(x, ia)
            za0, za1, za2, za3 = load4(z, ia) if has_act else (a0, a1, a2, a3)
            ra0, ra1, ra2, ra3 = words(base + uint64(j), k0, k1)
            store4(y, ia, apply(a0, za0, ra0, threshold, scale), apply(a1, za1, ra1, threshold, scale),
                   apply(a2, za2, ra2, threshold, scale), apply(a3, za3, ra3, threshold, scale))
            j += stride
            if pairs:
                break  # after the pair loop only the odd group out is left: one trip, fewer registers
        # at most two groups are cut by the tensor's ends: the head group (j = 0, when head > 0),
        # owned by the first thread, and the tail group (j = j_end), owned by the last thread
        tail_cut = (n + head) % GROUP != 0 and (j_end > 0 or head == 0)  # else the head group is the tail
        for c in range(2):
            jc = int64(0) if c == 0 else j_end
            owner = int64(0) if c == 0 else stride - 1
            cut = head > 0 if c == 0 else tail_cut
            if cut and tid == owner:
                r0, r1, r2, r3 = words(base + uint64(jc), k0, k1)
                for lane in range(GROUP):
                    e = GROUP * jc - head + lane
                    if e >= 0 and e < n:
                        zv = z[e] if has_act else x[e]
                        y[e] = apply(x[e], zv, select_word(r0, r1, r2, r3, uint64(lane)), threshold, scale)

    return act_dropout_backward_v2


def dropout_v2_source(dtype, vector):
    """v2 forward: the shared v2 kernel without activation; launch it as ``(x, x, y, ...)``."""
    return act_dropout_backward_v2_source(dtype, None, True, vector)


# ----------------------------------------------------------------------------
# Packed keep mask
# ----------------------------------------------------------------------------


def dropout_mask_source():
    """Keep mask packed 1 bit per element: bit ``e % 8`` of byte ``e // 8`` is ``keep(offset + e)``.

    The layout of ``numpy.packbits(keep, bitorder="little")``; padding bits past ``n`` are 0.
    One thread per byte: its 8 elements span 2 Philox blocks (3 when ``offset % 4 != 0``).
    """

    def dropout_mask(mask, n, k0, k1, offset, threshold):
        # mask is (ceil(n / 8),) uint8; n elements, n >= 0
        start = int64(cuda.grid(1))
        stride = int64(cuda.gridsize(1))
        # byte b's bit 0 is the absolute index offset + 8 b: block offset // 4 + 2 b, lane offset % 4
        # (computed this way, offset + 8 b never wraps past 2**64)
        head = int64(offset & THREE)
        for b in range(start, mask.size, stride):
            block = (offset >> TWO) + uint64(2 * b)
            bits = uint32(0)
            for k in range(3):
                if k < 2 or head > 0:
                    r0, r1, r2, r3 = philox_block(block + uint64(k), k0, k1)
                    for lane in range(GROUP):
                        i = GROUP * k + lane - head  # the bit this word decides
                        in_byte = i >= 0 and i < MASK_BITS and MASK_BITS * b + i < n
                        if in_byte and uint64(select_word(r0, r1, r2, r3, uint64(lane))) >= threshold:
                            bits |= uint32(1) << uint32(i)
            mask[b] = uint8(bits)

    return dropout_mask


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
    from .activations import NAMES
    from .catalogue import KernelSpec

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
