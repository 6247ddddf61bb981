"""Tests written for mutants that survived the mutation run (tests/mutation.py, docs/testing.md).

Each test names the mutant class it kills. The dropout boundary (word == threshold) has its own
file, tests/test_boundaries.py.
"""

import numpy as np
import pytest

import gpufc
from gpufc import reference as ref

SEED = 0x0123456789ABCDEF


def _word(seed, n):
    block = n // 4
    counter = np.array([block & 0xFFFFFFFF, block >> 32, 0, 0], np.uint32)
    return int(ref.philox4x32_10(counter, np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32))[n % 4])


@pytest.mark.reference
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 2**32 * 4 + 3])
def test_one_element_masks_follow_the_contract(offset):
    # kills: a size-1 tensor treated as empty (`if size == 0` -> `if size == 1` in dropout_keep_mask)
    w = _word(SEED, offset)
    for p, kept in ((w / 2**32, True), ((w + 1) / 2**32, False), (0.0, True)):
        assert ref.dropout_keep_mask(1, p, SEED, offset).tolist() == [kept]
        assert ref.dropout_keep_mask((1, 1), p, SEED, offset).tolist() == [[kept]]
        y = ref.dropout(np.array([3.0]), p, seed=SEED, offset=offset)
        assert (y[0] != 0) == kept


@pytest.mark.reference
def test_dropout_layer_with_rate_zero_draws_no_mask(cpu_backend):
    # kills: `dropout_rate > 0` -> `>= 0` in DropoutLayer.forward (the offset would advance with no mask drawn,
    # as FullyConnectedLayer without dropout already guarantees)
    layer = gpufc.DropoutLayer(0.0, seed=3)
    x = np.ones((2, 5), np.float32)
    np.testing.assert_array_equal(layer.forward(x), x)
    assert layer.offset == 0
