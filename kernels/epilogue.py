"""The fused epilogue of the fully connected forward, shared by every matmul version.

For one output element ``(row, col)`` of ``y (M, N)`` with accumulator ``acc``::

    z = acc + b[col]                          # if the kernel has a bias
    a = act(z)                                # activations.make_activation
    y[row, col] = keep(n) ? a * scale : 0     # if dropout; n = offset + row * N + col
    zout[row, col] = z                        # if the caller keeps the pre-activation

``keep`` is the dropout mask contract of ARCHITECTURE.md (kernels.philox.keep_word),
so the fused mask equals the standalone dropout kernel's bit for bit. A dropped
element is a selected 0, never ``a * 0``, so NaN and inf are dropped too.

``Epilogue`` is the frozen key of one specialisation; ``make_epilogue`` turns it
into a device function ``store(y, zout, b, row, col, acc, n_cols, k0, k1, offset, threshold, scale)``.
Index arguments are any integer type; they are widened to uint64 for the element index.
"""

import dataclasses
import functools

import numpy as np
from numba import cuda, uint64

from .activations import NAMES, make_activation
from .philox import keep_word


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


@functools.lru_cache(maxsize=None)
def make_epilogue(ep: Epilogue, dtype):
    """Device function storing one output element as ``ep`` says, in ``dtype``."""
    act, _ = make_activation(ep.activation, dtype)
    zero = np.dtype(dtype).type(0)
    has_bias, has_dropout, save_preact = ep.bias, ep.dropout, ep.save_preact

    @cuda.jit(device=True, inline=True)
    def store(y, zout, b, row, col, acc, n_cols, k0, k1, offset, threshold, scale):
        z = acc
        if has_bias:
            z = z + b[col]
        if save_preact:
            zout[row, col] = z
        a = act(z)
        if has_dropout:
            n = offset + uint64(row) * uint64(n_cols) + uint64(col)
            a = a * scale if keep_word(n, k0, k1, threshold) else zero
        y[row, col] = a

    return store
