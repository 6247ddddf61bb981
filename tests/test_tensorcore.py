"""Tensor cores: the inline-PTX ops (kernels/linear/mma.py) and the mma.sync matmul
(kernels/linear/tensorcore.py) against gpufc.reference's reduced-precision model.

Without a GPU the ops run as simulator twins (a per-warp barrier exchanges the
lanes' registers); every warp-level op costs about 20 ms there, so the shapes
stay small (M, N, K <= 40) and the matmul tests use the 32 x 32 block tile.

Tolerance (docs/precision.md): the reference rounds the operands exactly as the
kernel does and sums the exact products in float64; the kernel sums in float32.
``|y - ref| <= 2 eps_out |ref| + 8 eps32 sqrt(K) (|x| @ |w|)`` per element, where
eps_out is the output format's epsilon (float32 for TF32; one rounding of a value
that may sit on either side of a rounding boundary) and eps32 = 2**-23.
"""

import threading

import numpy as np
import pytest
from conftest import ON_GPU
from helpers import Launched, StandIn
from numba import cuda, uint32  # after conftest chose the simulator or the GPU

from gpufc import reference as ref
from gpufc.runtime import backend as _backend

pytestmark = pytest.mark.kernels

KINDS = ("tf32", "f16", "bf16")


def _mma():
    _backend.kernels()
    from gpufc.kernels.linear import mma

    return mma


def _bits16(values, kind):
    """float values -> uint16 bit patterns of float16 / bfloat16 (round to nearest even)."""
    v = np.asarray(values, np.float32)
    if kind == "f16":
        return v.astype(np.float16).view(np.uint16)
    return (ref.round_bf16(v).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def _value16(bits, kind):
    b = np.asarray(bits, np.uint16)
    if kind == "f16":
        return b.view(np.float16).astype(np.float64)
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


# ----------------------------------------------------------------------------
# One warp tile: mma.sync through the fragment layouts of the PTX ISA
# ----------------------------------------------------------------------------


def _warp_tile_kernel(kind):
    M = _mma()

    if kind == "tf32":

        @cuda.jit
        def tile(a, b, c, d):
            # a (16, 8) float32, b (8, 8) float32, c and d (16, 8) float32; one warp
            lane = cuda.threadIdx.x
            g, t = lane >> 2, lane & 3
            a0 = M.cvt_tf32(M.f32_bits(a[g, t]))
            a1 = M.cvt_tf32(M.f32_bits(a[g + 8, t]))
            a2 = M.cvt_tf32(M.f32_bits(a[g, t + 4]))
            a3 = M.cvt_tf32(M.f32_bits(a[g + 8, t + 4]))
            b0 = M.cvt_tf32(M.f32_bits(b[t, g]))
            b1 = M.cvt_tf32(M.f32_bits(b[t + 4, g]))
            d0, d1, d2, d3 = M.mma_tf32(a0, a1, a2, a3, b0, b1, c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t],
                                        c[g + 8, 2 * t + 1])
            d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1] = d0, d1, d2, d3

        return tile

    op = M.mma_f16 if kind == "f16" else M.mma_bf16

    @cuda.jit
    def tile16(a, b, c, d):
        # a (16, 16) uint16 bits, b (16, 8) uint16 bits, c and d (16, 8) float32; one warp
        lane = cuda.threadIdx.x
        g, t = lane >> 2, lane & 3
        k = 2 * t
        a0 = uint32(a[g, k]) | (uint32(a[g, k + 1]) << uint32(16))
        a1 = uint32(a[g + 8, k]) | (uint32(a[g + 8, k + 1]) << uint32(16))
        a2 = uint32(a[g, k + 8]) | (uint32(a[g, k + 9]) << uint32(16))
        a3 = uint32(a[g + 8, k + 8]) | (uint32(a[g + 8, k + 9]) << uint32(16))
        b0 = uint32(b[k, g]) | (uint32(b[k + 1, g]) << uint32(16))
        b1 = uint32(b[k + 8, g]) | (uint32(b[k + 9, g]) << uint32(16))
        d0, d1, d2, d3 = op(a0, a1, a2, a3, b0, b1, c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t],
                            c[g + 8, 2 * t + 1])
        d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1] = d0, d1, d2, d3

    return tile16


