"""Tensor-core matmul (mma.sync) with the fused epilogue: TF32, float16 and bfloat16.

Same math and operand layouts as the SIMT kernels::

    y (M, N) = epilogue(op(a) @ op(b)),  op(a) (M, K), op(b) (K, N)
    forward x @ w: NN;   grad_x = g @ w.T: NT (trans_b);   grad_w = x.T @ g: TN (trans_a)

Formats (``kind``): ``"tf32"`` (float32 data, rounded to TF32 by ``cvt.rna``,
``mma.m16n8k8``), ``"f16"`` and ``"bf16"`` (16-bit data, ``mma.m16n8k16``);
FP32 accumulation in every case; the epilogue (bias, activation, dropout,
pre-activation) runs in float32 and the stores round once to the data's
format. 16-bit data travel as uint16 (bit patterns), converted by
``cvt`` instructions (:mod:`.mma`), so no float16 arithmetic reaches NVVM.
The reference model and the test tolerance: docs/precision.md.

Tiling (one :class:`MmaConfig`): a block of ``wm x wn`` warps owns a
``bm x bn`` tile of ``y``; each warp a ``(bm / wm) x (bn / wn)`` warp tile,
``mi x ni`` mma tiles of 16 x 8, so ``mi * ni * 4`` float32 accumulators per
thread. K is walked in slices of ``bk`` (64 bytes of k: 16 TF32 or 32 16-bit
values, two mma k-steps per slice).

- Shared memory, ``stages`` buffers per operand, each operand in its stored
  layout (k-contiguous rows for ``a`` in NN/NT and ``b`` in NT; m- or
  n-contiguous rows otherwise), rows padded by 16 bytes (32 for TF32 m/n
  rows) so the 8 row addresses of an ``ldmatrix`` phase, and a TF32 warp's
  scalar fragment loads, hit distinct banks.
- Global -> shared: when both operands are 16-byte aligned with leading
  dimensions a multiple of 16 bytes, one 16-byte ``cp.async`` per chunk (no
  registers, L2 only) that reads only the bytes inside the operand and fills
  the rest with zeros (ragged M, N, K). Otherwise (e.g. an odd K) a second,
  single-buffered K loop loads element by element through registers, zeros
  past the edges: correct for any shape, without the asynchronous overlap.
- Pipeline: ``stages - 1`` slices in flight ahead of the one being multiplied;
  one ``cp.async.wait_group`` + ``syncthreads`` per slice.
- Fragments: ``ldmatrix.x4`` from k-contiguous rows (any format; a TF32 row of
  4 values is 16 bytes), ``ldmatrix.x4.trans`` from m/n-contiguous 16-bit rows,
  scalar shared loads for m/n-contiguous TF32 (there is no 32-bit transpose).
- Epilogue, straight from the accumulator fragments: each thread stores pairs
  of adjacent columns (``c0, c1`` and ``c2, c3`` of every mma tile) through
  :func:`kernels.epilogue.make_element_store`'s math, one Philox block per
  pair (two when the pair straddles blocks); a rolled loop keeps one copy of
  the Philox code. The mask is the contract's, whatever the precision.

FLOPs ``2 M N K``. Shared memory per block:
``stages * (bm + bn) * (64 + 16) bytes`` (+16 B per m/n row for TF32).

Not measured on a GPU: the static figures (registers, HMMA / LDSM / LDGSTS
counts) are in ``python bench/kernel_report.py --match mma``.
"""

from __future__ import annotations

import dataclasses
import functools
import linecache

import numba
import numpy as np
from numba import cuda, uint32, uint64

from gpufc.runtime.launch import serialised_in_sim

from ..activations import make_activation
from ..dropout.philox import THREE, TWO, philox_block, select_word
from . import mma as M
from .configs import device_sm_count
from .epilogue import PLAIN, Epilogue, make_element_store

KINDS = ("tf32", "f16", "bf16")
K_BYTES = 64  # bytes of k per shared slice: 16 TF32 or 32 16-bit values, two mma k-steps
CHUNK = 16  # bytes per cp.async / ldmatrix row
SMEM_LIMIT = 48 * 1024  # static shared memory per block


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def itemsize(kind: str) -> int:
    return 4 if kind == "tf32" else 2


def storage_dtype(kind: str):
    """The element type the kernel reads and writes: float32, or uint16 bit patterns."""
    return np.float32 if kind == "tf32" else np.uint16


# ----------------------------------------------------------------------------
# Shared layouts
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """One operand's shared buffer: ``rows`` rows of ``cont`` contiguous values, row stride ``stride``."""

    rows: int
    cont: int
    stride: int
    k_contiguous: bool

    @property
    def size(self) -> int:
        return self.rows * self.stride


