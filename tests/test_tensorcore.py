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
from numba import cuda, uint32  # after conftest chose the simulator or the GPU

from gpufc import backend as _backend
from gpufc import reference as ref

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