def _run_tile(kind, a, b, c):
    d = cuda.device_array((16, 8), np.float32)
    _warp_tile_kernel(kind)[1, 32](cuda.to_device(a), cuda.to_device(b), cuda.to_device(c), d)
    return d.copy_to_host()


def _tile_inputs(kind, rng, integer):
    k = 8 if kind == "tf32" else 16
    draw = (lambda shape: rng.integers(-8, 9, shape).astype(np.float32)) if integer else \
        (lambda shape: rng.standard_normal(shape).astype(np.float32))
    a, b, c = draw((16, k)), draw((k, 8)), draw((16, 8))
    if kind == "tf32":
        return (a, b, c), ref.round_tf32(a).astype(np.float64), ref.round_tf32(b).astype(np.float64)
    ab, bb = _bits16(a, kind), _bits16(b, kind)
    return (ab, bb, c), _value16(ab, kind), _value16(bb, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("integer", [True, False], ids=["integer", "normal"])
def test_warp_tile_mma_against_float64(device_backend, rng, kind, integer):
    (a, b, c), a64, b64 = _tile_inputs(kind, rng, integer)
    d = _run_tile(kind, a, b, c)
    want = a64 @ b64 + c.astype(np.float64)
    if integer:
        # small integers: every product and partial sum is exact in float32
        assert np.array_equal(d, want.astype(np.float32)), f"{kind}: integer tile not bit-exact"
    else:
        scale = np.abs(a64) @ np.abs(b64) + np.abs(c)
        err = np.abs(d - want)
        bound = 8 * 2.0**-23 * np.sqrt(a64.shape[1]) * scale + 2.0**-24 * np.abs(want)
        assert (err <= bound).all(), f"{kind}: max error {err.max()} (bound {bound[err > bound]})"


def test_tf32_operands_are_rounded_to_nearest_away(device_backend):
    # a = 1 + 2**-11 is a tie between 1 and 1 + 2**-10: cvt.rna takes 1 + 2**-10 (truncation: 1).
    a = np.zeros((16, 8), np.float32)
    b = np.zeros((8, 8), np.float32)
    a[:, 0] = np.float32(1 + 2**-11)
    b[0, :] = 1
    d = _run_tile("tf32", a, b, np.zeros((16, 8), np.float32))
    assert (d == np.float32(1 + 2**-10)).all()


# ----------------------------------------------------------------------------
# ldmatrix and cp.async
# ----------------------------------------------------------------------------


def _ldmatrix_kernel(trans):
    M = _mma()
    ld = M.ldmatrix_x4_trans if trans else M.ldmatrix_x4
    wait = M.make_cp_async_wait(0)

    @cuda.jit
    def kern(src, out):
        # src (256,) uint16: four 8 x 8 matrices, row-major; out (32, 4) uint32; one warp
        sm = cuda.shared.array((32, 8), np.uint16)
        lane = cuda.threadIdx.x
        M.cp_async16(sm, lane * 8, src, lane * 8)
        M.cp_async_commit()
        wait()
        # every lane's 16 bytes must have landed before any lane's ldmatrix reads them
        cuda.syncthreads()
        r0, r1, r2, r3 = ld(sm, lane * 8)
        out[lane, 0], out[lane, 1], out[lane, 2], out[lane, 3] = r0, r1, r2, r3

    return kern


@pytest.mark.parametrize("trans", [False, True], ids=["ldmatrix", "ldmatrix_trans"])
def test_ldmatrix_x4_after_cp_async(device_backend, trans):
    src = (np.arange(256, dtype=np.uint16) * 7 + 3).astype(np.uint16)
    out = cuda.device_array((32, 4), np.uint32)
    _ldmatrix_kernel(trans)[1, 32](cuda.to_device(src), out)
    got = out.copy_to_host()
    mats = src.reshape(4, 8, 8)
    for lane in range(32):
        row, col = lane // 4, 2 * (lane % 4)
        for r in range(4):
            m = mats[r].T if trans else mats[r]
            want = int(m[row, col]) | (int(m[row, col + 1]) << 16)
            assert int(got[lane, r]) == want, f"lane {lane} register {r}"


# ----------------------------------------------------------------------------
# The simulator twins' assumptions
# ----------------------------------------------------------------------------


@pytest.mark.skipif(ON_GPU, reason="the simulator's thread attributes matter only without a GPU")
def test_simulator_thread_has_the_attributes_the_twins_read(device_backend):
    # The twins find a lane's warp through numba-cuda's simulator thread object; these
    # attributes are private to numba-cuda (written against 0.30), so a change must fail here.
    M = _mma()
    seen = []

    @cuda.jit
    def probe(out):
        th = threading.current_thread()
        seen.append(tuple(hasattr(th, a) for a in M.SIM_THREAD_ATTRIBUTES))
        seen.append(hasattr(th._manager, "_block_dim"))
        out[cuda.threadIdx.x] = th.thread_id

    out = cuda.device_array(64, np.int64)
    probe[1, 64](out)
    assert all(all(s) if isinstance(s, tuple) else s for s in seen) and len(seen) == 128
    assert (out.copy_to_host() == np.arange(64)).all()


@pytest.mark.skipif(ON_GPU, reason="a divergent mma is undefined behaviour on hardware")
def test_divergent_mma_breaks_the_twin_barrier(device_backend, monkeypatch):
    M = _mma()
    monkeypatch.setattr(M, "SIM_BARRIER_TIMEOUT_S", 0.5)
    zero = np.float32(0)

    @cuda.jit
    def divergent(out):
        lane = cuda.threadIdx.x
        if lane != 5:
            d0, _, _, _ = M.mma_tf32(0, 0, 0, 0, 0, 0, zero, zero, zero, zero)
            out[lane] = d0

    with pytest.raises(threading.BrokenBarrierError):
        divergent[1, 32](cuda.device_array(32, np.float32))


# ----------------------------------------------------------------------------
# The mma.sync matmul (kernels/linear/tensorcore.py) against the reference model
# ----------------------------------------------------------------------------

SEED = 2**33 + 7  # both key words non-zero
P = 0.3
SMALL = "mma32x32"  # 4 warps of 16 x 16: the cheapest block in the simulator


def _tc():
    _backend.kernels()
    from gpufc.kernels.linear import tensorcore

    return tensorcore


def _draw(rng, kind, shape, integer=False):
    """(values as float32 on the format's grid, the array the kernel reads: float32 or uint16 bits)."""
    v = rng.integers(-4, 5, shape).astype(np.float32) if integer else rng.standard_normal(shape).astype(np.float32)
    if kind == "tf32":
        return v, v
    bits = _bits16(v, kind)
    return _value16(bits, kind).astype(np.float32), bits


def _to_values(kind, y):
    return y if kind == "tf32" else _value16(y, kind).astype(np.float32)


def _round_out(kind, y32):
    """float32 -> the output format (16-bit values as float32); TF32 outputs are float32."""
    y32 = np.asarray(y32, np.float32)
    if kind == "f16":
        return y32.astype(np.float16).astype(np.float32)
    if kind == "bf16":
        return ref.round_bf16(y32)
    return y32


def _ref_linear(kind, x, w, b=None, **kw):
    # float16 and bfloat16 values are exact in TF32 (11 and 8 significant bits), so the TF32
    # model of gpufc.reference computes the 16-bit model's float32 result; then one rounding.
    return _round_out(kind, ref.linear(x, w, b, precision="tf32", **kw))


def _bound(kind, x, w, want, k):
    """docs/precision.md: 2 eps_out |ref| + 8 eps32 sqrt(K) (|x| @ |w|) (+ 1e-30 for exact zeros)."""
    eps_out = {"tf32": 2.0**-23, "f16": 2.0**-10, "bf16": 2.0**-7}[kind]
    scale = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))
    return 2 * eps_out * np.abs(want) + 8 * 2.0**-23 * np.sqrt(max(k, 1)) * scale + 1e-30


