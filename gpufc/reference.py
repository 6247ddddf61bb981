"""NumPy reference of every gpufc op and contract.

This module is the ``cpu`` backend and the oracle of every test and benchmark.
It is written for clarity, not speed, and never imports numba or CuPy.

Naming follows the seed article and the kernels:
``x (M, K) @ w (K, N) + b (N) -> y (M, N)``; leading dims of ``x`` beyond the
last are batch dims.

The dropout mask contract (docs/architecture.md):

1. key ``(k0, k1) = (seed & 0xFFFFFFFF, seed >> 32)``;
2. element ``e`` (row-major flat index into the masked tensor), ``n = offset + e``;
3. ``word = philox4x32_10((lo32(n // 4), hi32(n // 4), 0, 0), key)[n % 4]``;
4. keep iff ``word >= floor(p * 2**32)``;
5. kept values are ``x * scale``, ``scale = 1 / (1 - p)`` rounded once to the dtype;
   dropped values are exactly 0 (also for NaN / inf inputs).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "ACTIVATIONS",
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "PRECISIONS",
    "activation",
    "activation_grad",
    "bfloat16_dtype",
    "check_p",
    "check_precision",
    "check_seed",
    "dropout",
    "dropout_backward",
    "dropout_keep_mask",
    "dropout_keep_mask_packed",
    "dropout_scale",
    "dropout_threshold",
    "linear",
    "linear_backward",
    "matmul_lowp",
    "pack_mask",
    "packed_size",
    "philox4x32_10",
    "philox_key",
    "round_bf16",
    "round_tf32",
    "round_to",
    "tensor_core_kind",
    "unpack_mask",
]

# Random123 Philox4x32 constants (Salmon et al., SC'11).
PHILOX_M0 = 0xD2511F53  # multiplies counter word 0
PHILOX_M1 = 0xCD9E8D57  # multiplies counter word 2
PHILOX_W0 = 0x9E3779B9  # key bump, golden ratio
PHILOX_W1 = 0xBB67AE85  # key bump, sqrt(3) - 1
PHILOX_ROUNDS = 10

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "tanh", "sigmoid")

_MASK32 = np.uint64(0xFFFFFFFF)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


# ----------------------------------------------------------------------------
# Philox4x32-10 and the dropout mask
# ----------------------------------------------------------------------------


def philox4x32_10(counter, key) -> np.ndarray:
    """Random123's Philox4x32-10 block function, vectorised over rows.

    Args:
        counter: uint32 array of shape ``(n, 4)`` (or ``(4,)``).
        key: uint32 array of shape ``(2,)`` (one key for all rows) or ``(n, 2)``.

    Returns:
        uint32 array of shape ``(n, 4)`` (``(4,)`` for a ``(4,)`` counter).

    Known answer: counter 0, key 0 gives ``6627e8d5 e169c58d bc57ac4c 9b00dbd8``.
    """
    ctr = np.asarray(counter)
    k = np.asarray(key)
    if ctr.dtype != np.uint32 or k.dtype != np.uint32:
        raise TypeError(
            f"philox4x32_10: counter and key must be uint32, got counter dtype "
            f"{ctr.dtype} and key dtype {k.dtype}"
        )
    single = ctr.ndim == 1
    ctr = np.atleast_2d(ctr)
    if ctr.ndim != 2 or ctr.shape[1] != 4:
        raise ValueError(f"philox4x32_10: counter must have shape (n, 4), got {np.shape(counter)}")
    if k.shape not in ((2,), (ctr.shape[0], 2)):
        raise ValueError(
            f"philox4x32_10: key must have shape (2,) or ({ctr.shape[0]}, 2), got {k.shape}"
        )
    # 64-bit lanes hold 32-bit words so that the 32x32->64 products are exact.
    c0, c1, c2, c3 = (ctr[:, i].astype(np.uint64) for i in range(4))
    k0 = np.broadcast_to(k[..., 0].astype(np.uint64), c0.shape).copy()
    k1 = np.broadcast_to(k[..., 1].astype(np.uint64), c0.shape).copy()
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    w0, w1 = np.uint64(PHILOX_W0), np.uint64(PHILOX_W1)
    for r in range(PHILOX_ROUNDS):
        p0 = m0 * c0
        p1 = m1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < PHILOX_ROUNDS:
            k0 = (k0 + w0) & _MASK32
            k1 = (k1 + w1) & _MASK32
    out = np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)
    return out[0] if single else out


def check_p(p) -> float:
    """Validate a dropout probability; returns it as a Python float."""
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.integer, np.floating)):
        raise TypeError(f"p must be a real number in [0, 1], got {p!r} of type {type(p).__name__}")
    pf = float(p)
    if not math.isfinite(pf) or not 0.0 <= pf <= 1.0:
        raise ValueError(f"p must be a finite number in [0, 1], got p={p!r}")
    return pf


def check_seed(seed) -> int:
    """Validate a seed (``0 <= seed < 2**64``); returns it as a Python int."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int in [0, 2**64), got {seed!r} of type {type(seed).__name__}")
    s = int(seed)
    if not 0 <= s < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got seed={seed!r}")
    return s


