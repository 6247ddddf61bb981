"""Device Philox4x32-10 (Random123, Salmon et al., SC'11) and the dropout keep test.

``philox4x32_10(c0, c1, c2, c3, k0, k1)`` is the block function: four uint32
counter words and two uint32 key words in, four uint32 words out. Every word
stays 32-bit; only the two 32x32 products per round widen to 64 bits, which
compiles to ``mul.wide.u32`` (hi and lo halves in one instruction pair).

``keep_word(n, k0, k1)`` applies the dropout mask contract (docs/architecture.md): element
``n = offset + e`` reads word ``n % 4`` of the block at counter
``(lo32(n // 4), hi32(n // 4), 0, 0)``. It draws a whole block for one word;
``philox_block(block, k0, k1)`` returns all four words of one block, which is
how the version-2 dropout kernels spend one call on 4 elements.

The NumPy twin is :func:`gpufc.reference.philox4x32_10`; the tests hold the
two to the Random123 known-answer vectors.
"""

import numpy as np
from numba import cuda, uint32, uint64

M0 = np.uint64(0xD2511F53)  # multiplies counter word 0
M1 = np.uint64(0xCD9E8D57)  # multiplies counter word 2
W0 = np.uint32(0x9E3779B9)  # key bump, golden ratio
W1 = np.uint32(0xBB67AE85)  # key bump, sqrt(3) - 1
MASK32 = np.uint64(0xFFFFFFFF)
SHIFT32 = np.uint64(32)
TWO = np.uint64(2)
THREE = np.uint64(3)


@cuda.jit(device=True, inline=True)
def _round(c0, c1, c2, c3, k0, k1):
    p0 = uint64(c0) * M0
    p1 = uint64(c2) * M1
    hi0 = uint32(p0 >> SHIFT32)
    lo0 = uint32(p0 & MASK32)
    hi1 = uint32(p1 >> SHIFT32)
    lo1 = uint32(p1 & MASK32)
    return hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0


@cuda.jit(device=True, inline=True)
def _bump(k0, k1):
    # uint32 + uint32 types as uint64 in Numba: mask back to 32 bits (a no-op in SASS).
    return uint32((uint64(k0) + uint64(W0)) & MASK32), uint32((uint64(k1) + uint64(W1)) & MASK32)


@cuda.jit(device=True, inline=True)
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 block: ten rounds, nine key bumps between them.

    A constant-trip loop rather than ten written-out rounds: the compiler
    unrolls it to the same straight-line code, and Numba's inliner copies one
    round instead of ten into every caller (kernels with several call sites
    compiled 5x slower written out).
    """
    for _ in range(9):
        c0, c1, c2, c3 = _round(c0, c1, c2, c3, k0, k1)
        k0, k1 = _bump(k0, k1)
    return _round(c0, c1, c2, c3, k0, k1)


@cuda.jit(device=True, inline=True)
def block_counter(block):
    """Split a uint64 block index into the (lo32, hi32) counter words."""
    return uint32(block & MASK32), uint32(block >> SHIFT32)


@cuda.jit(device=True, inline=True)
def select_word(r0, r1, r2, r3, lane):
    """Word ``lane`` (uint64 in 0..3) of a Philox block."""
    if lane == uint64(0):
        return r0
    if lane == uint64(1):
        return r1
    if lane == TWO:
        return r2
    return r3


@cuda.jit(device=True, inline=True)
def element_word(n, k0, k1):
    """The contract's Philox word of element ``n`` (uint64: offset + flat index)."""
    lo, hi = block_counter(n >> TWO)
    r0, r1, r2, r3 = philox4x32_10(lo, hi, uint32(0), uint32(0), k0, k1)
    return select_word(r0, r1, r2, r3, n & THREE)


@cuda.jit(device=True, inline=True)
def keep_word(n, k0, k1, threshold):
    """True when element ``n`` (uint64: offset + flat index) is kept; ``threshold`` is uint64."""
    return uint64(element_word(n, k0, k1)) >= threshold


@cuda.jit(device=True, inline=True)
def philox_block(block, k0, k1):
    """The four words of Philox block ``block`` (uint64): counter ``(lo32, hi32, 0, 0)``.

    Word ``i`` belongs to the absolute element ``n = 4 * block + i``. The two zero
    counter words make the first round's second product a constant the compiler folds.
    """
    lo, hi = block_counter(block)
    return philox4x32_10(lo, hi, uint32(0), uint32(0), k0, k1)