def _assert_within(kind, got, want, bound, what):
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bad = np.argwhere(~(err <= bound))
    assert bad.size == 0, (f"{what}: {len(bad)} of {err.size} outside the bound; first {bad[:3].tolist()}: "
                           f"got {got[tuple(bad[0])]}, want {want[tuple(bad[0])]}, bound {bound[tuple(bad[0])]}")


def _launch_tc(kind, a, b, bias, m, n, *, ep, trans_a=False, trans_b=False, config=SMALL, p=P, seed=SEED,
               offset=0):
    """Run ``launch_mma`` on host arrays (float32 or uint16 bits); returns (y, z) as float32 values."""
    store = np.float32 if kind == "tf32" else np.uint16
    y = cuda.device_array((m, n), store)
    z = cuda.device_array((m, n), store) if ep.save_preact else y
    _tc().launch_mma(cuda.to_device(a), cuda.to_device(b), cuda.to_device(bias), y, z, kind=kind, trans_a=trans_a,
                     trans_b=trans_b, ep=ep, key=(seed & 0xFFFFFFFF, seed >> 32), offset=offset,
                     threshold=ref.dropout_threshold(p), scale=ref.dropout_scale(p, np.float32), config=config)
    cuda.synchronize()
    return _to_values(kind, y.copy_to_host()), (_to_values(kind, z.copy_to_host()) if ep.save_preact else None)


