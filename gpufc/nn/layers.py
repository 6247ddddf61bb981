"""Layers with the seed article's names, and a container to train them.

``FullyConnectedLayer`` (``y = dropout(act(x @ weights + biases))``, one fused
kernel) and ``DropoutLayer`` keep the seed article's attribute names
(``weights``, ``biases``, ``dropout_rate``); ``Sequential`` chains modules.
All run forward and backward through :mod:`gpufc.functional`, so they use
whatever backend is active and return the caller's array type.

Where parameters live: a layer's ``device`` is ``"cpu"`` (NumPy parameters,
the default, as in the seed article and torch) or ``"cuda"`` (CuPy
parameters, after ``.to("cuda")`` on the ``cuda`` backend). A ``"cuda"``
layer keeps its parameters' device pointers between calls, so a forward on a
CuPy batch validates only the batch, allocates only its output and launches
one kernel; optimizers update its parameters in place on the device, and its
gradients are CuPy arrays. A ``"cpu"`` layer on a device backend copies its
parameters to the device on each call (simple, slow) and returns NumPy
gradients.

Gradients are not accumulated: each ``backward`` sets ``grad_weights`` and
``grad_biases`` afresh.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import zipfile
import zlib

import numpy as np

from ..runtime import backend as _backend
from .. import functional as F
from .. import precision as _prec
from .. import reference as _ref
from ..runtime import transfer as _tx

DEVICES = ("cpu", "cuda")
_FORMAT = "gpufc-npz-1"  # the "__gpufc__" entry of a saved .npz names its format and the modules


class CheckpointError(ValueError):
    """A file :meth:`Module.load` cannot read as a gpufc checkpoint; the message names the file."""

    def __init__(self, path, what: str):
        super().__init__(f"cannot load {path!s}: {what}")
        self.path = path


def _new_seed(seed):
    if seed is None:
        return int(np.random.default_rng().integers(0, 2**63))
    return _ref.check_seed(seed)


def _advance(offset: int, count: int) -> int:
    """The mask contract's offset rule (docs/architecture.md): advance by the element count rounded up to a multiple of 4."""
    return (offset + -(-count // 4) * 4) % 2**64


def _is_cupy(arr) -> bool:
    return type(arr).__module__.split(".", 1)[0] == "cupy"


def _to_numpy(value, name: str) -> np.ndarray:
    """A host NumPy copy of a NumPy, CuPy, torch (any device) or array-like value."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    elif _is_cupy(value):
        value = value.get()
    elif hasattr(value, "copy_to_host"):  # a Numba device array
        value = value.copy_to_host()
    try:
        return np.array(value)
    except Exception as err:
        raise TypeError(f"{name} must be an array, got {type(value).__name__}") from err


def _check_device(device) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got device={device!r}")
    if device == "cuda":
        if _backend.get_backend() != "cuda":
            raise RuntimeError(
                f"device='cuda' needs the 'cuda' backend (a GPU and CuPy); the active backend is "
                f"{_backend.get_backend()!r}. On 'sim' and 'cpu', parameters stay NumPy arrays (device='cpu')"
            )
        if _backend.cupy_or_none() is None:
            raise RuntimeError("device='cuda' keeps parameters in CuPy arrays; install CuPy (pip install 'gpufc[cuda13]')")
    return device


def _move(arr, device: str):
    """``arr`` as a NumPy (``cpu``) or CuPy (``cuda``) array, copying only when it moves."""
    if arr is None:
        return None
    if device == "cuda":
        return arr if _is_cupy(arr) else _backend.cupy_or_none().asarray(arr)
    return arr.get() if _is_cupy(arr) else arr


def _host(arr, name: str):
    """A parameter as the cpu backend needs it."""
    if arr is None or isinstance(arr, np.ndarray):
        return arr
    raise TypeError(
        f"{name} is a {type(arr).__name__} but the gpufc backend is 'cpu'; move the layer with .to('cpu')"
    )


# ----------------------------------------------------------------------------
# Module: what every layer and container shares
# ----------------------------------------------------------------------------


class Module:
    """The shared layer protocol: ``forward``/``backward``, ``train``/``eval``, parameters and state.

    Subclasses define ``forward``, ``backward``, ``_param_names`` (attribute
    names of the parameters; each has a gradient ``grad_<name>``), ``config()``
    and ``extra_repr()``.
    """

    _param_names: tuple = ()
    training: bool = True
    device: str = "cpu"

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- mode -----------------------------------------------------------------

    def train(self, mode: bool = True):
        """Training mode (dropout active) when ``mode``, else evaluation mode; returns self."""
        self.training = bool(mode)
        for child in self.children():
            child.train(mode)
        return self

    def eval(self):
        """Evaluation mode: dropout is the identity; returns self."""
        return self.train(False)

    def children(self) -> list:
        return []

    # -- parameters -----------------------------------------------------------

    def named_parameters(self, prefix: str = "") -> list:
        """``[(name, array), ...]`` in a fixed order (``"0.weights"`` in a container)."""
        out = [(prefix + n, getattr(self, n)) for n in self._param_names if getattr(self, n) is not None]
        for i, child in enumerate(self.children()):
            out += child.named_parameters(f"{prefix}{i}.")
        return out

    def parameters(self) -> list:
        """The parameter arrays, in the order of :meth:`gradients`."""
        return [p for _, p in self.named_parameters()]

    def gradients(self) -> list:
        """The gradients of :meth:`parameters`, position by position (None before a backward)."""
        out = [getattr(self, "grad_" + n) for n in self._param_names if getattr(self, n) is not None]
        for child in self.children():
            out += child.gradients()
        return out

    def zero_grad(self):
        """Forget the gradients (they are set, not accumulated, by each backward)."""
        for n in self._param_names:
            setattr(self, "grad_" + n, None)
        for child in self.children():
            child.zero_grad()

    def to(self, device: str):
        """Move the parameters to ``device`` (``"cpu"``: NumPy, ``"cuda"``: CuPy) once; returns self."""
        device = _check_device(device)
        for n in self._param_names:
            setattr(self, n, _move(getattr(self, n), device))
            setattr(self, "grad_" + n, _move(getattr(self, "grad_" + n, None), device))
        self.device = device
        for child in self.children():
            child.to(device)
        return self

    def cpu(self):
        return self.to("cpu")

    def cuda(self):
        return self.to("cuda")

    # -- state ----------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{name: host NumPy copy}`` of every parameter (torch-style names, gpufc's layout)."""
        return {n: _to_numpy(p, n) for n, p in self.named_parameters()}

    def load_state_dict(self, state, strict: bool = True):
        """Copy ``state`` (a mapping or a loaded ``.npz``) into the parameters in place.

        In place keeps the arrays' identity, so optimizers and cached device
        views stay valid. Shapes must match; with ``strict`` the names must too.
        Keys starting with ``"__"`` (a saved file's metadata) are ignored.
        """
        own = dict(self.named_parameters())
        given = {k: state[k] for k in state if not k.startswith("__")}
        missing = sorted(set(own) - set(given))
        unexpected = sorted(set(given) - set(own))
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict does not match: missing keys {missing}, unexpected keys {unexpected}")
        for name, value in given.items():
            if name in own:
                _assign(own[name], _to_numpy(value, name), name)
        return self

    def save(self, path):
        """Write the parameters and the configuration to ``path`` (``.npz``); :meth:`load` rebuilds it.

        As with ``np.savez``, ``.npz`` is appended to a path without it. The file
        is written whole to a temporary file in the same directory and renamed
        over ``path`` only when complete, so a save that is interrupted (a killed
        job, a full disk) leaves the previous checkpoint as it was.
        """
        meta = json.dumps({"format": _FORMAT, "module": _describe(self)})
        target = os.fspath(path)
        if not target.endswith(".npz"):
            target += ".npz"
        state = self.state_dict()  # device parameters are copied to the host before anything is written
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                                   dir=os.path.dirname(os.path.abspath(target)))
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, __gpufc__=np.array(meta), **state)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path, device: str = "cpu"):
        """Rebuild a module saved by :meth:`save` (same class, configuration and parameters).

        A file that is truncated, corrupt or not a gpufc checkpoint raises
        :class:`CheckpointError` (a ``ValueError``) naming the file and what is wrong.
        """
        path = os.fspath(path)
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise CheckpointError(path, "it holds a single array, not a gpufc .npz checkpoint")
            with data:
                if "__gpufc__" not in data.files:
                    raise CheckpointError(path, "it was not written by gpufc's save (no '__gpufc__' entry)")
                meta = json.loads(str(data["__gpufc__"]))
                if not isinstance(meta, dict) or meta.get("format") != _FORMAT or "module" not in meta:
                    raise CheckpointError(path, f"unknown checkpoint format {meta!r}, expected {_FORMAT!r}")
                module = _build(meta["module"])
                if cls is not Module and not isinstance(module, cls):
                    raise TypeError(f"{path} holds a {type(module).__name__}, not a {cls.__name__}")
                module.load_state_dict({k: data[k] for k in data.files})
        except (CheckpointError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as err:
            # np.load reports a truncated or foreign file as BadZipFile, EOFError, OSError or a pickle
            # ValueError, and a damaged member as BadZipFile (bad CRC) or zlib.error: one error names the file.
            raise CheckpointError(path, f"the file is truncated, corrupt or not a gpufc checkpoint "
                                        f"({type(err).__name__}: {err})") from err
        return module.to(device) if device != "cpu" else module

    # -- repr -----------------------------------------------------------------

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


def _assign(target, value: np.ndarray, name: str):
    if tuple(target.shape) != value.shape:
        raise ValueError(f"{name}: shape {value.shape} does not match the parameter's {tuple(target.shape)}")
    if _is_cupy(target):
        target.set(np.ascontiguousarray(value, dtype=target.dtype))
    else:
        target[...] = value


def _describe(module) -> dict:
    d = {"type": type(module).__name__, "config": module.config()}
    if isinstance(module, Sequential):
        d["children"] = [_describe(c) for c in module.children()]
    return d


def _build(desc: dict):
    kinds = {"FullyConnectedLayer": FullyConnectedLayer, "DropoutLayer": DropoutLayer, "Sequential": Sequential}
    kind = kinds.get(desc.get("type"))
    if kind is None:
        raise ValueError(f"unknown module type {desc.get('type')!r} in a saved file")
    if kind is Sequential:
        return Sequential(*[_build(c) for c in desc["children"]])
    return kind.from_config(desc["config"])


# ----------------------------------------------------------------------------
# DropoutLayer
# ----------------------------------------------------------------------------


class DropoutLayer(Module):
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
        >>> g = layer.backward(np.ones((2, 4), np.float32))   # zero exactly where y is
    """

    def __init__(self, dropout_rate: float, *, seed=None):
        try:
            self.dropout_rate = _ref.check_p(dropout_rate)
        except (TypeError, ValueError) as err:
            raise type(err)(f"dropout_rate: {err}") from None
        self.seed = _new_seed(seed)
        self.offset = 0
        self.training = True
        self._drop = F.Dropout.make(self.dropout_rate, self.seed, 0, True)
        self._last = None  # (offset, shape, active) of the last forward

    def forward(self, x, training=True, *, stream=None):
        """``x`` any shape -> the same shape and type; the identity unless training."""
        xo = _tx.operand(x, "x")
        F._check_float(xo)
        active = bool(training) and self.training and self.dropout_rate > 0
        offset = self.offset
        y = F.dropout_apply(xo, self._drop.at(offset, active), stream)
        self._last = (offset, tuple(xo.shape), active)
        if active:
            self.offset = _advance(offset, xo.size)
        return y

    def backward(self, grad_output, *, stream=None, input_grad=True):
        """The last forward's mask and scale applied to ``grad_output`` (same shape)."""
        if self._last is None:
            raise RuntimeError("DropoutLayer.backward called before forward")
        offset, shape, active = self._last
        go = _tx.operand(grad_output, "grad_output")
        F._check_float(go)
        if tuple(go.shape) != shape:
            raise ValueError(f"grad_output must have the forward output's shape {shape}, got {tuple(go.shape)}")
        if not input_grad:
            return None
        return F.dropout_apply(go, self._drop.at(offset, active), stream)

    def config(self) -> dict:
        return {"dropout_rate": self.dropout_rate, "seed": self.seed, "offset": self.offset}

    @classmethod
    def from_config(cls, config: dict) -> DropoutLayer:
        layer = cls(config["dropout_rate"], seed=config["seed"])
        layer.offset = int(config.get("offset", 0))
        return layer

    def extra_repr(self) -> str:
        return f"dropout_rate={self.dropout_rate}, seed={self.seed}"


# ----------------------------------------------------------------------------
# FullyConnectedLayer
# ----------------------------------------------------------------------------


class _Ctx:
    """What a forward keeps for backward: the input (and its device view) and the pre-activation."""

    __slots__ = ("active", "keep", "offset", "rows", "x", "xo", "xv", "z", "zv")

    def __init__(self, xo, x, xv, keep, z, zv, rows, offset, active):
        self.xo, self.x, self.xv, self.keep, self.z, self.zv = xo, x, xv, keep, z, zv
        self.rows, self.offset, self.active = rows, offset, active


class FullyConnectedLayer(Module):
    """``y = dropout(act(x @ weights + biases))``, one fused kernel.

    Args:
        input_size: K, features in.
        output_size: N, features out.
        bias: learn ``biases (N,)`` when True.
        activation: None, "relu", "gelu", "gelu_tanh", "tanh" or "sigmoid".
        dropout_rate: dropout after the activation, in [0, 1].
        init: how :meth:`reset_parameters` draws the weights: "he_uniform"
            (the default for relu and gelu), "glorot_uniform" (the default
            otherwise, Keras' default), "he_normal", "glorot_normal", "torch"
            (torch's ``nn.Linear`` default: weights and biases uniform in
            ``+-1/sqrt(K)``) or "randn" (the seed article's unscaled standard
            normal). Biases start at zero except with "torch".
        dtype: np.float32 (default) or np.float64.
        seed: seeds both the initial weights and the dropout key; random when None.
        device: "cpu" (NumPy parameters, default) or "cuda" (CuPy); see :meth:`to`.
        precision: "ieee" or "tf32" (float32 matmuls on the tensor cores), forward and
            backward; None follows :func:`gpufc.set_matmul_precision`. float64 ignores it.

    Shape:
        x ``(..., input_size)`` -> ``(..., output_size)``; ``weights (input_size, output_size)``,
        ``biases (output_size,)``: the seed article's and Keras' layout, the
        transpose of torch's ``nn.Linear.weight``.

    Example:
        >>> layer = FullyConnectedLayer(3, 4, activation="relu", seed=0)
        >>> y = layer.forward(np.ones((2, 3), np.float32))          # (2, 4)
        >>> gx = layer.backward(np.ones((2, 4), np.float32))        # (2, 3); sets grad_weights, grad_biases
    """

    INITS = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "torch", "randn")
    _param_names = ("weights", "biases")

    def __init__(self, input_size, output_size, *, bias=True, activation=None, dropout_rate=0.0,
                 init=None, dtype=np.float32, seed=None, device="cpu", precision=None):
        for name, v in (("input_size", input_size), ("output_size", output_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
        if np.dtype(dtype) not in F._FLOATS:
            raise TypeError(f"dtype must be float32 or float64, got dtype={np.dtype(dtype)}")
        if activation not in _ref.ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ref.ACTIVATIONS}, got activation={activation!r}")
        if init is None:
            init = "he_uniform" if activation in ("relu", "gelu", "gelu_tanh") else "glorot_uniform"
        if init not in self.INITS:
            raise ValueError(f"init must be one of {self.INITS}, got init={init!r}")
        try:
            self.dropout_rate = _ref.check_p(dropout_rate)
        except (TypeError, ValueError) as err:
            raise type(err)(f"dropout_rate: {err}") from None
        self.input_size, self.output_size = int(input_size), int(output_size)
        self.activation = activation
        self.init = init
        self.dtype = np.dtype(dtype)
        self.seed = _new_seed(seed)
        self.offset = 0
        self.training = True
        self.device = "cpu"
        self.precision = None if precision is None else _ref.check_precision(precision)
        self._bias = bool(bias)
        self.weights = self.biases = None
        self.grad_weights = self.grad_biases = None
        self._drop = F.Dropout.make(self.dropout_rate, self.seed, 0, True)
        self._ctx = None
        self._views = None  # (weights, biases, weights view, biases view) of a "cuda" layer
        self.reset_parameters()
        if device != "cpu":
            self.to(device)

    @property
    def bias(self) -> bool:
        """Whether the layer has biases."""
        return self._bias

    def reset_parameters(self):
        """Draw the weights as ``init`` says (seeded by ``seed``); biases start at zero (uniform for "torch")."""
        rng = np.random.default_rng(self.seed)
        k, n = self.input_size, self.output_size
        b = np.zeros(n)
        if self.init == "randn":
            w = rng.standard_normal((k, n))
        elif self.init.endswith("_normal"):
            std = math.sqrt(2.0 / (k + n)) if self.init.startswith("glorot") else math.sqrt(2.0 / k)
            w = rng.normal(0.0, std, (k, n))
        else:
            limit = {"glorot_uniform": math.sqrt(6.0 / (k + n)), "he_uniform": math.sqrt(6.0 / k),
                     "torch": 1.0 / math.sqrt(k)}[self.init]
            w = rng.uniform(-limit, limit, (k, n))
            if self.init == "torch":
                b = rng.uniform(-limit, limit, n)
        self.weights = _move(w.astype(self.dtype), self.device)
        self.biases = _move(b.astype(self.dtype), self.device) if self._bias else None
        self._views = None

    # -- checks -----------------------------------------------------------------

    def _check_input(self, xo: _tx.Operand):
        if xo.dtype != self.dtype:
            F._check_float(xo)
            raise TypeError(
                f"x.dtype={xo.dtype} does not match the layer's dtype (weights.dtype={self.dtype}); "
                f"cast the input, e.g. x.astype(np.{self.dtype.name})"
            )
        if len(xo.shape) < 1 or xo.shape[-1] != self.input_size:
            raise ValueError(
                f"x must have shape (..., {self.input_size}) (input_size={self.input_size}), got x.shape={xo.shape}"
            )

    def _check_params(self):
        k, n = self.input_size, self.output_size
        for name, want in (("weights", (k, n)), ("biases", (n,))):
            p = getattr(self, name)
            if p is None:
                if name == "biases" and self._bias:
                    raise ValueError("biases is None but the layer was built with bias=True")
                continue
            if name == "biases" and not self._bias:
                raise ValueError("the layer was built with bias=False, so biases must stay None")
            if tuple(p.shape) != want:
                raise ValueError(f"{name} must have shape {want}, got {name}.shape={tuple(p.shape)}")
            if np.dtype(p.dtype) != self.dtype:
                raise TypeError(f"{name} must have the layer's dtype {self.dtype}, got {name}.dtype={p.dtype}")

    def _device_params(self, numba: bool = False):
        """The parameters as launch arguments (``numba``: Numba views, for the tensor-core route):
        cached for CuPy parameters, fresh copies of NumPy ones."""
        w, b = self.weights, self.biases
        v = self._views
        if v is not None and v[0] is w and v[1] is b and v[2] is numba:
            return v[3], v[4]
        self._check_params()
        view = _tx.numba_view if numba else _tx.device_view
        wv, wk = view(_tx.operand(w, "weights"))
        bv, bk = view(_tx.operand(b, "biases")) if b is not None else (None, None)
        # Device arrays used in place: the arguments stay valid and are cached. Host parameters
        # are copied per call; each argument owns its copy until the launch is queued.
        self._views = (w, b, numba, wv, bv) if wk is w and (b is None or bk is b) else None
        return wv, bv

    # -- forward / backward -------------------------------------------------------

    def forward(self, x, *, stream=None):
        """``x (..., input_size)`` -> ``(..., output_size)``, the caller's array type.

        In training mode with ``dropout_rate > 0`` each call draws a fresh mask
        (the offset advances); the input and the pre-activation are kept for
        :meth:`backward`. ``stream``: where to queue the work (see :mod:`gpufc.functional`).
        """
        xo = _tx.operand(x, "x")
        self._check_input(xo)
        k, n = self.input_size, self.output_size
        rows = math.prod(xo.shape[:-1])
        out_shape = xo.shape[:-1] + (n,)
        training = self.training
        active = training and self.dropout_rate > 0
        offset = self.offset
        drop = self._drop.at(offset, active)
        save = training and self.activation is not None
        prec = _prec.resolve(self.precision)
        kind = _prec.kind(self.dtype, prec)
        if _backend.get_backend() == "cpu":
            _tx.stream_scope(stream)  # validates it; NumPy needs none
            self._check_params()
            x2 = _tx.host_array(xo).reshape(rows, k)
            w, b = _host(self.weights, "weights"), _host(self.biases, "biases")
            if kind is None:
                y, z = F._ref_forward(x2, w, b, self.activation, drop)
            else:
                y, z = _prec.ref_forward(x2, w, b, self.activation, drop, prec)
            self._ctx = _Ctx(xo, x2, None, None, z if save else None, None, rows, offset, active)
            y = y.reshape(out_shape)
        elif rows == 0:
            self._check_params()
            y, z = F.linear_forward(xo.value, self.weights, self.biases, activation=self.activation,
                                    training=False, save_preact=save, stream=stream, precision=prec)
            self._ctx = _Ctx(xo, xo.value, None, None, z, None, rows, offset, active)
        else:
            with _tx.stream_scope(stream) as s:
                view = _tx.device_view if kind is None else _tx.numba_view  # tensor cores: Numba's launch
                xv, keep = view(xo, (rows, k))
                wv, bv = self._device_params(kind is not None)
                yh, zv, zh = F.forward_device(xv, wv, bv, rows, k, n, self.dtype, self.activation, drop, save, s,
                                              kind=kind)
                y = _tx.to_caller(yh, xo, out_shape)
            self._ctx = _Ctx(xo, None, xv, keep, zh, zv, rows, offset, active)
        if active:
            self.offset = _advance(offset, rows * n)
        return y

    def backward(self, grad_output, *, stream=None, input_grad=True):
        """Gradients of the last forward.

        Args:
            grad_output: ``(..., output_size)``, d loss / d y, the forward's batch shape.
            stream: where to queue the work.
            input_grad: compute and return d loss / d x (skip it for a model's first layer).

        Returns:
            grad_input ``(..., input_size)`` in the forward input's type (None when
            not ``input_grad``). Sets ``grad_weights`` ``(input_size, output_size)``
            and ``grad_biases`` ``(output_size,)`` (None without bias), on the
            layer's device. The dropout mask is regenerated, never stored.
        """
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("FullyConnectedLayer.backward called before forward")
        go = _tx.operand(grad_output, "grad_output")
        F._check_float(go)
        if go.dtype != self.dtype:
            raise TypeError(f"grad_output.dtype={go.dtype} does not match the layer's dtype {self.dtype}")
        out_shape = ctx.xo.shape[:-1] + (self.output_size,)
        if go.shape != out_shape:
            raise ValueError(f"grad_output must have the forward output's shape {out_shape}, got {go.shape}")
        k, n, rows = self.input_size, self.output_size, ctx.rows
        drop = self._drop.at(ctx.offset, ctx.active)
        prec = _prec.resolve(self.precision)
        kind = _prec.kind(self.dtype, prec)
        if _backend.get_backend() == "cpu":
            _tx.stream_scope(stream)
            w, b = _host(self.weights, "weights"), _host(self.biases, "biases")
            gx, gw, gb = _ref.linear_backward(
                ctx.x, w, _tx.host_array(go).reshape(rows, n), ctx.z, biases=b, activation=self.activation,
                dropout_p=drop.p, training=drop.active, seed=drop.seed, offset=drop.offset, precision=prec,
            )
            gx = gx.reshape(ctx.xo.shape) if input_grad else None
        elif rows == 0:
            gx, gw, gb = F.linear_backward(ctx.x, self.weights, go.value, ctx.z, biases=self.biases,
                                           activation=self.activation, training=False, stream=stream,
                                           precision=prec)
            gx = gx if input_grad else None
        else:
            with _tx.stream_scope(stream) as s:
                wv, bv = self._device_params(kind is not None)
                gov, _gk = (_tx.device_view if kind is None else _tx.numba_view)(go, (rows, n))
                zv = ctx.zv
                if self.activation is not None and zv is None:  # an evaluation-mode forward kept no z
                    _, zv, _zh = F.forward_device(ctx.xv, wv, bv, rows, k, n, self.dtype, self.activation,
                                                  drop.at(0, False), True, s, kind=kind)
                gxh, gwh, gbh = F.backward_device(ctx.xv, wv, gov, zv, rows, k, n, self.dtype, self.activation,
                                                  drop, s, need_x=input_grad, need_b=self._bias, kind=kind)
                gx = _tx.to_caller(gxh, ctx.xo, ctx.xo.shape) if input_grad else None
                if _is_cupy(self.weights):
                    gw, gb = gwh, gbh
                else:
                    gw, gb = _host_copy(gwh), _host_copy(gbh)
        self.grad_weights = gw
        self.grad_biases = gb if self._bias else None
        return gx

    # -- state and conversions ----------------------------------------------------

    def config(self) -> dict:
        return {"input_size": self.input_size, "output_size": self.output_size, "bias": self._bias,
                "activation": self.activation, "dropout_rate": self.dropout_rate, "init": self.init,
                "dtype": self.dtype.name, "seed": self.seed, "offset": self.offset, "precision": self.precision}

    @classmethod
    def from_config(cls, config: dict) -> FullyConnectedLayer:
        layer = cls(config["input_size"], config["output_size"], bias=config["bias"],
                    activation=config["activation"], dropout_rate=config["dropout_rate"], init=config["init"],
                    dtype=np.dtype(config["dtype"]), seed=config["seed"], precision=config.get("precision"))
        layer.offset = int(config.get("offset", 0))
        return layer

    def torch_state_dict(self) -> dict:
        """``{"weight": (output_size, input_size), "bias": (output_size,)}`` as NumPy: torch's ``nn.Linear`` layout.

        Works without torch; load it into torch with
        ``linear.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.
        """
        sd = {"weight": np.ascontiguousarray(_to_numpy(self.weights, "weights").T)}
        if self._bias:
            sd["bias"] = _to_numpy(self.biases, "biases")
        return sd

    def load_torch_state_dict(self, state):
        """Load torch ``nn.Linear`` state (``weight (out, in)``, ``bias (out,)``; tensors or arrays), transposing."""
        if "weight" not in state:
            raise KeyError(f"a torch nn.Linear state dict has a 'weight' entry; got keys {sorted(state.keys())}")
        w = _to_numpy(state["weight"], "weight")
        if w.shape != (self.output_size, self.input_size):
            raise ValueError(
                f"weight must have torch's shape (output_size, input_size) = {(self.output_size, self.input_size)}, "
                f"got {w.shape}"
            )
        has_b = state.get("bias") is not None
        if has_b != self._bias:
            raise ValueError(f"the layer has bias={self._bias} but the torch state {'has' if has_b else 'lacks'} one")
        _assign(self.weights, w.T, "weights")
        if has_b:
            _assign(self.biases, _to_numpy(state["bias"], "bias"), "biases")
        return self

    @classmethod
    def from_torch(cls, linear, *, activation=None, dropout_rate=0.0, seed=None, dtype=None):
        """A layer holding a torch ``nn.Linear``'s parameters (or its state dict), transposed to our layout."""
        state = linear.state_dict() if hasattr(linear, "state_dict") else linear
        w = _to_numpy(state["weight"], "weight")
        dtype = np.dtype(dtype or (w.dtype if w.dtype in F._FLOATS else np.float32))
        layer = cls(w.shape[1], w.shape[0], bias=state.get("bias") is not None, activation=activation,
                    dropout_rate=dropout_rate, dtype=dtype, seed=seed)
        return layer.load_torch_state_dict(state)

    def to_torch(self):
        """A new ``torch.nn.Linear`` with this layer's parameters (needs torch)."""
        try:
            import torch
        except ImportError as err:
            raise ImportError("to_torch needs torch; torch_state_dict() gives the same arrays without it") from err
        dtype = torch.float64 if self.dtype == np.float64 else torch.float32
        lin = torch.nn.Linear(self.input_size, self.output_size, bias=self._bias, dtype=dtype)
        lin.load_state_dict({k: torch.from_numpy(v) for k, v in self.torch_state_dict().items()})
        return lin

    def keras_weights(self) -> list:
        """``[kernel (input_size, output_size), bias]`` as Keras' ``Dense.get_weights()`` orders them (our layout)."""
        out = [_to_numpy(self.weights, "weights")]
        if self._bias:
            out.append(_to_numpy(self.biases, "biases"))
        return out

    def load_keras_weights(self, weights):
        """Load ``[kernel, bias]`` (Keras ``Dense.get_weights()``); the kernel is already ``(input_size, output_size)``."""
        weights = list(weights)
        if len(weights) != 1 + self._bias:
            raise ValueError(f"expected {1 + self._bias} arrays ([kernel{', bias' if self._bias else ''}]), "
                             f"got {len(weights)}")
        _assign(self.weights, _to_numpy(weights[0], "kernel"), "weights")
        if self._bias:
            _assign(self.biases, _to_numpy(weights[1], "bias"), "biases")
        return self

    @classmethod
    def from_keras(cls, dense, *, activation=None, dropout_rate=0.0, seed=None):
        """A layer from a Keras ``Dense`` (anything with ``get_weights()``) or its ``[kernel, bias]`` list.

        The activation is taken from the Dense layer's config when it is one of
        gpufc's, unless given.
        """
        weights = dense.get_weights() if hasattr(dense, "get_weights") else list(dense)
        if activation is None and hasattr(dense, "get_config"):
            name = dense.get_config().get("activation")
            activation = None if name in (None, "linear") else name
            if activation not in _ref.ACTIVATIONS:
                raise ValueError(f"the Dense layer's activation {name!r} is not one of gpufc's {_ref.ACTIVATIONS}")
        kernel = _to_numpy(weights[0], "kernel")
        dtype = kernel.dtype if kernel.dtype in F._FLOATS else np.float32
        layer = cls(kernel.shape[0], kernel.shape[1], bias=len(weights) > 1, activation=activation,
                    dropout_rate=dropout_rate, dtype=dtype, seed=seed)
        return layer.load_keras_weights(weights)

    def extra_repr(self) -> str:
        s = f"input_size={self.input_size}, output_size={self.output_size}, bias={self._bias}"
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        if self.dropout_rate:
            s += f", dropout_rate={self.dropout_rate}"
        s += f", dtype={self.dtype.name}"
        if self.device != "cpu":
            s += f", device={self.device!r}"
        return s


def _host_copy(holder):
    """A device result copied to NumPy (for a layer whose parameters are NumPy)."""
    if holder is None or isinstance(holder, np.ndarray):
        return holder
    if _is_cupy(holder):
        return holder.get()
    return holder.copy_to_host()


# ----------------------------------------------------------------------------
# Sequential
# ----------------------------------------------------------------------------


class Sequential(Module):
    """Modules applied in order; backward runs them in reverse.

    Example:
        >>> model = Sequential(FullyConnectedLayer(64, 128, activation="relu", dropout_rate=0.1, seed=0),
        ...                    FullyConnectedLayer(128, 10, seed=1))
        >>> logits = model.forward(x)                 # (batch, 10)
        >>> model.backward(grad_logits)               # sets every layer's gradients

    On a ``"cuda"`` model a NumPy batch is copied to the device once, runs
    through every layer there, and comes back as NumPy at the end.
    """

    def __init__(self, *modules):
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential takes gpufc modules, got {type(m).__name__} at position {i}")
        self.modules = list(modules)
        self.training = True
        devices = {m.device for m in modules}
        self.device = devices.pop() if len(devices) == 1 else "cpu"
        self._host_in = False

    def children(self) -> list:
        return self.modules

    def __getitem__(self, i):
        return self.modules[i]

    def __len__(self):
        return len(self.modules)

    def __iter__(self):
        return iter(self.modules)

    def append(self, module: Module):
        self.modules.append(module)
        return self

    def _to_device(self, value, name):
        """NumPy into a "cuda" model: one copy up; returns (value, came_from_host)."""
        if self.device == "cuda" and isinstance(value, np.ndarray):
            return _backend.cupy_or_none().asarray(value), True
        return value, False

    def forward(self, x, *, stream=None):
        with _tx.stream_scope(stream) if self.device == "cuda" else _tx._NO_SCOPE:
            x, self._host_in = self._to_device(x, "x")
            for m in self.modules:
                x = m.forward(x, stream=stream)
            return x.get() if self._host_in else x

    def backward(self, grad_output, *, stream=None, input_grad=True):
        """Backpropagate d loss / d output; returns d loss / d input (None when not ``input_grad``)."""
        with _tx.stream_scope(stream) if self.device == "cuda" else _tx._NO_SCOPE:
            g, from_host = self._to_device(grad_output, "grad_output")
            last = len(self.modules) - 1
            for i in range(last, -1, -1):
                g = self.modules[i].backward(g, stream=stream, input_grad=input_grad or i > 0)
            if g is not None and (from_host or self._host_in) and _is_cupy(g):
                g = g.get()
            return g

    def config(self) -> dict:
        return {}

    def __repr__(self):
        if not self.modules:
            return "Sequential()"
        lines = [f"  ({i}): {m!r}" for i, m in enumerate(self.modules)]
        return "Sequential(\n" + "\n".join(lines) + "\n)"
