"""``gpufc train``: an MLP trained on scikit-learn's bundled handwritten digits.

The data are ``sklearn.datasets.load_digits`` (1797 8x8 images, 10 classes,
shipped inside scikit-learn: no download), scaled to [0, 1] and split 80/20
with a fixed seed. The model is ``64 -> hidden (ReLU, dropout) -> 10``, two
:class:`~gpufc.layers.FullyConnectedLayer` s (the dropout fused into the first
one's kernel), trained with softmax cross-entropy and Adam or SGD on whatever
backend is active. On ``cuda`` the parameters and the whole data set live on
the device (CuPy); each epoch is one shuffle on the device and contiguous
batch slices, and the loss is read back once per epoch.

The last line printed is ``test accuracy: 0.xxxx``.
Machines without scikit-learn can pass the same arrays as ``--data FILE.npz``
(``X`` (n, 64), ``y`` (n,)), written once elsewhere with :func:`export_digits`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

from .runtime import backend as _backend
from .nn.layers import FullyConnectedLayer, Sequential
from .nn.losses import softmax_cross_entropy
from .nn.optim import SGD, Adam

DEFAULTS = {"epochs": 30, "batch_size": 32, "lr": 2e-3, "optimizer": "adam", "momentum": 0.9, "hidden": 128,
            "dropout": 0.1, "seed": 0}
QUICK_EPOCHS = 12


def load_digits_arrays(path=None):
    """``(X (n, 64) float64 in [0, 16], y (n,) int64)``: scikit-learn's digits, or an ``.npz`` with X and y.

    Without ``path``, a file named by the environment variable ``GPUFC_DIGITS``
    is used when scikit-learn is not installed (the lent GPU machine has none).
    """
    if path is None and importlib.util.find_spec("sklearn") is None:
        path = os.environ.get("GPUFC_DIGITS") or None
    if path is not None:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["X"], np.float64), np.asarray(data["y"], np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise SystemExit(
            "gpufc train needs scikit-learn for its data set: pip install 'gpufc[train]' "
            "(or pass --data FILE.npz holding arrays X and y, or name one in GPUFC_DIGITS)"
        ) from err
    digits = load_digits()
    return digits.data.astype(np.float64), digits.target.astype(np.int64)


def export_digits(path):
    """Write scikit-learn's digits to ``path`` (``.npz``, X and y) for machines without scikit-learn."""
    x, y = load_digits_arrays()
    np.savez_compressed(path, X=x.astype(np.uint8), y=y.astype(np.uint8))