def _on_device(arr, misaligned=False):
    """``arr`` on the device; ``misaligned``: viewed one element into its buffer (not 16-byte aligned)."""
    if not misaligned:
        return cuda.to_device(arr)
    buf = cuda.to_device(np.concatenate([np.zeros(1, arr.dtype), arr.ravel()]))
    return buf[1:].reshape(arr.shape)


def _epilogue(*args, **kw):
    _backend.kernels()
    from gpufc.kernels.linear.tensorcore import Epilogue

    return Epilogue(*args, **kw)


# (M, K, N): ragged in every dimension. K = 21 and N = 35: rows misaligned for 16-byte copies
# (the element-by-element K loop); (40, 40, 24): every leading dimension a multiple of 16 bytes
# (the cp.async K loop, zeros filled past M, N and the last K slice).
SHAPES = [(37, 21, 35), (40, 40, 24)]
LAYOUTS = ["NN", "NT", "TN"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_integer_inputs_are_bit_exact(device_backend, rng, kind, layout):
    # Small integers: every product and partial sum is exact in float32, so the kernel must
    # match the model bit for bit in every operand layout (NN forward, NT grad_x, TN grad_w),
    # on the cp.async path (leading dimensions multiples of 16 bytes, edges ragged).
    m, k, n = 40, 40, 24
    x, xs = _draw(rng, kind, (m, k), integer=True)
    w, ws = _draw(rng, kind, (k, n), integer=True)
    a = xs.T.copy() if layout[0] == "T" else xs
    b = ws.T.copy() if layout[1] == "T" else ws
    y, _ = _launch_tc(kind, a, b, np.zeros(n, a.dtype), m, n, ep=_epilogue(), trans_a=layout[0] == "T",
                      trans_b=layout[1] == "T")
    assert np.array_equal(y, _ref_linear(kind, x, w)), f"{kind} {layout}: not bit-exact"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])
def test_block_tiles_that_are_not_square(device_backend, rng, kind, layout, shape):
    # The shipped configurations are square; the generator takes any that passes MmaConfig's checks,
    # and a and b's buffers are then sized by different sides (a by BM rows, b by BN columns).
    # 64 x 32 gives each warp two mma rows, 32 x 64 four mma columns: the fragment offsets of
    # rows and columns past the first, which the 16 x 16 warp tiles of mma32x32 never use.
    bm, bn = shape
    cfg = _tc().MmaConfig(f"mma{bm}x{bn}", bm, bn, 2, 2, stages=2)
    m, k, n = 40, 40, 72
    x, xs = _draw(rng, kind, (m, k), integer=True)
    w, ws = _draw(rng, kind, (k, n), integer=True)
    a = xs.T.copy() if layout[0] == "T" else xs
    b = ws.T.copy() if layout[1] == "T" else ws
    y, _ = _launch_tc(kind, a, b, np.zeros(n, xs.dtype), m, n, ep=_epilogue(), trans_a=layout[0] == "T",
                      trans_b=layout[1] == "T", config=cfg)
    assert np.array_equal(y, _ref_linear(kind, x, w)), f"{kind} {layout} {cfg.name}: not bit-exact"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["a", "b", "ab"])
