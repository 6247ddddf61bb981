"""The keep comparison at its boundary, through every implementation of the dropout mask.

The contract keeps element ``n`` iff its Philox word ``w >= floor(p * 2**32)``.
Random data meets ``w == threshold`` once in 2**32 draws, so a ``>`` in place of
``>=`` passes every random test. Here the boundary is hit on purpose: pick
``(seed, offset)`` and an element, compute its word ``w`` from the block
function (held to Random123's known answers elsewhere), and set
``p = w / 2**32`` (exact in float64, so the threshold is exactly ``w``): that
element must be KEPT. With ``p = (w + 1) / 2**32`` the threshold is ``w + 1``
and it must be DROPPED. Every implementation is checked at that element and,
bit for bit, everywhere else: the reference, the standalone dropout kernels
(v1, v2 vector and scalar paths, offsets that are not multiples of 4), the
fused linear epilogue (v1 element store, v2 group store, the tensor-core
kernels' pair store in TF32, float16 and bfloat16), the packed mask,
dropout backward and linear backward (float32, and the 16-bit kernels' own), on the cpu
and the device backends.
"""

import inspect
import math

import numpy as np
import pytest

import gpufc
from gpufc import reference as ref
from gpufc.runtime import backend

SEED = 0x0123456789ABCDEF  # both key words non-zero
N = 11  # elements of the 1-D tensors: a head group, two whole groups, a tail group at offset % 4 != 0
# (offset, element): the head group (offset % 4 != 0), whole groups, the tail, every lane (offset + e) % 4,
# and a counter past 2**32 blocks (the high counter word)
POSITIONS = [(0, 0), (0, 6), (1, 0), (3, 9), (2, 10), (5, 4), (4 * 2**32 + 2, 5)]
CASES = ["equal", "above"]  # p = w / 2**32 (kept), p = (w + 1) / 2**32 (dropped)


def word_of(seed: int, n: int) -> int:
    """The contract's word for absolute element ``n``: word ``n % 4`` of block ``n // 4``, computed
    here from the block function alone (not from the key and counter helpers under test)."""
    block = n // 4
    counter = np.array([block & 0xFFFFFFFF, block >> 32, 0, 0], np.uint32)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32)
    return int(ref.philox4x32_10(counter, key)[n % 4])


def boundary_p(seed: int, n: int, case: str) -> float:
    """``p`` whose threshold is exactly element ``n``'s word (``equal``) or one above it (``above``)."""
    w = word_of(seed, n)
    assert 0 < w < 2**32 - 1, "pick another element: the boundary needs 0 < w < 2**32 - 1"
    p = (w if case == "equal" else w + 1) / 2**32
    assert math.floor(p * 2**32) == (w if case == "equal" else w + 1)  # exact: a 32-bit integer / 2**32
    return p


def check(out, e, kept, expected, what):
    """``out`` (any shape, flat element ``e``) equals ``expected`` bit for bit, and ``e`` is kept or dropped."""
    out, expected = np.asarray(out), np.asarray(expected)
    flat = out.reshape(-1)
    assert (flat[e] != 0) == kept, (
        f"{what}: the element whose word equals the threshold{'' if kept else ' - 1'} must be "
        f"{'kept' if kept else 'dropped'}, got {flat[e]!r}")
    assert out.shape == expected.shape and out.dtype == expected.dtype, (out.shape, out.dtype, expected.dtype)
    same = (out == expected) | (np.isnan(out) & np.isnan(expected))
    assert same.all(), f"{what}: differs from the reference at {np.flatnonzero(~same.reshape(-1))[:5].tolist()}"


def _x(n, dtype):
    return (np.arange(n) + 1.5).astype(dtype)  # non-zero everywhere: a kept element is never 0


# ----------------------------------------------------------------------------
# Routing to version 1 (kept forever as the baseline) through the public API
# ----------------------------------------------------------------------------


def _kernel_module(*names):
    """The kernels' module that defines all of ``names`` (a module or a package's ``__init__``)."""
    k = backend.kernels()
    for attr in dir(k):
        mod = getattr(k, attr)
        if inspect.ismodule(mod) and all(hasattr(mod, n) for n in names):
            return mod
    raise AssertionError(f"no kernels module defines {names}")


