"""``gpufc train``: the digits MLP reaches the accuracy bar; the kernels train it like the reference does."""

import os

import numpy as np
import pytest
from conftest import requires_gpu
from helpers import assert_close

import gpufc
from gpufc import cli
from gpufc.train import build_model, export_digits, load_digits_arrays, train

pytestmark = pytest.mark.kernels

ACCURACY_BAR = 0.95


def _have_digits() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return bool(os.environ.get("GPUFC_DIGITS"))
    return True


needs_digits = pytest.mark.skipif(
    not _have_digits(), reason="scikit-learn is not installed and GPUFC_DIGITS names no digits .npz"
)


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@needs_digits
def test_gpufc_train_reaches_the_bar_on_cpu(cpu_backend, capsys):
    assert cli.main(["train", "--quick", "--no-progress", "--seed", "0"]) == 0
    last = _last_line(capsys.readouterr().out)
    assert last.startswith("test accuracy: ")
    assert float(last.split(":")[1]) >= ACCURACY_BAR


@needs_digits
def test_simulator_runs_an_epoch_like_the_reference(device_backend):
    """One short epoch (two batches of a 64-8-10 model, dropout on) on the kernels and on NumPy: same numbers.

    float64, so that Adam's first step (about lr * sign(g)) cannot flip on rounding.
    """
    kw = {"epochs": 1, "batch_size": 8, "hidden": 8, "train_limit": 16, "test_limit": 8, "seed": 3, "dtype": np.float64}
    got = train(**kw)
    previous = gpufc.set_backend("cpu")
    try:
        want = train(**kw)
    finally:
        gpufc.set_backend(previous)
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-10)
    for (name, a), (_, b) in zip(got["model"].named_parameters(), want["model"].named_parameters()):
        a = a.get() if hasattr(a, "get") else a
        assert_close(a, b, rtol=1e-9, atol=1e-12, what=f"{name} after one epoch")
    assert got["test_accuracy"] == want["test_accuracy"]


def test_train_from_an_npz_and_sgd(cpu_backend, tmp_path, rng):
    # Two separable blobs stand in for the digits: the --data path and the SGD branch.
    x = np.concatenate([rng.normal(3, 1, (60, 64)), rng.normal(9, 1, (60, 64))]).clip(0, 16)
    y = np.repeat([0, 1], 60)
    path = tmp_path / "blobs.npz"
    np.savez(path, X=x, y=y)
    out = train(epochs=3, optimizer="sgd", lr=0.05, data=str(path), hidden=16, seed=1)
    assert out["test_accuracy"] == 1.0
    assert out["model"][1].output_size == 2


@needs_digits
def test_export_digits_round_trip(tmp_path):
    path = tmp_path / "digits.npz"
    export_digits(path)
    x, y = load_digits_arrays(str(path))
    x0, y0 = load_digits_arrays()
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)


def test_model_layers_have_distinct_seeds():
    model = build_model(seed=5)
    assert model[0].seed != model[1].seed
    assert model[0].activation == "relu" and model[0].dropout_rate == 0.1


def test_train_rejects_an_unknown_optimizer(cpu_backend, tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((10, 4)), y=np.arange(10) % 2)
    with pytest.raises(ValueError, match="optimizer='rmsprop'"):
        train(epochs=1, optimizer="rmsprop", data=str(path))


@requires_gpu
@pytest.mark.gpu
@needs_digits
def test_gpufc_train_reaches_the_bar_on_cuda(device_backend, capsys):
    assert cli.main(["train", "--quick", "--no-progress", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "backend: cuda" in out
    assert float(_last_line(out).split(":")[1]) >= ACCURACY_BAR
