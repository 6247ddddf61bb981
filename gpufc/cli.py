"""The ``gpufc`` command: ``info``, ``demo``, ``warmup`` (and the subcommands other modules register).

Each subcommand is a function taking the parsed ``argparse.Namespace`` and
returning an exit code; heavy imports happen inside it, so ``gpufc info``
stays fast.
"""

from __future__ import annotations

import argparse
import os
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
    for key, value in _cache_lines():
        print(f"{key:20s} {value}")
    return 0


def _cache_lines() -> list:
    """``gpufc info``'s kernel-cache section: the directory, whether it is used, entries and size."""
    from .runtime import cache

    try:
        c = cache.default().info()
    except OSError as err:
        return [("kernel_cache", f"unreadable: {err}")]
    state = "on" if c["disk"] else f"off ({cache.ENV_SWITCH}=0)"
    return [("kernel_cache", f"{c['directory']} ({state}; {cache.ENV_DIR} moves it)"),
            ("kernel_cache_size", f"{c['entries']} entries, {c['bytes'] / 2**20:.1f} MiB")]


def cmd_warmup(args) -> int:
    """Compile the default configurations' kernels into the on-disk cache, with a progress bar."""
    import os

    from .runtime import backend, cache

    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        print("gpufc warmup compiles for a real device; unset NUMBA_ENABLE_CUDASIM", file=sys.stderr)
        return 2
    if not cache.disk_enabled():
        print(f"the kernel cache is off ({cache.ENV_SWITCH}=0): nothing to warm", file=sys.stderr)
        return 2
    if backend.get_backend() == "sim":
        backend.set_backend("cpu")  # compiling needs numba's real CUDA target, not the simulator
    archs = tuple(tuple(int(v) for v in a.split(".")) for a in args.cc) if args.cc else cache.target_archs()
    specs = cache.warmup_specs(args.match)
    total = sum(1 for cc in archs for s in specs if s.archs is None or cc in s.archs)
    where = cache.default().directory
    print(f"gpufc warmup: {total} kernels for {', '.join(f'sm_{a}{b}' for a, b in archs)} into {where}")
    with _progress(total, args.no_progress) as tick:
        done = cache.warmup(specs, archs, jobs=args.jobs, progress=tick)
    print(f"compiled {done['compiled']}, already cached {done['cached']}, of {done['total']}")
    return 0


def _configure_warmup(p) -> None:
    p.add_argument("--match", default=None, help="only kernels whose name contains this, e.g. t128x128 or dropout")
    p.add_argument("--cc", nargs="+", default=None, help="compute capabilities, e.g. 9.0 8.0 (default: this "
                   "GPU's; without a GPU 8.0 and 9.0)")
    p.add_argument("-j", "--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


cmd_warmup.configure = _configure_warmup


class _progress:
    """A rich progress bar on a terminal (rich is optional), else a line per 10%."""

    def __init__(self, total: int, off: bool):
        self.total, self.off, self.n, self._bar = total, off, 0, None

    def __enter__(self):
        if not self.off and sys.stderr.isatty():
            try:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn())
                self._bar.__enter__()
                self._task = self._bar.add_task("gpufc warmup", total=self.total)
            except ImportError:
                self._bar = None
        return self.tick

    def tick(self, what: str):
        self.n += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=f"gpufc warmup: {what}")
        elif not self.off and (self.n == self.total or self.n % max(1, self.total // 10) == 0):
            print(f"  {self.n}/{self.total} {what}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False



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
    "warmup": (cmd_warmup, "compile the default kernels into the on-disk cache (no GPU needed: PTX for sm_80/sm_90)"),
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
