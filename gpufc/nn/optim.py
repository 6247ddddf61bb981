"""Optimizers that update a model's parameters in place, where they live.

An optimizer holds a module (a layer, a :class:`~gpufc.layers.Sequential`, or
a list of modules) and, on :meth:`Optimizer.step`, pairs
``module.parameters()`` with ``module.gradients()`` position by position and
updates each parameter in place with its array's own module: NumPy for
``"cpu"`` layers, CuPy elementwise ops on the device for ``"cuda"`` layers (so
nothing is copied or synchronised). In place keeps each parameter's identity,
so the layers' cached device views stay valid. Parameters without a gradient
(no backward yet) are skipped.

The update rules are torch's (``torch.optim.SGD`` and ``torch.optim.Adam``,
``weight_decay`` as an L2 term added to the gradient).
"""

from __future__ import annotations

import math

import numpy as np


def _xp(arr):
    if type(arr).__module__.split(".", 1)[0] == "cupy":
        import cupy

        return cupy
    return np


def _like(value, param):
    """``value`` in ``param``'s array module (a gradient or a state buffer that lives elsewhere)."""
    if value is None or type(value) is type(param):
        return value
    if _xp(param) is np:
        return value.get() if _xp(value) is not np else np.asarray(value)
    return _xp(param).asarray(value)


class _Group:
    """The modules an optimizer updates, seen as one list of (parameter, gradient) pairs."""

    def __init__(self, modules):
        if hasattr(modules, "parameters") and hasattr(modules, "gradients"):
            modules = [modules]
        self.modules = list(modules)
        for i, m in enumerate(self.modules):
            if not (hasattr(m, "parameters") and hasattr(m, "gradients")):
                raise TypeError(f"optimizers take gpufc modules (with parameters() and gradients()); "
                                f"got {type(m).__name__} at position {i}")

    def pairs(self):
        for m in self.modules:
            yield from zip(m.parameters(), m.gradients())

    def zero_grad(self):
        for m in self.modules:
            m.zero_grad()


def _check_positive(name, value, allow_zero=False):
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {name}={value!r}")
    return v


class Optimizer:
    """Base: ``step()`` updates every parameter that has a gradient; ``zero_grad()`` forgets them."""

    def __init__(self, model, lr):
        self._group = _Group(model)
        self.lr = _check_positive("lr", lr)
        self.state: dict = {}  # position -> per-parameter buffers
        self.steps = 0

    def zero_grad(self):
        self._group.zero_grad()

    def step(self):
        self.steps += 1
        for i, (p, g) in enumerate(self._group.pairs()):
            if g is None:
                continue
            g = _like(g, p)
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"gradient {i} has shape {tuple(g.shape)} but its parameter has {tuple(p.shape)}")
            self._update(i, p, g, _xp(p))

    def _buffer(self, i, name, p, xp):
        """The state buffer ``name`` of parameter ``i``, zeros at first, in ``p``'s module."""
        bufs = self.state.setdefault(i, {})
        buf = bufs.get(name)
        if buf is None or tuple(buf.shape) != tuple(p.shape):
            buf = bufs[name] = xp.zeros_like(p)
        elif type(buf) is not type(p):
            buf = bufs[name] = _like(buf, p)  # the model moved between devices
        return buf

    def _update(self, i, p, g, xp):
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with momentum (torch's rule).

    ``d = g + weight_decay * p``; with momentum ``buf = momentum * buf + d``
    (``buf = d`` at the first step) and ``d = buf`` (``d + momentum * buf`` if
    ``nesterov``); then ``p -= lr * d``.

    Example:
        >>> opt = SGD(model, lr=0.1, momentum=0.9)
        >>> model.backward(grad); opt.step()
    """

    def __init__(self, model, lr=0.01, momentum=0.0, *, nesterov=False, weight_decay=0.0):
        super().__init__(model, lr)
        self.momentum = _check_positive("momentum", momentum, allow_zero=True)
        self.weight_decay = _check_positive("weight_decay", weight_decay, allow_zero=True)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0, got momentum=0")

    def _update(self, i, p, g, xp):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            first = i not in self.state
            buf = self._buffer(i, "momentum", p, xp)
            if first:
                buf[...] = g
            else:
                buf *= self.momentum
                buf += g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= self.lr * g

    def __repr__(self):
        return f"SGD(lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov}, weight_decay={self.weight_decay})"


class Adam(Optimizer):
    """Adam (Kingma and Ba, 2015) with torch's bias correction.

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)``.

    Example:
        >>> opt = Adam(model, lr=1e-3)
    """

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, weight_decay=0.0):
        super().__init__(model, lr)
        b1, b2 = (float(b) for b in betas)
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got betas={betas!r}")
        self.betas = (b1, b2)
        self.eps = _check_positive("eps", eps)
        self.weight_decay = _check_positive("weight_decay", weight_decay, allow_zero=True)

    def _update(self, i, p, g, xp):
        b1, b2 = self.betas
        if self.weight_decay:
            g = g + self.weight_decay * p
        m = self._buffer(i, "m", p, xp)
        v = self._buffer(i, "v", p, xp)
        t = self.state[i]["t"] = self.state[i].get("t", 0) + 1
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        denom = xp.sqrt(v)
        denom *= 1.0 / math.sqrt(1 - b2**t)
        denom += self.eps
        p -= (self.lr / (1 - b1**t)) * (m / denom)

    def __repr__(self):
        return f"Adam(lr={self.lr}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay})"