def _layout(cfg, kind: str, op: str, mn_contiguous: bool) -> _Layout:
    bk = cfg.bk(kind)
    length = cfg.bm if op == "a" else cfg.bn
    ch = CHUNK // itemsize(kind)
    if mn_contiguous:
        # TF32: 8 words of padding make the row stride 8 mod 32 banks, so the scalar
        # fragment loads (rows t, columns g) of a warp hit 32 distinct banks.
        pad = 8
        return _Layout(bk, length, length + pad, False)
    return _Layout(length, bk, bk + ch, True)


@dataclasses.dataclass(frozen=True)
class MmaConfig:
    """One tensor-core configuration: block tile ``bm x bn``, ``wm x wn`` warps, ``stages`` buffers."""

    name: str
    bm: int
    bn: int
    wm: int
    wn: int
    stages: int = 2

    def __post_init__(self):
        assert self.bm % (16 * self.wm) == 0, f"{self.name}: bm={self.bm} must be a multiple of 16 * wm={self.wm}."
        assert self.bn % (16 * self.wn) == 0, (
            f"{self.name}: bn={self.bn} must be a multiple of 16 * wn={self.wn} (ldmatrix.x4 loads two n8 tiles)."
        )
        assert self.stages >= 2, f"{self.name}: the pipeline needs at least 2 stages, got {self.stages}."
        assert 32 <= self.threads <= 1024, f"{self.name}: {self.threads} threads per block."
        for kind in KINDS:
            assert self.shared_bytes(kind, True, False) <= SMEM_LIMIT, (
                f"{self.name}: {self.shared_bytes(kind, True, False)} bytes of shared memory in {kind}, over the "
                f"{SMEM_LIMIT}-byte static limit."
            )
            chunks = (self.bm + self.bn) * K_BYTES // CHUNK
            assert (self.bm * K_BYTES // CHUNK) % self.threads == 0 and chunks % self.threads == 0, (
                f"{self.name}: the 16-byte chunks of a slice must split evenly over {self.threads} threads."
            )

    @property
    def threads(self) -> int:
        return 32 * self.wm * self.wn

    @property
    def mi(self) -> int:
        """16-row mma tiles per warp tile."""
        return self.bm // self.wm // 16

    @property
    def ni(self) -> int:
        """8-column mma tiles per warp tile."""
        return self.bn // self.wn // 8

    def bk(self, kind: str) -> int:
        return K_BYTES // itemsize(kind)

    def shared_bytes(self, kind: str, trans_a: bool = False, trans_b: bool = False) -> int:
        a = _layout(self, kind, "a", trans_a)
        b = _layout(self, kind, "b", not trans_b)
        return self.stages * (a.size + b.size) * itemsize(kind)

    def grid(self, m: int, n: int) -> tuple[int, int]:
        return ceil_div(m, self.bm), ceil_div(n, self.bn)

    def block(self) -> tuple[int]:
        return (self.threads,)


# Configurations, largest tile first. Static evidence only (ptxas 13.5 -O3, sm_90; not measured on a
# GPU): mma128x128 NN uses 120 (tf32) / 135 (f16, bf16) registers, no spills; its K loop issues 32 HMMA
# in 290 (tf32: cvt.rna and scalar B loads) / 173 (f16, bf16) instructions.
CONFIGS = (
    MmaConfig("mma128x128", 128, 128, 2, 4, stages=2),  # 256 threads, 64 x 32 warp tiles; 40 KiB shared
    MmaConfig("mma64x64", 64, 64, 2, 2, stages=4),  # 128 threads, 32 x 32 warp tiles; 40 KiB shared
    MmaConfig("mma32x32", 32, 32, 2, 2, stages=2),  # 128 threads, 16 x 16 warp tiles; small problems, sim tests
)
_BY_NAME = {c.name: c for c in CONFIGS}
SMS = 132  # an H100 SXM's SMs, the default device size for choose_config


def config_by_name(name: str) -> MmaConfig:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"config must be one of {sorted(_BY_NAME)}, got config={name!r}") from None


def choose_config(m: int, n: int, k: int, kind: str, sms: int = SMS) -> MmaConfig:
    """The largest tile that still gives every SM a block, else the smallest tile."""
    for cfg in CONFIGS:
        gx, gy = cfg.grid(m, n)
        if gx * gy >= sms:
            return cfg
    return CONFIGS[-1]


