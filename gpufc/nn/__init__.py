"""Layers, optimizers and losses: the training API, re-exported by :mod:`gpufc`."""

from .layers import CheckpointError, DropoutLayer, FullyConnectedLayer, Module, Sequential
from .losses import SoftmaxCrossEntropy, softmax_cross_entropy
from .optim import SGD, Adam

__all__ = [
    "SGD",
    "Adam",
    "CheckpointError",
    "DropoutLayer",
    "FullyConnectedLayer",
    "Module",
    "Sequential",
    "SoftmaxCrossEntropy",
    "softmax_cross_entropy",
]
