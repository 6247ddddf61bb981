"""gpufc over Dask arrays: :func:`predict`, :func:`linear` and :func:`dropout`, chunk by chunk.

Needs the ``dask`` extra (``pip install 'gpufc[dask]'``: ``dask[array]`` and
``distributed``); ``import gpufc`` never imports Dask, this module is imported
explicitly: ``import gpufc.dask``.

Every function takes a Dask array ``X`` chunked along its first axis (rows) and
returns a lazy Dask array with the same row chunks and the same chunk type
(NumPy chunks give NumPy chunks, CuPy chunks give CuPy chunks). Each chunk runs
the eager gpufc function (:func:`gpufc.linear`, :func:`gpufc.dropout`) on the
backend of the process that computes it: a ``distributed`` worker chooses its
backend exactly as any process does (``GPUFC_BACKEND`` in the worker's
environment, else ``NUMBA_ENABLE_CUDASIM``, else a GPU if the driver reports
one, else ``cpu``); :func:`gpufc.set_backend` in the client does not reach the
workers.

Rules shared by the three functions:

- Rows only. A chunk must hold whole rows, so every axis but the first is
  merged into one chunk (``X.rechunk``) when it is split. A merged chunk may
  hold at most Dask's ``array.chunk-size`` bytes of ``X`` (128 MiB by default;
  ``dask.config.set({"array.chunk-size": "1GiB"})`` raises it); where the
  merged row chunks would be larger, the rows are re-split to fit. When one
  row alone is larger than that, the merge is impossible: ``ValueError``.
- Dropout offsets. The chunk whose first row is ``r0`` draws its mask at
  ``offset + r0 * E`` (``E``: output elements per row), so the mask is the one
  the eager call on the whole array draws, for any chunking. Offsets past
  ``2**64`` wrap, as a layer's offset does.
- Parameters travel once per graph: the weights and biases (or the model's) are
  one graph key that every chunk's task depends on, uploaded to the device at
  most once per worker process for CuPy chunks.
- Values. The mask and :func:`dropout` are bit-identical to the eager call on
  the whole array. A matrix product's last bit can depend on how many rows the
  call sees (NumPy's BLAS blocks by size; gpufc picks a kernel configuration
  by shape), so :func:`linear` and :func:`predict` equal, bit for bit, the
  eager call applied chunk by chunk (at the chunk's offset), and the eager call
  on the whole array to rounding.
- A failed chunk fails the ``compute`` with the worker's exception; Dask
  returns no partial result.
"""

from __future__ import annotations

import math
import threading

import numpy as np

try:
    import dask
    import dask.array as da
    from dask.array.utils import meta_from_array
    from dask.base import tokenize
    from dask.utils import format_bytes, parse_bytes
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gpufc.dask needs Dask: pip install 'gpufc[dask]' (dask[array] and distributed)"
    ) from err

from . import reference as _ref
from .functional import dropout as _eager_dropout
from .functional import linear as _eager_linear
from .nn.layers import DropoutLayer, FullyConnectedLayer, Module, Sequential

__all__ = ["dropout", "linear", "predict"]

_U64 = 2**64


# ----------------------------------------------------------------------------
# What travels to the workers
# ----------------------------------------------------------------------------


def _module_root(obj) -> str:
    return type(obj).__module__.split(".", 1)[0]


def _host(arr, name: str) -> np.ndarray:
    """A host NumPy copy of a NumPy, CuPy or array-like parameter (Dask arrays refused)."""
    if isinstance(arr, da.Array):
        raise TypeError(
            f"{name} must be a NumPy or CuPy array (it travels to each worker once), got a dask array "
            f"of shape {arr.shape}; compute it first"
        )
    if isinstance(arr, np.ndarray):
        return arr
    if _module_root(arr) == "cupy":
        return arr.get()
    try:
        return np.asarray(arr)
    except Exception as err:
        raise TypeError(f"{name} must be an array, got {type(arr).__name__}") from err


