"""The fused epilogue of the fully connected forward, shared by every matmul version.

For one output element ``(row, col)`` of ``y (M, N)`` with accumulator ``acc``::

    z = acc + b[col]                          # if the kernel has a bias
    a = act(z)                                # activations.make_activation
    y[row, col] = keep(n) ? a * scale : 0     # if dropout; n = offset + row * N + col
    zout[row, col] = z                        # if the caller keeps the pre-activation

``keep`` is the dropout mask contract (docs/architecture.md; kernels.dropout.philox.element_word),
so the fused mask equals the standalone dropout kernel's bit for bit. A dropped
element is a selected 0, never ``a * 0``, so NaN and inf are dropped too.

``Epilogue`` is the frozen key of one specialisation; ``make_epilogue`` turns it
into a device function ``store(y, zout, b, row, col, acc, n_cols, k0, k1, offset, threshold, scale)``.
Index arguments are any integer type; they are widened to uint64 for the element index.

The register-tiled kernels store runs of four consecutive columns of one row:
``make_group_store(ep, dtype)`` gives
``store_group(y, zout, b, row, col, v0, v1, v2, v3, n_cols, k0, k1, offset, threshold, scale)``,
the same math (one ``make_element_store`` per element) for columns ``col .. col + 3``
(each guarded by ``< n_cols``).
Its dropout words come from :func:`words4`: one Philox block serves the four
elements when ``offset + row * N + col`` is a multiple of 4, two blocks otherwise,
so the mask is the contract's for any offset and any N.
"""

import dataclasses
import functools

import numpy as np
from numba import cuda, uint32, uint64

from ..activations import NAMES, make_activation
from ..dropout.philox import THREE, TWO, element_word, philox_block


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """What the epilogue does: one specialisation per distinct value."""

    activation: str | None = None
    bias: bool = False
    dropout: bool = False
    save_preact: bool = False

    def __post_init__(self):
        assert self.activation in NAMES, f"activation must be one of {NAMES}, got {self.activation!r}"

    @property
    def tag(self) -> str:
        parts = [self.activation or "id"]
        parts += ["bias"] if self.bias else []
        parts += ["drop"] if self.dropout else []
        parts += ["z"] if self.save_preact else []
        return "+".join(parts)


PLAIN = Epilogue()


@functools.cache
def make_element_store(ep: Epilogue, dtype):
    """Device function ``store_one(y, zout, b, row, col, v, word, threshold, scale)``: the
    epilogue of one element whose accumulator is ``v`` and whose Philox word is ``word``."""
    act, _ = make_activation(ep.activation, dtype)
    zero = np.dtype(dtype).type(0)
    has_bias, has_dropout, save_preact = ep.bias, ep.dropout, ep.save_preact

    @cuda.jit(device=True, inline=True)
    def store_one(y, zout, b, row, col, v, word, threshold, scale):
        z = v
        if has_bias:
            z = z + b[col]
        if save_preact:
            zout[row, col] = z
        a = act(z)
        if has_dropout:
            a = a * scale if uint64(word) >= threshold else zero
        y[row, col] = a

    return store_one


@functools.cache
def make_epilogue(ep: Epilogue, dtype):
    """Device function storing one output element as ``ep`` says, in ``dtype``."""
    store_one = make_element_store(ep, dtype)
    has_dropout = ep.dropout

    @cuda.jit(device=True, inline=True)
    def store(y, zout, b, row, col, acc, n_cols, k0, k1, offset, threshold, scale):
        word = uint32(0)
        if has_dropout:
            word = element_word(offset + uint64(row) * uint64(n_cols) + uint64(col), k0, k1)
        store_one(y, zout, b, row, col, acc, word, threshold, scale)

    return store


_ONE = np.uint64(1)


@cuda.jit(device=True, inline=True)
def words4(n0, k0, k1):
    """The contract's Philox words of elements ``n0 .. n0 + 3`` (``n0`` uint64 = offset + flat index).

    Element ``n`` reads word ``n % 4`` of block ``n // 4``: four consecutive
    elements lie in one block when ``n0 % 4 == 0`` (one Philox call) and
    straddle two blocks otherwise (two calls).
    """
    q = n0 >> TWO
    s = n0 & THREE
    r0, r1, r2, r3 = philox_block(q, k0, k1)
    if s == uint64(0):
        return r0, r1, r2, r3
    t0, t1, t2, _ = philox_block(q + _ONE, k0, k1)
    if s == _ONE:
        return r1, r2, r3, t0
    if s == TWO:
        return r2, r3, t0, t1
    return r3, t0, t1, t2


@functools.cache
def make_group_store(ep: Epilogue, dtype):
    """Device function storing 4 consecutive outputs of one row as ``ep`` says.

    ``store_group(y, zout, b, row, col, v0, v1, v2, v3, n_cols, k0, k1, offset, threshold, scale)``:
    ``v_j`` is the accumulator of ``(row, col + j)``; ``row < M`` is the caller's
    guard, each column is guarded here; ``row``, ``col`` and ``n_cols`` are uint64.
    """
    one = make_element_store(ep, dtype)
    has_dropout = ep.dropout
    c1, c2, c3 = np.uint64(1), np.uint64(2), np.uint64(3)

    @cuda.jit(device=True, inline=True)
    def store_group(y, zout, b, row, col, v0, v1, v2, v3, n_cols, k0, k1, offset, threshold, scale):
        w0 = w1 = w2 = w3 = uint32(0)
        if has_dropout:
            w0, w1, w2, w3 = words4(offset + row * n_cols + col, k0, k1)
        if col < n_cols:
            one(y, zout, b, row, col, v0, w0, threshold, scale)
        if col + c1 < n_cols:
            one(y, zout, b, row, col + c1, v1, w1, threshold, scale)
        if col + c2 < n_cols:
            one(y, zout, b, row, col + c2, v2, w2, threshold, scale)
        if col + c3 < n_cols:
            one(y, zout, b, row, col + c3, v3, w3, threshold, scale)

    return store_group