def test_misaligned_operand_takes_the_element_path(device_backend, rng, kind, which):
    # An operand viewed one element into its buffer is not 16-byte aligned, though its leading
    # dimension is a multiple of 16 bytes: the launcher must read it element by element (the
    # simulator's cp.async twins fault on a misaligned address, as the hardware does). The kernel
    # copies with cp.async only when both operands allow it: "ab" misaligns both.
    m, k, n = 40, 40, 24
    x, xs = _draw(rng, kind, (m, k), integer=True)
    w, ws = _draw(rng, kind, (k, n), integer=True)
    ops = {"a": xs, "b": ws}
    dev = {name: _on_device(arr, name in which) for name, arr in ops.items()}
    for name in which:
        assert _tc().address(dev[name]) % 16 != 0
    store = np.float32 if kind == "tf32" else np.uint16
    y = cuda.device_array((m, n), store)
    _tc().launch_mma(dev["a"], dev["b"], cuda.to_device(np.zeros(n, store)), y, y, kind=kind, ep=_epilogue(),
                     config=SMALL)
    assert np.array_equal(_to_values(kind, y.copy_to_host()), _ref_linear(kind, x, w)), f"{kind} {which}"


@pytest.mark.parametrize("kind", KINDS)
def test_launcher_flags_the_operands_it_may_copy_16_bytes_at_a_time(device_backend, monkeypatch, kind):
    # The element path is right for any operand, so results cannot show whether the launcher let the
    # kernel copy 16 bytes at a time; the flags it passes can: bit 0 for a, bit 1 for b, set exactly
    # when the operand starts on a 16-byte boundary and each of its rows is whole 16-byte chunks.
    tc = _tc()
    seen = []

    class Kernel:
        def __getitem__(self, launch):
            return self

        def __call__(self, *args):
            seen.append(int(args[6]))

    monkeypatch.setattr(tc, "make_kernel", lambda *args, **kw: Kernel())
    store = np.float32 if kind == "tf32" else np.uint16
    ch = 16 // np.dtype(store).itemsize  # elements per 16-byte chunk

    def operand(rows, cols, aligned=True):
        arr = _on_device(np.zeros((rows, cols), store), misaligned=not aligned)
        assert (tc.address(arr) % 16 == 0) == aligned
        return arr

    def flags(a, b, n):
        y = cuda.device_array((a.shape[0], n), store)
        tc.launch_mma(a, b, cuda.device_array(n, store), y, y, kind=kind, ep=_epilogue(), config=SMALL)
        return seen.pop()

    m, k, n = ch, 2 * ch, 3 * ch  # every dimension a different multiple of the chunk
    assert flags(operand(m, k), operand(k, n), n) == 3
    assert flags(operand(m, k, aligned=False), operand(k, n), n) == 2
    assert flags(operand(m, k), operand(k, n, aligned=False), n) == 1
    # rows of k = ch + 1 elements are not whole chunks (a's rows); b's rows of n are, b's k is not
    assert flags(operand(m, ch + 1), operand(ch + 1, n), n) == 2
    assert flags(operand(ch + 1, k), operand(k, ch + 1), ch + 1) == 1