class _Stack:
    """Dense layers as ``(activation, weights (K, N), biases (N,) or None)``, host arrays.

    One instance is one graph key. It is deserialised once per worker, and
    :meth:`like` uploads its arrays to the device once per worker process and
    device for CuPy chunks (under a lock: a worker runs several tasks at once).
    """

    def __init__(self, layers):
        self.layers = tuple((act, w, b) for act, w, b in layers)
        self._token = tokenize(self.layers)
        self._reset()

    def _reset(self):
        self._lock = threading.Lock()
        self._device: dict = {}

    def __dask_tokenize__(self):
        return ("gpufc.dask._Stack", self._token)

    def __getstate__(self):
        return {"layers": self.layers, "_token": self._token}

    def __setstate__(self, state):
        self.layers = state["layers"]
        self._token = state["_token"]
        self._reset()

    def like(self, block):
        """The layers with arrays of ``block``'s kind: NumPy as stored, CuPy uploaded once."""
        if isinstance(block, np.ndarray) or _module_root(block) != "cupy":
            return self.layers
        import cupy

        key = cupy.cuda.Device().id
        layers = self._device.get(key)
        if layers is None:
            with self._lock:
                layers = self._device.get(key)
                if layers is None:
                    layers = self._device[key] = tuple(
                        (act, cupy.asarray(w), None if b is None else cupy.asarray(b)) for act, w, b in self.layers
                    )
        return layers


def _graph_node(stack: _Stack):
    """``stack`` as one key of the graph (named by its content), a dependency of every chunk's task."""
    return dask.delayed(stack, pure=True, traverse=False)


# ----------------------------------------------------------------------------
# Validation and chunking
# ----------------------------------------------------------------------------


def _check_dask(X, name: str = "X"):
    if not isinstance(X, da.Array):
        raise TypeError(
            f"{name} must be a dask.array.Array chunked along rows, got {type(X).__module__}.{type(X).__name__}; "
            f"wrap it with dask.array.from_array({name}, chunks=(rows_per_chunk, -1)) or call the eager gpufc function"
        )


def _check_2d(X, what: str):
    if X.ndim < 2:
        raise ValueError(
            f"X must have shape (rows, {what}) (more leading axes are allowed, chunked along the first only), "
            f"got X.shape={X.shape}; reshape a single row to (1, {what})"
        )