# ----------------------------------------------------------------------------
# Epilogue pieces: pairs of adjacent columns
# ----------------------------------------------------------------------------

_ONE = np.uint64(1)


@cuda.jit(device=True, inline=True)
def words2(n0, k0, k1):
    """The contract's Philox words of elements ``n0`` and ``n0 + 1`` (uint64: offset + flat index)."""
    q = n0 >> TWO
    s = n0 & THREE
    r0, r1, r2, r3 = philox_block(q, k0, k1)
    if s == THREE:
        t0, _, _, _ = philox_block(q + _ONE, k0, k1)
        return r3, t0
    return select_word(r0, r1, r2, r3, s), select_word(r0, r1, r2, r3, s + _ONE)


@functools.cache
def make_element_store16(ep: Epilogue, kind: str):
    """``store_one(y, zout, b, row, col, v, word, threshold, scale)`` for 16-bit data (uint16
    bit patterns): the epilogue of :func:`make_element_store` in float32, each store rounded once."""
    act, _ = make_activation(ep.activation, np.float32)
    to32 = M.f16_to_f32 if kind == "f16" else M.bf16_to_f32
    from32 = M.f32_to_f16 if kind == "f16" else M.f32_to_bf16
    zero = np.float32(0)
    has_bias, has_dropout, save_preact = ep.bias, ep.dropout, ep.save_preact

    @cuda.jit(device=True, inline=True)
    def store_one(y, zout, b, row, col, v, word, threshold, scale):
        z = v
        if has_bias:
            z = z + to32(b[col])
        if save_preact:
            zout[row, col] = from32(z)
        a = act(z)
        if has_dropout:
            a = a * scale if uint64(word) >= threshold else zero
        y[row, col] = from32(a)

    return store_one


@functools.cache
def make_pair_store(ep: Epilogue, kind: str):
    """``store_pair(y, zout, b, row, col, v0, v1, n_cols, k0, k1, offset, threshold, scale)``:
    outputs ``(row, col)`` and ``(row, col + 1)``, each guarded by ``< n_cols`` (uint64 indices)."""
    one = make_element_store(ep, np.float32) if kind == "tf32" else make_element_store16(ep, kind)
    has_dropout = ep.dropout

    @cuda.jit(device=True, inline=True)
    def store_pair(y, zout, b, row, col, v0, v1, n_cols, k0, k1, offset, threshold, scale):
        w0 = w1 = uint32(0)
        if has_dropout:
            w0, w1 = words2(offset + row * n_cols + col, k0, k1)
        if col < n_cols:
            one(y, zout, b, row, col, v0, w0, threshold, scale)
        if col + _ONE < n_cols:
            one(y, zout, b, row, col + _ONE, v1, w1, threshold, scale)

    return store_pair


# ----------------------------------------------------------------------------
# Source generation
# ----------------------------------------------------------------------------


