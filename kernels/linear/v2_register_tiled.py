"""Version 2 of the matmul: register-tiled, double-buffered, code-generated.

Same math as :mod:`kernels.linear` (read its docstring first)::

    y (M, N) = epilogue(op(a) @ op(b)),  op(a) (M, K), op(b) (K, N)
    forward x @ w: NN;   grad_x = g @ w.T: NT (trans_b);   grad_w = x.T @ g: TN (trans_a)

Tiling (one :class:`TileConfig`): a block of ``threads = (BM / TM) * (BN / TN)``
threads owns a ``BM x BN`` tile of ``y`` (blockIdx.x walks the row tiles, so M
has no practical limit; blockIdx.y the column tiles). It walks K in slices of
``BK``, staging a ``BK x BM`` slice of ``op(a)`` and a ``BK x BN`` slice of
``op(b)`` in shared memory, both k-major (``a_s[k, m]``, ``b_s[k, n]``), so a
thread's operands for one k are contiguous. Each thread keeps a ``TM x TN``
accumulator tile in registers; per k it reads TM + TN values from shared memory
and issues TM * TN fused multiply-adds (at 8 x 8: 64 FFMA per four 16-byte
shared loads, against v1's one FFMA per two 4-byte loads). FLOPs ``2 M N K``;
global traffic ``K (M N / BN + M N / BM)`` elements read (each operand re-read
once per block column / row) + ``M N`` written.

- Thread tile: runs of 4 rows and 4 columns spread over the block tile (at
  TM = 8 thread (ty, tx) owns rows ``{0, BM/2} + 4 ty + {0..3}``), so each run
  is one 16-byte shared load (LDS.128) and a warp's loads hit distinct banks.
- Double buffering: slice t + 1 is loaded from global memory into registers
  before the multiply of slice t (the loads overlap the FFMAs; they are
  predicated, not branched around, since behind a branch the compiler sinks
  them below the multiply), stored into the other buffer after it: one
  ``syncthreads`` per slice.
- Global loads, scalar: an operand stored with k contiguous (``a`` in NN, ``b``
  in NT) is read in runs of 4 along k per thread (one index, immediate
  offsets) and transposed into shared memory, whose rows are padded by 16 bytes
  so those stores miss bank conflicts; an operand stored with m or n contiguous
  is read one element per thread per row, consecutive threads on consecutive
  columns (coalesced, conflict-free stores).
- Ragged edges without guards in the K loop: the slices start at ``-shift``
  (``shift = ceil(K / BK) BK - K``), so only the first, loaded before the loop,
  is ragged and guarded; rows and columns past M or N are clamped to the last
  one (they feed only outputs that are never stored). Every M, N >= 1, K >= 0.
- Generated source: Numba leaves a natural ``for k / for i / for j`` tile
  rolled (58% FFMA in the loop), so the K step's body is written out, with
  ``TM * TN`` named accumulators (no arrays: no local memory). Index math is
  unsigned 64-bit (no negative-index wraparound selects, no overflow past
  2**31 elements); operands are passed flat with K explicit, so a run needs
  one index.
- Epilogue, one row of the thread tiles per pass: staged through shared memory,
  then each thread applies :func:`kernels.linear.epilogue.make_group_store` (bias,
  activation, dropout, pre-activation) to runs of 4 consecutive columns and
  stores them, coalesced, one store per element. A rolled loop keeps a single
  copy of the Philox code (an unrolled 8 x 8 epilogue took 34 s to compile).

Shared memory: ``(2 BK (BM + BN + 2 pad) + (BM / TM) (BN + pad)) itemsize`` bytes,
pad = 16 bytes (25 KiB for t128x128 float32). Registers, spills, occupancy and
the main loop's FFMA share of every configuration: ``python bench/kernel_report.py``.

Configurations are data: :data:`.configs.CONFIGS`; :func:`choose_config` is the one
place that picks one by shape, among :data:`PREFERRED` (the other entries of
:data:`DTYPE_CONFIGS` are candidates, run only when forced);
``launch_matmul(config=...)`` overrides.
"""

from __future__ import annotations

import dataclasses
import linecache

import numpy as np
from numba import cuda, uint32, uint64

from .configs import GROUP, SMEM_LIMIT, TileConfig
from .epilogue import PLAIN, Epilogue, make_group_store

# ----------------------------------------------------------------------------
# Source generation
# ----------------------------------------------------------------------------