def _rows_only(X):
    """``X`` with every axis but the first in one chunk (module docstring: the rule)."""
    if all(len(c) == 1 for c in X.chunks[1:]):
        return X
    row_elements = math.prod(X.shape[1:])
    row_bytes = row_elements * X.dtype.itemsize
    limit = parse_bytes(dask.config.get("array.chunk-size"))
    if row_bytes > limit:
        raise ValueError(
            f"X has shape {X.shape} with its trailing axes split into chunks {X.chunks[1:]}; gpufc needs whole "
            f"rows in one chunk, but one row is {row_elements} elements ({format_bytes(row_bytes)}), more than "
            f"Dask's array.chunk-size ({format_bytes(limit)}), so the columns cannot be merged within memory. "
            "Raise it with dask.config.set({'array.chunk-size': ...}) if the workers can hold such chunks"
        )
    if any(math.isnan(c) for c in X.chunks[0]):
        raise ValueError(
            f"X has unknown row chunk sizes and its trailing axes split into chunks {X.chunks[1:]}; "
            "call X.compute_chunk_sizes() first so the columns can be merged"
        )
    whole = {i: -1 for i in range(1, X.ndim)}
    if max(X.chunks[0], default=0) * row_bytes <= limit:
        return X.rechunk({0: X.chunks[0], **whole})
    return X.rechunk({0: max(1, limit // row_bytes), **whole})


def _known_rows(X, why: str):
    if any(math.isnan(c) for c in X.chunks[0]):
        raise ValueError(
            f"X has unknown row chunk sizes (chunks[0]={X.chunks[0]}); {why} needs each chunk's first row: "
            "call X.compute_chunk_sizes() first"
        )


def _meta(X, ndim: int):
    """A 0-size array of ``X``'s chunk type: the result's chunks are of the input's kind."""
    return meta_from_array(X, ndim=ndim, dtype=X.dtype)


def _first_row(block_info) -> int:
    return block_info[0]["array-location"][0][0]


# ----------------------------------------------------------------------------
# Chunk functions (run on the workers)
# ----------------------------------------------------------------------------


def _stack_block(x, stack: _Stack):
    for act, w, b in stack.like(x):
        x = _eager_linear(x, w, b, activation=act, training=False)
    return x


def _linear_block(x, stack: _Stack, activation, dropout_p, seed, offset, per_row, block_info=None):
    ((_, w, b),) = stack.like(x)
    offset = (offset + _first_row(block_info) * per_row) % _U64
    return _eager_linear(x, w, b, activation=activation, dropout_p=dropout_p, training=True, seed=seed, offset=offset)


def _dropout_block(x, p, seed, offset, per_row, block_info=None):
    offset = (offset + _first_row(block_info) * per_row) % _U64
    return _eager_dropout(x, p, seed=seed, offset=offset, training=True)


# ----------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------


def _dense_layers(model, path: str = "model") -> list:
    """``[(path, FullyConnectedLayer), ...]`` in order; evaluation-mode dropout layers are the identity."""
    if isinstance(model, FullyConnectedLayer):
        return [(path, model)]
    if isinstance(model, DropoutLayer):
        return []
    if isinstance(model, Sequential):
        out = []
        for i, child in enumerate(model.children()):
            out += _dense_layers(child, f"{path}[{i}]")
        return out
    raise TypeError(
        f"{path} must be a gpufc FullyConnectedLayer, DropoutLayer or Sequential of them, "
        f"got {type(model).__name__}"
    )


def predict(model, X):
    """``model`` in evaluation mode applied to every row chunk of ``X``.

    Args:
        model: a gpufc :class:`~gpufc.FullyConnectedLayer`, :class:`~gpufc.DropoutLayer`
            or :class:`~gpufc.Sequential` of them. Evaluated as ``model.eval()``
            would (dropout is the identity) whatever its mode; the model itself is
            not changed. Its parameters (NumPy or CuPy) are copied to the host
            once here and travel to each worker once.
        X: Dask array ``(rows, input_size)`` (or ``(rows, ..., input_size)``) of
            the model's dtype, NumPy or CuPy chunks, chunked along rows.

    Returns:
        Lazy Dask array ``(rows, output_size)`` (``(rows, ..., output_size)``),
        the row chunks of ``X`` (see the module docstring for merged columns),
        chunks of ``X``'s type.

    Example:
        >>> counts = da.bincount(gpufc.dask.predict(model, X).argmax(axis=1), minlength=10).compute()
    """
    _check_dask(X)
    if not isinstance(model, Module):
        raise TypeError(f"model must be a gpufc Module (FullyConnectedLayer, DropoutLayer, Sequential), "
                        f"got {type(model).__name__}")
    dense = _dense_layers(model)
    width = X.shape[-1] if X.ndim else None
    _check_2d(X, "input_size" if not dense else str(dense[0][1].input_size))
    layers = []
    for path, layer in dense:
        if width != layer.input_size:
            where = "X" if not layers else "the previous layer's output"
            raise ValueError(
                f"{path} takes {layer.input_size} inputs (weights.shape={(layer.input_size, layer.output_size)}) "
                f"but {where} has {width} columns (X.shape={X.shape})"
            )
        if np.dtype(layer.dtype) != X.dtype:
            raise TypeError(f"X.dtype={X.dtype} does not match {path}'s dtype {np.dtype(layer.dtype)}; "
                            f"cast one of them (X.astype(...) or a model of X's dtype)")
        layers.append((layer.activation, _host(layer.weights, f"{path}.weights"),
                       None if layer.biases is None else _host(layer.biases, f"{path}.biases")))
        width = layer.output_size
    X = _rows_only(X)
    if not layers:  # only dropout layers: the identity in evaluation mode
        return X
    stack = _graph_node(_Stack(layers))
    return X.map_blocks(_stack_block, stack, chunks=X.chunks[:-1] + ((width,),), dtype=X.dtype,
                        meta=_meta(X, X.ndim), name="gpufc-predict-" + tokenize(X, stack))


def linear(X, weights, biases=None, *, activation=None, dropout_p=0.0, training=True, seed=0, offset=0):
    """:func:`gpufc.linear` over the row chunks of ``X``: ``dropout(act(X @ weights + biases))``.

    Args:
        X: Dask array ``(rows, input_size)`` (or ``(rows, ..., input_size)``),
            float32 or float64, NumPy or CuPy chunks, chunked along rows.
        weights: ``(input_size, output_size)`` NumPy or CuPy array of ``X``'s dtype.
        biases: ``(output_size,)`` or None.
        activation, dropout_p, training, seed, offset: as :func:`gpufc.linear`;
            the mask is indexed over the whole ``(rows, output_size)`` output, so
            it is the eager call's mask for any chunking.

    Returns:
        Lazy Dask array ``(rows, output_size)``, ``X``'s row chunks and chunk type.
    """
    _check_dask(X)
    w = _host(weights, "weights")
    if w.ndim != 2:
        raise ValueError(f"weights must have shape (input_size, output_size), got weights.shape={w.shape}")
    k, n = w.shape
    _check_2d(X, str(k))
    if X.shape[-1] != k:
        raise ValueError(f"X must have shape (rows, {k}) to match weights.shape={w.shape}, got X.shape={X.shape}")
    if w.dtype != X.dtype:
        raise TypeError(f"X and weights must share one dtype, got X.dtype={X.dtype} and weights.dtype={w.dtype}")
    b = None
    if biases is not None:
        b = _host(biases, "biases")
        if b.shape != (n,):
            raise ValueError(f"biases must have shape ({n},) to match weights.shape={w.shape}, got biases.shape={b.shape}")
        if b.dtype != X.dtype:
            raise TypeError(f"X and biases must share one dtype, got X.dtype={X.dtype} and biases.dtype={b.dtype}")
    if activation not in _ref.ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ref.ACTIVATIONS}, got activation={activation!r}")
    p = _ref.check_p(dropout_p)
    seed = _ref.check_seed(seed)
    offset = _ref.check_offset(offset)
    X = _rows_only(X)
    stack = _graph_node(_Stack([(activation, w, b)]))
    chunks = X.chunks[:-1] + ((n,),)
    meta = _meta(X, X.ndim)
    name = "gpufc-linear-" + tokenize(X, stack, activation, p, bool(training), seed, offset)
    if not (training and p > 0.0):
        return X.map_blocks(_stack_block, stack, chunks=chunks, dtype=X.dtype, meta=meta, name=name)
    _known_rows(X, "dropout")
    per_row = math.prod(X.shape[1:-1]) * n
    return X.map_blocks(_linear_block, stack, activation, p, seed, offset, per_row, chunks=chunks, dtype=X.dtype,
                        meta=meta, name=name)


def dropout(X, p, *, seed=0, offset=0, training=True):
    """:func:`gpufc.dropout` over the row chunks of ``X``, bit-identical to the eager call on the whole array.

    Args:
        X: Dask array of any shape with at least one axis, float32 or float64,
            NumPy or CuPy chunks, chunked along its first axis.
        p, seed, offset, training: as :func:`gpufc.dropout`; element ``e``
            (row-major over all of ``X``) is drawn at ``offset + e``.

    Returns:
        Lazy Dask array of ``X``'s shape, row chunks and chunk type (``X`` itself
        when ``training`` is False or ``p == 0``: dropout is then the identity).
    """
    _check_dask(X)
    if X.ndim < 1:
        raise ValueError(f"X must have at least one axis (rows), got X.shape={X.shape}")
    p = _ref.check_p(p)
    seed = _ref.check_seed(seed)
    offset = _ref.check_offset(offset)
    if X.dtype.kind != "f":
        raise TypeError(f"X must be a floating-point array, got X.dtype={X.dtype}")
    if not (training and p > 0.0):
        return X
    X = _rows_only(X)
    _known_rows(X, "dropout")
    per_row = math.prod(X.shape[1:])
    return X.map_blocks(_dropout_block, p, seed, offset, per_row, dtype=X.dtype, meta=_meta(X, X.ndim),
                        name="gpufc-dropout-" + tokenize(X, p, seed, offset))