def check_offset(offset) -> int:
    """Validate a Philox element offset (``0 <= offset < 2**64``)."""
    if isinstance(offset, (bool, np.bool_)) or not isinstance(offset, (int, np.integer)):
        raise TypeError(
            f"offset must be an int in [0, 2**64), got {offset!r} of type {type(offset).__name__}"
        )
    o = int(offset)
    if not 0 <= o < 2**64:
        raise ValueError(f"offset must be in [0, 2**64), got offset={offset!r}")
    return o


def philox_key(seed) -> tuple[int, int]:
    """The contract's Philox key words ``(k0, k1) = (lo32(seed), hi32(seed))``."""
    seed = check_seed(seed)
    return seed & 0xFFFFFFFF, seed >> 32


def dropout_threshold(p: float) -> int:
    """``floor(p * 2**32)``, exact: scaling a float64 by a power of two is exact."""
    return int(math.floor(check_p(p) * 4294967296.0))


def dropout_scale(p: float, dtype) -> np.generic:
    """``1 / (1 - p)`` computed in float64, rounded once to ``dtype``; 0 for ``p == 1``."""
    p = check_p(p)
    return np.dtype(dtype).type(0.0 if p == 1.0 else 1.0 / (1.0 - p))


def dropout_keep_mask(shape, p, seed=0, offset=0) -> np.ndarray:
    """The contract's keep mask: bool array of ``shape``, True where kept."""
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    t = dropout_threshold(p)
    seed = check_seed(seed)
    offset = check_offset(offset)
    size = math.prod(shape)
    if size == 0:
        return np.zeros(shape, dtype=bool)
    n0 = offset
    first_block, last_block = n0 // 4, (n0 + size - 1) // 4
    blocks = np.arange(last_block - first_block + 1, dtype=np.uint64) + np.uint64(first_block % 2**64)
    counter = np.zeros((blocks.size, 4), dtype=np.uint32)
    counter[:, 0] = (blocks & _MASK32).astype(np.uint32)
    counter[:, 1] = (blocks >> np.uint64(32)).astype(np.uint32)
    key = np.array(philox_key(seed), dtype=np.uint32)
    words = philox4x32_10(counter, key).reshape(-1)
    start = n0 % 4
    words = words[start : start + size]
    # t == 2**32 (p == 1) fits uint64 and keeps nothing.
    return (words.astype(np.uint64) >= np.uint64(t)).reshape(shape)


