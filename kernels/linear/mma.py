"""Tensor-core building blocks: inline PTX ``mma.sync``, ``ldmatrix``, ``cp.async`` and conversions.

numba-cuda has no wmma/mma API and libNVVM rejects the ``llvm.nvvm.mma.*``
intrinsics, so each op is a Numba ``@intrinsic`` whose code is one llvmlite
``ir.InlineAsm`` PTX instruction; ptxas turns them into ``HMMA``, ``LDSM``
and ``LDGSTS``. The PTX ISA's "Matrix Fragments" sections define the
register layouts; with ``lane = laneid``, ``g = lane >> 2``, ``t = lane & 3``:

========================  ==================================================================
TF32 m16n8k8              a0=A[g,t] a1=A[g+8,t] a2=A[g,t+4] a3=A[g+8,t+4]; b0=B[t,g] b1=B[t+4,g]
FP16/BF16 m16n8k16        a0=A[g,2t:2t+2] a1=A[g+8,2t:2t+2] a2=A[g,2t+8:2t+10] a3=A[g+8,2t+8:2t+10];
                          b0=B[2t:2t+2,g] b1=B[2t+8:2t+10,g] (two 16-bit values per .b32, lower k low)
C/D (f32)                 c0=C[g,2t] c1=C[g,2t+1] c2=C[g+8,2t] c3=C[g+8,2t+1]
========================  ==================================================================

Ops (device functions; every index is an element index into the array as laid
out in memory, C order, so multi-dimensional shared arrays are addressed flat):

- ``mma_tf32(a0..a3, b0, b1, c0..c3)``, ``mma_f16(...)``, ``mma_bf16(...)``:
  ``D = A @ B + C`` for one warp, A/B fragments as uint32, C/D as 4 float32;
  FP32 accumulation, every product exact (TF32 and 16-bit significands fit
  a float32 product).
- ``cvt_tf32(bits)``: a float32 (given as its uint32 bits) rounded to TF32 by
  ``cvt.rna`` (to nearest, ties away from zero, on the 13 dropped bits).
- ``ldmatrix_x4(smem, i)`` / ``ldmatrix_x4_trans(smem, i)``: four 8 x 8
  matrices of 16-bit elements (8 x 4 of 32-bit ones without ``.trans``);
  lane ``l`` gives the address of row ``l % 8`` of matrix ``l // 8`` (16
  contiguous bytes at ``smem.flat[i]``, 16-byte aligned); register ``r`` of
  lane ``l`` holds word ``l % 4`` of row ``l // 4`` of matrix ``r`` (of its
  transpose with ``.trans``).
- ``cp_async16(smem, i, src, j)``: copy 16 bytes ``src.flat[j:] -> smem.flat[i:]``
  without passing through registers (``.cg``: L2 only); ``cp_async16_zfill(smem,
  i, src, j, nbytes)`` reads only the first ``nbytes`` (0..16) and writes zeros
  after them (ragged edges; ``nbytes = 0`` reads nothing); ``cp_async_commit()``
  closes a group; ``cp_async_wait(n)`` waits until at most ``n`` groups are in
  flight (``n`` a compile-time constant: ``make_cp_async_wait(n)``).
- ``f16_to_f32(u16)``, ``f32_to_f16(f)``, ``bf16_to_f32(u16)``,
  ``f32_to_bf16(f)`` (round to nearest even), ``f32_bits(f)``, ``bits_f32(u)``:
  16-bit values travel as uint16 so that no float16 arithmetic (which
  numba-cuda lowers to NVRTC-built helpers that a plain ``compile_ptx`` +
  ptxas cannot link) appears in a kernel.

The simulator runs every thread of a block as a Python thread. Each warp-level
op has a twin there: every lane posts its operands to a per-warp exchange and
waits on a ``threading.Barrier`` of the warp's 32 lanes; the barrier's action
(run once, by the last lane to arrive) computes the warp's result, in float64
then rounded to float32 for mma (exact products, one rounding of each sum),
and each lane picks its own fragment. A lane that skips the op (divergence,
undefined on hardware) breaks the barrier: ``threading.BrokenBarrierError``
after :data:`SIM_BARRIER_TIMEOUT_S` seconds instead of a hang. The twins read
the simulator thread's warp identity from attributes numba-cuda does not
document (:data:`SIM_THREAD_ATTRIBUTES`; the tests pin them).
"""

