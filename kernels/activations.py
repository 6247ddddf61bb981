"""Device activations and their derivatives, the elementwise half of the epilogue.

``make_activation(name, dtype)`` returns ``(act, dact)``, two inlined device
functions of one scalar ``z`` (the pre-activation ``x @ w + b``), with every
constant typed as ``dtype`` so float32 kernels stay in float32 arithmetic
(a bare ``0.5`` would promote the expression to float64, a 1/64-rate unit on
consumer GPUs and 1/2 on H100).

Names and math match :func:`gpufc.reference.activation` / ``activation_grad``:
``relu``; ``gelu`` (exact, erf form, torch's default); ``gelu_tanh``;
``tanh``; ``sigmoid``; ``None`` is the identity.
"""

import functools
import math

import numpy as np
from numba import cuda

NAMES = (None, "relu", "gelu", "gelu_tanh", "tanh", "sigmoid")


@functools.cache
def make_activation(name, dtype):
    """``(act, dact)`` device functions for activation ``name`` in ``dtype`` (np.float32/np.float64)."""
    if name not in NAMES:
        raise ValueError(f"activation must be one of {NAMES}, got activation={name!r}")
    t = np.dtype(dtype).type
    zero, half, one, three = t(0), t(0.5), t(1), t(3)
    inv_sqrt2 = t(1 / math.sqrt(2.0))
    inv_sqrt_2pi = t(1 / math.sqrt(2.0 * math.pi))
    k0 = t(math.sqrt(2.0 / math.pi))
    k1 = t(0.044715)

    if name is None:

        @cuda.jit(device=True, inline=True)
        def act(z):
            return z

        @cuda.jit(device=True, inline=True)
        def dact(z):
            return one

    elif name == "relu":

        @cuda.jit(device=True, inline=True)
        def act(z):
            return zero if z <= zero else z  # NaN propagates, as in torch and the reference

        @cuda.jit(device=True, inline=True)
        def dact(z):
            return one if z > zero else zero

    elif name == "gelu":

        @cuda.jit(device=True, inline=True)
        def act(z):
            return half * z * (one + math.erf(z * inv_sqrt2))

        @cuda.jit(device=True, inline=True)
        def dact(z):
            cdf = half * (one + math.erf(z * inv_sqrt2))
            return cdf + z * inv_sqrt_2pi * math.exp(-half * z * z)

    elif name == "gelu_tanh":

        @cuda.jit(device=True, inline=True)
        def act(z):
            return half * z * (one + math.tanh(k0 * (z + k1 * z * z * z)))

        @cuda.jit(device=True, inline=True)
        def dact(z):
            th = math.tanh(k0 * (z + k1 * z * z * z))
            return half * (one + th) + half * z * (one - th * th) * k0 * (one + three * k1 * z * z)

    elif name == "tanh":

        @cuda.jit(device=True, inline=True)
        def act(z):
            return math.tanh(z)

        @cuda.jit(device=True, inline=True)
        def dact(z):
            th = math.tanh(z)
            return one - th * th

    else:  # sigmoid

        @cuda.jit(device=True, inline=True)
        def act(z):
            return one / (one + math.exp(-z))

        @cuda.jit(device=True, inline=True)
        def dact(z):
            s = one / (one + math.exp(-z))
            return s * (one - s)

    return act, dact