class _Src:
    def __init__(self):
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, line: str = ""):
        self.lines.append("    " * self.depth + line if line else "")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _emit_load(s: _Src, cfg: MmaConfig, kind: str, op: str, lay: _Layout, trans: bool, stage: str, kt: str,
               vec: bool):
    """Copy slice ``kt`` of operand ``op`` into buffer ``stage``, zeros past the operand's edges.

    ``vec``: one 16-byte cp.async per chunk, reading only the bytes inside the operand
    (the operand is 16-byte aligned with a leading dimension a multiple of 16 bytes, so
    every chunk's source is aligned). Otherwise element by element through registers.
    """
    isz = itemsize(kind)
    ch = CHUNK // isz
    per_row = lay.cont // ch
    chunks = lay.rows * per_row
    bk = cfg.bk(kind)
    # stored operand: rows bound rb, contiguous bound cb, leading dimension ld
    if op == "a":
        rb, cb, ld = ("kd", "m", "m") if trans else ("m", "kd", "kd")
        r0, c0 = (f"{kt} * u64({bk})", "row0") if trans else ("row0", f"{kt} * u64({bk})")
    else:
        rb, cb, ld = ("n", "kd", "kd") if trans else ("kd", "n", "n")
        r0, c0 = ("col0", f"{kt} * u64({bk})") if trans else (f"{kt} * u64({bk})", "col0")
    s(f"{op}_r0 = {r0}")
    s(f"{op}_c0 = {c0}")
    s(f"{op}_sb = {stage} * u64({lay.size})")
    for q in range(chunks // cfg.threads):
        s(f"q = tid + u64({q * cfg.threads})")
        s(f"gr = {op}_r0 + q // u64({per_row})")
        s(f"gc = {op}_c0 + (q % u64({per_row})) * u64({ch})")
        s(f"so = {op}_sb + (q // u64({per_row})) * u64({lay.stride}) + (q % u64({per_row})) * u64({ch})")
        if vec:
            s("nb = u32(0)")
            s(f"if gr < {rb} and gc < {cb}:")
            s(f"    nb = u32(min({cb} - gc, u64({ch})) * u64({isz}))")
            s(f"cp_async16_zfill({op}_s, so, {op}, gr * {ld} + gc if nb != u32(0) else u64(0), nb)")
        else:
            s(f"for e in range(u64({ch})):")
            s(f"    {op}_s[so + e] = {op}[gr * {ld} + gc + e] if gr < {rb} and gc + e < {cb} else zero")


def _emit_pipeline(s: _Src, cfg: MmaConfig, kind: str, a_lay: _Layout, b_lay: _Layout, trans_a: bool,
                   trans_b: bool, vec: bool):
    """The K loop. vec: ``stages - 1`` slices in flight (cp.async groups) ahead of the one being
    multiplied. Otherwise the copies go through registers, synchronously: one buffer, two barriers."""
    steps = cfg.bk(kind) // (8 if kind == "tf32" else 16)
    if not vec:
        s("for kt in range(ntiles):")
        s.depth += 1
        _emit_load(s, cfg, kind, "a", a_lay, trans_a, "u64(0)", "kt", False)
        _emit_load(s, cfg, kind, "b", b_lay, trans_b, "u64(0)", "kt", False)
        s("# The slice must be complete before any warp reads it.")
        s("cuda.syncthreads()")
        s("a_base = a_lane")
        s("b_base = b_lane")
        for ks in range(steps):
            _emit_fragments(s, cfg, kind, a_lay, b_lay, ks)
        s("# Every warp must be done reading before the next slice overwrites the buffer.")
        s("cuda.syncthreads()")
        s.depth -= 1
        return
    s(f"# Prologue: slices 0 .. {cfg.stages - 2} in flight, one commit group each (empty past K).")
    s(f"for ps in range(u64({cfg.stages - 1})):")
    s.depth += 1
    s("if ps < ntiles:")
    s.depth += 1
    _emit_load(s, cfg, kind, "a", a_lay, trans_a, "ps", "ps", vec)
    _emit_load(s, cfg, kind, "b", b_lay, trans_b, "ps", "ps", vec)
    s.depth -= 1
    s("cp_async_commit()")
    s.depth -= 1
    s("for kt in range(ntiles):")
    s.depth += 1
    s(f"# At most {cfg.stages - 2} groups still in flight: this thread's copies of slice kt have landed.")
    s("cp_async_wait()")
    s("# Every thread's copies of slice kt are visible, and every warp is done with slice kt - 1,")
    s("# whose buffer the next copy overwrites.")
    s("cuda.syncthreads()")
    s(f"nk = kt + u64({cfg.stages - 1})")
    s("if nk < ntiles:")
    s.depth += 1
    s(f"ns = nk % u64({cfg.stages})")
    _emit_load(s, cfg, kind, "a", a_lay, trans_a, "ns", "nk", vec)
    _emit_load(s, cfg, kind, "b", b_lay, trans_b, "ns", "nk", vec)
    s.depth -= 1
    s("cp_async_commit()")
    s(f"st = kt % u64({cfg.stages})")
    s(f"a_base = st * u64({a_lay.size}) + a_lane")
    s(f"b_base = st * u64({b_lay.size}) + b_lane")
    for ks in range(steps):
        _emit_fragments(s, cfg, kind, a_lay, b_lay, ks)
    s.depth -= 1
    s("cp_async_wait_all()")


def _emit_fragments(s: _Src, cfg: MmaConfig, kind: str, a_lay: _Layout, b_lay: _Layout, ks: int):
    """Registers of k-step ``ks`` of the current slice: fa{i}_{r} (A of mma row i) and
    fb{j}_{r} (B of mma column j), TF32 values rounded by cvt.rna."""
    tf32 = kind == "tf32"
    km = 8 if tf32 else 16
    k0 = ks * km
    for i in range(cfg.mi):
        if a_lay.k_contiguous:
            s(f"fa{i}_0, fa{i}_1, fa{i}_2, fa{i}_3 = ldmatrix_x4(a_s, a_base + u64({i * 16 * a_lay.stride + k0}))")
        elif not tf32:
            s(f"fa{i}_0, fa{i}_1, fa{i}_2, fa{i}_3 = "
              f"ldmatrix_x4_trans(a_s, a_base + u64({k0 * a_lay.stride + i * 16}))")
        else:
            for r, (dk, dm) in enumerate(((0, 0), (0, 8), (4, 0), (4, 8))):
                s(f"fa{i}_{r} = f32_bits(a_s[a_base + u64({(k0 + dk) * a_lay.stride + i * 16 + dm})])")
        if tf32:
            for r in range(4):
                s(f"fa{i}_{r} = cvt_tf32(fa{i}_{r})")
    for jj in range(cfg.ni // 2):
        j0, j1 = 2 * jj, 2 * jj + 1
        regs = f"fb{j0}_0, fb{j0}_1, fb{j1}_0, fb{j1}_1"
        if b_lay.k_contiguous:
            s(f"{regs} = ldmatrix_x4(b_s, b_base + u64({jj * 16 * b_lay.stride + k0}))")
        elif not tf32:
            s(f"{regs} = ldmatrix_x4_trans(b_s, b_base + u64({k0 * b_lay.stride + jj * 16}))")
        else:
            for j in (j0, j1):
                for r, dk in enumerate((0, 4)):
                    s(f"fb{j}_{r} = f32_bits(b_s[b_base + u64({(k0 + dk) * b_lay.stride + j * 8})])")
        if tf32:
            for j in (j0, j1):
                for r in range(2):
                    s(f"fb{j}_{r} = cvt_tf32(fb{j}_{r})")
    for i in range(cfg.mi):
        for j in range(cfg.ni):
            c = f"c{i}_{j}_0, c{i}_{j}_1, c{i}_{j}_2, c{i}_{j}_3"
            s(f"{c} = mma(fa{i}_0, fa{i}_1, fa{i}_2, fa{i}_3, fb{j}_0, fb{j}_1, {c})")


def _lane_offset(lay: _Layout, kind: str, op: str) -> str:
    """This lane's fragment address within a buffer, relative to the warp's first row/column."""
    w0 = "wm0" if op == "a" else "wn0"
    ch = CHUNK // itemsize(kind)
    if lay.k_contiguous:
        # ldmatrix: lane l addresses row l % 8 of matrix l // 8; matrices step 8 rows along
        # m (a) or ch values along k (b) first
        if op == "a":
            mn, k = "(lane % u64(8)) + u64(8) * ((lane // u64(8)) % u64(2))", f"u64({ch}) * (lane // u64(16))"
        else:
            mn, k = "(lane % u64(8)) + u64(8) * (lane // u64(16))", f"u64({ch}) * ((lane // u64(8)) % u64(2))"
        return f"({w0} + {mn}) * u64({lay.stride}) + {k}"
    if kind == "tf32":
        # scalar loads: row (k) t, column (m or n) g
        return f"t * u64({lay.stride}) + {w0} + g"
    if op == "a":
        k, mn = "(lane % u64(8)) + u64(8) * (lane // u64(16))", "u64(8) * ((lane // u64(8)) % u64(2))"
    else:
        k, mn = "(lane % u64(8)) + u64(8) * ((lane // u64(8)) % u64(2))", "u64(8) * (lane // u64(16))"
    return f"({k}) * u64({lay.stride}) + {w0} + {mn}"


def mma_source(cfg: MmaConfig, kind: str, trans_a: bool, trans_b: bool, ep: Epilogue) -> tuple[str, dict]:
    """The generated kernel's Python source and its globals."""
    assert kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}"
    sim = M.SIM
    a_lay = _layout(cfg, kind, "a", trans_a)
    b_lay = _layout(cfg, kind, "b", not trans_b)
    bk = cfg.bk(kind)
    wtm, wtn = cfg.bm // cfg.wm, cfg.bn // cfg.wn
    align = "" if sim else ", alignment=16"  # the simulator takes no alignment argument
    tag = ("T" if trans_a else "N") + ("T" if trans_b else "N")
    s = _Src()
    s(f"def mma_{cfg.name}_{kind}_{tag}(a, b, bias, y, zout, kd, flags, k0, k1, offset, threshold, scale):")
    s.depth = 1
    s(f"# {cfg.name} {kind} {tag}: block tile {cfg.bm} x {cfg.bn}, {cfg.wm} x {cfg.wn} warps of {wtm} x {wtn}, "
      f"K slices of {bk}, {cfg.stages} stages.")
    s(f"# a is the flat ({'K, M' if trans_a else 'M, K'}), b the flat ({'N, K' if trans_b else 'K, N'}), "
      "y and zout (M, N), bias (N); flags bit 0 / 1: a / b may be copied 16 bytes at a time.")
    s("m = u64(y.shape[0])")
    s("n = u64(y.shape[1])")
    s(f"a_s = cuda.shared.array({cfg.stages * a_lay.size}, stype{align})")
    s(f"b_s = cuda.shared.array({cfg.stages * b_lay.size}, stype{align})")
    s("tid = u64(u32(cuda.threadIdx.x))")
    s("lane = tid % u64(32)")
    s("warp = tid // u64(32)")
    s("g = lane // u64(4)")
    s("t = lane % u64(4)")
    s(f"wm0 = (warp // u64({cfg.wn})) * u64({wtm})")
    s(f"wn0 = (warp % u64({cfg.wn})) * u64({wtn})")
    s(f"row0 = u64(u32(cuda.blockIdx.x)) * u64({cfg.bm})")
    s(f"col0 = u64(u32(cuda.blockIdx.y)) * u64({cfg.bn})")
    s("a_vec = (flags & u32(1)) != u32(0)")
    s("b_vec = (flags & u32(2)) != u32(0)")
    s(f"ntiles = (kd + u64({bk - 1})) // u64({bk})")
    s(f"a_lane = {_lane_offset(a_lay, kind, 'a')}")
    s(f"b_lane = {_lane_offset(b_lay, kind, 'b')}")
    for i in range(cfg.mi):
        for j in range(cfg.ni):
            s(f"c{i}_{j}_0 = c{i}_{j}_1 = c{i}_{j}_2 = c{i}_{j}_3 = fzero")
    s("# Both operands copyable 16 bytes at a time: the cp.async pipeline; else element by element.")
    s("if a_vec and b_vec:")
    s.depth += 1
    _emit_pipeline(s, cfg, kind, a_lay, b_lay, trans_a, trans_b, True)
    s.depth -= 1
    s("else:")
    s.depth += 1
    _emit_pipeline(s, cfg, kind, a_lay, b_lay, trans_a, trans_b, False)
    s.depth -= 1
    s("# Epilogue from the fragments: pair p is (mma row i, column j, half h): rows g (h = 0) or")
    s("# g + 8 (h = 1), columns 2t and 2t + 1. A rolled loop keeps one copy of the Philox code.")
    pairs = cfg.mi * cfg.ni * 2
    s(f"for p in range(u64({pairs})):")
    s.depth += 1
    first = True
    for i in range(cfg.mi):
        for j in range(cfg.ni):
            for h in range(2):
                p = (i * cfg.ni + j) * 2 + h
                s(f"{'if' if first else 'elif'} p == u64({p}):")
                s(f"    v0, v1 = c{i}_{j}_{2 * h}, c{i}_{j}_{2 * h + 1}")
                first = False
    s(f"r = row0 + wm0 + (p // u64({cfg.ni * 2})) * u64(16) + (p % u64(2)) * u64(8) + g")
    s(f"c = col0 + wn0 + ((p // u64(2)) % u64({cfg.ni})) * u64(8) + u64(2) * t")
    s("if r < m:")
    s("    store_pair(y, zout, bias, r, c, v0, v1, n, k0, k1, offset, threshold, scale)")
    s.depth -= 1
    glb = {
        "cuda": cuda, "u32": uint32, "u64": uint64,
        "stype": numba.from_dtype(np.dtype(storage_dtype(kind))),
        "zero": storage_dtype(kind)(0), "fzero": np.float32(0),
        "mma": {"tf32": M.mma_tf32, "f16": M.mma_f16, "bf16": M.mma_bf16}[kind],
        "ldmatrix_x4": M.ldmatrix_x4, "ldmatrix_x4_trans": M.ldmatrix_x4_trans,
        "cvt_tf32": M.cvt_tf32, "f32_bits": M.f32_bits, "cp_async16_zfill": M.cp_async16_zfill,
        "cp_async_commit": M.cp_async_commit, "cp_async_wait": M.make_cp_async_wait(cfg.stages - 2),
        "cp_async_wait_all": M.make_cp_async_wait(0), "store_pair": make_pair_store(ep, kind),
    }
    return s.text(), glb


def signature(kind: str) -> str:
    """(a, b, bias, y, zout, K, flags, k0, k1, offset, threshold, scale); 16-bit data as uint16."""
    t = numba.from_dtype(np.dtype(storage_dtype(kind)))
    return (f"void({t}[::1], {t}[::1], {t}[::1], {t}[:, ::1], {t}[:, ::1], "
            "uint64, uint32, uint32, uint32, uint64, uint64, float32)")


def kernel_source(cfg: MmaConfig, kind: str, trans_a: bool = False, trans_b: bool = False, ep: Epilogue = PLAIN):
    """The uncompiled Python kernel (generated source, registered with linecache)."""
    text, glb = mma_source(cfg, kind, bool(trans_a), bool(trans_b), ep)
    tag = ("T" if trans_a else "N") + ("T" if trans_b else "N")
    filename = f"<gpufc.kernels.linear.tensorcore {cfg.name} {kind} {tag} {ep.tag}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    exec(compile(text, filename, "exec"), glb)  # noqa: S102 (our own generated source, no user input)
    return glb[f"mma_{cfg.name}_{kind}_{tag}"]


@functools.cache
def make_kernel(cfg: MmaConfig, kind: str, trans_a: bool = False, trans_b: bool = False, ep: Epilogue = PLAIN):
    """Compiled kernel for one (config, kind, transposes, epilogue), cached."""
    return cuda.jit(signature(kind))(kernel_source(cfg, kind, trans_a, trans_b, ep))


# ----------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------


def address(a) -> int:
    """Device address of ``a``'s first element (the host address in the simulator)."""
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        return int(a.__array_interface__["data"][0])
    return int(cai["data"][0])


def _as_storage(arr, kind):
    """``arr`` as the kernel's element type: float32 as is, 16-bit data viewed as uint16."""
    if kind == "tf32" or np.dtype(arr.dtype) == np.uint16:
        return arr
    return arr.view(np.uint16)


@serialised_in_sim
def launch_mma(a, b, bias, y, zout, *, kind, trans_a=False, trans_b=False, ep: Epilogue = PLAIN, key=(0, 0),
               offset=0, threshold=0, scale=0.0, config=None, stream=0):
    """Launch ``y = epilogue(op(a) @ op(b))`` on tensor cores (device arrays, C-contiguous).

    Shapes: a (M, K) or (K, M) with trans_a; b (K, N) or (N, K) with trans_b;
    bias (N,) (any 1-element array when ``ep.bias`` is False); y and zout (M, N)
    (zout may be ``y`` when ``ep.save_preact`` is False). Data are float32
    (``kind="tf32"``) or 16-bit (``"f16"`` / ``"bf16"``; float16, bfloat16 or
    uint16 bit-pattern arrays). M, N > 0; K may be 0. ``config``: None picks by
    shape, else an :class:`MmaConfig` or its name. ``scale`` is the dropout
    scale, applied in float32.
    """
    assert kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}"
    m, n = y.shape
    k = a.shape[0] if trans_a else a.shape[1]
    if config is None:
        cfg = choose_config(m, n, k, kind, sms=device_sm_count())
    elif isinstance(config, str):
        cfg = config_by_name(config)
    else:
        cfg = config
    grid = cfg.grid(m, n)
    if grid[1] > 65535:
        raise ValueError(f"y has {n} columns; {cfg.name} launches at most 65535 column tiles ({65535 * cfg.bn})")
    if max(m, n, k) >= 2**32:
        raise ValueError(f"M, N and K must each be below 2**32, got M={m}, N={n}, K={k}")
    a, b, bias, y, zout = (_as_storage(v, kind) for v in (a, b, bias, y, zout))
    ch = CHUNK // itemsize(kind)
    flags = 0
    for bit, arr in ((1, a), (2, b)):
        if address(arr) % CHUNK == 0 and arr.shape[1] % ch == 0:
            flags |= bit
    kern = make_kernel(cfg, kind, bool(trans_a), bool(trans_b), ep)
    kern[grid, cfg.block(), stream](
        a.reshape(a.size), b.reshape(b.size), bias, y, zout, np.uint64(k), np.uint32(flags),
        np.uint32(key[0]), np.uint32(key[1]), np.uint64(offset), np.uint64(threshold), np.float32(scale),
    )