def route_dropout_to_v1(monkeypatch):
    """The host API's dropout launches (gpufc.dropout, the fused backward) run version 1."""
    monkeypatch.setattr(backend.kernels().dropout, "VERSION", 1)


def matmul_config(version):
    """``config=`` for gpufc.linear & co.: the version-1 kernel, or None (chosen by shape)."""
    return "v1_t16" if version == 1 else None


# ----------------------------------------------------------------------------
# The reference (the oracle of every other test)
# ----------------------------------------------------------------------------


@pytest.mark.reference
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("offset,e", POSITIONS)
def test_threshold_word_is_kept_by_the_reference(offset, e, case):
    p = boundary_p(SEED, offset + e, case)
    kept = case == "equal"
    mask = ref.dropout_keep_mask(N, p, SEED, offset)
    assert mask[e] == kept
    words = np.array([word_of(SEED, offset + i) for i in range(N)], np.uint64)
    assert np.array_equal(mask, words >= ref.dropout_threshold(p)), "the mask is words >= floor(p * 2**32)"
    assert np.array_equal(ref.unpack_mask(ref.dropout_keep_mask_packed(N, p, SEED, offset), N), mask)
    x = _x(N, np.float32)
    want = np.where(mask, x * ref.dropout_scale(p, np.float32), np.float32(0))
    check(ref.dropout(x, p, seed=SEED, offset=offset), e, kept, want, "reference.dropout")
    check(ref.dropout_backward(x, p, seed=SEED, offset=offset), e, kept, want, "reference.dropout_backward")


@pytest.mark.reference
@pytest.mark.parametrize("offset,e", POSITIONS)
def test_threshold_is_the_floor_of_p_times_2_to_the_32(offset, e):
    # p just below w / 2**32: the threshold is w - 1, the element is kept; w / 2**32 itself: w, kept.
    w = word_of(SEED, offset + e)
    below = np.nextafter(w / 2**32, 0.0)
    assert ref.dropout_threshold(below) == w - 1
    assert ref.dropout_threshold(w / 2**32) == w
    assert ref.dropout_threshold((w + 1) / 2**32) == w + 1
    assert ref.dropout_keep_mask(N, below, SEED, offset)[e]
    assert ref.dropout_threshold(1.0) == 2**32 and not ref.dropout_keep_mask(N, 1.0, SEED, offset).any()


@pytest.mark.reference
def test_scale_is_one_over_one_minus_p_rounded_once():
    # 1 / (1 - p) in float64, then one rounding to the dtype (not 1 / (1 - float32(p)))
    for p in (0.1, 0.3, 1 / 3, 0.7, 0.999):
        assert ref.dropout_scale(p, np.float64) == np.float64(1.0 / (1.0 - p))
        assert ref.dropout_scale(p, np.float32) == np.float32(1.0 / (1.0 - p))
    assert ref.dropout_scale(1.0, np.float32) == 0 and ref.dropout_scale(0.0, np.float64) == 1


@pytest.mark.reference
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("offset,e", [(0, 9), (3, 20), (2**34 + 1, 13)])
def test_threshold_word_is_kept_by_the_reference_linear_and_backward(offset, e, case):
    m, n = 4, 7  # e = row * n + col of the (m, n) output
    p = boundary_p(SEED, offset + e, case)
    kept = case == "equal"
    x, w, b = np.zeros((m, m), np.float64), np.zeros((m, n)), np.ones(n)
    mask = ref.dropout_keep_mask((m, n), p, SEED, offset)
    scale = ref.dropout_scale(p, np.float64)
    y = ref.linear(x, w, b, dropout_p=p, seed=SEED, offset=offset)
    check(y, e, kept, np.where(mask, scale, 0.0), "reference.linear")
    x = np.eye(m)  # grad_w = x.T @ g = g
    _, gw, _ = ref.linear_backward(x, w, np.ones((m, n)), biases=b, activation="relu", dropout_p=p, seed=SEED,
                                   offset=offset)
    check(gw, e, kept, np.where(mask, scale, 0.0), "reference.linear_backward grad_w")


