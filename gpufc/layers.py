"""Layers with the seed article's names: ``FullyConnectedLayer`` and ``DropoutLayer``.

Both run forward and backward through :mod:`gpufc.functional`, so they use
whatever backend is active and return the caller's array type.
"""

from __future__ import annotations

import math

import numpy as np

from . import functional as F
from . import reference as _ref


def _new_seed(seed):
    if seed is None:
        return int(np.random.default_rng().integers(0, 2**63))
    return _ref.check_seed(seed)


def _advance(offset: int, count: int) -> int:
    """ARCHITECTURE.md rule 7: advance by the element count rounded up to a multiple of 4."""
    return (offset + -(-count // 4) * 4) % 2**64


class DropoutLayer:
    """Inverted dropout that owns its Philox ``(seed, offset)``.

    Args:
        dropout_rate: probability of zeroing an element, in [0, 1].
        seed: Philox key (``0 <= seed < 2**64``); random when None.

    Shape: any; the output has the input's shape and type.

    Each training ``forward`` draws a fresh mask (the offset advances by the
    element count rounded up to a multiple of 4); ``backward`` regenerates the
    last forward's mask from ``(seed, offset)`` instead of storing it.

    Example:
        >>> layer = DropoutLayer(0.2, seed=0)
        >>> y = layer.forward(np.ones((2, 4), np.float32))
    """

    def __init__(self, dropout_rate: float, *, seed=None):
        self.dropout_rate = _ref.check_p(dropout_rate)
        self.seed = _new_seed(seed)
        self.offset = 0
        self.training = True
        self._last = None  # (offset, shape, training) of the last forward

    def forward(self, x, training=True):
        training = bool(training) and self.training
        offset = self.offset
        y = F.dropout(x, self.dropout_rate, seed=self.seed, offset=offset, training=training)
        size = int(np.prod(np.shape(y), dtype=np.int64)) if hasattr(y, "shape") else 0
        self._last = (offset, tuple(y.shape), training)
        if training and self.dropout_rate > 0:
            self.offset = _advance(offset, size)
        return y

    __call__ = forward

    def backward(self, grad_output):
        if self._last is None:
            raise RuntimeError("DropoutLayer.backward called before forward")
        offset, shape, training = self._last
        if tuple(grad_output.shape) != shape:
            raise ValueError(f"grad_output must have the forward output's shape {shape}, got {tuple(grad_output.shape)}")
        return F.dropout_backward(grad_output, self.dropout_rate, seed=self.seed, offset=offset, training=training)

    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def __repr__(self):
        return f"DropoutLayer(dropout_rate={self.dropout_rate}, seed={self.seed})"


class FullyConnectedLayer:
    """``y = dropout(act(x @ weights + biases))``, one fused kernel.

    Args:
        input_size: K, features in.
        output_size: N, features out.
        bias: learn ``biases (N,)`` when True.
        activation: None, "relu", "gelu", "gelu_tanh", "tanh" or "sigmoid".
        dropout_rate: dropout after the activation, in [0, 1].
        init: "glorot_uniform" (default), "he_uniform", or "randn" (the seed
            article's unscaled standard normal).
        dtype: np.float32 (default) or np.float64.
        seed: seeds both the initial weights and the dropout key; random when None.

    Shape:
        x ``(..., input_size)`` -> ``(..., output_size)``; ``weights (input_size, output_size)``.

    Example:
        >>> layer = FullyConnectedLayer(3, 4, seed=0)
        >>> y = layer.forward(np.ones((2, 3), np.float32))
    """

    INITS = ("glorot_uniform", "he_uniform", "randn")

    def __init__(self, input_size, output_size, *, bias=True, activation=None, dropout_rate=0.0,
                 init="glorot_uniform", dtype=np.float32, seed=None):
        for name, v in (("input_size", input_size), ("output_size", output_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
        if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64, got dtype={np.dtype(dtype)}")
        if activation not in _ref.ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ref.ACTIVATIONS}, got activation={activation!r}")
        if init not in self.INITS:
            raise ValueError(f"init must be one of {self.INITS}, got init={init!r}")
        self.input_size, self.output_size = int(input_size), int(output_size)
        self.activation = activation
        self.dropout_rate = _ref.check_p(dropout_rate)
        self.init = init
        self.dtype = np.dtype(dtype)
        self.seed = _new_seed(seed)
        self.offset = 0
        self.training = True
        self.weights = None
        self._bias = bool(bias)
        self.grad_weights = None
        self.grad_biases = None
        self._cache = None
        self.reset_parameters()

    def reset_parameters(self):
        rng = np.random.default_rng(self.seed)
        k, n = self.input_size, self.output_size
        if self.init == "randn":
            w = rng.standard_normal((k, n))
        else:
            limit = math.sqrt(6.0 / (k + n)) if self.init == "glorot_uniform" else math.sqrt(6.0 / k)
            w = rng.uniform(-limit, limit, (k, n))
        self.weights = w.astype(self.dtype)
        self.biases = np.zeros(n, self.dtype) if self._bias else None

    def forward(self, x):
        training = self.training and self.dropout_rate > 0
        offset = self.offset
        y, z = F.linear_forward(
            x, self.weights, self.biases, activation=self.activation, dropout_p=self.dropout_rate,
            training=training, seed=self.seed, offset=offset, save_preact=self.activation is not None,
        )
        self._cache = (x, z, offset, training)
        if training:
            self.offset = _advance(offset, int(np.prod(y.shape, dtype=np.int64)))
        return y

    __call__ = forward

    def backward(self, grad_output):
        """Returns grad_input ``(..., input_size)``; sets ``grad_weights`` and ``grad_biases``."""
        if self._cache is None:
            raise RuntimeError("FullyConnectedLayer.backward called before forward")
        x, z, offset, training = self._cache
        gx, gw, gb = F.linear_backward(
            x, self.weights, grad_output, z, biases=self.biases, activation=self.activation,
            dropout_p=self.dropout_rate, training=training, seed=self.seed, offset=offset,
        )
        self.grad_weights = gw
        self.grad_biases = gb if self._bias else None
        return gx

    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def parameters(self):
        return [p for p in (self.weights, self.biases) if p is not None]

    def __repr__(self):
        return (
            f"FullyConnectedLayer(input_size={self.input_size}, output_size={self.output_size}, "
            f"bias={self._bias}, activation={self.activation!r}, dropout_rate={self.dropout_rate}, "
            f"dtype={self.dtype.name})"
        )