def dropout(x, p, *, seed=0, offset=0, training=True) -> np.ndarray:
    """Inverted dropout of ``x`` (any shape): ``where(keep, x * scale, 0)``."""
    x = np.asarray(x)
    p = check_p(p)
    if not training or p == 0.0:
        check_seed(seed)
        check_offset(offset)
        return x.copy()
    keep = dropout_keep_mask(x.shape, p, seed, offset)
    scale = dropout_scale(p, x.dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(keep, x * scale, x.dtype.type(0))


def dropout_backward(grad, p, *, seed=0, offset=0, training=True) -> np.ndarray:
    """Gradient of :func:`dropout`: the same mask and scale applied to ``grad``."""
    return dropout(grad, p, seed=seed, offset=offset, training=training)


# ----------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------

_erf = np.vectorize(math.erf, otypes=[np.float64])


def activation(z, name):
    """Apply activation ``name`` (one of :data:`ACTIVATIONS`) elementwise in z's dtype."""
    z = np.asarray(z)
    dt = z.dtype.type
    if name is None:
        return z.copy()
    if name == "relu":
        return np.maximum(z, dt(0))
    if name == "gelu":
        return (dt(0.5) * z * (dt(1) + _erf(z.astype(np.float64) / math.sqrt(2.0)).astype(z.dtype))).astype(z.dtype)
    if name == "gelu_tanh":
        inner = dt(_SQRT_2_OVER_PI) * (z + dt(_GELU_TANH_C) * z * z * z)
        return dt(0.5) * z * (dt(1) + np.tanh(inner))
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        with np.errstate(over="ignore"):
            return dt(1) / (dt(1) + np.exp(-z))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got activation={name!r}")


def activation_grad(z, name):
    """d act(z) / dz elementwise, in z's dtype (relu' at 0 is 0, as in torch)."""
    z = np.asarray(z)
    dt = z.dtype.type
    if name is None:
        return np.ones_like(z)
    if name == "relu":
        return (z > 0).astype(z.dtype)
    if name == "gelu":
        z64 = z.astype(np.float64)
        cdf = 0.5 * (1.0 + _erf(z64 / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * z64 * z64) / math.sqrt(2.0 * math.pi)
        return (cdf + z64 * pdf).astype(z.dtype)
    if name == "gelu_tanh":
        inner = dt(_SQRT_2_OVER_PI) * (z + dt(_GELU_TANH_C) * z * z * z)
        t = np.tanh(inner)
        dinner = dt(_SQRT_2_OVER_PI) * (dt(1) + dt(3 * _GELU_TANH_C) * z * z)
        return dt(0.5) * (dt(1) + t) + dt(0.5) * z * (dt(1) - t * t) * dinner
    if name == "tanh":
        t = np.tanh(z)
        return dt(1) - t * t
    if name == "sigmoid":
        s = activation(z, "sigmoid")
        return s * (dt(1) - s)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got activation={name!r}")


# ----------------------------------------------------------------------------
# The fully connected layer
# ----------------------------------------------------------------------------


def linear(x, weights, biases=None, *, activation=None, dropout_p=0.0, training=True, seed=0, offset=0,
           precision="ieee"):
    """``dropout(act(x @ weights + biases))`` in the dtype of ``x``.

    Shapes: ``x (..., K)``, ``weights (K, N)``, ``biases (N,)`` -> ``(..., N)``.
    The dropout mask is indexed over the ``(rows, N)`` output, rows = prod(x.shape[:-1]).
    float16, bfloat16 and float32 with ``precision="tf32"`` follow the tensor-core
    model of :func:`linear_preact` (epilogue in float32, output rounded once to the dtype).
    """
    x = np.asarray(x)
    w = np.asarray(weights)
    kind = tensor_core_kind(x.dtype, precision)
    if kind is not None:
        z = linear_preact(x, w, biases, precision=precision)
        y = globals()["activation"](z, activation)
        if dropout_p and training:
            y = dropout(y, dropout_p, seed=seed, offset=offset)
        return round_to(y, x.dtype)
    z = x @ w
    if biases is not None:
        z = z + np.asarray(biases)
    y = globals()["activation"](z, activation)
    if dropout_p and training:
        y = dropout(y, dropout_p, seed=seed, offset=offset)
    return y


def linear_backward(
    x, weights, grad_output, preact=None, *, biases=None, activation=None, dropout_p=0.0,
    training=True, seed=0, offset=0, precision="ieee",
):
    """Backward of :func:`linear`.

    Args:
        x: ``(..., K)``, the forward input.
        weights: ``(K, N)``.
        grad_output: ``(..., N)``, d loss / d y.
        preact: ``(..., N)``, ``x @ weights + biases``; recomputed when None.

    Returns:
        ``(grad_x (..., K), grad_weights (K, N), grad_biases (N,))`` where
        ``g = dropout_backward(grad_output) * act'(preact)``,
        ``grad_x = g @ weights.T``, ``grad_weights = x.T @ g``, ``grad_biases = g.sum(0)``.
        float16, bfloat16 and TF32 follow :func:`linear_backward_lowp`.
    """
    x = np.asarray(x)
    w = np.asarray(weights)
    go = np.asarray(grad_output)
    if tensor_core_kind(x.dtype, precision) is not None:
        return linear_backward_lowp(x, w, go, preact, biases=biases, activation=activation, dropout_p=dropout_p,
                                    training=training, seed=seed, offset=offset, precision=precision)
    k, n = w.shape
    x2 = x.reshape(-1, k)
    g = go.reshape(-1, n)
    if dropout_p and training:
        g = dropout_backward(g, dropout_p, seed=seed, offset=offset)
    if activation is not None:
        if preact is None:
            preact = x2 @ w + (0 if biases is None else np.asarray(biases))
        g = g * activation_grad(np.asarray(preact).reshape(-1, n), activation)
    grad_x = (g @ w.T).reshape(x.shape)
    grad_w = x2.T @ g
    grad_b = g.sum(axis=0)
    return grad_x, grad_w, grad_b


# ----------------------------------------------------------------------------
# Packed masks (1 bit per element)
# ----------------------------------------------------------------------------
#
# Layout: uint8 array of ceil(size / 8) bytes; element e (row-major flat index)
# is bit e % 8 (least significant first) of byte e // 8, i.e.
# numpy.packbits(mask.reshape(-1), bitorder="little"). Padding bits are 0.


def packed_size(size: int) -> int:
    """Bytes of a packed mask of ``size`` elements: ``ceil(size / 8)``."""
    return -(-int(size) // 8)


def pack_mask(mask) -> np.ndarray:
    """Pack a bool mask (any shape) to uint8 ``(ceil(size / 8),)``: element e -> byte e // 8, bit e % 8."""
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise TypeError(f"pack_mask: mask must be a bool array, got mask.dtype={m.dtype}")
    return np.packbits(m.reshape(-1), bitorder="little")


def unpack_mask(packed, shape) -> np.ndarray:
    """Inverse of :func:`pack_mask`: uint8 ``(ceil(size / 8),)`` -> bool array of ``shape``."""
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    b = np.asarray(packed)
    size = math.prod(shape)
    if b.dtype != np.uint8 or b.ndim != 1:
        raise TypeError(f"unpack_mask: packed must be a 1-D uint8 array, got dtype {b.dtype} and shape {b.shape}")
    if b.size != packed_size(size):
        raise ValueError(
            f"unpack_mask: shape {shape} has {size} elements and needs ceil({size} / 8) = "
            f"{packed_size(size)} bytes, got packed.shape={b.shape}"
        )
    return np.unpackbits(b, count=size, bitorder="little").astype(bool).reshape(shape)


def dropout_keep_mask_packed(shape, p, seed=0, offset=0) -> np.ndarray:
    """The contract's keep mask of ``shape``, packed: uint8 ``(ceil(size / 8),)``."""
    return pack_mask(dropout_keep_mask(shape, p, seed, offset))


# ----------------------------------------------------------------------------
# Reduced precision: the tensor-core matmuls (TF32, float16, bfloat16)
# ----------------------------------------------------------------------------
#
# The model every tensor-core kernel is tested against (docs/precision.md):
# operands rounded to the input format (TF32: round to nearest, ties away from
# zero, on the 13 dropped mantissa bits, as PTX cvt.rna.tf32.f32 does; float16
# and bfloat16 values are already exact), products exact, the K-sum computed in
# float64 and rounded once to float32 (the hardware accumulates in float32, in
# an order of its own: the tests allow a K-scaled float32 tolerance for that),
# bias, activation and dropout (scale rounded to float32) in float32, and the
# output rounded once, to nearest even, to the data's dtype.

PRECISIONS = ("ieee", "tf32")

_EXP_MASK = np.uint32(0x7F800000)


def check_precision(precision) -> str:
    """Validate a matmul precision: ``"ieee"`` (float32/float64 as is) or ``"tf32"``."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got precision={precision!r}")
    return precision


def bfloat16_dtype():
    """The NumPy bfloat16 dtype of the ``ml_dtypes`` package, or None when it is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype) -> bool:
    return np.dtype(dtype).name == "bfloat16"


def tensor_core_kind(dtype, precision="ieee"):
    """The tensor-core input format for data of ``dtype`` under ``precision``: ``"f16"``,
    ``"bf16"``, ``"tf32"`` (float32 with ``precision="tf32"``) or None (IEEE float32/float64).
    float64 ignores the precision (it is still validated)."""
    check_precision(precision)
    dt = np.dtype(dtype)
    if dt == np.float16:
        return "f16"
    if is_bfloat16(dt):
        return "bf16"
    if dt == np.float32 and precision == "tf32":
        return "tf32"
    return None


def round_tf32(x) -> np.ndarray:
    """float32 -> float32 values on the TF32 grid (10 stored mantissa bits), as ``cvt.rna.tf32.f32``:
    add half a TF32 ulp to the magnitude, clear the 13 dropped bits (ties away from zero;
    overflow rounds to inf). NaN and inf pass unchanged."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    bits = a.view(np.uint32)
    rounded = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return np.where((bits & _EXP_MASK) == _EXP_MASK, bits, rounded).astype(np.uint32).view(np.float32)


def round_bf16(x) -> np.ndarray:
    """float32 -> float32 values on the bfloat16 grid (7 stored mantissa bits): round to
    nearest, ties to even, on the 16 dropped bits (PTX cvt.rn.bf16.f32); NaN and inf pass."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    bits = a.view(np.uint32)
    with np.errstate(over="ignore"):
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.where((bits & _EXP_MASK) == _EXP_MASK, bits, rounded).astype(np.uint32).view(np.float32)


def round_to(x, dtype) -> np.ndarray:
    """``x`` rounded once from float32 to ``dtype`` (float16, bfloat16, float32 or float64):
    the kernels' final store. Values are first made float32 (the accumulator's format)."""
    dt = np.dtype(dtype)
    if dt == np.float64:
        return np.asarray(x, dtype=np.float64)
    x32 = np.asarray(x, dtype=np.float32)
    if dt == np.float32:
        return x32
    if dt == np.float16:
        with np.errstate(over="ignore"):
            return x32.astype(np.float16)
    if is_bfloat16(dt):
        return round_bf16(x32).astype(dt)  # exact: the values are on the bfloat16 grid
    raise TypeError(f"round_to: dtype must be float16, bfloat16, float32 or float64, got {dt}")


def matmul_lowp(a, b, kind: str) -> np.ndarray:
    """``a (M, K) @ b (K, N)`` as one tensor-core matmul: float32 result.

    ``kind`` ``"tf32"`` rounds both operands with :func:`round_tf32`; ``"f16"`` and
    ``"bf16"`` operands are exact in float32. Products are exact and summed in float64,
    then rounded once to float32.
    """
    if kind not in ("tf32", "f16", "bf16"):
        raise ValueError(f"kind must be 'tf32', 'f16' or 'bf16', got kind={kind!r}")
    a32 = np.asarray(a).astype(np.float32)
    b32 = np.asarray(b).astype(np.float32)
    if kind == "tf32":
        a32, b32 = round_tf32(a32), round_tf32(b32)
    return (a32.astype(np.float64) @ b32.astype(np.float64)).astype(np.float32)


def linear_preact(x, weights, biases=None, *, precision="ieee") -> np.ndarray:
    """The tensor-core model's pre-activation ``x @ weights + biases`` in float32 (not rounded to
    the dtype). Shapes as in :func:`linear`; ``x``'s dtype and ``precision`` choose the format."""
    x = np.asarray(x)
    w = np.asarray(weights)
    kind = tensor_core_kind(x.dtype, precision)
    if kind is None:
        raise ValueError(f"linear_preact models the tensor cores: x.dtype={x.dtype} with precision={precision!r} "
                         "is not one of float16, bfloat16 or float32 with precision='tf32'")
    k, n = w.shape
    z = matmul_lowp(x.reshape(-1, k), w, kind).reshape(x.shape[:-1] + (n,))
    if biases is not None:
        z = z + np.asarray(biases).astype(np.float32)
    return z


def linear_backward_lowp(x, weights, grad_output, preact=None, *, biases=None, activation=None, dropout_p=0.0,
                         training=True, seed=0, offset=0, precision="ieee"):
    """Backward of :func:`linear` for the tensor-core formats (shapes as in :func:`linear_backward`).

    ``g = dropout'(grad_output) * act'(preact)`` in float32, stored in the data's
    dtype (``gs``); ``grad_x = gs @ weights.T`` and ``grad_weights = x.T @ gs`` are
    :func:`matmul_lowp` products rounded once to the dtype; ``grad_biases`` is the
    float64 column sum of ``gs`` rounded to float32, then to the dtype.
    """
    x = np.asarray(x)
    w = np.asarray(weights)
    go = np.asarray(grad_output)
    dtype = x.dtype
    kind = tensor_core_kind(dtype, precision)
    k, n = w.shape
    x2 = x.reshape(-1, k)
    g = go.reshape(-1, n).astype(np.float32)
    if dropout_p and training:
        g = dropout_backward(g, dropout_p, seed=seed, offset=offset)
    if activation is not None:
        z = linear_preact(x2, w, biases, precision=precision) if preact is None else np.asarray(preact)
        g = g * activation_grad(z.reshape(-1, n).astype(np.float32), activation)
    gs = round_to(g, dtype)
    grad_x = round_to(matmul_lowp(gs, w.T, kind), dtype).reshape(x.shape)
    grad_w = round_to(matmul_lowp(x2.T, gs, kind), dtype)
    grad_b = round_to(gs.astype(np.float64).sum(axis=0).astype(np.float32), dtype)
    return grad_x, grad_w, grad_b