# ----------------------------------------------------------------------------
# The standalone kernels and the public API
# ----------------------------------------------------------------------------


@pytest.mark.kernels
@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("offset,e", POSITIONS)
def test_threshold_word_is_kept_by_the_standalone_kernels(device_backend, monkeypatch, offset, e, case, dtype,
                                                         version):
    # v2 takes the 16-byte path at offset % 4 == 0 and the scalar path otherwise
    if version == 1:
        route_dropout_to_v1(monkeypatch)
    p = boundary_p(SEED, offset + e, case)
    kept = case == "equal"
    x = _x(N, dtype)
    want = ref.dropout(x, p, seed=SEED, offset=offset)
    check(gpufc.dropout(x, p, seed=SEED, offset=offset), e, kept, want, f"dropout v{version}")
    check(gpufc.dropout_backward(x, p, seed=SEED, offset=offset), e, kept, want, f"dropout_backward v{version}")


@pytest.mark.reference
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("offset,e", POSITIONS)
def test_threshold_word_is_kept_by_the_public_api_on_cpu(cpu_backend, offset, e, case):
    p = boundary_p(SEED, offset + e, case)
    kept = case == "equal"
    x = _x(N, np.float64)
    want = ref.dropout(x, p, seed=SEED, offset=offset)
    check(gpufc.dropout(x, p, seed=SEED, offset=offset), e, kept, want, "cpu dropout")
    check(gpufc.dropout_backward(x, p, seed=SEED, offset=offset), e, kept, want, "cpu dropout_backward")
    mask = gpufc.unpack_mask(gpufc.dropout_mask(N, p, seed=SEED, offset=offset), N)
    assert mask[e] == kept and np.array_equal(mask, ref.dropout_keep_mask(N, p, SEED, offset))


@pytest.mark.kernels
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("offset,e", POSITIONS + [(6, 17), (1, 18), (7, 8)])
def test_threshold_word_is_kept_by_the_packed_mask_kernel(device_backend, offset, e, case):
    size = 19  # three bytes, the last one part-filled; bits of one byte span 2-3 Philox blocks
    p = boundary_p(SEED, offset + e, case)
    kept = case == "equal"
    bits = gpufc.dropout_mask(size, p, seed=SEED, offset=offset)
    assert np.array_equal(bits, ref.dropout_keep_mask_packed(size, p, SEED, offset))
    mask = gpufc.unpack_mask(bits, size)
    assert mask[e] == kept
    assert np.array_equal(gpufc.dropout_mask(size, p, seed=SEED, offset=offset, packed=False), mask)


# ----------------------------------------------------------------------------
# The fused linear epilogue and the linear backward
# ----------------------------------------------------------------------------

M, K, NCOLS = 5, 3, 7  # (M, K) @ (K, 7): rows start at every offset % 4, runs of 4 columns are cut at 7
# (offset, element = row * 7 + col): every (offset + e) % 4 at the start of a run of 4 (col 0, 4) and inside one
LINEAR_POSITIONS = [(0, 0), (0, 9), (1, 4), (2, 16), (3, 30), (4 * 2**32 + 1, 13), (2, 34)]


@pytest.mark.kernels
@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("offset,e", LINEAR_POSITIONS)
def test_threshold_word_is_kept_by_the_fused_epilogue(device_backend, monkeypatch, offset, e, case, version):
    # x = 0, b = 1: every pre-dropout output is exactly 1, so y is the scale where kept, 0 where dropped
    config = matmul_config(version)
    p = boundary_p(SEED, offset + e, case)
    kept = case == "equal"
    x, w, b = np.zeros((M, K), np.float32), np.ones((K, NCOLS), np.float32), np.ones(NCOLS, np.float32)
    mask = ref.dropout_keep_mask((M, NCOLS), p, SEED, offset)
    want = np.where(mask, ref.dropout_scale(p, np.float32), np.float32(0))
    check(gpufc.linear(x, w, b, dropout_p=p, seed=SEED, offset=offset, config=config), e, kept, want,
          f"linear v{version}")
    y, z = gpufc.linear_forward(x, w, b, activation="relu", dropout_p=p, seed=SEED, offset=offset,
                                save_preact=True, config=config)
    check(y, e, kept, want, f"linear_forward v{version}")
    assert np.array_equal(z, np.ones((M, NCOLS), np.float32)), "the saved pre-activation is x @ w + b"