from __future__ import annotations

import functools
import threading
import weakref

import numpy as np
from numba import config

SIM = bool(config.ENABLE_CUDASIM)
WARP = 32
CHUNK_BYTES = 16  # ldmatrix rows and cp.async copies move 16 bytes

# The numba-cuda simulator's per-thread attributes the twins rely on (numba-cuda 0.30:
# numba/cuda/simulator/kernel.py, BlockThread): the block manager (one per launch), the
# block index and the linear thread index within the block.
SIM_THREAD_ATTRIBUTES = ("_manager", "blockIdx", "thread_id")
SIM_BARRIER_TIMEOUT_S = 120.0  # a shared 2-core machine can stall a Python thread for seconds

__all__ = [
    "SIM",
    "SIM_THREAD_ATTRIBUTES",
    "bf16_to_f32",
    "bits_f32",
    "cp_async16",
    "cp_async16_zfill",
    "cp_async_commit",
    "cvt_tf32",
    "f16_to_f32",
    "f32_bits",
    "f32_to_bf16",
    "f32_to_f16",
    "ldmatrix_x4",
    "ldmatrix_x4_trans",
    "make_cp_async_wait",
    "mma_bf16",
    "mma_f16",
    "mma_tf32",
]


# ----------------------------------------------------------------------------
# Host-side bit manipulation, shared by the twins (NumPy, no numba)
# ----------------------------------------------------------------------------


def tf32_round_bits(bits):
    """``cvt.rna.tf32.f32`` on float32 bit patterns (uint32 array or scalar): add half a
    TF32 ulp to the magnitude and clear the 13 dropped bits; NaN and inf are kept."""
    b = np.asarray(bits, dtype=np.uint32)
    special = (b & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    r = (b + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return np.where(special, b, r).astype(np.uint32)


def _u32(v) -> int:
    return int(v) & 0xFFFFFFFF


def _halves(word) -> tuple[int, int]:
    w = _u32(word)
    return w & 0xFFFF, w >> 16


def _decode(kind: str, words) -> np.ndarray:
    """Fragment registers -> float64 element values: tf32 one per word (low 13 bits
    ignored, as the tensor core does), f16/bf16 two per word (low half first)."""
    w = np.asarray([_u32(x) for x in words], dtype=np.uint32)
    if kind == "tf32":
        return (w & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)
    h = np.stack([w & np.uint32(0xFFFF), w >> np.uint32(16)], axis=-1).reshape(-1)
    if kind == "f16":
        return h.astype(np.uint16).view(np.float16).astype(np.float64)
    return (h << np.uint32(16)).astype(np.uint32).view(np.float32).astype(np.float64)


# ----------------------------------------------------------------------------
# Simulator twins
# ----------------------------------------------------------------------------


class _Warp:
    """One warp's exchange: 32 slots and a barrier whose action computes the op."""

    def __init__(self, lanes: int):
        self.slots = [None] * lanes
        self.result = None
        self.barrier = threading.Barrier(lanes, action=self._compute, timeout=SIM_BARRIER_TIMEOUT_S)

    def _compute(self):
        kinds = {s[0] for s in self.slots}
        if len(kinds) != 1:
            raise RuntimeError(f"lanes of one warp ran different warp-level ops at once: {sorted(kinds)}")
        op = self.slots[0][0]
        self.result = _TWIN_OPS[op](self.slots)


_warps_lock = threading.Lock()
_warps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sim_lane():
    """(this lane's warp exchange, lane index) from the simulator's current thread."""
    th = threading.current_thread()
    manager, block, tid = th._manager, tuple(th.blockIdx), th.thread_id
    warp = tid // WARP
    with _warps_lock:
        per_launch = _warps.setdefault(manager, {})
        w = per_launch.get((block, warp))
        if w is None:
            threads = int(np.prod(manager._block_dim))
            w = per_launch[(block, warp)] = _Warp(min(WARP, threads - warp * WARP))
    return w, tid % WARP


def _exchange(op: str, payload):
    w, lane = _sim_lane()
    w.slots[lane] = (op, payload)
    w.barrier.wait()
    # The result stays valid until every lane has posted its next op, which is after
    # this lane reads it: one barrier per op suffices.
    return w.result[lane]


def _mma_twin_ops(kind: str):
    k = 8 if kind == "tf32" else 16

    def compute(slots):
        a = np.zeros((16, k))
        b = np.zeros((k, 8))
        c = np.zeros((16, 8))
        for lane, (_, (av, bv, cv)) in enumerate(slots):
            g, t = lane >> 2, lane & 3
            ea, eb = _decode(kind, av), _decode(kind, bv)
            if kind == "tf32":
                a[g, t], a[g + 8, t], a[g, t + 4], a[g + 8, t + 4] = ea
                b[t, g], b[t + 4, g] = eb
            else:
                a[g, 2 * t: 2 * t + 2], a[g + 8, 2 * t: 2 * t + 2] = ea[0:2], ea[2:4]
                a[g, 2 * t + 8: 2 * t + 10], a[g + 8, 2 * t + 8: 2 * t + 10] = ea[4:6], ea[6:8]
                b[2 * t: 2 * t + 2, g], b[2 * t + 8: 2 * t + 10, g] = eb[0:2], eb[2:4]
            c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1] = cv
        # Products of TF32/16-bit values are exact in float64 and so is their sum for
        # K <= 16 unless the exponents spread over 53 bits; one rounding to float32.
        d = (a @ b + c).astype(np.float32)
        out = []
        for lane in range(len(slots)):
            g, t = lane >> 2, lane & 3
            out.append((d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1]))
        return out

    return compute


