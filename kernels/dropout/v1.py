"""Dropout version 1: one thread per element in a grid-stride loop, one Philox block per element.

Four times the RNG work needed (a block's four words serve four elements),
simple, correct for any offset: the baseline. Also the fused FC backward's
elementwise stage ``g = dropout'(grad) * act'(z)`` in the same style, which
the launcher falls back to where version 2's 16-byte accesses do not apply.
"""

import numpy as np
from numba import cuda, uint64

from ..activations import make_activation
from .philox import keep_word


def dropout_v1_source(dtype):
    zero = np.dtype(dtype).type(0)

    def dropout_v1(x, y, k0, k1, offset, threshold, scale):
        # x, y are (n,); y[e] = keep(offset + e) ? x[e] * scale : 0
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for e in range(start, x.size, stride):
            y[e] = x[e] * scale if keep_word(offset + uint64(e), k0, k1, threshold) else zero

    return dropout_v1


def act_dropout_backward_source(dtype, activation, dropout):
    """g = (keep ? grad * scale : 0) * act'(z): the FC backward's elementwise stage."""
    zero = np.dtype(dtype).type(0)
    _, dact = make_activation(activation, dtype)
    has_act = activation is not None

    def act_dropout_backward(grad, z, g, k0, k1, offset, threshold, scale):
        # grad, z, g are the flat (M * N,) views of (M, N) tensors
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for e in range(start, grad.size, stride):
            v = grad[e]
            if dropout:
                v = v * scale if keep_word(offset + uint64(e), k0, k1, threshold) else zero
            if has_act:
                v = v * dact(z[e])
            g[e] = v

    return act_dropout_backward
