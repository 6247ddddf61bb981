"""The ``gpufc`` command: ``info``, ``demo`` (and the subcommands other modules register).

Each subcommand is a function taking the parsed ``argparse.Namespace`` and
returning an exit code; heavy imports happen inside it, so ``gpufc info``
stays fast.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .tools.bench import cmd_bench  # light at import: numpy and the standard library
from .train import cmd_train
from .tune import cmd_tune  # light at import: the standard library

DEMO_SEED = 2024


def cmd_info(args) -> int:
    from .runtime.backend import backend_info
    from .envcheck import report

    for key, value in backend_info().items():
        print(f"{key:20s} {value}")
    env = report()
    print(f"{'driver_cuda':20s} {env['driver_cuda'] or 'none (no CUDA driver)'}")
    print(f"{'toolkit_cuda':20s} {env['toolkit_cuda'] or 'none from pip (numba-cuda looks for a system CUDA)'}")
    print(f"{'install_extra':20s} {env['matches']}")
    for line in env["missing"]:
        print(f"{'missing':20s} {line}")
    for line in env["versions"]:
        print(f"{'untested':20s} {line}")
    return 0


def cmd_demo(args) -> int:
    """The seed article's two examples, run through the library with a fixed seed."""
    import gpufc

    info = gpufc.backend_info()
    print(f"gpufc {gpufc.__version__} | backend: {info['backend']} | device: {info['device']}")
    np.set_printoptions(precision=6, suppress=True, floatmode="fixed")

    print("\n1) Fully connected layer, 3 inputs -> 4 outputs, on a (2, 3) batch")
    layer = gpufc.FullyConnectedLayer(3, 4, init="randn", seed=DEMO_SEED)
    layer.biases[:] = np.arange(4, dtype=np.float32) / 10  # visible biases
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
    print(f"x =\n{x}\nweights (3, 4) =\n{layer.weights}\nbiases (4,) = {layer.biases}")
    print(f"forward(x) = x @ weights + biases =\n{layer.forward(x)}")

    print("\n2) Dropout, rate 0.2, on a (4, 5) batch of ones")
    drop = gpufc.DropoutLayer(0.2, seed=DEMO_SEED)
    ones = np.ones((4, 5), dtype=np.float32)
    train = drop.forward(ones, training=True)
    print(f"training: mask (1 = kept) =\n{(train != 0).astype(np.int8)}")
    print(f"training: output (kept values scaled by 1 / (1 - 0.2) = 1.25) =\n{train}")
    print(f"test: output (identity) =\n{drop.forward(ones, training=False)}")
    return 0


COMMANDS = {
    "info": (cmd_info, "print the backend, device and versions"),
    "demo": (cmd_demo, "run the seed article's fully connected and dropout examples"),
    "bench": (cmd_bench, "benchmark against cuBLAS/PyTorch/NumPy on the active backend (cpu: not a GPU measurement)"),
    "train": (cmd_train, "train an MLP on scikit-learn's handwritten digits; prints the test accuracy last"),
    "tune": (cmd_tune, "time the matmul configurations per shape on this GPU and keep the winners (needs a GPU)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufc", description="Fully connected layers and dropout as Numba CUDA kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        configure = getattr(func, "configure", None)
        if configure is not None:
            configure(p)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
