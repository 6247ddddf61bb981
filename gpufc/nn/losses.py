"""Softmax cross-entropy: the loss of a classifier's logits, and its gradient.

Math, for logits ``z (B, C)`` and integer labels ``t (B,)``::

    log p[i, c] = z[i, c] - max_c z[i] - log sum_c exp(z[i, c] - max_c z[i])   # stable: no exp overflows
    loss        = -(1 / B) sum_i log p[i, t[i]]
    d loss / dz = (p - onehot(t)) / B

Soft targets ``q (B, C)`` (rows summing to 1) replace ``onehot(t)``. Leading
dims beyond the last are batch dims (``B`` is their product). Works on NumPy
and CuPy arrays alike (the array's own module does the math, so a CuPy batch
never leaves the device and nothing synchronises); other CUDA arrays are taken
through CuPy.
"""

from __future__ import annotations

import numpy as np

from ..runtime import transfer as _tx


def _xp(arr):
    """``(array module, array)``: NumPy or CuPy, taking other CUDA arrays through CuPy zero-copy."""
    if _is_cupy(arr):
        import cupy

        return cupy, arr
    if isinstance(arr, np.ndarray):
        return np, arr
    if hasattr(arr, "__cuda_array_interface__") or _tx._is_cuda_dlpack(arr):
        import cupy

        return cupy, _tx.as_cupy(_tx.operand(arr, "logits"))
    return np, np.asarray(arr)


def _is_cupy(arr) -> bool:
    return type(arr).__module__.split(".", 1)[0] == "cupy"


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy over the batch, and its gradient.

    Args:
        logits: ``(..., C)`` float32 or float64.
        labels: integer class indices ``(...)`` in ``[0, C)``, or float targets
            with the logits' shape (each row a distribution).

    Returns:
        ``(loss, grad)``: ``loss`` a 0-d array of the logits' kind (``float(loss)``
        gives a number; on CuPy that synchronises), ``grad`` d loss / d logits,
        the logits' shape, dtype and kind.
    """
    xp, z = _xp(logits)
    if z.dtype not in (np.float32, np.float64):
        raise TypeError(f"logits must be float32 or float64, got logits.dtype={z.dtype}")
    if z.ndim < 1 or z.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., C) with C >= 1, got logits.shape={tuple(z.shape)}")
    c = z.shape[-1]
    z2 = z.reshape(-1, c)
    b = z2.shape[0]
    if b == 0:
        raise ValueError(f"logits must hold at least one row, got logits.shape={tuple(z.shape)}")
    t = xp.asarray(labels)
    if t.dtype.kind == "f":
        if tuple(t.shape) != tuple(z.shape):
            raise ValueError(f"float targets must have the logits' shape {tuple(z.shape)}, got {tuple(t.shape)}")
        target = t.reshape(-1, c).astype(z.dtype, copy=False)
    elif t.dtype.kind in "iu":
        if tuple(t.shape) != tuple(z.shape[:-1]):
            raise ValueError(
                f"labels must have shape {tuple(z.shape[:-1])} (the logits' batch dims), got labels.shape={tuple(t.shape)}"
            )
        t = t.reshape(-1)
        if xp is np and t.size and (t.min() < 0 or t.max() >= c):
            bad = t[(t < 0) | (t >= c)][0]
            raise ValueError(f"labels must be class indices in [0, {c}), got label {int(bad)}")
        target = None
    else:
        raise TypeError(f"labels must be integer class indices or float targets, got labels.dtype={t.dtype}")

    shifted = z2 - z2.max(axis=1, keepdims=True)
    lse = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    logp = shifted - lse
    grad = xp.exp(logp)
    if target is None:
        rows = xp.arange(b)
        loss = -logp[rows, t].mean()
        grad[rows, t] -= 1
    else:
        loss = -(target * logp).sum() / b
        grad -= target
    grad *= z.dtype.type(1.0 / b)
    return loss, grad.reshape(z.shape)


class SoftmaxCrossEntropy:
    """Module-style :func:`softmax_cross_entropy`: ``loss = crit(logits, labels)``; ``grad = crit.backward()``."""

    def __init__(self):
        self._grad = None

    def forward(self, logits, labels):
        loss, self._grad = softmax_cross_entropy(logits, labels)
        return loss

    __call__ = forward

    def backward(self):
        """d loss / d logits of the last forward."""
        if self._grad is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward called before forward")
        return self._grad

    def __repr__(self):
        return "SoftmaxCrossEntropy()"
