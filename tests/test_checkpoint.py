"""Checkpoints: an interrupted save keeps the previous file; a damaged file gives one clear error."""

import json
import os
import zipfile

import numpy as np
import pytest

import gpufc
from gpufc import CheckpointError, FullyConnectedLayer, Module, Sequential

pytestmark = pytest.mark.reference


def _model(seed):
    return Sequential(FullyConnectedLayer(4, 5, activation="relu", seed=seed), FullyConnectedLayer(5, 2, seed=seed + 1))


class _FailingWrites:
    """Lets ``budget`` bytes through ``write`` on the checkpoint's temporary file, then raises OSError."""

    def __init__(self, monkeypatch, budget):
        self.budget, self.written = budget, 0
        real_fdopen = os.fdopen

        def fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            if "w" not in mode:
                return f
            outer = self
            raw_write = f.write

            def write(data):
                room = outer.budget - outer.written
                if len(data) > room:
                    raw_write(bytes(data)[:max(room, 0)])
                    f.flush()
                    outer.written = outer.budget
                    raise OSError(28, "No space left on device")
                outer.written += len(data)
                return raw_write(data)

            f.write = write
            return f

        monkeypatch.setattr(os, "fdopen", fdopen)


def test_interrupted_save_keeps_the_previous_checkpoint(cpu_backend, tmp_path, monkeypatch, rng):
    path = tmp_path / "model.npz"
    good = _model(1)
    good.save(path)
    before = path.read_bytes()

    newer = _model(7)  # different weights: a completed save would change the file
    failing = _FailingWrites(monkeypatch, budget=len(before) // 2)
    with pytest.raises(OSError, match="No space left"):
        newer.save(path)
    monkeypatch.undo()

    assert failing.written == len(before) // 2, "the writer failed part-way, after some bytes"
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.npz"], "the partial temporary file is removed"
    back = Module.load(path)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(back.forward(x), good.forward(x))


def test_completed_save_replaces_the_file(cpu_backend, tmp_path, rng):
    path = tmp_path / "model.npz"
    _model(1).save(path)
    newer = _model(7)
    newer.save(path)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(Module.load(path).forward(x), newer.forward(x))
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]


def test_save_appends_npz_like_numpy(cpu_backend, tmp_path):
    _model(1).save(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_truncated_file_names_the_file(cpu_backend, tmp_path, keep):
    path = tmp_path / "model.npz"
    _model(1).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cannot load .*model\.npz: the file is truncated, corrupt") as info:
        Module.load(path)
    assert isinstance(info.value, ValueError) and info.value.path == str(path)


def test_corrupt_member_names_the_file(cpu_backend, tmp_path):
    path = tmp_path / "model.npz"
    _model(1).save(path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("0.weights.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200  # inside the stored array bytes
    data[start] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.npz: .*Bad CRC-32"):
        Module.load(path)


def test_foreign_files_name_the_file(cpu_backend, tmp_path):
    plain = tmp_path / "plain.npz"
    np.savez(plain, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"plain\.npz: it was not written by gpufc's save"):
        Module.load(plain)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(CheckpointError, match=r"single\.npy: it holds a single array"):
        Module.load(single)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.txt: the file is truncated, corrupt or not a gpufc"):
        Module.load(text)
    other = tmp_path / "other.npz"
    np.savez(other, __gpufc__=np.array(json.dumps({"format": "someone-else-2"})))
    with pytest.raises(CheckpointError, match=r"other\.npz: unknown checkpoint format"):
        Module.load(other)


def test_missing_file_is_file_not_found(cpu_backend, tmp_path):
    with pytest.raises(FileNotFoundError):
        Module.load(tmp_path / "absent.npz")


def test_checkpoint_error_is_exported():
    assert gpufc.CheckpointError is CheckpointError