def _ldmatrix_twin(trans: bool):
    def compute(slots):
        rows = [s[1] for s in slots]  # 32 rows of 16 bytes, as 8 uint16
        out = []
        for lane in range(WARP):
            regs = []
            for r in range(4):
                mat = np.stack(rows[8 * r: 8 * r + 8])  # (8, 8) uint16
                if trans:
                    mat = mat.T
                lo, hi = int(mat[lane // 4, 2 * (lane % 4)]), int(mat[lane // 4, 2 * (lane % 4) + 1])
                regs.append(np.uint32(lo | (hi << 16)))
            out.append(tuple(regs))
        return out

    return compute


_TWIN_OPS = {
    "mma_tf32": _mma_twin_ops("tf32"),
    "mma_f16": _mma_twin_ops("f16"),
    "mma_bf16": _mma_twin_ops("bf16"),
    "ldmatrix": _ldmatrix_twin(False),
    "ldmatrix_trans": _ldmatrix_twin(True),
}


def _row16(smem, i):
    """The 16 bytes at ``smem.flat[i]`` as 8 uint16 (simulator)."""
    flat = smem.reshape(-1)
    n = CHUNK_BYTES // flat.dtype.itemsize
    return np.ascontiguousarray(flat[int(i): int(i) + n]).view(np.uint16).copy()


if SIM:

    def _sim_mma(kind):
        op = "mma_" + kind

        def mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            return _exchange(op, ((a0, a1, a2, a3), (b0, b1), (c0, c1, c2, c3)))

        mma.__name__ = op
        return mma

    mma_tf32 = _sim_mma("tf32")
    mma_f16 = _sim_mma("f16")
    mma_bf16 = _sim_mma("bf16")

    def ldmatrix_x4(smem, i):
        return _exchange("ldmatrix", _row16(smem, i))

    def ldmatrix_x4_trans(smem, i):
        return _exchange("ldmatrix_trans", _row16(smem, i))

    def cvt_tf32(bits):
        return np.uint32(tf32_round_bits(bits))

    def _check_chunk(smem, i, src, j):
        """cp.async.cg moves 16-byte chunks: both addresses must be 16-byte aligned, also when
        the source size is 0 (the hardware faults on a misaligned one). The shared buffers are
        declared 16-byte aligned, so their element offset is checked; the global one by its
        address (the simulator's device arrays hold NumPy arrays)."""
        if (int(i) * smem.dtype.itemsize) % CHUNK_BYTES:
            raise AssertionError(f"misaligned 16-byte cp.async destination: shared element {int(i)}")
        base = getattr(src, "_ary", src)
        if (base.ctypes.data + int(j) * base.dtype.itemsize) % CHUNK_BYTES:
            raise AssertionError(f"misaligned 16-byte cp.async source: element {int(j)} of an array at "
                                 f"{base.ctypes.data:#x}")

    def cp_async16(smem, i, src, j):
        # A synchronous copy: the kernel's wait + syncthreads order it as on hardware.
        _check_chunk(smem, i, src, j)
        flat = smem.reshape(-1)
        for e in range(CHUNK_BYTES // flat.dtype.itemsize):
            flat[int(i) + e] = src[int(j) + e]

    def cp_async16_zfill(smem, i, src, j, nbytes):
        # Byte by byte, as the hardware copies: the first nbytes (0 to 16) of the source chunk,
        # zeros after them. A count that cuts an element copies part of it, and every element
        # the count touches must lie inside the source array.
        _check_chunk(smem, i, src, j)
        nb = int(nbytes)
        if nb > CHUNK_BYTES:
            raise AssertionError(f"cp.async source size {nb} is over the {CHUNK_BYTES}-byte chunk")
        flat = smem.reshape(-1)
        size = flat.dtype.itemsize
        chunk = np.zeros(CHUNK_BYTES // size, flat.dtype)
        if nb:
            touched = np.array([src[int(j) + e] for e in range(-(-nb // size))], flat.dtype)
            chunk.view(np.uint8)[:nb] = touched.view(np.uint8)[:nb]
        flat[int(i): int(i) + chunk.size] = chunk

    def cp_async_commit():
        pass

    @functools.cache
    def make_cp_async_wait(n: int):
        def cp_async_wait():
            pass

        return cp_async_wait

    def f16_to_f32(u):
        return np.float32(np.uint16(u).view(np.float16))

    def f32_to_f16(f):
        return np.float32(f).astype(np.float16).view(np.uint16)

    def bf16_to_f32(u):
        return np.uint32(int(u) << 16).view(np.float32)

    def f32_to_bf16(f):
        b = int(np.float32(f).view(np.uint32))
        if (b & 0x7F800000) == 0x7F800000:
            return np.uint16((b >> 16) | (0x40 if b & 0x7FFFFF else 0))  # NaN stays NaN (quiet)
        return np.uint16(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF)

    def f32_bits(f):
        return np.float32(f).view(np.uint32)

    def bits_f32(u):
        return np.uint32(u).view(np.float32)

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    _I32, _I16, _F32, _I64 = ir.IntType(32), ir.IntType(16), ir.FloatType(), ir.IntType(64)

    def _call_asm(builder, ret, args, text, constraints, *, side_effect=False, convergent=False):
        fnty = ir.FunctionType(ret, [a.type for a in args])
        asm = ir.InlineAsm(fnty, text, constraints, side_effect=side_effect)
        return builder.call(asm, args, attrs=("convergent",) if convergent else ())

    def _make_mma(shape: str, types_: str):
        text = (f"mma.sync.aligned.{shape}.row.col.f32.{types_}.{types_}.f32 "
                "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$0,$1,$2,$3};")
        constraints = "=f,=f,=f,=f,r,r,r,r,r,r,0,1,2,3"

        @intrinsic
        def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            u, f = types.uint32, types.float32
            sig = types.UniTuple(f, 4)(u, u, u, u, u, u, f, f, f, f)

            def codegen(context, builder, sig, args):
                ret = ir.LiteralStructType([_F32] * 4)
                out = _call_asm(builder, ret, list(args), text, constraints, convergent=True)
                vals = [builder.extract_value(out, i) for i in range(4)]
                return context.make_tuple(builder, sig.return_type, vals)

            return sig, codegen

        return mma

    mma_tf32 = _make_mma("m16n8k8", "tf32")
    mma_f16 = _make_mma("m16n8k16", "f16")
    mma_bf16 = _make_mma("m16n8k16", "bf16")

    def _shared_address(context, builder, array_type, array, index_type, index):
        """32-bit shared-window address of ``array.flat[index]``: generic -> addrspace(3) -> i32."""
        arr = context.make_array(array_type)(context, builder, array)
        idx = context.cast(builder, index, index_type, types.int64)
        ptr = builder.gep(arr.data, [idx])
        shared = builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, 3))
        return builder.ptrtoint(shared, _I32)

    def _global_address(context, builder, array_type, array, index_type, index):
        arr = context.make_array(array_type)(context, builder, array)
        idx = context.cast(builder, index, index_type, types.int64)
        ptr = builder.gep(arr.data, [idx])
        glob = builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, 1))
        return builder.ptrtoint(glob, _I64)

    def _make_ldmatrix(trans: bool):
        text = "ldmatrix.sync.aligned.m8n8.x4" + (".trans" if trans else "") + ".shared.b16 {$0,$1,$2,$3}, [$4];"

        @intrinsic
        def ldmatrix(typingctx, smem, i):
            sig = types.UniTuple(types.uint32, 4)(smem, i)

            def codegen(context, builder, sig, args):
                addr = _shared_address(context, builder, sig.args[0], args[0], sig.args[1], args[1])
                ret = ir.LiteralStructType([_I32] * 4)
                out = _call_asm(builder, ret, [addr], text, "=r,=r,=r,=r,r,~{memory}", side_effect=True,
                                convergent=True)
                vals = [builder.extract_value(out, k) for k in range(4)]
                return context.make_tuple(builder, sig.return_type, vals)

            return sig, codegen

        return ldmatrix

    ldmatrix_x4 = _make_ldmatrix(False)
    ldmatrix_x4_trans = _make_ldmatrix(True)

    @intrinsic
    def cvt_tf32(typingctx, bits):
        sig = types.uint32(types.uint32)

        def codegen(context, builder, sig, args):
            f = builder.bitcast(args[0], _F32)
            return _call_asm(builder, _I32, [f], "cvt.rna.tf32.f32 $0, $1;", "=r,f")

        return sig, codegen

    @intrinsic
    def cp_async16(typingctx, smem, i, src, j):
        sig = types.void(smem, i, src, j)

        def codegen(context, builder, sig, args):
            dst = _shared_address(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            gsrc = _global_address(context, builder, sig.args[2], args[2], sig.args[3], args[3])
            _call_asm(builder, ir.VoidType(), [dst, gsrc], "cp.async.cg.shared.global [$0], [$1], 16;",
                      "r,l,~{memory}", side_effect=True)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def cp_async16_zfill(typingctx, smem, i, src, j, nbytes):
        sig = types.void(smem, i, src, j, types.uint32)

        def codegen(context, builder, sig, args):
            dst = _shared_address(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            gsrc = _global_address(context, builder, sig.args[2], args[2], sig.args[3], args[3])
            _call_asm(builder, ir.VoidType(), [dst, gsrc, args[4]], "cp.async.cg.shared.global [$0], [$1], 16, $2;",
                      "r,l,r,~{memory}", side_effect=True)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def cp_async_commit(typingctx):
        sig = types.void()

        def codegen(context, builder, sig, args):
            _call_asm(builder, ir.VoidType(), [], "cp.async.commit_group;", "~{memory}", side_effect=True)
            return context.get_dummy_value()

        return sig, codegen

    @functools.cache
    def make_cp_async_wait(n: int):
        """``cp.async.wait_group n``: the count is an immediate in PTX, so one intrinsic per n."""
        text = f"cp.async.wait_group {int(n)};"

        @intrinsic
        def cp_async_wait(typingctx):
            sig = types.void()

            def codegen(context, builder, sig, args):
                _call_asm(builder, ir.VoidType(), [], text, "~{memory}", side_effect=True)
                return context.get_dummy_value()

            return sig, codegen

        return cp_async_wait

    def _unary(text, constraints, arg_type, ret_type, ll_ret, post=None):
        """A one-operand op: inline PTX ``text``, or ``post(builder, value)`` (plain LLVM IR)."""
        @intrinsic
        def op(typingctx, x):
            sig = ret_type(arg_type)

            def codegen(context, builder, sig, args):
                v = context.cast(builder, args[0], sig.args[0], arg_type)
                if text is None:
                    return post(builder, v)
                return _call_asm(builder, ll_ret, [v], text, constraints)

            return sig, codegen

        return op

    f16_to_f32 = _unary("cvt.f32.f16 $0, $1;", "=f,h", types.uint16, types.float32, _F32)
    f32_to_f16 = _unary("cvt.rn.f16.f32 $0, $1;", "=h,f", types.float32, types.uint16, _I16)
    f32_to_bf16 = _unary("cvt.rn.bf16.f32 $0, $1;", "=h,f", types.float32, types.uint16, _I16)
    bf16_to_f32 = _unary(None, None, types.uint16, types.float32, _F32,
                         post=lambda b, v: b.bitcast(b.shl(b.zext(v, _I32), ir.Constant(_I32, 16)), _F32))
    f32_bits = _unary(None, None, types.float32, types.uint32, _I32, post=lambda b, v: b.bitcast(v, _I32))
    bits_f32 = _unary(None, None, types.uint32, types.float32, _F32, post=lambda b, v: b.bitcast(v, _F32))
