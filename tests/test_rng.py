"""RNG quality: Philox known answers on the device, keep rates, independence of neighbouring masks.

Statistical tests are sized so that a correct generator fails each of them
with probability below 1e-6 (Hoeffding's bound for keep rates; the
chi-square tail for pair tables). Inputs are fixed, so a run is deterministic:
a failure means the generator or the mask contract changed, not bad luck.
Big samples come from the NumPy reference (fast); the device (GPU or
simulator) draws moderate ones and must equal the reference bit for bit.
"""

import math

import numpy as np
import pytest
from helpers import KAT

from gpufc.runtime import backend
from gpufc import reference as ref

FAIL_PROB = 1e-6  # per test, on a correct generator

# numba.cuda as conftest set it up (GPU or simulator). The test kernels below use it as a
# module global: the simulator swaps the globals of a kernel, not its closure variables.
cuda = backend.numba_cuda()
philox = backend.kernels().dropout.philox



# ----------------------------------------------------------------------------
# Device Philox against Random123 and the reference
# ----------------------------------------------------------------------------


def _philox_rows(ctr, key, out):
    # ctr (n, 4), key (n, 2), out (n, 4), all uint32: one Philox block per row
    i = cuda.grid(1)
    if i < ctr.shape[0]:
        r0, r1, r2, r3 = philox.philox4x32_10(ctr[i, 0], ctr[i, 1], ctr[i, 2], ctr[i, 3], key[i, 0], key[i, 1])
        out[i, 0] = r0
        out[i, 1] = r1
        out[i, 2] = r2
        out[i, 3] = r3


def _block_words(blk, k0, k1, out):
    # blk (n,) uint64 block indices -> out (n, 4) uint32 words
    i = cuda.grid(1)
    if i < blk.size:
        r0, r1, r2, r3 = philox.philox_block(blk[i], k0, k1)
        out[i, 0] = r0
        out[i, 1] = r1
        out[i, 2] = r2
        out[i, 3] = r3