@pytest.mark.skipif(ON_GPU, reason="counts the simulator's cp.async calls; a compiled kernel cannot be spied on")
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_copies_16_bytes_at_a_time_exactly_when_both_operands_are_flagged(device_backend, monkeypatch,
                                                                                  rng, kind):
    # The other half of the launcher's flags test: the kernel must honour them. Results cannot tell
    # the cp.async pipeline from the element path, so count the simulator's 16-byte copies: the
    # pipeline copies every (M + N) x K chunk of both operands (zero-fill chunks past the edges too);
    # with either flag clear the kernel must not issue one (the element path reads any layout).
    tc, M = _tc(), _mma()
    copies = []
    real = M.cp_async16_zfill

    def counting(smem, i, src, j, nbytes):
        copies.append(int(nbytes))
        real(smem, i, src, j, nbytes)

    monkeypatch.setattr(M, "cp_async16_zfill", counting)
    monkeypatch.setattr(tc, "make_kernel", tc.make_kernel.__wrapped__)  # uncached: built with the counter
    m, k, n = 32, 32, 32  # one block tile of mma32x32; rows of whole 16-byte chunks
    x, xs = _draw(rng, kind, (m, k), integer=True)
    w, ws = _draw(rng, kind, (k, n), integer=True)
    ch = 16 // xs.itemsize
    store = np.float32 if kind == "tf32" else np.uint16

    def run(misaligned):
        y = cuda.device_array((m, n), store)
        copies.clear()
        tc.launch_mma(_on_device(xs, "a" in misaligned), _on_device(ws, "b" in misaligned), cuda.to_device(np.zeros(n, store)), y, y, kind=kind, ep=_epilogue(),
                      config=SMALL)
        assert np.array_equal(_to_values(kind, y.copy_to_host()), _ref_linear(kind, x, w)), f"{kind} {misaligned}"
        return list(copies)

    both = run("")
    assert len(both) >= (m + n) * k // ch, f"{kind}: {len(both)} cp.async copies for {(m + n) * k // ch} chunks"
    assert sum(both) == (m + n) * k * xs.itemsize, f"{kind}: copied {sum(both)} bytes of the operands"
    for misaligned in ("a", "b", "ab"):
        assert run(misaligned) == [], f"{kind}: cp.async with {misaligned} misaligned"


