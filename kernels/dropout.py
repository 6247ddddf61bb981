"""Scale-and-mask dropout, forward and backward, with a counter-based Philox RNG.

Math (ARCHITECTURE.md, dropout mask contract), for a flat view of the tensor::

    y[e] = x[e] * scale   if philox_word(offset + e) >= threshold
    y[e] = 0              otherwise

``x (n,) -> y (n,)``; the backward is the same kernel applied to the incoming
gradient (the mask is regenerated from ``(seed, offset)``, never stored). The
fully connected backward's elementwise stage, ``g = dropout'(grad) * act'(z)``,
is the fused kernel ``act_dropout_backward``.

Bytes moved: ``2 n itemsize`` (read x, write y); no FLOPs worth counting
beyond the 10-round Philox (20 32x32 multiplies per block).

Version 1 (``v1``): one thread per element in a grid-stride loop, one Philox
block per element (four times the RNG work of one block per four elements).
Simple, correct for any offset, kept as the baseline.
"""

import functools

import numba
import numpy as np
from numba import cuda, uint64

from .activations import make_activation
from .philox import keep_word

THREADS = 256  # per block; a multiple of the warp size
MAX_BLOCKS = 65535 * 4  # grid-stride past this; plenty to fill any current GPU


def _flat_sig(dtype) -> str:
    t = numba.from_dtype(np.dtype(dtype))
    return f"void({t}[::1], {t}[::1], uint32, uint32, uint64, uint64, {t})"


def _act_bwd_sig(dtype) -> str:
    t = numba.from_dtype(np.dtype(dtype))
    return f"void({t}[::1], {t}[::1], {t}[::1], uint32, uint32, uint64, uint64, {t})"


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


@functools.lru_cache(maxsize=None)
def make_dropout_kernel(dtype):
    return cuda.jit(_flat_sig(dtype))(dropout_v1_source(np.dtype(dtype).type))


@functools.lru_cache(maxsize=None)
def make_act_dropout_backward_kernel(dtype, activation, dropout):
    return cuda.jit(_act_bwd_sig(dtype))(act_dropout_backward_source(np.dtype(dtype).type, activation, dropout))


def grid_for(n: int, threads: int = THREADS) -> int:
    return max(1, min(MAX_BLOCKS, -(-n // threads)))


def launch_dropout(x, y, *, key, offset, threshold, scale, stream=0):
    """``y = dropout(x)`` on flat (n,) device arrays, n > 0."""
    kern = make_dropout_kernel(np.dtype(x.dtype).type)
    kern[grid_for(x.size), THREADS, stream](
        x, y, np.uint32(key[0]), np.uint32(key[1]), np.uint64(offset), np.uint64(threshold),
        np.dtype(x.dtype).type(scale),
    )


def launch_act_dropout_backward(grad, z, g, *, activation, dropout, key, offset, threshold, scale, stream=0):
    """``g = dropout'(grad) * act'(z)`` on flat (n,) device arrays, n > 0 (z unused without activation)."""
    kern = make_act_dropout_backward_kernel(np.dtype(grad.dtype).type, activation, bool(dropout))
    kern[grid_for(grad.size), THREADS, stream](
        grad, z, g, np.uint32(key[0]), np.uint32(key[1]), np.uint64(offset), np.uint64(threshold),
        np.dtype(grad.dtype).type(scale),
    )


def catalogue():
    """KernelSpec entries for every dropout kernel (see kernels.catalogue)."""
    from .activations import NAMES
    from .catalogue import KernelSpec

    for dt in (np.float32, np.float64):
        dn = np.dtype(dt).name
        yield KernelSpec(f"dropout/v1/{dn}", dropout_v1_source(dt), _flat_sig(dt))
        for act in NAMES:
            yield KernelSpec(f"act_dropout_backward/{dn}/{act or 'id'}+drop",
                             act_dropout_backward_source(dt, act, True), _act_bwd_sig(dt))
