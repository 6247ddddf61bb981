"""Kernels tier: dropout v2 (one Philox block per 4 elements), its fused backward and the packed mask.

Everything is held to gpufc.reference bit for bit: values (kept = one multiply
by the rounded scale) and masks, for float32 and float64, any size and offset,
whatever the launch geometry and however a tensor is split into calls. Sizes
are small because the simulator runs every thread in Python; the sizes past
2**31 elements run in the gpu tier at the end.
"""

import itertools

import numpy as np
import pytest
from conftest import requires_gpu
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpufc
from gpufc.runtime import backend
from gpufc import reference as ref

pytestmark = pytest.mark.kernels

cuda = backend.numba_cuda()  # as conftest set it up: a GPU or the simulator
kd = backend.kernels().dropout

DTYPES = [np.float32, np.float64]
# sizes: below one group, one group, ragged tails, several blocks' worth in the simulator
SIZES = [1, 3, 4, 5, 8, 9, 66, 1001]
# offsets: every head (offset % 4), a 32-bit carry into the counter's high word, the top of the range
OFFSETS = [0, 1, 2, 3, 2**32 - 2, 2**32 + 4, 2**64 - 1001 - 3]
KEY_SEED = 0x0123456789ABCDEF  # both key words non-zero


def _args(p, dtype, seed=KEY_SEED, offset=0):
    return {"key": (seed & 0xFFFFFFFF, seed >> 32), "offset": offset, "threshold": ref.dropout_threshold(p),
            "scale": ref.dropout_scale(p, dtype)}


def _data(rng, n, dtype):
    x = rng.standard_normal(n).astype(dtype)
    x[::5] = np.nan  # dropped NaN and inf must come out as exactly 0
    x[2::7] = np.inf
    x[3::11] = -np.inf
    return x


def _forward(x, p, offset, **launch):
    xd = cuda.to_device(x)
    yd = cuda.device_array(x.size, x.dtype)
    kd.launch_dropout(xd, yd, **_args(p, x.dtype, offset=offset), **launch)
    return yd.copy_to_host()