# ----------------------------------------------------------------------------
# 16-bit backward helpers: g = dropout'(grad) * act'(z), and the bias gradient
# ----------------------------------------------------------------------------

ELEMENTWISE_THREADS = 256


@functools.cache
def act_dropout_backward16_source(kind: str, activation, dropout: bool):
    """``g[e] = dropout'(grad)[e] * act'(z[e])`` on flat (n,) uint16 arrays of ``kind`` (f16/bf16),
    in float32, stored rounded once; element ``e``'s mask word is the contract's (offset + e)."""
    _, dact = make_activation(activation, np.float32)
    to32 = M.f16_to_f32 if kind == "f16" else M.bf16_to_f32
    from32 = M.f32_to_f16 if kind == "f16" else M.f32_to_bf16
    has_act = activation is not None
    zero = np.float32(0)
    try:
        from ..dropout.philox import element_word
    except ImportError:
        from ..dropout.philox import element_word

    def act_dropout_backward16(grad, z, g, k0, k1, offset, threshold, scale):
        # grad, z, g are flat (n,) uint16 bit patterns; z is read only with an activation
        start, step = cuda.grid(1), cuda.gridsize(1)
        for e in range(start, g.size, step):
            d = to32(grad[e])
            if dropout:
                word = element_word(offset + uint64(e), k0, k1)
                d = d * scale if uint64(word) >= threshold else zero
            if has_act:
                d = d * dact(to32(z[e]))
            g[e] = from32(d)

    return act_dropout_backward16


