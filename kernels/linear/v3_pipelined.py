"""Version 3 of the matmul: the version-2 tiling with a CUTLASS-order software pipeline.

Same math and launch signature as version 2 (:mod:`kernels.matmul_tiled`)::

    y (M, N) = epilogue(op(a) @ op(b)),  op(a) (M, K), op(b) (K, N)
    forward x @ w: NN;   grad_x = g @ w.T: NT (trans_b);   grad_w = x.T @ g: TN (trans_a)

Tiling is version 2's (a :class:`TileConfig` with ``version=3``): a block of
``(BM / TM) (BN / TN)`` threads owns a ``BM x BN`` tile of ``y``, walks K in
slices of ``BK`` staged k-major in two shared buffers (``a_s[stage, k, m]``,
``b_s[stage, k, n]``, rows padded by 16 bytes), each thread keeps a ``TM x TN``
accumulator tile in registers and reads its fragments as runs of 4 (LDS.128).
FLOPs ``2 M N K``; global traffic ``K (M N / BN + M N / BM)`` elements read +
``M N`` written. Shared memory as version 2: 25 KiB for t128x128 float32.

Gained, static only (numba-cuda 0.30.4 NVVM, ptxas / nvdisasm 13.5, sm_90; not measured
on a GPU): v3_t128x128k16w NN's main loop is 1,133 instructions for 16 k-steps, 0.904
FFMA (version 2's t128x128: 609 for 8, 0.841), 79 FFMA issue behind each barrier before
the first read of the new slice (version 2: none), 128 registers, no spills.

What changed against version 2, each a ranked cause of its lost issue slots
(static SASS anatomy, sm_90):

- CUTLASS order. Version 2 loads the k = 0 fragments of a slice only after the
  barrier, so every slice starts cold (50 instructions and no FFMA after each
  BAR). Here the fragments are double-buffered in registers (two named sets,
  ``a0_*`` / ``a1_*``): k-step ``kk`` multiplies set ``kk % 2`` while set
  ``(kk + 1) % 2`` is read for ``kk + 1``; before the last k-step of a slice
  the next slice is stored to the other shared buffer, the block meets at the
  barrier, and the next slice's k = 0 fragments are read right behind it, so
  the last k-step's ``TM * TN`` FFMA cover their latency.
- Unconditional global loads. Every load in the K loop reads a valid address:
  past the last slice the run index stops advancing (the index is selected,
  not the loaded value), so ptxas has no predicate to sink the loads behind
  (version 2's w/k16 candidates lost their global-latency cover that way).
- Vector global loads (``vec=True``, when the operand's contiguous dimension
  is a multiple of 4 and every array is 16-byte aligned): a thread reads runs of
  up to 4 along the stored contiguous dimension in one LDG.64/128, along k for
  a k-contiguous operand (transposed into shared memory by scalar stores) and
  along m / n for the other (stored as one STS.128). ``vec=False`` is version
  2's scalar loader (any shape).
- One run index per thread and operand, advanced by a constant step per slice;
  the shared-memory offsets of the current and next buffer are one add each.

Ragged edges as version 2: slices start at ``-shift`` (``shift = ceil(K / BK)
BK - K``) so only the first slice, loaded before the loop, is guarded; rows and
columns past M or N are clamped to the last one (they feed only outputs that are
never stored). Every M, N >= 1, K >= 0. Accumulation order: every output sums
its products in ascending k, one fused multiply-add each, whatever the tile
(the split-K kernels rely on it, :mod:`kernels.linear.splitk`).

The epilogue is version 2's: one row of thread tiles at a time staged through
shared memory, then :func:`kernels.epilogue.make_group_store` (bias,
activation, dropout, pre-activation) on runs of 4 columns, so the mask contract
is unchanged.
"""

from __future__ import annotations

import functools
import linecache

import numba
import numpy as np
from numba import cuda, uint32, uint64

from .epilogue import PLAIN, Epilogue, make_group_store

GROUP = 4  # rows / columns per fragment run: 4 float32 = one 16-byte shared load
SMEM_LIMIT = 48 * 1024  # static shared memory per block
VECTOR_BYTES = 16

_SIM = bool(numba.config.ENABLE_CUDASIM)