def assert_same(actual, expected, what):
    """Bit-for-bit equality (NaN equal to NaN) with a message that locates the first differences."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: got {actual.dtype}{actual.shape}, expected {expected.dtype}{expected.shape}")
    same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
    if not same.all():
        bad = np.flatnonzero(~same)
        pytest.fail(f"{what}: {bad.size} of {same.size} differ; first at {bad[:5].tolist()}: "
                    f"got {actual.reshape(-1)[bad[:5]].tolist()}, expected {expected.reshape(-1)[bad[:5]].tolist()}")


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_v2_forward_is_bit_exact(device_backend, rng, dtype, size, offset):
    x = _data(rng, size, dtype)
    want = ref.dropout(x, 0.3, seed=KEY_SEED, offset=offset)
    assert_same(_forward(x, 0.3, offset), want, f"v2 size={size} offset={offset}")
    if offset % 4 == 0:  # the 16-byte specialisation applies; check the scalar one too
        assert_same(_forward(x, 0.3, offset, vector=False), want, f"v2 scalar size={size} offset={offset}")


@pytest.mark.parametrize("blocks,threads", [(1, 1), (1, 32), (3, 7), (2, 64), (5, 256)])
@pytest.mark.parametrize("offset", [0, 2])
def test_mask_does_not_depend_on_launch_geometry(device_backend, rng, blocks, threads, offset):
    x = _data(rng, 203, np.float32)
    want = ref.dropout(x, 0.5, seed=KEY_SEED, offset=offset)
    assert_same(_forward(x, 0.5, offset, blocks=blocks, threads=threads), want, f"grid {blocks} x {threads}")


def test_split_calls_equal_one_call(device_backend, rng):
    # a tensor cut into pieces at any element, each launched at offset + start, gives the whole mask
    x = _data(rng, 300, np.float32)
    whole = _forward(x, 0.4, 6)
    cuts = [0, 1, 7, 8, 130, 131, 300]
    parts = [_forward(x[a:b], 0.4, 6 + a) for a, b in itertools.pairwise(cuts)]
    assert_same(np.concatenate(parts), whole, "split calls")
    assert_same(whole, ref.dropout(x, 0.4, seed=KEY_SEED, offset=6), "whole")


def test_v1_and_v2_agree(device_backend, rng):
    x = _data(rng, 97, np.float64)
    for offset in (0, 3):
        assert_same(_forward(x, 0.2, offset, version=1), _forward(x, 0.2, offset), f"v1 vs v2 offset={offset}")


def test_dropped_nan_and_inf_are_zero(device_backend):
    x = np.array([np.nan, np.inf, -np.inf, 1.0] * 64, np.float32)
    y = _forward(x, 0.5, 0)
    keep = ref.dropout_keep_mask(x.size, 0.5, KEY_SEED, 0)
    assert 0 < keep.sum() < keep.size
    assert (y[~keep] == 0).all() and not np.signbit(y[~keep]).any()
    assert_same(y[keep], x[keep] * np.float32(2), "kept")


def test_vector_path_needs_alignment_and_a_multiple_of_4_offset(device_backend, rng):
    x = _data(rng, 64, np.float32)
    xd, yd = cuda.to_device(x), cuda.device_array(64, np.float32)
    assert kd.vector_ok(0, True, xd, yd)
    assert not kd.vector_ok(1, True, xd, yd)  # groups no longer start at element 0
    assert kd.vector_ok(1, False, xd, yd)  # no RNG, no groups to align with
    assert not kd.vector_ok(0, True, xd[1:], yd[1:])  # 4 bytes past a 16-byte boundary
    with pytest.raises(ValueError, match="vector=True"):
        kd.launch_dropout(xd[1:], yd[1:], **_args(0.5, np.float32), vector=True)
    # misaligned views still work: the launcher picks the scalar specialisation
    kd.launch_dropout(xd[1:], yd[1:], **_args(0.5, np.float32, offset=4))
    assert_same(yd.copy_to_host()[1:], ref.dropout(x[1:], 0.5, seed=KEY_SEED, offset=4), "misaligned")


def test_bad_version_is_refused(device_backend):
    xd = cuda.to_device(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="version"):
        kd.launch_dropout(xd, xd, **_args(0.5, np.float32), version=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(1, 70),
    offset=st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 71)),
    seed=st.integers(0, 2**64 - 1),
    p=st.floats(0.0, 1.0),
    f64=st.booleans(),
)
def test_forward_property_any_size_offset_seed_p(device_backend, size, offset, seed, p, f64):
    dtype = np.float64 if f64 else np.float32
    x = np.linspace(-3, 3, size).astype(dtype)
    xd, yd = cuda.to_device(x), cuda.device_array(size, dtype)
    kd.launch_dropout(xd, yd, **_args(p, dtype, seed=seed, offset=offset), blocks=1, threads=8)
    assert_same(yd.copy_to_host(), ref.dropout(x, p, seed=seed, offset=offset), f"p={p}")


# ----------------------------------------------------------------------------
# Through the public API
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (2, 3, 7)])
def test_public_dropout_and_backward(device_backend, rng, dtype, shape):
    x = rng.standard_normal(shape).astype(dtype)
    y = gpufc.dropout(x, 0.25, seed=9, offset=12)
    assert_same(y, ref.dropout(x, 0.25, seed=9, offset=12), "dropout")
    assert_same(gpufc.dropout_backward(x, 0.25, seed=9, offset=12), ref.dropout(x, 0.25, seed=9, offset=12),
                "dropout_backward")


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_p_zero_keeps_all_and_p_one_drops_all(device_backend, rng, p):
    x = _data(rng, 37, np.float32)
    y = gpufc.dropout(x, p, seed=3)
    assert_same(y, x if p == 0.0 else np.zeros_like(x), f"p={p}")


def test_training_false_is_identity_and_bad_p_is_refused(device_backend, rng):
    x = _data(rng, 21, np.float64)
    assert_same(gpufc.dropout(x, 0.9, seed=3, training=False), x, "training=False")
    for p in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="p"):
            gpufc.dropout(x, p)


# ----------------------------------------------------------------------------
# Fused FC backward: g = dropout'(grad) * act'(z)
# ----------------------------------------------------------------------------


# a kept inf times relu'(z) = 0 is NaN on both sides (the simulator's threads warn outside np.errstate)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("activation", list(ref.ACTIVATIONS))
@pytest.mark.parametrize("dropout", [True, False])
@pytest.mark.parametrize("size,offset", [(67, 0), (67, 3), (5, 2)])
def test_fused_backward_matches_reference(device_backend, rng, activation, dropout, size, offset):
    grad = _data(rng, size, np.float64) if dropout else rng.standard_normal(size)
    z = rng.standard_normal(size)
    gd, zd, out = cuda.to_device(grad), cuda.to_device(z), cuda.device_array(size)
    kd.launch_act_dropout_backward(gd, zd, out, activation=activation, dropout=dropout,
                                   **_args(0.4, np.float64, offset=offset), blocks=2, threads=8)
    want = ref.dropout(grad, 0.4, seed=KEY_SEED, offset=offset) if dropout else grad
    want = want * ref.activation_grad(z, activation)
    got = out.copy_to_host()
    if dropout:  # the mask exactly: dropped are 0 even for NaN / inf grads
        keep = ref.dropout_keep_mask(size, 0.4, KEY_SEED, offset)
        assert (got[~keep] == 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_fused_backward_float32_geometry_and_fallback(device_backend, rng, activation):
    # v2 at several geometries, v1, and misaligned views (which fall back to v1) agree bit for bit
    grad = rng.standard_normal(151).astype(np.float32)
    z = rng.standard_normal(151).astype(np.float32)
    kw = dict(activation=activation, dropout=True, **_args(0.5, np.float32, offset=8))
    outs = []
    for version, blocks, threads in ((2, None, 256), (2, 3, 16), (1, None, 256)):
        out = cuda.device_array(150, np.float32)
        kd.launch_act_dropout_backward(cuda.to_device(grad[1:]), cuda.to_device(z[1:]), out, **kw,
                                       version=version, blocks=blocks, threads=threads)
        outs.append(out.copy_to_host())
    gd, zd, out = cuda.to_device(grad), cuda.to_device(z), cuda.device_array(151, np.float32)
    assert not kd.vector_ok(8, True, gd[1:], zd[1:], out[1:])
    kd.launch_act_dropout_backward(gd[1:], zd[1:], out[1:], **kw)
    outs.append(out.copy_to_host()[1:])
    for o in outs[1:]:
        assert_same(o, outs[0], "geometry / version / misaligned")
    want = ref.dropout(grad[1:], 0.5, seed=KEY_SEED, offset=8) * ref.activation_grad(z[1:], activation)
    np.testing.assert_allclose(outs[0], want, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# Packed masks
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 64, 203])
@pytest.mark.parametrize("offset", [0, 1, 3, 6, 2**33 + 2, 2**64 - 203 - 1])
def test_dropout_mask_kernel_is_bit_exact(device_backend, size, offset):
    bits = gpufc.dropout_mask(size, 0.35, seed=KEY_SEED, offset=offset)
    assert bits.dtype == np.uint8 and bits.shape == (-(-size // 8),)
    keep = ref.dropout_keep_mask(size, 0.35, KEY_SEED, offset)
    assert_same(bits, np.packbits(keep, bitorder="little"), f"mask size={size} offset={offset}")


@pytest.mark.parametrize("blocks,threads", [(1, 1), (2, 3), (4, 32)])
def test_dropout_mask_kernel_geometry(device_backend, blocks, threads):
    size = 77
    md = cuda.device_array(10, np.uint8)
    kd.launch_dropout_mask(md, size=size, key=(5, 6), offset=5, threshold=ref.dropout_threshold(0.5),
                           blocks=blocks, threads=threads)
    assert_same(md.copy_to_host(), ref.dropout_keep_mask_packed(size, 0.5, 5 + (6 << 32), 5), "mask geometry")


def test_mask_kernel_refuses_a_wrong_size(device_backend):
    with pytest.raises(ValueError, match="ceil"):
        kd.launch_dropout_mask(cuda.device_array(3, np.uint8), size=25, key=(0, 0), offset=0, threshold=0)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_mask_extremes_and_padding(any_backend, p):
    bits = gpufc.dropout_mask((3, 5), p, seed=1, offset=2)
    # 15 elements: two bytes, the last bit of the second is padding and always 0
    assert bits.tolist() == ([0xFF, 0x7F] if p == 0.0 else [0, 0])


@pytest.mark.parametrize("shape", [(), (0,), (13,), (4, 6), (2, 3, 5)])
def test_dropout_mask_api_and_unpack(any_backend, shape):
    keep = gpufc.dropout_mask(shape, 0.5, seed=4, offset=10, packed=False)
    assert keep.dtype == np.bool_ and keep.shape == shape
    assert_same(keep, ref.dropout_keep_mask(shape, 0.5, 4, 10), "bool mask")
    bits = gpufc.dropout_mask(shape, 0.5, seed=4, offset=10)
    assert_same(gpufc.unpack_mask(bits, shape), keep, "unpack")
    assert_same(gpufc.pack_mask(keep), bits, "pack")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_with_mask(any_backend, rng, dtype):
    x = _data(rng, 45, dtype).reshape(5, 9)
    y, bits = gpufc.dropout_with_mask(x, 0.6, seed=21, offset=3)
    assert_same(y, ref.dropout(x, 0.6, seed=21, offset=3), "y")
    keep = gpufc.unpack_mask(bits, x.shape)
    assert_same(keep, ref.dropout_keep_mask(x.shape, 0.6, 21, 3), "mask")
    assert (y[~keep] == 0).all()
    y_eval, bits_eval = gpufc.dropout_with_mask(x, 0.6, training=False)
    assert_same(y_eval, x, "eval")
    assert gpufc.unpack_mask(bits_eval, x.shape).all()


def test_mask_api_errors_name_the_argument(any_backend):
    with pytest.raises(ValueError, match="needs ceil"):
        gpufc.unpack_mask(np.zeros(2, np.uint8), (3, 7))
    with pytest.raises(TypeError, match="uint8"):
        gpufc.unpack_mask(np.zeros(3, np.int32), 21)
    with pytest.raises(TypeError, match="bool"):
        gpufc.pack_mask(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="p"):
        gpufc.dropout_mask(4, 1.5)
    with pytest.raises(ValueError, match="seed"):
        gpufc.dropout_mask(4, 0.5, seed=-1)
    with pytest.raises(ValueError, match="shape"):
        gpufc.dropout_mask((2, -1), 0.5)


# ----------------------------------------------------------------------------
# Past 2**31 elements (real GPU only: 17 GB of float32)
# ----------------------------------------------------------------------------


@pytest.mark.gpu
@requires_gpu
def test_v2_past_2_to_the_31_elements(device_backend):
    cp = pytest.importorskip("cupy", reason="CuPy is not installed")
    n = 2**31 + 13
    try:
        x = cp.ones(n, cp.float32)
        y = cp.empty_like(x)
    except cp.cuda.memory.OutOfMemoryError:
        pytest.skip("needs 17 GB of free GPU memory")
    xv, yv = cuda.as_cuda_array(x), cuda.as_cuda_array(y)
    kd.launch_dropout(xv, yv, **_args(0.5, np.float32, offset=8))
    cuda.synchronize()
    head, tail = cp.asnumpy(y[:4096]), cp.asnumpy(y[-4099:])
    del x, y
    assert_same(head != 0, ref.dropout_keep_mask(4096, 0.5, KEY_SEED, 8), "head")
    assert_same(tail != 0, ref.dropout_keep_mask(4099, 0.5, KEY_SEED, 8 + n - 4099), "tail")


@pytest.mark.gpu
@requires_gpu
def test_mask_api_cupy_in_cupy_out(device_backend):
    cp = pytest.importorskip("cupy", reason="CuPy is not installed")
    x = cp.arange(45, dtype=cp.float32).reshape(5, 9)
    y, bits = gpufc.dropout_with_mask(x, 0.5, seed=3, offset=4)
    assert isinstance(y, cp.ndarray) and isinstance(bits, cp.ndarray) and bits.dtype == cp.uint8
    want = ref.dropout_keep_mask((5, 9), 0.5, 3, 4)
    assert_same(cp.asnumpy(bits), np.packbits(want, bitorder="little"), "packed on the device")
    keep = gpufc.unpack_mask(bits, (5, 9))
    assert isinstance(keep, cp.ndarray) and keep.dtype == cp.bool_
    assert_same(cp.asnumpy(keep), want, "unpacked on the device")
    assert_same(cp.asnumpy(gpufc.pack_mask(keep)), cp.asnumpy(bits), "packed again on the device")
    assert_same(cp.asnumpy(y), ref.dropout(cp.asnumpy(x), 0.5, seed=3, offset=4), "y")