ACT_BWD16_SIG = "void(uint16[::1], uint16[::1], uint16[::1], uint32, uint32, uint64, uint64, float32)"


@functools.cache
def make_act_dropout_backward16(kind: str, activation, dropout: bool):
    return cuda.jit(ACT_BWD16_SIG)(act_dropout_backward16_source(kind, activation, bool(dropout)))


@serialised_in_sim
def launch_act_dropout_backward16(grad, z, g, *, kind, activation, dropout, key, offset, threshold, scale,
                                  stream=0):
    """``g = dropout'(grad) * act'(z)`` for 16-bit data (flat (n,) arrays, n > 0; ``z`` any array
    of the same size when ``activation`` is None); dropout scale applied in float32."""
    grad, z, g = (_as_storage(v, kind) for v in (grad, z, g))
    kern = make_act_dropout_backward16(kind, activation, bool(dropout))
    blocks = min(ceil_div(g.size, ELEMENTWISE_THREADS), 2 if M.SIM else 65535)
    kern[blocks, ELEMENTWISE_THREADS, stream](grad, z, g, np.uint32(key[0]), np.uint32(key[1]), np.uint64(offset),
                                              np.uint64(threshold), np.float32(scale))


@functools.cache
def bias_grad16_source(kind: str):
    to32 = M.f16_to_f32 if kind == "f16" else M.bf16_to_f32
    from32 = M.f32_to_f16 if kind == "f16" else M.f32_to_bf16

    def bias_grad16(g, out):
        # g is (M, N), out (N,), uint16 bit patterns: out[j] = sum_i g[i, j], summed in float32
        # and rounded once; one thread per column, consecutive threads on consecutive columns.
        j = cuda.grid(1)
        if j < out.size:
            acc = np.float32(0)
            for i in range(g.shape[0]):
                acc += to32(g[i, j])
            out[j] = from32(acc)

    return bias_grad16