if _SIM:
    # Simulator twins. A shared "address" is a byte offset into the array passed beside it.

    def smem_addr(s):
        return uint32(0)

    def ldg2(a, i):
        return a[i], a[i + 1]

    def ldg4(a, i):
        return a[i], a[i + 1], a[i + 2], a[i + 3]

    def _at(s, addr):
        return int(addr) // s.dtype.itemsize

    def lds1(s, addr):
        return s[_at(s, addr)]

    def lds2(s, addr):
        i = _at(s, addr)
        return s[i], s[i + 1]

    def lds4(s, addr):
        i = _at(s, addr)
        return s[i], s[i + 1], s[i + 2], s[i + 3]

    def sts1(s, addr, v):
        s[_at(s, addr)] = v

    def sts4(s, addr, v0, v1, v2, v3):
        i = _at(s, addr)
        s[i], s[i + 1], s[i + 2], s[i + 3] = v0, v1, v2, v3

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    _I32, _I64 = ir.IntType(32), ir.IntType(64)

    def _align(dtype, width: int) -> int:
        return min(VECTOR_BYTES, width * dtype.bitwidth // 8)

    def _make_ldg(width: int):
        @intrinsic
        def ldg(typingctx, a, i):
            """``a[i : i + width]`` as a tuple in one aligned vector load; ``i`` is a uint32,
            ``&a[i]`` must be aligned to ``width * itemsize`` bytes (at most 16): the caller's duty."""
            sig = types.UniTuple(a.dtype, width)(a, types.uint32)

            def codegen(context, builder, sig, args):
                dtype = sig.args[0].dtype
                vec = ir.VectorType(context.get_value_type(dtype), width)
                arr = context.make_array(sig.args[0])(context, builder, args[0])
                # &a[i] from a 32-bit index in one wide multiply-add (ptxas: a LEA pair): LLVM
                # widens i first and spends three instructions; a 64-bit pointer advanced in
                # the loop costs two adds and two moves into the load's register quad
                mad = ir.InlineAsm(ir.FunctionType(_I64, [_I32, _I32, _I64]), "mad.wide.u32 $0, $1, $2, $3;",
                                   "=l,r,r,l")
                size = ir.Constant(_I32, dtype.bitwidth // 8)
                addr = builder.call(mad, [args[1], size, builder.ptrtoint(arr.data, _I64)])
                ptr = builder.inttoptr(addr, vec.as_pointer(1))  # address space 1: LDG, not LD
                v = builder.load(ptr, align=_align(dtype, width))
                vals = [builder.extract_element(v, ir.Constant(_I32, k)) for k in range(width)]
                return context.make_tuple(builder, sig.return_type, vals)

            return sig, codegen

        return ldg

    @intrinsic
    def smem_addr(typingctx, s):
        """The 32-bit shared-window byte address of shared array ``s``'s first element."""
        sig = types.uint32(s)

        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            elem = context.get_value_type(sig.args[0].dtype)
            return builder.ptrtoint(builder.addrspacecast(arr.data, elem.as_pointer(3)), _I32)

        return sig, codegen

    def _make_lds(width: int):
        @intrinsic
        def lds(typingctx, s, addr):
            """``width`` elements of ``s``'s dtype from shared byte address ``addr`` (uint32), in one
            load aligned to ``width * itemsize`` bytes (at most 16)."""
            ret = s.dtype if width == 1 else types.UniTuple(s.dtype, width)
            sig = ret(s, types.uint32)

            def codegen(context, builder, sig, args):
                dtype = sig.args[0].dtype
                elem = context.get_value_type(dtype)
                if width == 1:
                    return builder.load(builder.inttoptr(args[1], elem.as_pointer(3)), align=dtype.bitwidth // 8)
                vec = ir.VectorType(elem, width)
                v = builder.load(builder.inttoptr(args[1], vec.as_pointer(3)), align=_align(dtype, width))
                vals = [builder.extract_element(v, ir.Constant(_I32, k)) for k in range(width)]
                return context.make_tuple(builder, sig.return_type, vals)

            return sig, codegen

        return lds

    @intrinsic
    def sts1(typingctx, s, addr, v):
        """``v`` to shared byte address ``addr`` (uint32)."""
        sig = types.void(s, types.uint32, s.dtype)

        def codegen(context, builder, sig, args):
            dtype = sig.args[0].dtype
            ptr = builder.inttoptr(args[1], context.get_value_type(dtype).as_pointer(3))
            builder.store(args[2], ptr, align=dtype.bitwidth // 8)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def sts4(typingctx, s, addr, v0, v1, v2, v3):
        """Four elements to shared byte address ``addr`` (uint32) in one 16-byte-aligned store."""
        sig = types.void(s, types.uint32, s.dtype, s.dtype, s.dtype, s.dtype)

        def codegen(context, builder, sig, args):
            dtype = sig.args[0].dtype
            vec = ir.VectorType(context.get_value_type(dtype), 4)
            v = ir.Constant(vec, ir.Undefined)
            for k in range(4):
                v = builder.insert_element(v, args[2 + k], ir.Constant(_I32, k))
            builder.store(v, builder.inttoptr(args[1], vec.as_pointer(3)), align=_align(dtype, 4))
            return context.get_dummy_value()

        return sig, codegen

    ldg2 = _make_ldg(2)
    ldg4 = _make_ldg(4)
    lds1 = _make_lds(1)
    lds2 = _make_lds(2)
    lds4 = _make_lds(4)


def _configs():
    """The version-3 entries of the configuration table (:mod:`.configs`)."""
    from .configs import CONFIGS as ALL

    return tuple(c for c in ALL if c.version == 3)


CONFIGS = _configs()


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class _Src:
    """Lines of generated Python with indentation."""

    def __init__(self):
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, line: str = ""):
        self.lines.append("    " * self.depth + line if line else "")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class _Loader:
    """One operand's global -> register -> shared staging for one thread.

    The ``length x BK`` slice (``length`` = BM for a, BN for b) is cut into runs
    of ``v`` elements along the stored operand's contiguous dimension (k when
    ``kc``, else m / n); run ``q = r * threads + tid`` is run ``r`` of thread
    ``tid``, so a warp's runs are adjacent in memory. A run is loaded in one
    vector load when ``vec``, else element by element at immediate offsets.
    With mn contiguous and not ``vec``, runs are single elements (version 2).
    """

    def __init__(self, op: str, cfg, length: int, kc: bool, vec: bool, arr: str, base: str, dim: str, isz: int):
        self.op, self.kc, self.vec, self.arr, self.base, self.dim, self.isz = op, kc, vec, arr, base, dim, isz
        self.bk, self.length, self.threads = cfg.bk, length, cfg.threads
        per = length * cfg.bk // cfg.threads
        self.v = min(GROUP, per) if (kc or vec) else 1
        assert per % self.v == 0, f"{cfg.name}: runs of {self.v} must split {op}'s {per} elements per thread."
        self.count = per // self.v
        cont = cfg.bk if kc else length
        self.rpr = cont // self.v  # runs per row of the stored contiguous dimension
        assert cont % self.v == 0, f"{cfg.name}: runs of {self.v} must tile {op}'s rows of {cont}."
        assert self.threads >= self.rpr and self.threads % self.rpr == 0, (
            f"{cfg.name}: {self.threads} threads must cover whole rows of {op}'s {self.rpr} runs.")

    def row_offset(self, r: int) -> int:
        """Rows of the stored operand between this thread's run 0 and its run ``r`` (run
        ``r * threads + tid``: the same position along the row, ``r * threads / rpr`` rows on)."""
        return r * (self.threads // self.rpr)

    def setup(self, s: _Src):
        op, v = self.op, self.v
        s(f"{op}_c = (tid % u64({self.rpr}))" + (f" * u64({v})" if v > 1 else ""))
        s(f"{op}_o = tid // u64({self.rpr})")

    def _k_and_mn(self, r):
        o_off = self.row_offset(r)
        cexp, oexp = f"{self.op}_c", (f"{self.op}_o + u64({o_off})" if o_off else f"{self.op}_o")
        return (cexp, oexp) if self.kc else (oexp, cexp)  # (k, mn)

    def prologue(self, s: _Src):
        """Registers of slice 0 (the ragged one, guarded in k) and each run's index of slice 1."""
        op, arr, dim, v = self.op, self.arr, self.dim, self.v
        zeros = ", ".join("zero" for _ in range(v))
        for r in range(self.count):
            k, mn = self._k_and_mn(r)
            s(f"{op}_k{r} = {k}")
            if self.kc:
                # run (mn, k .. k + v - 1) of the stored (length, K): one clamped row, k walks along it
                s(f"{op}_b{r} = min({self.base} + {mn}, {dim} - u64(1)) * kd + kz")
                step = f"u64({self.bk})"
            else:
                # run (k, mn .. mn + v - 1) of the stored (K, length): one row, its column clamped
                # (a vector run as a whole: the dimension is a multiple of v, runs never straddle it)
                s(f"{op}_b{r} = min({self.base} + {mn}, {dim} - u64({v})) + kz * {dim}")
                step = f"u64({self.bk}) * {dim}"
            stride = "" if self.kc else f" * {dim}"
            ok = f"{op}_k{r} >= shift and {op}_k{r} - shift < kl"
            if self.vec and v > 1:
                # k-contiguous vector runs start at multiples of v and K % v == 0: wholly in or out
                idx = f"{op}_b{r} + ({op}_k{r} - shift){stride}"
                s(f"{self.names(r)} = ldg{v}({arr}, u32({idx})) if {ok} else ({zeros},)")
            elif self.kc:
                for j in range(v):
                    kj = f"{op}_k{r} + u64({j})"
                    s(f"{op}_r{r}_{j} = {arr}[{op}_b{r} + {kj} - shift] if {kj} >= shift and {kj} - shift < kl "
                      "else zero")
            else:
                s(f"{op}_r{r}_0 = {arr}[{op}_b{r} + ({op}_k{r} - shift){stride}] if {ok} else zero")
            # index of the run in slice 1; slice 0 when there is none (any valid address: the
            # loop's last load is never stored where it is read)
            nxt = f"{op}_b{r} + (u64({self.bk}) + {op}_k{r} - shift){stride} if ntiles > u64(1) else {op}_b{r}"
            s(f"{op}_i{r} = u32({nxt})")
        s(f"{op}_step = u32({step})")
        if self.kc and not self.vec and v > 1:
            s(f"{op}_last = u64({arr}.size) - u64(1)")

    def names(self, r: int) -> str:
        return ", ".join(f"{self.op}_r{r}_{j}" for j in range(self.v))

    def loop_loads(self, s: _Src):
        op, arr = self.op, self.arr
        for r in range(self.count):
            if self.vec and self.v > 1:
                s(f"{self.names(r)} = ldg{self.v}({arr}, {op}_i{r})")
            else:
                for j in range(self.v):
                    # clamped: with K below one run (one slice) the repeated load would pass the end
                    idx = f"min(u64({op}_i{r}) + u64({j}), {op}_last)" if j else f"u64({op}_i{r})"
                    s(f"{op}_r{r}_{j} = {arr}[{idx}]")
        for r in range(self.count):
            s(f"{op}_i{r} = u32({op}_i{r} + {op}_adv)")

    def thread_part(self, row: int) -> str:
        """This thread's element offset in a shared buffer of rows of ``row``, without the runs' constants."""
        op = self.op
        return f"({op}_c * u64({row}) + {op}_o)" if self.kc else f"({op}_o * u64({row}) + {op}_c)"

    def addr_stores(self, s: _Src, smem: str, addr: str, row: int, isz: int):
        """Shared stores of the staged runs at byte address ``addr`` (this thread's part
        included) plus each run's constant offset: 16-byte stores for runs of 4 along mn."""
        for r in range(self.count):
            o_off = self.row_offset(r)
            if not self.kc and self.v == 4:
                s(f"sts4({smem}, u32({addr} + u32({o_off * row * isz})), "
                  + ", ".join(f"{self.op}_r{r}_{j}" for j in range(4)) + ")")
                continue
            for j in range(self.v):
                const = j * row + o_off if self.kc else o_off * row + j
                s(f"sts1({smem}, u32({addr} + u32({const * isz})), {self.op}_r{r}_{j})")

    def stores(self, s: _Src, smem: str, stage: str, row: int):
        """Shared stores of the staged runs into buffer ``stage`` (an expression: stage * stage size)."""
        for r in range(self.count):
            k, mn = self._k_and_mn(r)
            for j in range(self.v):
                kk, mm = (f"{k} + u64({j})", mn) if self.kc else (k, f"{mn} + u64({j})")
                s(f"{smem}[{stage} + ({kk}) * u64({row}) + {mm}] = {self.op}_r{r}_{j}")


def _thread_offsets(t: int, g: int) -> list[tuple[int, int]]:
    """(run, offset within the run) of each of a thread's ``t`` rows (or columns)."""
    v = t // g
    return [(i // v, i % v) for i in range(t)]


def pipelined_source(cfg, dtype, trans_a: bool, trans_b: bool, ep: Epilogue, vec: bool = False,
                     split: bool = False) -> tuple[str, dict]:
    """The generated kernel's Python source and its globals (for ``exec``).

    ``split``: the split-K partial kernel (:mod:`kernels.linear.splitk`): block z sums one
    K chunk into ``ws[z]`` with no epilogue (``ep`` must be PLAIN).

    ``vec``: vector global loads (every run of the stored contiguous dimensions starts
    16-byte aligned: the caller checks the dimensions and the arrays' alignment).
    """
    dtype = np.dtype(dtype)
    if cfg.shared_bytes(dtype) > SMEM_LIMIT:
        raise ValueError(f"{cfg.name} needs {cfg.shared_bytes(dtype)} bytes of shared memory in {dtype}, "
                         f"over the {SMEM_LIMIT}-byte static limit; pick a smaller tile for {dtype}")
    assert cfg.bk % 2 == 0, f"{cfg.name}: the K step must be even (two fragment sets alternate); got {cfg.bk}."
    nbtype = numba.from_dtype(dtype)
    bm, bn, bk, tm, tn = cfg.bm, cfg.bn, cfg.bk, cfg.tm, cfg.tn
    gm, gn = max(1, tm // GROUP), max(1, tn // GROUP)
    vm, vn = tm // gm, tn // gn
    pad = cfg.pad(dtype)
    ra_row, rb_row = bm + pad, bn + pad  # shared row lengths
    sa, sb = bk * ra_row, bk * rb_row  # elements per shared buffer
    a_kc, b_kc = not trans_a, trans_b  # is k the contiguous dimension of the stored operand?
    s = _Src()
    if split:
        s(f"def matmul_v3_{cfg.name}(a, b, ws, kd, chunk):")
    else:
        s(f"def matmul_v3_{cfg.name}(a, b, bias, y, zout, kd, k0, k1, offset, threshold, scale):")
    s.depth = 1
    s(f"# {cfg.name} (v3): block tile {bm} x {bn}, K step {bk}, thread tile {tm} x {tn}, {cfg.threads} threads, "
      f"{'vector' if vec else 'scalar'} global loads.")
    s(f"# a is the flat ({'K, M' if trans_a else 'M, K'}), b the flat ({'N, K' if trans_b else 'K, N'}), "
      + ("ws is (splits, M, N): split z's partial sums." if split else "y and zout are (M, N), bias (N)."))
    if split:
        s("z = u64(u32(cuda.blockIdx.z))")
        s("y = ws[z]")
    s("m = u64(y.shape[0])")
    s("n = u64(y.shape[1])")
    align = "" if _SIM else ", alignment=16"  # 16-byte shared accesses; the simulator takes no alignment
    s(f"a_s = cuda.shared.array({2 * sa}, nbtype{align})")
    s(f"b_s = cuda.shared.array({2 * sb}, nbtype{align})")
    s(f"c_s = cuda.shared.array(({bm // tm}, {bn + pad}), nbtype)")
    s("tid = u64(u32(cuda.threadIdx.x))")
    s(f"row0 = u64(u32(cuda.blockIdx.x)) * u64({bm})")
    s(f"col0 = u64(u32(cuda.blockIdx.y)) * u64({bn})")
    s("# The K slices start at -shift, so the first one holds the ragged remainder")
    s("# and every later one lies wholly inside K: only the first is guarded.")
    if split:
        s("# Split z sums k in [z chunk, min((z + 1) chunk, K)): the partition is the caller's chunk,")
        s("# never the grid, so the result bits do not depend on the launch geometry.")
        s("kz = z * chunk")
        s("kl = min(chunk, kd - kz)")
    else:
        s("kz = u64(0)")
        s("kl = kd")
    s(f"ntiles = (kl + u64({bk - 1})) // u64({bk})")
    s(f"shift = ntiles * u64({bk}) - kl")
    la = _Loader("la", cfg, bm, a_kc, vec, "a", "row0", "m", dtype.itemsize)
    lb = _Loader("lb", cfg, bn, b_kc, vec, "b", "col0", "n", dtype.itemsize)
    s("# Loads: consecutive threads read consecutive runs of each operand.")
    la.setup(s)
    lb.setup(s)
    la.prologue(s)
    lb.prologue(s)
    la.stores(s, "a_s", "u64(0)", ra_row)
    lb.stores(s, "b_s", "u64(0)", rb_row)
    s("# This thread's rows and columns of the block tile: runs of 4, half a tile apart.")
    if cfg.warp:
        wr, wc = cfg.warp
        s(f"# A warp covers {wr} x {wc} thread tiles: each shared fragment load reads {wr} (a) or {wc} (b)")
        s("# distinct 16-byte runs, one wavefront each.")
        s("lane = tid % u64(32)")
        s("warp = tid // u64(32)")
        s(f"ty = (warp // u64({bn // tn // wc})) * u64({wr}) + lane // u64({wc})")
        s(f"tx = (warp % u64({bn // tn // wc})) * u64({wc}) + lane % u64({wc})")
    else:
        s(f"ty = tid // u64({bn // tn})")
        s(f"tx = tid % u64({bn // tn})")
    s(f"ra = ty * u64({vm})")
    s(f"cb = tx * u64({vn})")
    ra = [r * (bm // gm) + o for r, o in _thread_offsets(tm, gm)]
    cb = [r * (bn // gn) + o for r, o in _thread_offsets(tn, gn)]
    for i in range(tm):
        s(", ".join(f"c{i}_{j}" for j in range(tn)) + " = " + ", ".join("zero" for _ in range(tn)))
    s("# Slice 0 must be complete before any thread reads it.")
    s("cuda.syncthreads()")

    isz = dtype.itemsize
    sab, sbb = sa * isz, sb * isz  # bytes per shared buffer

    def ffma(buf: int):
        for i in range(tm):
            for j in range(tn):
                s(f"c{i}_{j} += a{buf}_{i} * b{buf}_{j}")

    def frags(buf: int, kk: int):
        for side, t, g, v, offs, row, rd in (("a", tm, gm, vm, ra, ra_row, "rd_a"), ("b", tn, gn, vn, cb, rb_row, "rd_b")):
            for run in range(g):
                names = ", ".join(f"{side}{buf}_{run * v + e}" for e in range(v))
                s(f"{names} = lds{v}({side}_s, u32({rd} + u32({(kk * row + offs[run * v]) * isz})))")

    s("# Shared byte addresses (32-bit): this thread's fragment runs in the buffer being read")
    s("# (rd_*) and its staging stores into the other one (st_*). Each flips between the two")
    s("# buffers as (flip - address): one add per slice.")
    s("a_base = smem_addr(a_s)")
    s("b_base = smem_addr(b_s)")
    s(f"rd_a = u32(u64(a_base) + ra * u64({isz}))")
    s(f"rd_b = u32(u64(b_base) + cb * u64({isz}))")
    s(f"flip_rd_a = u32(u64(rd_a) * u64(2) + u64({sab}))")
    s(f"flip_rd_b = u32(u64(rd_b) * u64(2) + u64({sbb}))")
    s(f"st_a = u32(u64(a_base) + {la.thread_part(ra_row)} * u64({isz}))")
    s(f"st_b = u32(u64(b_base) + {lb.thread_part(rb_row)} * u64({isz}))")
    s(f"flip_st_a = u32(u64(st_a) * u64(2) + u64({sab}))")
    s(f"flip_st_b = u32(u64(st_b) * u64(2) + u64({sbb}))")
    s(f"st_a = u32(st_a + u32({sab}))")
    s(f"st_b = u32(st_b + u32({sbb}))")
    s("# The k = 0 fragments of slice 0 (fragment set 0); set 1 starts at zero, so the first")
    s("# trip's deferred k-step adds 0 * 0 to the zero accumulators (exactly +0).")
    frags(0, 0)
    for i in range(tm):
        s(f"a1_{i} = zero")
    for j in range(tn):
        s(f"b1_{j} = zero")
    s("# 32-bit loop arithmetic (Numba widens sums: every update is cast back).")
    s("nt = u32(ntiles)")
    s("last = u32(max(ntiles, u64(1)) - u64(1))")
    s("t = u32(1)")
    s("while t <= nt:")
    s.depth += 1
    s("# The previous slice's last k-step (fragment set 1), deferred to here so it issues")
    s("# behind the barrier while this slice's k = 0 fragments (set 0) are in flight.")
    ffma(1)
    s("# Slice t into registers, overlapping this slice's multiply. Past the last slice the")
    s("# index stops (t + 1 < nt is false): the load is repeated, never predicated.")
    s("la_adv = la_step if t < last else u32(0)")
    s("lb_adv = lb_step if t < last else u32(0)")
    la.loop_loads(s)
    lb.loop_loads(s)
    for kk in range(bk - 1):
        frags((kk + 1) % 2, kk + 1)
        ffma(kk % 2)
    s("# The next slice into the other buffer (last read before the previous barrier).")
    la.addr_stores(s, "a_s", "st_a", ra_row, isz)
    lb.addr_stores(s, "b_s", "st_b", rb_row, isz)
    s("rd_a = u32(flip_rd_a - rd_a)")
    s("rd_b = u32(flip_rd_b - rd_b)")
    s("st_a = u32(flip_st_a - st_a)")
    s("st_b = u32(flip_st_b - st_b)")
    s("# The new slice must be complete, and everyone done with the old one, before it is read.")
    s("cuda.syncthreads()")
    frags(0, 0)
    s("t = u32(t + u32(1))")
    s.depth -= 1
    s("# The last slice's last k-step.")
    ffma(1)
    s("# Epilogue, one row of the thread tiles per pass: stage it in shared memory, then")
    s("# the block applies bias / activation / dropout to runs of 4 columns and stores them")
    s("# coalesced. A rolled loop here keeps one copy of the epilogue code (Philox is long).")
    s(f"for p in range(u64({tm})):")
    s.depth += 1
    for i in range(tm):
        s(f"{'if' if i == 0 else 'elif'} p == u64({i}):")
        s.depth += 1
        for j in range(tn):
            s(f"c_s[ty, cb + u64({cb[j]})] = c{i}_{j}")
        s.depth -= 1
    s("# The staged rows must be complete before the block reads them.")
    s("cuda.syncthreads()")
    s(f"rp = row0 + (p // u64({vm})) * u64({bm // gm}) + p % u64({vm})")
    s(f"for e in range(tid, u64({(bm // tm) * bn // GROUP}), u64({cfg.threads})):")
    s.depth += 1
    s(f"sr = e // u64({bn // GROUP})")
    s(f"sc = (e % u64({bn // GROUP})) * u64({GROUP})")
    s(f"r = rp + sr * u64({vm})")
    s("if r < m:")
    s.depth += 1
    tail = "y, y, y[0], r" if split else "y, zout, bias, r"
    args = "n, u32(0), u32(0), u64(0), u64(0), zero" if split else "n, k0, k1, offset, threshold, scale"
    s(f"store({tail}, col0 + sc, c_s[sr, sc], c_s[sr, sc + u64(1)], c_s[sr, sc + u64(2)], "
      f"c_s[sr, sc + u64(3)], {args})")
    s.depth -= 2
    s("# Everyone must be done reading before the next pass overwrites the staged rows.")
    s("cuda.syncthreads()")
    s.depth -= 1
    glb = {
        "cuda": cuda, "u32": uint32, "u64": uint64, "nbtype": nbtype, "zero": dtype.type(0),
        "store": make_group_store(PLAIN if split else ep, dtype.type), "ldg2": ldg2, "ldg4": ldg4,
        "smem_addr": smem_addr, "lds1": lds1, "lds2": lds2, "lds4": lds4, "sts1": sts1, "sts4": sts4,
    }
    return s.text(), glb


def pipelined_function(cfg, dtype, trans_a: bool, trans_b: bool, ep: Epilogue = PLAIN, vec: bool = False,
                       split: bool = False):
    """The uncompiled Python kernel: the generated source, exec'd (and registered with
    linecache so tracebacks and ``inspect`` show it)."""
    assert not (split and ep != PLAIN), "The split-K partial kernel has no epilogue: the reduction applies it."
    text, glb = pipelined_source(cfg, dtype, trans_a, trans_b, ep, vec, split)
    tag = f"{'T' if trans_a else 'N'}{'T' if trans_b else 'N'}"
    filename = f"<gpufc.kernels.linear.v3 {cfg.name} {np.dtype(dtype).name} {tag} {ep.tag} {'vec' if vec else 'scalar'}{' split' if split else ''}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    exec(compile(text, filename, "exec"), glb)  # noqa: S102 (our own generated source, no user input)
    return glb[f"matmul_v3_{cfg.name}"]


def signature(dtype) -> str:
    """Launch signature of every version-3 kernel (version 2's): flat operands, K explicit.

    (a, b, bias, y, zout, K, k0, k1, offset, threshold, scale)
    """
    t = numba.from_dtype(np.dtype(dtype))
    return (f"void({t}[::1], {t}[::1], {t}[::1], {t}[:, ::1], {t}[:, ::1], "
            f"uint64, uint32, uint32, uint64, uint64, {t})")


def _bounds(cfg, trans_a, trans_b, vec):
    """Launch bounds: the configuration's, except for the scalar loader of a register-capped
    tile, which spills under the cap (104 bytes for v3_t128x128k16w NN, sm_90) and runs uncapped."""
    return cfg.launch_bounds(trans_a, trans_b) if vec else None


def _jit(cfg, sig, fn, trans_a, trans_b, vec=True):
    bounds = _bounds(cfg, trans_a, trans_b, vec)
    # the simulator's jit takes no launch_bounds (and has no registers to bound)
    options = {"launch_bounds": bounds} if bounds and not _SIM else {}
    return cuda.jit(sig, **options)(fn)


@functools.cache
def make_kernel(cfg, dtype, trans_a=False, trans_b=False, ep: Epilogue = PLAIN, vec=False):
    """Compiled kernel for one (config, dtype, transposes, epilogue, vector loads), cached."""
    return _jit(cfg, signature(dtype), pipelined_function(cfg, dtype, trans_a, trans_b, ep, vec), trans_a, trans_b,
                vec)


@functools.cache
def make_partial_kernel(cfg, dtype, trans_a=False, trans_b=False, vec=False):
    """Compiled split-K partial kernel (:mod:`kernels.linear.splitk`), cached."""
    from .splitk import partial_signature

    fn = pipelined_function(cfg, dtype, trans_a, trans_b, PLAIN, vec, split=True)
    return _jit(cfg, partial_signature(dtype), fn, trans_a, trans_b, vec)


def _address(arr) -> int:
    cai = getattr(arr, "__cuda_array_interface__", None)
    if cai is None:  # the simulator's arrays: NumPy arrays underneath
        return int(arr.ctypes.data)
    return int(cai["data"][0] or 0)


def vector_ok(a, b, m: int, n: int, k: int, trans_a: bool, trans_b: bool) -> bool:
    """Whether the vector loads apply: each operand's stored contiguous dimension a multiple
    of 4 and both arrays 16-byte aligned."""
    cont_a = m if trans_a else k
    cont_b = k if trans_b else n
    if cont_a % 4 or cont_b % 4:
        return False
    return _address(a) % VECTOR_BYTES == 0 and _address(b) % VECTOR_BYTES == 0


U32_LIMIT = 2**32


def launch(a, b, bias, y, zout, *, cfg, trans_a=False, trans_b=False, ep: Epilogue = PLAIN, key=(0, 0), offset=0,
           threshold=0, scale=0.0, stream=0, chunk=None, ws=None):
    """Launch ``y = epilogue(op(a) @ op(b))`` with a version-3 configuration ``cfg``.

    Shapes as ``kernels.matmul.launch_matmul``: a (M, K) or (K, M) with trans_a; b (K, N) or
    (N, K) with trans_b; bias (N,); y and zout (M, N); device arrays, C-contiguous; M, N > 0.
    ``chunk``: split K into chunks of ``chunk`` (:mod:`kernels.linear.splitk`), summing the
    partial products in ``ws`` (splits, M, N), which the caller allocates
    (``splitk.splits_for(K, chunk)`` splits); None: one pass.
    """
    from . import splitk

    dtype = np.dtype(y.dtype)
    m, n = y.shape
    k = a.shape[0] if trans_a else a.shape[1]
    if max(a.size, b.size) >= U32_LIMIT:
        raise ValueError(f"{cfg.name} indexes the operands with 32 bits: a and b must have fewer than 2**32 "
                         f"elements, got {a.size} and {b.size}")
    gx, gy = ceil_div(m, cfg.bm), ceil_div(n, cfg.bn)
    if gy > 65535:
        raise ValueError(f"y has {n} columns; {cfg.name} launches at most 65535 column tiles ({65535 * cfg.bn} columns)")
    vec = vector_ok(a, b, m, n, k, trans_a, trans_b)
    fa, fb = a.reshape(a.size), b.reshape(b.size)
    tail = (np.uint32(key[0]), np.uint32(key[1]), np.uint64(offset), np.uint64(threshold), dtype.type(scale))
    if chunk is None:
        kern = make_kernel(cfg, dtype.type, bool(trans_a), bool(trans_b), ep, vec)
        kern[(gx, gy), (cfg.threads,), stream](fa, fb, bias, y, zout, np.uint64(k), *tail)
        return
    splits = splitk.splits_for(k, chunk)
    if ws is None or tuple(ws.shape) != (splits, m, n) or np.dtype(ws.dtype) != dtype:
        got = None if ws is None else (tuple(ws.shape), np.dtype(ws.dtype).name)
        raise ValueError(f"ws must be a ({splits}, {m}, {n}) {dtype.name} workspace for K={k}, chunk={chunk}; got {got}")
    if splits > 65535:
        raise ValueError(f"chunk={chunk} cuts K={k} into {splits} splits; at most 65535")
    part = make_partial_kernel(cfg, dtype.type, bool(trans_a), bool(trans_b), vec)
    part[(gx, gy, splits), (cfg.threads,), stream](fa, fb, ws, np.uint64(k), np.uint64(chunk))
    red = splitk.make_reduce_kernel(dtype.type, ep)
    red[splitk.reduce_grid(m, n), splitk.REDUCE_THREADS, stream](ws, bias, y, zout, *tail)


def catalogue():
    """KernelSpec entries (see kernels.catalogue) the linear op's catalogue does not already hold,
    sm_90 only (compile-tier time): every version-3 configuration's scalar-load NN forward (the
    loader for shapes whose contiguous dimensions are not multiples of 4; the op's catalogue
    compiles the vector loader, every layout); split-K's partial kernels (NN, NT, TN) of the
    tiles split-K uses and its reduction (plain and the full epilogue)."""
    from ..catalogue import KernelSpec
    from . import splitk

    full = Epilogue("gelu", bias=True, dropout=True, save_preact=True)
    f32 = np.float32
    sm90 = ((9, 0),)
    for cfg in CONFIGS:
        yield KernelSpec(f"matmul_scalar/{cfg.name}/float32/NN/id", pipelined_function(cfg, f32, False, False),
                         signature(f32), main_loop=True, launch_bounds=_bounds(cfg, False, False, False),
                         threads=cfg.threads, archs=sm90)
    for cfg in CONFIGS:
        if cfg.name not in splitk.SPLIT_K_CONFIGS:
            continue
        for ta, tb in ((False, False), (False, True), (True, False)):
            tag = ("T" if ta else "N") + ("T" if tb else "N")
            yield KernelSpec(
                f"splitk/{cfg.name}/float32/{tag}/partial", pipelined_function(cfg, f32, ta, tb, PLAIN, True, True),
                splitk.partial_signature(f32), main_loop=True, launch_bounds=cfg.launch_bounds(ta, tb),
                threads=cfg.threads, archs=sm90,
            )
    for ep in (PLAIN, full):
        yield KernelSpec(f"splitk/reduce/float32/{ep.tag}", splitk.reduce_source(f32, ep), splitk.reduce_signature(f32),
                         threads=splitk.REDUCE_THREADS, archs=sm90)