class _Src:
    """Lines of generated Python with indentation."""

    def __init__(self):
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, line: str = ""):
        self.lines.append("    " * self.depth + line if line else "")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _thread_offsets(block: int, t: int, g: int) -> list[tuple[int, int]]:
    """(run, offset within the run) of each of a thread's ``t`` rows (or columns):
    local index = run * (block / g) + thread coordinate * (t / g) + offset."""
    v = t // g
    return [(i // v, i % v) for i in range(t)]


@dataclasses.dataclass(frozen=True)
class _Run:
    """``v`` consecutive elements of one operand along its stored contiguous
    dimension, loaded by one thread: slice coordinates of the first element."""

    mn: str  # offset within the BM (or BN) side of the slice
    k: str  # offset within the BK side
    v: int
    k_off: int = 0  # the constant part of ``k`` (rows below the thread's first)


def _loader(src: _Src, cfg: TileConfig, op: str, length: int, k_contiguous: bool) -> list[_Run]:
    """Emit one operand's per-thread load coordinates; return the thread's runs.

    The ``length x BK`` slice is cut into runs of ``v`` elements along the
    stored operand's contiguous dimension; run ``q = r * threads + tid`` is run
    ``r`` of thread ``tid``, so a warp's runs are adjacent and its loads, taken
    together, read whole sectors. With k contiguous, ``v = min(4, per thread)``:
    one index per run, its elements at immediate offsets. With mn contiguous,
    ``v = 1``: the thread's elements share one (clamped) column and differ by
    whole rows, offsets that are the same in every thread (uniform registers);
    runs along mn would need a clamped column per element, 3 more registers.
    """
    threads = cfg.threads
    per_thread = length * cfg.bk // threads
    v = min(GROUP, per_thread) if k_contiguous else 1
    cont = cfg.bk if k_contiguous else length
    assert per_thread % v == 0 and cont % v == 0, f"{cfg.name}: runs of {v} must tile the slice."
    runs_per_row = cont // v
    assert threads >= runs_per_row and threads % runs_per_row == 0, (
        f"{cfg.name}: {threads} threads must cover whole rows of {runs_per_row} runs.")
    src(f"{op}_c = (tid % u64({runs_per_row}))" + (f" * u64({v})" if v > 1 else ""))
    src(f"{op}_o = tid // u64({runs_per_row})")
    runs = []
    for r in range(per_thread // v):
        # run r of thread tid is run r * threads + tid: the same column, r * threads // runs_per_row rows on
        o_off = r * (threads // runs_per_row)
        c = f"{op}_c"
        o = f"{op}_o + u64({o_off})" if o_off else f"{op}_o"
        runs.append(_Run(o, c, v) if k_contiguous else _Run(c, o, v, o_off))
    return runs


def _emit_operand_setup(src: _Src, op: str, runs: list[_Run], k_contiguous: bool, arr: str, base: str,
                        dim_mn: str, bk: int):
    """Prologue: registers of slice 0 (the ragged one, guarded in k) and the run
    indices of slice 1, which the K loop advances by ``{op}_step`` per slice.

    Rows (columns) past the edge are clamped to the last one: they only feed
    outputs that are never stored, so no load in the K loop needs a guard in mn.
    """
    for r, run in enumerate(runs):
        src(f"{op}_k{r} = {run.k}")
        if k_contiguous:
            # elements (mn, k + j): one row, clamped; the loop index walks along it
            src(f"{op}_mn{r} = min({base} + {run.mn}, {dim_mn} - u64(1)) * kd")
            for j in range(run.v):
                kj = f"{op}_k{r} + u64({j})"
                src(f"{op}_r{r}_{j} = {arr}[{op}_mn{r} + {kj} - shift] if {kj} >= shift and {kj} - shift < kd else zero")
            src(f"{op}_i{r} = {op}_mn{r} + u64({bk}) - shift + {op}_k{r}")
        else:
            # element (mn, k): its column clamped (shared by runs in one column); one row
            # index per thread walks down, each run k_off rows below it
            col = _col_name(op, runs, r)
            if col == f"{op}_col{r}":
                src(f"{col} = u32(min({base} + {run.mn}, {dim_mn} - u64(1)))")
            ok = f"{op}_k{r} >= shift and {op}_k{r} - shift < kd"
            src(f"{op}_r{r}_0 = {arr}[({op}_k{r} - shift) * {dim_mn} + {col}] if {ok} else zero")
            src(f"{op}_d{r} = u64({run.k_off}) * {dim_mn}" if run.k_off else f"{op}_d{r} = u64(0)")
    if not k_contiguous:
        src(f"{op}_kb = (u64({bk}) - shift + {op}_o) * {dim_mn}")


def _col_name(op: str, runs: list[_Run], r: int) -> str:
    """The variable holding run ``r``'s clamped column: the first run with the same column's."""
    first = next(i for i, run in enumerate(runs) if run.mn == runs[r].mn)
    return f"{op}_col{first}"


def _emit_loop_loads(src: _Src, op: str, runs: list[_Run], k_contiguous: bool, arr: str):
    for r, run in enumerate(runs):
        if k_contiguous:
            for j in range(run.v):
                src(f"{op}_r{r}_{j} = {arr}[{op}_i{r} + u64({j})] if more else zero")
            src(f"{op}_i{r} += {op}_step")
        else:
            src(f"{op}_r{r}_0 = {arr}[{op}_kb + {op}_d{r} + {_col_name(op, runs, r)}] if more else zero")
    if not k_contiguous:
        src(f"{op}_kb += {op}_step")


def _emit_stores(src: _Src, op: str, runs: list[_Run], k_contiguous: bool, smem: str, buf: str):
    for r, run in enumerate(runs):
        for j in range(run.v):
            kk, mn = (f"{run.k} + u64({j})", run.mn) if k_contiguous else (run.k, f"{run.mn} + u64({j})")
            src(f"{smem}[{buf}, {kk}, {mn}] = {op}_r{r}_{j}")


def tiled_source(cfg: TileConfig, dtype, trans_a: bool, trans_b: bool, ep: Epilogue) -> tuple[str, dict]:
    """The generated kernel's Python source and its globals (for ``exec``)."""
    import numba

    dtype = np.dtype(dtype)
    if cfg.shared_bytes(dtype) > SMEM_LIMIT:
        raise ValueError(f"{cfg.name} needs {cfg.shared_bytes(dtype)} bytes of shared memory in {dtype}, "
                         f"over the {SMEM_LIMIT}-byte static limit; pick a smaller tile for {dtype}")
    nbtype = numba.from_dtype(dtype)
    bm, bn, bk, tm, tn = cfg.bm, cfg.bn, cfg.bk, cfg.tm, cfg.tn
    gm, gn = cfg.gm, cfg.gn
    vm, vn = tm // gm, tn // gn
    pad = cfg.pad(dtype)
    a_kc, b_kc = not trans_a, trans_b  # is k the contiguous dimension of the stored operand?
    s = _Src()
    s(f"def matmul_{cfg.name}(a, b, bias, y, zout, kd, k0, k1, offset, threshold, scale):")
    s.depth = 1
    s(f"# {cfg.name}: block tile {bm} x {bn}, K step {bk}, thread tile {tm} x {tn}, {cfg.threads} threads.")
    s(f"# a is the flat ({'K, M' if trans_a else 'M, K'}), b the flat ({'N, K' if trans_b else 'K, N'}), "
      "y and zout are (M, N), bias (N).")
    s("m = u64(y.shape[0])")
    s("n = u64(y.shape[1])")
    s(f"a_s = cuda.shared.array((2, {bk}, {bm + pad}), nbtype)")
    s(f"b_s = cuda.shared.array((2, {bk}, {bn + pad}), nbtype)")
    s(f"c_s = cuda.shared.array(({bm // tm}, {bn + pad}), nbtype)")
    s("tid = u64(u32(cuda.threadIdx.x))")
    s(f"row0 = u64(u32(cuda.blockIdx.x)) * u64({bm})")
    s(f"col0 = u64(u32(cuda.blockIdx.y)) * u64({bn})")
    s("# The K slices start at -shift, so the first one holds the ragged remainder")
    s("# and every later one lies wholly inside K: only the first is guarded.")
    s(f"ntiles = (kd + u64({bk - 1})) // u64({bk})")
    s(f"shift = ntiles * u64({bk}) - kd")
    s("# Loads: consecutive threads read consecutive addresses of each operand.")
    la = _loader(s, cfg, "la", bm, a_kc)
    lb = _loader(s, cfg, "lb", bn, b_kc)
    _emit_operand_setup(s, "la", la, a_kc, "a", "row0", "m", bk)
    _emit_operand_setup(s, "lb", lb, b_kc, "b", "col0", "n", bk)
    s("# Index step from one K slice to the next.")
    s(f"la_step = u64({bk}){'' if a_kc else ' * m'}")
    s(f"lb_step = u64({bk}){'' if b_kc else ' * n'}")
    _emit_stores(s, "la", la, a_kc, "a_s", "0")
    _emit_stores(s, "lb", lb, b_kc, "b_s", "0")
    s("# This thread's rows and columns of the block tile: runs of 4, half a tile apart.")
    if cfg.warp:
        wr, wc = cfg.warp
        s(f"# A warp covers {wr} x {wc} thread tiles: each of its shared loads reads {wr} (a) or {wc} (b)")
        s("# distinct 16-byte runs, one wavefront each, where a row of the thread grid needs two for b.")
        s("lane = tid % u64(32)")
        s("warp = tid // u64(32)")
        s(f"ty = (warp // u64({bn // tn // wc})) * u64({wr}) + lane // u64({wc})")
        s(f"tx = (warp % u64({bn // tn // wc})) * u64({wc}) + lane % u64({wc})")
    else:
        s(f"ty = tid // u64({bn // tn})")
        s(f"tx = tid % u64({bn // tn})")
    s(f"ra = ty * u64({vm})")
    s(f"cb = tx * u64({vn})")
    ra = [f"ra + u64({r * (bm // gm) + o})" for r, o in _thread_offsets(bm, tm, gm)]
    cb = [f"cb + u64({r * (bn // gn) + o})" for r, o in _thread_offsets(bn, tn, gn)]
    for i in range(tm):
        s(", ".join(f"c{i}_{j}" for j in range(tn)) + " = " + ", ".join("zero" for _ in range(tn)))
    s("# Slice 0 must be complete before any thread reads it.")
    s("cuda.syncthreads()")
    s("cur = u64(0)")
    s("for t in range(u64(1), ntiles + u64(1)):")
    s.depth += 1
    s("# Slice t into registers first, so its loads overlap the multiply of slice t - 1.")
    s("# Predicated loads, not a branch: behind a branch the compiler sinks them below the multiply.")
    s("more = t < ntiles")
    _emit_loop_loads(s, "la", la, a_kc, "a")
    _emit_loop_loads(s, "lb", lb, b_kc, "b")
    for kk in range(bk):
        for i in range(tm):
            s(f"a{i} = a_s[cur, {kk}, {ra[i]}]")
        for j in range(tn):
            s(f"b{j} = b_s[cur, {kk}, {cb[j]}]")
        for i in range(tm):
            for j in range(tn):
                s(f"c{i}_{j} += a{i} * b{j}")
    s("nxt = cur ^ u64(1)")
    s("# Buffer nxt was last read before the previous barrier, so it is free.")
    _emit_stores(s, "la", la, a_kc, "a_s", "nxt")
    _emit_stores(s, "lb", lb, b_kc, "b_s", "nxt")
    s("# The new slice must be complete, and everyone done with cur, before the next step.")
    s("cuda.syncthreads()")
    s("cur = nxt")
    s.depth -= 1
    s("# Epilogue, one row of the thread tiles per pass: stage it in shared memory, then")
    s("# the block applies bias / activation / dropout to runs of 4 columns and stores them")
    s("# coalesced. A rolled loop here keeps one copy of the epilogue code (Philox is long).")
    s(f"for p in range(u64({tm})):")
    s.depth += 1
    for i in range(tm):
        s(f"{'if' if i == 0 else 'elif'} p == u64({i}):")
        s.depth += 1
        for j in range(tn):
            s(f"c_s[ty, {cb[j]}] = c{i}_{j}")
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
    s("store(y, zout, bias, r, col0 + sc, c_s[sr, sc], c_s[sr, sc + u64(1)], c_s[sr, sc + u64(2)], "
      "c_s[sr, sc + u64(3)], n, k0, k1, offset, threshold, scale)")
    s.depth -= 2
    s("# Everyone must be done reading before the next pass overwrites the staged rows.")
    s("cuda.syncthreads()")
    s.depth -= 1
    glb = {
        "cuda": cuda, "u32": uint32, "u64": uint64, "nbtype": nbtype, "zero": dtype.type(0),
        "store": make_group_store(ep, dtype.type),
    }
    return s.text(), glb


def signature(dtype) -> str:
    """Launch signature of every tiled kernel: flat operands, K passed explicitly.

    (a, b, bias, y, zout, K, k0, k1, offset, threshold, scale)
    """
    import numba

    t = numba.from_dtype(np.dtype(dtype))
    return (
        f"void({t}[::1], {t}[::1], {t}[::1], {t}[:, ::1], {t}[:, ::1], "
        f"uint64, uint32, uint32, uint64, uint64, {t})"
    )


def tiled_function(cfg: TileConfig, dtype, trans_a: bool, trans_b: bool, ep: Epilogue = PLAIN):
    """The uncompiled Python kernel: the generated source, exec'd (and registered with
    linecache so tracebacks and ``inspect`` show it)."""
    text, glb = tiled_source(cfg, dtype, trans_a, trans_b, ep)
    tag = f"{'T' if trans_a else 'N'}{'T' if trans_b else 'N'}"
    filename = f"<gpufc.kernels.linear.v2_register_tiled {cfg.name} {np.dtype(dtype).name} {tag} {ep.tag}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    exec(compile(text, filename, "exec"), glb)  # noqa: S102 (our own generated source, no user input)
    return glb[f"matmul_{cfg.name}"]