@pytest.mark.kernels
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("offset,e", [(0, 9), (3, 20), (4 * 2**32 + 2, 13)])
def test_threshold_word_is_kept_by_linear_backward(device_backend, monkeypatch, offset, e, case, version,
                                                   activation):
    # x = I makes grad_w = x.T @ g = g exactly; w = 0, b = 1 make relu'(z) = 1, so g = dropout'(grad_output)
    if version == 1:
        route_dropout_to_v1(monkeypatch)
    config = matmul_config(version)
    m, n = 6, NCOLS
    p = boundary_p(SEED, offset + e, case)
    kept = case == "equal"
    x, w, b = np.eye(m, dtype=np.float32), np.zeros((m, n), np.float32), np.ones(n, np.float32)
    go = np.full((m, n), 2.0, np.float32)
    want = ref.dropout(go, p, seed=SEED, offset=offset)
    _, gw, gb = gpufc.linear_backward(x, w, go, biases=b, activation=activation, dropout_p=p, seed=SEED,
                                       offset=offset, config=config)
    check(gw, e, kept, want, f"linear_backward v{version} grad_w")
    assert np.array_equal(gb, want.sum(axis=0)), "grad_b is the column sums of g"



@pytest.mark.kernels
@pytest.mark.parametrize("kind", ["tf32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("offset,e", [(0, 9), (3, 30), (4 * 2**32 + 1, 13), (2, 34)])
def test_threshold_word_is_kept_by_the_tensor_core_epilogue(device_backend, offset, e, case, kind):
    # The tensor-core kernels' own epilogue (pairs of columns; 16-bit data rounded once at the
    # store): x = 0, b = 1, so y is the scale in the output format where kept, 0 where dropped.
    if kind == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 host arrays need ml_dtypes")
        dtype, precision = np.dtype(ml_dtypes.bfloat16), None
    else:
        dtype, precision = np.dtype(np.float32 if kind == "tf32" else np.float16), ("tf32" if kind == "tf32" else None)
    p = boundary_p(SEED, offset + e, case)
    kept = case == "equal"
    x, w, b = (np.zeros((M, K), dtype), np.ones((K, NCOLS), dtype), np.ones(NCOLS, dtype))
    mask = ref.dropout_keep_mask((M, NCOLS), p, SEED, offset)
    scale = ref.round_to(ref.dropout_scale(p, np.float32), dtype)
    want = np.where(mask, scale, np.zeros((), dtype)).astype(dtype)
    y = gpufc.linear(x, w, b, dropout_p=p, seed=SEED, offset=offset, precision=precision)
    check(np.asarray(y), e, kept, want, f"linear {kind}")


@pytest.mark.kernels
@pytest.mark.parametrize("kind", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("offset,e", [(0, 9), (3, 20), (4 * 2**32 + 2, 13)])
def test_threshold_word_is_kept_by_the_tensor_core_backward(device_backend, offset, e, case, kind):
    # 16-bit linear_backward runs its own dropout' kernel (float32 math, stored rounded once);
    # x = I makes grad_w = x.T @ g = g exactly, w = 0 and b = 1 make relu'(z) = 1.
    if kind == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 host arrays need ml_dtypes")
        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(np.float16)
    m, n = 6, NCOLS
    p = boundary_p(SEED, offset + e, case)
    kept = case == "equal"
    x, w, b = np.eye(m, dtype=dtype), np.zeros((m, n), dtype), np.ones(n, dtype)
    go = np.full((m, n), 2.0, np.float32)
    want = ref.round_to(ref.dropout(go, p, seed=SEED, offset=offset), dtype)
    _, gw, _ = gpufc.linear_backward(x, w, go.astype(dtype), biases=b, activation="relu", dropout_p=p, seed=SEED,
                                     offset=offset)
    check(np.asarray(gw), e, kept, want, f"linear_backward {kind} grad_w")