@pytest.mark.parametrize("kind", KINDS)
def test_shared_layouts_are_free_of_bank_conflicts(device_backend, kind):
    # The buffers' padding changes speed, not results, so no result can check it. Shared memory has
    # 32 banks of 4 bytes: an ldmatrix phase reads 8 rows of 16 bytes, which must start in 8 different
    # 16-byte bank groups; TF32's scalar fragment loads of an mn-contiguous buffer read rows t < 4,
    # columns g < 8 (one per lane), which must fall in 32 different banks.
    tc = _tc()
    isz = 4 if kind == "tf32" else 2
    for cfg in tc.CONFIGS:
        for op in ("a", "b"):
            for mn_contiguous in (False, True):
                lay = tc._layout(cfg, kind, op, mn_contiguous)
                where = f"{cfg.name} {kind} {op} {'mn' if mn_contiguous else 'k'}-contiguous, row stride {lay.stride}"
                assert lay.stride * isz % 16 == 0, f"{where}: rows not 16-byte aligned (cp.async, ldmatrix)"
                if kind == "tf32" and mn_contiguous:
                    assert len({(t * lay.stride + g) % 32 for t in range(4) for g in range(8)}) == 32, where
                else:
                    assert len({(r * lay.stride * isz // 16) % 8 for r in range(8)}) == 8, where


def test_launch_limits_at_their_boundaries(device_backend, monkeypatch):
    tc = _tc()

    def launched(*args, **kwargs):
        raise Launched

    monkeypatch.setattr(tc, "make_kernel", launched)
    cfg = tc.config_by_name(SMALL)

    def go(m, k, n):
        tc.launch_mma(StandIn(m, k), StandIn(k, n), StandIn(n), StandIn(m, n), StandIn(m, n), kind="tf32",
                      ep=_epilogue(), config=cfg)

    # 65535 column tiles go through, one column more does not; row tiles are not limited so
    n = 65535 * cfg.bn
    with pytest.raises(Launched):
        go(8, 8, n)
    with pytest.raises(ValueError, match=rf"y has {n + 1} columns; {SMALL} launches at most 65535 column tiles"):
        go(8, 8, n + 1)
    with pytest.raises(Launched):
        go(65536 * cfg.bm, 8, 8)
    # M, N and K below 2**32 go through (32-bit indices), 2**32 does not
    for m, k in ((2**32 - 1, 8), (8, 2**32 - 1)):
        with pytest.raises(Launched):
            go(m, k, 8)
    for m, k in ((2**32, 8), (8, 2**32)):
        with pytest.raises(ValueError, match=rf"below 2\*\*32, got M={m}, N=8, K={k}"):
            go(m, k, 8)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_forward_full_epilogue(device_backend, rng, kind, m, k, n):
    # N odd and offset 3: pairs of outputs straddle Philox blocks
    x, xs = _draw(rng, kind, (m, k))
    w, ws = _draw(rng, kind, (k, n))
    b, bs = _draw(rng, kind, (n,))
    ep = _epilogue("gelu", bias=True, dropout=True, save_preact=True)
    y, z = _launch_tc(kind, xs, ws, bs, m, n, ep=ep, offset=3)
    z_want = _round_out(kind, ref.linear_preact(x, w, b, precision="tf32"))
    _assert_within(kind, z, z_want, _bound(kind, x, w, z_want, k), f"{kind} pre-activation")
    want = _ref_linear(kind, x, w, b, activation="gelu", dropout_p=P, seed=SEED, offset=3)
    dropped = ~ref.dropout_keep_mask((m, n), P, SEED, 3)
    assert (y[dropped] == 0).all(), f"{kind}: {np.count_nonzero(y[dropped])} dropped outputs are not 0"
    _assert_within(kind, y, want, _bound(kind, x, w, want, k) * 1.2, f"{kind} gelu + dropout")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["NT", "TN"])
def test_backward_layouts_against_the_model(device_backend, rng, kind, layout):
    # grad_x = g (M, N) @ w.T (NT: w in its stored (K, N) layout) and grad_w = x.T @ g (TN)
    m, k, n = 24, 56, 40  # here "k" is the reduction: N for grad_x, the batch for grad_w (cp.async path)
    p, ps = _draw(rng, kind, (m, k))
    q, qs = _draw(rng, kind, (k, n))
    a = ps.T.copy() if layout == "TN" else ps
    b = qs.T.copy() if layout == "NT" else qs
    y, _ = _launch_tc(kind, a, b, np.zeros(n, a.dtype), m, n, ep=_epilogue(), trans_a=layout == "TN",
                      trans_b=layout == "NT")
    want = _ref_linear(kind, p, q)
    _assert_within(kind, y, want, _bound(kind, p, q, want, k), f"{kind} {layout}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [0, 3, 2**32 - 1])
def test_fused_dropout_mask_is_bit_exact(device_backend, kind, offset):
    # x = 0 and b = 1: every pre-dropout output is exactly 1, so y is the scale (rounded once
    # to the output format) where kept and exactly 0 where dropped: the mask, bit for bit.
    m, k, n, p = 19, 8, 13, 0.4
    store = np.float32 if kind == "tf32" else np.uint16
    one = np.float32(1) if kind == "tf32" else _bits16(np.float32(1), kind)
    y, _ = _launch_tc(kind, np.zeros((m, k), store), np.full((k, n), one, store), np.full(n, one, store), m, n,
                      ep=_epilogue(None, bias=True, dropout=True), p=p, seed=77, offset=offset)
    keep = ref.dropout_keep_mask((m, n), p, 77, offset)
    assert np.array_equal(y != 0, keep)
    assert (y[keep] == _round_out(kind, ref.dropout_scale(p, np.float32))).all()


@pytest.mark.parametrize("activation", [None, "relu", "gelu_tanh", "tanh", "sigmoid"])
def test_every_activation(device_backend, rng, activation):
    kind = "f16" if activation in ("relu", "tanh") else "bf16" if activation == "sigmoid" else "tf32"
    m, k, n = 9, 7, 11
    x, xs = _draw(rng, kind, (m, k))
    w, ws = _draw(rng, kind, (k, n))
    b, bs = _draw(rng, kind, (n,))
    y, _ = _launch_tc(kind, xs, ws, bs, m, n, ep=_epilogue(activation, bias=True, dropout=True), offset=2)
    want = _ref_linear(kind, x, w, b, activation=activation, dropout_p=P, seed=SEED, offset=2)
    _assert_within(kind, y, want, _bound(kind, x, w, want, k) * 1.2 + 4e-7, f"{kind} {activation}")


def test_k_zero_gives_the_epilogue_of_zero(device_backend):
    m, n = 5, 6
    b = np.linspace(-1, 1, n).astype(np.float32)
    y, _ = _launch_tc("tf32", np.zeros((m, 0), np.float32), np.zeros((0, n), np.float32), b, m, n,
                      ep=_epilogue("sigmoid", bias=True, dropout=True), offset=1)
    want = ref.linear(np.zeros((m, 0), np.float32), np.zeros((0, n), np.float32), b, activation="sigmoid",
                      dropout_p=P, seed=SEED, offset=1)
    _assert_within("tf32", y, want, np.full(want.shape, 1e-6), "K = 0")


@pytest.mark.parametrize("kind", KINDS)
def test_k_one_past_whole_slices(device_backend, rng, kind):
    # K = 1 and K = BK + 1: a last slice with a single value of k, which the slice count (a
    # ceiling) must include.
    bk = _tc().config_by_name(SMALL).bk(kind)
    m, n = 24, 16
    for k in (1, bk + 1):
        x, xs = _draw(rng, kind, (m, k), integer=True)
        w, ws = _draw(rng, kind, (k, n), integer=True)
        y, _ = _launch_tc(kind, xs, ws, np.zeros(n, xs.dtype), m, n, ep=_epilogue())
        assert np.array_equal(y, _ref_linear(kind, x, w)), f"{kind} K={k}: not bit-exact"


@pytest.mark.parametrize("name,kind", [("mma64x64", "f16"), ("mma64x64", "bf16"), ("mma128x128", "tf32")])
def test_every_configuration_integer_tile(device_backend, rng, name, kind):
    # Each larger configuration once, integer inputs (bit-exact), edges ragged, one K slice + a bit.
    cfg = _tc().config_by_name(name)
    m, k, n = cfg.bm + 3 if cfg.bm < 128 else cfg.bm - 5, cfg.bk(kind) + 5, cfg.bn - 3
    x, xs = _draw(rng, kind, (m, k), integer=True)
    w, ws = _draw(rng, kind, (k, n), integer=True)
    b, bs = _draw(rng, kind, (n,), integer=True)
    y, _ = _launch_tc(kind, xs, ws, bs, m, n, ep=_epilogue("relu", bias=True), config=name)
    assert np.array_equal(y, _ref_linear(kind, x, w, b, activation="relu"))


# ----------------------------------------------------------------------------
# 16-bit backward helpers: g = dropout'(grad) * act'(z) and the bias gradient
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["f16", "bf16"])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_act_dropout_backward16(device_backend, rng, kind, activation):
    n, offset = 523, 5  # one block past the simulator's grid: the grid-stride loop wraps
    grad, grad_bits = _draw(rng, kind, (n,))
    z, z_bits = _draw(rng, kind, (n,))
    g = cuda.device_array(n, np.uint16)
    _tc().launch_act_dropout_backward16(cuda.to_device(grad_bits), cuda.to_device(z_bits), g, kind=kind,
                                        activation=activation, dropout=True, key=(SEED & 0xFFFFFFFF, SEED >> 32),
                                        offset=offset, threshold=ref.dropout_threshold(P),
                                        scale=ref.dropout_scale(P, np.float32))
    got = _to_values(kind, g.copy_to_host())
    want = ref.dropout_backward(grad, P, seed=SEED, offset=offset)
    if activation is not None:
        want = want * ref.activation_grad(z, activation)
    want = _round_out(kind, want)
    keep = ref.dropout_keep_mask(n, P, SEED, offset)
    assert np.array_equal(got != 0, keep & (want != 0)), f"{kind}: the mask differs"
    eps = 2.0**-10 if kind == "f16" else 2.0**-7
    _assert_within(kind, got, want, 2 * eps * np.abs(want) + 1e-30, f"{kind} {activation}")


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_bias_grad16(device_backend, rng, kind):
    m, n = 37, 45
    g, g_bits = _draw(rng, kind, (m, n), integer=True)
    out = cuda.device_array(n, np.uint16)
    _tc().launch_bias_grad16(cuda.to_device(g_bits), out, kind=kind)
    # integer sums are exact in float32: one rounding, the same in both
    assert np.array_equal(_to_values(kind, out.copy_to_host()), _round_out(kind, g.sum(axis=0)))
