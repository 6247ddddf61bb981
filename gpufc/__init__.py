"""gpufc: fully connected layers and dropout as handwritten Numba CUDA kernels.

``import gpufc`` is cheap and works without a GPU or CuPy: the backend
(``cuda``, ``sim`` or ``cpu``; see :mod:`gpufc.runtime.backend`) is chosen on first use.
"""

from . import reference
from .runtime.backend import backend_info, get_backend, set_backend
from .functional import config_names, dropout, dropout_backward, linear, linear_backward, linear_forward
from .nn.layers import CheckpointError, DropoutLayer, FullyConnectedLayer, Module, Sequential
from .nn.losses import SoftmaxCrossEntropy, softmax_cross_entropy
from .masks import dropout_mask, dropout_with_mask, pack_mask, unpack_mask
from .precision import get_matmul_precision, set_matmul_precision
from .nn.optim import SGD, Adam

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adam",
    "CheckpointError",
    "DropoutLayer",
    "FullyConnectedLayer",
    "Module",
    "Sequential",
    "SoftmaxCrossEntropy",
    "backend_info",
    "config_names",
    "dropout",
    "dropout_backward",
    "dropout_mask",
    "dropout_with_mask",
    "get_backend",
    "get_matmul_precision",
    "linear",
    "linear_backward",
    "linear_forward",
    "pack_mask",
    "reference",
    "set_backend",
    "set_matmul_precision",
    "softmax_cross_entropy",
    "unpack_mask",
]