def _device_philox(counters: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """kernels.philox.philox4x32_10 on rows of uint32 counters (n, 4) and keys (n, 2)."""
    kern = cuda.jit("void(uint32[:, ::1], uint32[:, ::1], uint32[:, ::1])")(_philox_rows)
    out = cuda.device_array(counters.shape, np.uint32)
    kern[-(-len(counters) // 32), 32](cuda.to_device(counters), cuda.to_device(keys), out)
    return out.copy_to_host()


@pytest.mark.kernels
def test_device_philox_known_answers(device_backend):
    counters = np.array([c for c, _, _ in KAT], np.uint32)
    keys = np.array([k for _, k, _ in KAT], np.uint32)
    got = _device_philox(counters, keys)
    for row, (c, k, expected) in zip(got, KAT):
        assert [hex(v) for v in row] == [hex(v) for v in expected], f"counter {c}, key {k}"


@pytest.mark.kernels
def test_device_philox_matches_reference_on_random_rows(device_backend, rng):
    counters = rng.integers(0, 2**32, size=(40, 4), dtype=np.uint32)
    keys = rng.integers(0, 2**32, size=(40, 2), dtype=np.uint32)
    assert np.array_equal(_device_philox(counters, keys), ref.philox4x32_10(counters, keys))


@pytest.mark.kernels
def test_device_philox_block_splits_the_counter(device_backend):
    # philox_block(block) is the counter (lo32(block), hi32(block), 0, 0), the contract's step 3
    blocks = np.array([0, 1, 2**32 - 1, 2**32, 2**32 + 5, 2**62 + 2**40 + 3, 2**64 - 1], np.uint64)
    kern = cuda.jit("void(uint64[::1], uint32, uint32, uint32[:, ::1])")(_block_words)
    out = cuda.device_array((blocks.size, 4), np.uint32)
    kern[1, 32](cuda.to_device(blocks), np.uint32(0x1234), np.uint32(0xFEDC), out)
    ctr = np.zeros((blocks.size, 4), np.uint32)
    ctr[:, 0] = blocks & np.uint64(0xFFFFFFFF)
    ctr[:, 1] = blocks >> np.uint64(32)
    assert np.array_equal(out.copy_to_host(), ref.philox4x32_10(ctr, np.array([0x1234, 0xFEDC], np.uint32)))


# ----------------------------------------------------------------------------
# Keep rates
# ----------------------------------------------------------------------------


def keep_probability(p: float) -> float:
    """Exact keep probability of the contract: P(word >= floor(p 2**32)) for a uniform 32-bit word."""
    return 1.0 - ref.dropout_threshold(p) / 2**32


def hoeffding_halfwidth(n: int, fail_prob: float = FAIL_PROB) -> float:
    """eps with P(|mean - q| >= eps) <= 2 exp(-2 n eps^2) = fail_prob for n Bernoulli(q) draws."""
    return math.sqrt(math.log(2.0 / fail_prob) / (2.0 * n))


def assert_keep_rate(keep: np.ndarray, p: float, what: str):
    n = keep.size
    rate = float(np.count_nonzero(keep)) / n
    q, eps = keep_probability(p), hoeffding_halfwidth(n)
    assert abs(rate - q) < eps, f"{what}: keep rate {rate:.6f} over {n} draws, expected {q:.6f} +- {eps:.6f}"


@pytest.mark.reference
@pytest.mark.parametrize("p", [0.01, 0.1, 0.25, 1 / 3, 0.5, 0.9, 0.999])
def test_reference_keep_rate(p):
    keep = ref.dropout_keep_mask(1 << 21, p, seed=2024, offset=7)
    assert_keep_rate(keep, p, f"reference p={p}")


@pytest.mark.reference
@pytest.mark.parametrize("lane", range(4))
def test_reference_keep_rate_per_word_lane(lane):
    # each of the 4 words of a block must be uniform on its own, not just on average
    keep = ref.dropout_keep_mask(1 << 20, 0.3, seed=99, offset=0)
    assert_keep_rate(keep[lane::4], 0.3, f"word lane {lane}")


@pytest.mark.kernels
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_device_keep_rate(device_backend, p):
    import gpufc

    n = 1 << 13  # moderate: the simulator runs every thread in Python
    packed = gpufc.dropout_mask(n, p, seed=31337, offset=4 * 12345)
    assert np.array_equal(packed, ref.dropout_keep_mask_packed(n, p, 31337, 4 * 12345))
    assert_keep_rate(ref.unpack_mask(packed, n), p, f"device p={p}")


def test_keep_probability_is_exact():
    assert keep_probability(0.0) == 1.0 and keep_probability(1.0) == 0.0
    assert keep_probability(0.5) == 0.5
    # a p that is not a multiple of 2**-32 keeps slightly more than 1 - p (floor)
    assert 0.0 < keep_probability(0.1) - 0.9 < 2**-32


# ----------------------------------------------------------------------------
# Independence of neighbouring masks: 2 x 2 tables of (keep_a, keep_b)
# ----------------------------------------------------------------------------


def chi2_3dof_sf(x: float) -> float:
    """Upper tail of the chi-square distribution with 3 degrees of freedom."""
    return math.erfc(math.sqrt(x / 2.0)) + math.sqrt(2.0 * x / math.pi) * math.exp(-x / 2.0)


def assert_independent(a: np.ndarray, b: np.ndarray, p: float, what: str):
    """Pearson goodness of fit of the (a, b) pair counts to two independent Bernoulli(q) draws.

    The expected table uses the exact keep probability q (no fitted margins), so
    the statistic is chi-square with 4 - 1 = 3 degrees of freedom; it tests the
    keep rate of both and their independence at once.
    """
    a = np.asarray(a, bool).reshape(-1)
    b = np.asarray(b, bool).reshape(-1)
    n = a.size
    q = keep_probability(p)
    observed = np.array([np.count_nonzero(~a & ~b), np.count_nonzero(~a & b),
                         np.count_nonzero(a & ~b), np.count_nonzero(a & b)], float)
    expected = n * np.array([(1 - q) ** 2, (1 - q) * q, q * (1 - q), q * q])
    assert expected.min() >= 50, "too few expected counts for the chi-square approximation"
    stat = float(((observed - expected) ** 2 / expected).sum())
    pval = chi2_3dof_sf(stat)
    assert pval > FAIL_PROB, f"{what}: chi2 = {stat:.2f} (3 dof), p-value {pval:.2e}; table {observed.tolist()}"


N_PAIRS = 1 << 20


@pytest.mark.reference
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_masks_of_adjacent_offsets_are_independent(p, offset):
    # offsets o and o + 1 pair the words n and n + 1; disjoint pairs (every other element)
    # keep the samples independent, and o = 0..3 covers every lane pair, across blocks too
    a = ref.dropout_keep_mask(2 * N_PAIRS, p, seed=5, offset=offset)
    b = ref.dropout_keep_mask(2 * N_PAIRS, p, seed=5, offset=offset + 1)
    assert_independent(a[::2], b[::2], p, f"offsets {offset}, {offset + 1}")


@pytest.mark.reference
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_of_adjacent_blocks_are_independent(p):
    # the same word lane of neighbouring counters: offsets o and o + 4
    a = ref.dropout_keep_mask(8 * (N_PAIRS // 4), p, seed=8, offset=0).reshape(-1, 8)
    assert_independent(a[:, :4], a[:, 4:], p, "blocks 2k, 2k + 1")


@pytest.mark.reference
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 12345, 2**32 - 1, 2**63])
@pytest.mark.parametrize("step", [1, 2**32])
def test_masks_of_adjacent_seeds_are_independent(p, seed, step):
    # step 1 changes the low key word; 2**32 the high one
    a = ref.dropout_keep_mask(N_PAIRS, p, seed=seed, offset=0)
    b = ref.dropout_keep_mask(N_PAIRS, p, seed=(seed + step) % 2**64, offset=0)
    assert_independent(a, b, p, f"seeds {seed}, {seed} + {step}")


@pytest.mark.kernels
def test_device_masks_of_adjacent_seeds_are_independent(device_backend):
    import gpufc

    n, p = 1 << 13, 0.5
    a = gpufc.unpack_mask(gpufc.dropout_mask(n, p, seed=77, offset=0), n)
    b = gpufc.unpack_mask(gpufc.dropout_mask(n, p, seed=78, offset=0), n)
    assert np.array_equal(a, ref.dropout_keep_mask(n, p, 77, 0))
    assert_independent(a, b, p, "device seeds 77, 78")


def test_chi2_tail_matches_known_quantiles():
    # chi2(3) quantiles: 7.815 at 0.05, 11.345 at 0.01, 16.266 at 0.001
    for x, tail in ((7.8147, 0.05), (11.3449, 0.01), (16.2662, 0.001)):
        assert chi2_3dof_sf(x) == pytest.approx(tail, rel=1e-3)


def test_independence_check_catches_a_correlated_pair():
    # the check itself must have power: b = a (perfect correlation) and a biased rate both fail
    a = ref.dropout_keep_mask(1 << 14, 0.5, seed=1, offset=0)
    with pytest.raises(AssertionError, match="chi2"):
        assert_independent(a, a, 0.5, "a with itself")
    with pytest.raises(AssertionError, match="chi2"):
        assert_independent(a, ref.dropout_keep_mask(1 << 14, 0.4, seed=2, offset=0), 0.5, "biased")