def split(x, y, *, seed, test_fraction=0.2, dtype=np.float32):
    """A fixed shuffled split: ``(x_train, y_train, x_test, y_test)``, x scaled to [0, 1]."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = round(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    scale = max(float(x.max()), 1.0)
    xs = (x / scale).astype(dtype)
    return xs[train], y[train], xs[test], y[test]


def build_model(n_in=64, hidden=128, n_out=10, *, dropout=0.1, seed=0, dtype=np.float32):
    """``n_in -> hidden (ReLU, dropout) -> n_out``; each layer gets its own seed so masks never repeat."""
    return Sequential(
        FullyConnectedLayer(n_in, hidden, activation="relu", dropout_rate=dropout, seed=seed, dtype=dtype),
        FullyConnectedLayer(hidden, n_out, seed=seed + 1, dtype=dtype),
    )


def accuracy(model, x, y, batch_size=512) -> float:
    """Fraction of ``x``'s rows whose arg-max logit is ``y`` (evaluation mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model.forward(x[i:i + batch_size])
        correct += int((logits.argmax(axis=1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


class _Progress:
    """One progress bar per epoch on stderr: rich when installed, else one plain line per epoch."""

    def __init__(self, enabled: bool):
        self.rich = None
        if enabled:
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self.rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                     console=Console(stderr=True))
            except ImportError:
                pass
        self.enabled = enabled

    def __enter__(self):
        if self.rich is not None:
            self.rich.__enter__()
        return self

    def __exit__(self, *exc):
        if self.rich is not None:
            self.rich.__exit__(*exc)

    def epoch(self, label: str, total: int):
        self._label, self._t0 = label, time.perf_counter()
        if self.rich is not None:
            self._task = self.rich.add_task(label, total=total, info="")

    def advance(self):
        if self.rich is not None:
            self.rich.advance(self._task)

    def done(self, info: str):
        if self.rich is not None:
            self.rich.update(self._task, info=info)
        elif self.enabled:
            print(f"{self._label}  {info}  ({time.perf_counter() - self._t0:.2f} s)", file=sys.stderr, flush=True)


def train(*, epochs=DEFAULTS["epochs"], batch_size=DEFAULTS["batch_size"], lr=DEFAULTS["lr"],
          optimizer=DEFAULTS["optimizer"], momentum=DEFAULTS["momentum"], hidden=DEFAULTS["hidden"],
          dropout=DEFAULTS["dropout"], seed=DEFAULTS["seed"], dtype=np.float32, data=None,
          train_limit=None, test_limit=None, progress=False):
    """Train the digits MLP; returns ``{"model", "losses" (mean per epoch), "test_accuracy", "seconds"}``.

    ``train_limit`` / ``test_limit`` keep only the first rows of each split (the
    simulator tests use a few dozen). Everything is seeded by ``seed``: the
    split, the initial weights, the dropout keys and the batch order.
    """
    x, y = load_digits_arrays(data) if not isinstance(data, tuple) else data
    x_tr, y_tr, x_te, y_te = split(x, y, seed=seed, dtype=dtype)
    x_tr, y_tr = x_tr[:train_limit], y_tr[:train_limit]
    x_te, y_te = x_te[:test_limit], y_te[:test_limit]
    model = build_model(x.shape[1], hidden, int(y.max()) + 1, dropout=dropout, seed=seed, dtype=dtype)
    xp = np
    if _backend.get_backend() == "cuda" and _backend.cupy_or_none() is not None:
        xp = _backend.cupy_or_none()
        model.to("cuda")
        x_tr, y_tr, x_te, y_te = (xp.asarray(a) for a in (x_tr, y_tr, x_te, y_te))
    if optimizer == "adam":
        opt = Adam(model, lr=lr)
    elif optimizer == "sgd":
        opt = SGD(model, lr=lr, momentum=momentum)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got optimizer={optimizer!r}")

    rng = np.random.default_rng(seed + 2)
    n = len(y_tr)
    steps = -(-n // batch_size)
    losses = []
    t0 = time.perf_counter()
    model.train()
    with _Progress(progress) as bar:
        for epoch in range(epochs):
            bar.epoch(f"epoch {epoch + 1:>{len(str(epochs))}}/{epochs}", steps)
            perm = xp.asarray(rng.permutation(n))
            xs, ys = x_tr[perm], y_tr[perm]
            total = 0.0
            for s in range(steps):
                xb, yb = xs[s * batch_size:(s + 1) * batch_size], ys[s * batch_size:(s + 1) * batch_size]
                loss, grad = softmax_cross_entropy(model.forward(xb), yb)
                model.backward(grad, input_grad=False)
                opt.step()
                total = total + loss * len(yb)  # stays on the device until the epoch ends
                bar.advance()
            losses.append(float(total) / n)
            bar.done(f"loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - t0
    return {"model": model, "losses": losses, "test_accuracy": accuracy(model, x_te, y_te), "seconds": seconds}


def configure(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument("--epochs", type=int, default=None, help=f"passes over the training set (default {d['epochs']})")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"default {d['batch_size']}")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3 for adam, 0.05 for sgd)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default=d["optimizer"])
    parser.add_argument("--momentum", type=float, default=d["momentum"], help="SGD momentum (default 0.9)")
    parser.add_argument("--hidden", type=int, default=d["hidden"], help=f"hidden units (default {d['hidden']})")
    parser.add_argument("--dropout", type=float, default=d["dropout"], help=f"dropout rate (default {d['dropout']})")
    parser.add_argument("--seed", type=int, default=d["seed"], help=f"seeds everything (default {d['seed']})")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs unless --epochs is given")
    parser.add_argument("--data", metavar="FILE.npz", help="X (n, 64) and y (n,) instead of scikit-learn's digits")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_train(args) -> int:
    """Train the digits MLP and print the test accuracy as the last line."""
    from . import __version__, backend_info

    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else DEFAULTS["epochs"])
    lr = args.lr if args.lr is not None else (DEFAULTS["lr"] if args.optimizer == "adam" else 0.05)
    info = backend_info()
    print(f"gpufc {__version__} | backend: {info['backend']} | device: {info['device']}")
    print(f"digits MLP 64-{args.hidden}-10, relu, dropout {args.dropout} | {args.optimizer} lr {lr} | "
          f"{epochs} epochs, batch {args.batch_size}, seed {args.seed}, {args.dtype}")
    result = train(epochs=epochs, batch_size=args.batch_size, lr=lr, optimizer=args.optimizer,
                   momentum=args.momentum, hidden=args.hidden, dropout=args.dropout, seed=args.seed,
                   dtype=np.dtype(args.dtype), data=args.data, progress=not args.no_progress)
    print(f"final training loss: {result['losses'][-1]:.4f} | training time: {result['seconds']:.2f} s")
    print(f"test accuracy: {result['test_accuracy']:.4f}")
    return 0


cmd_train.configure = configure
