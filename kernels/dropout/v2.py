"""Dropout version 2: one Philox block per group of 4 elements, 16-byte accesses where aligned.

See :mod:`kernels.dropout` for the group layout, the grid and the static
evidence. Numba has no float4 type: the 16-byte accesses are two small LLVM
intrinsics (``load_vec`` / ``store_vec``); the simulator runs plain-Python twins.
"""

import numpy as np
from numba import config, cuda, int64, uint32, uint64

from ..activations import make_activation
from .philox import THREE, TWO, philox_block, select_word

GROUP = 4  # elements per Philox block, one call per group
UNROLL = 2  # groups per thread per trip: 2 (float32) or 4 (float64) 16-byte loads before the first store
VECTOR_BYTES = 16  # vec16 specialisation: bytes per load / store instruction

_SIM = bool(config.ENABLE_CUDASIM)


if _SIM:

    def _check_aligned(a, i):
        # The hardware faults on a misaligned 16-byte access; the launcher only picks this path for
        # 16-byte-aligned arrays, so an element index off a multiple of the width is a kernel bug.
        width = VECTOR_BYTES // a.dtype.itemsize
        if i % width:
            raise AssertionError(f"misaligned {VECTOR_BYTES}-byte access at element {i} (width {width})")

    def load_vec(a, i):
        """Simulator twin: the ``16 // itemsize`` elements from ``a[i]``; ``i`` must be 16-byte aligned."""
        _check_aligned(a, i)
        return tuple(a[i + k] for k in range(VECTOR_BYTES // a.dtype.itemsize))

    def store_vec(a, i, values):
        _check_aligned(a, i)
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