BIAS_GRAD16_SIG = "void(uint16[:, ::1], uint16[::1])"


@functools.cache
def make_bias_grad16(kind: str):
    return cuda.jit(BIAS_GRAD16_SIG)(bias_grad16_source(kind))


@serialised_in_sim
def launch_bias_grad16(g, out, *, kind, stream=0):
    """``out (N,) = g (M, N).sum(0)`` for 16-bit data, float32 sums, N > 0."""
    g, out = _as_storage(g, kind), _as_storage(out, kind)
    make_bias_grad16(kind)[ceil_div(out.size, 128), 128, stream](g, out)


def catalogue():
    """KernelSpec entries: per configuration and format, the forward with the full epilogue
    (NN) and the two backward operand layouts (NT: g @ w.T, TN: x.T @ g); the largest
    configuration also the plain forward (its main loop without the epilogue's registers)."""
    from ..catalogue import KernelSpec

    full = Epilogue("gelu", bias=True, dropout=True, save_preact=True)
    variants = ((False, False, full, "NN"), (False, True, PLAIN, "NT"), (True, False, PLAIN, "TN"))
    for cfg in CONFIGS:
        for kind in KINDS:
            extra = ((False, False, PLAIN, "NN"),) if cfg is CONFIGS[0] else ()
            for ta, tb, ep, tag in extra + variants:
                yield KernelSpec(f"mma/{cfg.name}/{kind}/{tag}/{ep.tag}", kernel_source(cfg, kind, ta, tb, ep),
                                 signature(kind), main_loop=True, threads=cfg.threads)
    for kind in ("f16", "bf16"):
        yield KernelSpec(f"tc_backward/act_dropout/{kind}/gelu+drop",
                         act_dropout_backward16_source(kind, "gelu", True), ACT_BWD16_SIG,
                         threads=ELEMENTWISE_THREADS)
        yield KernelSpec(f"tc_backward/bias_grad/{kind}", bias_grad16_source(kind), BIAS_GRAD16_SIG, threads=128)
