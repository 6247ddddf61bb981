"""Dropout keep masks for users who want to see them, packed 1 bit per element.

gpufc never stores a dropout mask: the kernels regenerate it from
``(seed, offset)`` (the dropout mask contract, docs/architecture.md). These functions
materialise the same mask on request, bit for bit:

- :func:`dropout_mask` ``(shape, p, *, seed, offset)`` -> packed bits (or bools);
- :func:`dropout_with_mask` ``(x, p, ...)`` -> ``(dropout(x), packed mask)``;
- :func:`unpack_mask` ``(packed, shape)`` -> bool array, and :func:`pack_mask`.

Packed layout: a uint8 array of ``ceil(size / 8)`` bytes; element ``e`` (the
row-major flat index into the masked tensor) is bit ``e % 8``, least
significant first, of byte ``e // 8`` -- exactly
``numpy.packbits(keep.reshape(-1), bitorder="little")``. A set bit means
*kept*. Padding bits past ``size`` are 0.

Example:
    >>> bits = gpufc.dropout_mask((4, 5), 0.5, seed=7)          # uint8 (3,)
    >>> keep = gpufc.unpack_mask(bits, (4, 5))                   # bool (4, 5)
    >>> y, bits = gpufc.dropout_with_mask(x, 0.5, seed=7)        # y == where(keep, x * 2, 0)
"""

from __future__ import annotations

import math

import numpy as np

from .runtime import backend as _backend
from . import reference as _ref
from .runtime import transfer as _tx


def _shape(shape) -> tuple:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as err:
        raise TypeError(f"shape must be an int or a tuple of ints, got shape={shape!r}") from err
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative dims, got shape={shape}")
    return shape


def _like(like) -> _tx.Operand:
    if like is None:
        return _tx.Operand("like", None, "numpy", (), np.dtype(np.uint8))
    return _tx.operand(like, "like")


def dropout_mask(shape, p, *, seed=0, offset=0, packed=True, like=None):
    """The keep mask that ``gpufc.dropout`` draws for ``(shape, p, seed, offset)``.

    Args:
        shape: the masked tensor's shape (an int for 1-D); elements in row-major order.
        p: drop probability in [0, 1]; ``p = 0`` keeps all, ``p = 1`` none.
        seed: Philox key, ``0 <= seed < 2**64``.
        offset: Philox element offset; element ``e`` uses ``offset + e``.
        packed: True for the 1-bit layout (module docstring), False for a bool array.
        like: an array whose type the result takes: NumPy (or None) -> NumPy,
            CuPy -> CuPy, another CUDA array -> the same type.

    Returns:
        ``packed``: uint8 ``(ceil(size / 8),)``; else bool ``shape``; True / set bit = kept.
        Equal to :func:`gpufc.reference.dropout_keep_mask_packed` (or ``dropout_keep_mask``).
        On the ``cuda`` and ``sim`` backends a kernel draws it (``kernels.dropout.mask``), through its launch plan.
    """
    shape = _shape(shape)
    p = _ref.check_p(p)
    seed = _ref.check_seed(seed)
    offset = _ref.check_offset(offset)
    lo = _like(like)
    size = math.prod(shape)
    on_cpu = _backend.get_backend() == "cpu"
    if on_cpu and lo.kind != "numpy":
        _tx.host_array(lo)  # raises the cpu backend's TypeError for a device array
    if on_cpu or size == 0:
        host = _ref.dropout_keep_mask(shape, p, seed, offset)
        return _tx.from_host(_ref.pack_mask(host) if packed else host, lo)
    kd = _backend.kernels().dropout
    k0, k1 = _ref.philox_key(seed)
    with _tx.stream_scope(None) as s:
        mv, mh = _tx.empty((_ref.packed_size(size),), np.uint8)
        kd.mask_plan(size, None, kd.THREADS, s.device, s.stream)(mv, k0, k1, offset, _ref.dropout_threshold(p))
    bits = _tx.to_caller(mh, lo)
    return bits if packed else unpack_mask(bits, shape)


def unpack_mask(packed, shape):
    """Unpack a 1-bit mask (module docstring layout) to a bool array of ``shape``.

    Args:
        packed: uint8 ``(ceil(size / 8),)``, NumPy or a CUDA array (CuPy, torch, ...).
        shape: the mask's shape; ``size = prod(shape)``.

    Returns:
        bool ``shape`` in ``packed``'s array type (unpacked on the device for device arrays).
    """
    shape = _shape(shape)
    op = _tx.operand(packed, "packed")
    size = math.prod(shape)
    if op.dtype != np.uint8 or len(op.shape) != 1:
        raise TypeError(f"packed must be a 1-D uint8 array, got packed.dtype={op.dtype}, packed.shape={op.shape}")
    if op.shape[0] != _ref.packed_size(size):
        raise ValueError(
            f"shape {shape} has {size} elements and needs ceil({size} / 8) = {_ref.packed_size(size)} bytes, "
            f"got packed.shape={op.shape}"
        )
    if op.kind == "numpy":
        return _ref.unpack_mask(op.value, shape)
    import cupy  # a device operand was classified, so CuPy imports

    bits = _tx.as_cupy(op)
    e = cupy.arange(size, dtype=cupy.int64)
    keep = ((bits[e >> 3] >> (e & 7).astype(cupy.uint8)) & 1).astype(bool)
    return _tx.to_caller(keep.reshape(shape), op)


def pack_mask(mask):
    """Pack a bool mask (any shape; NumPy or a CUDA array) to uint8 ``(ceil(size / 8),)``."""
    op = _tx.operand(mask, "mask")
    if op.dtype != np.bool_:
        raise TypeError(f"mask must be a bool array, got mask.dtype={op.dtype}")
    if op.kind == "numpy":
        return _ref.pack_mask(op.value)
    import cupy

    m = _tx.as_cupy(op).reshape(-1)
    pad = cupy.zeros(_ref.packed_size(m.size) * 8, dtype=cupy.uint8)
    pad[: m.size] = m
    weights = cupy.asarray([1, 2, 4, 8, 16, 32, 64, 128], dtype=cupy.uint8)  # bit e % 8, LSB first
    return _tx.to_caller((pad.reshape(-1, 8) * weights).sum(axis=1, dtype=cupy.uint8), op)


def dropout_with_mask(x, p, *, seed=0, offset=0, training=True):
    """``(gpufc.dropout(x, p, ...), packed keep mask)``: the output and the mask it used.

    The mask is :func:`dropout_mask` of ``x.shape`` in ``x``'s array type (all
    bits set when ``training=False`` or ``p = 0``). It costs a second launch
    that regenerates the same Philox words and writes ``size / 8`` bytes.
    """
    from .functional import dropout

    y = dropout(x, p, seed=seed, offset=offset, training=training)
    shape = _tx.operand(x, "x").shape
    return y, dropout_mask(shape, p if training else 0.0, seed=seed, offset=offset, like=x)
