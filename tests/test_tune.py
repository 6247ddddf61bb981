"""The autotuner's records (gpufc/tune.py): what a record must match to be used, the store on
disk, and `gpufc tune` without a GPU. No timing here (timing needs a GPU; performance lives
in bench/)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpufc import tune

pytestmark = pytest.mark.reference

ENV = tune.environment("NVIDIA H200", (9, 0), "0.30.4", "abcdef0123456789")


def _record(config="v3_t128x128k16w", chunk=None, shape=(4096, 4096, 4096), **env_changes):
    m, n, k = shape
    return {"bucket": list(tune.bucket(m, n, k)), "dtype": "float32", "epilogue": "id", "layout": "NN",
            **ENV, **env_changes, "config": config, "chunk": chunk}


def test_bucket_rounds_up_to_powers_of_two():
    assert tune.bucket(4096, 4096, 4096) == (4096, 4096, 4096)
    assert tune.bucket(1, 3, 0) == (1, 4, 1)
    assert tune.bucket(4097, 100, 2**40) == (8192, 128, tune.BUCKET_CAP)
    with pytest.raises(ValueError, match="m must be a non-negative integer, got m=-1"):
        tune.bucket(-1, 1, 1)


def test_a_record_from_this_environment_is_used():
    got = tune.lookup(3000, 4000, 4096, np.float32, "id", "NN", ENV, [_record()])
    assert got == {"config": "v3_t128x128k16w", "chunk": None}


@pytest.mark.parametrize("field,value", [("device", "NVIDIA H100 80GB HBM3"), ("cc", "8.0"),
                                         ("numba_cuda", "0.31.0"), ("source", "0000000000000000")])
def test_a_record_from_elsewhere_is_ignored(field, value):
    # another device, compute capability, numba-cuda version or kernel source: never used
    assert tune.lookup(4096, 4096, 4096, np.float32, "id", "NN", ENV, [_record(**{field: value})]) is None


@pytest.mark.parametrize("change", [{"dtype": "float64"}, {"epilogue": "relu+bias"}, {"layout": "TN"},
                                    {"bucket": [2048, 4096, 4096]}])
def test_a_record_for_another_problem_is_not_used(change):
    assert tune.lookup(4096, 4096, 4096, np.float32, "id", "NN", ENV, [{**_record(), **change}]) is None


@pytest.mark.parametrize("bad", [{"config": None}, {"config": 7}, {"chunk": 0}, {"chunk": "256"}])
def test_a_malformed_record_is_ignored(bad):
    assert not tune.valid({**_record(), **bad}, ENV)
    assert tune.lookup(4096, 4096, 4096, np.float32, "id", "NN", ENV, [{**_record(), **bad}]) is None


def test_no_device_or_tuning_off_uses_no_record(monkeypatch):
    assert tune.lookup(4096, 4096, 4096, np.float32, "id", "NN", None, [_record()]) is None
    monkeypatch.setenv(tune.ENV_SWITCH, "0")
    assert tune.lookup(4096, 4096, 4096, np.float32, "id", "NN", ENV, [_record()]) is None


def test_merge_replaces_the_same_problem_and_keeps_other_environments():
    old = _record(config="t128x128")
    foreign = _record(config="t64x64", device="Other GPU")
    merged = tune.merge([old, foreign], _record(config="v3_t128x128k16w", chunk=512))
    assert foreign in merged and old not in merged and len(merged) == 2
    assert tune.lookup(4096, 4096, 4096, np.float32, "id", "NN", ENV, merged) == {"config": "v3_t128x128k16w",
                                                                                  "chunk": 512}


def test_store_round_trip_and_unreadable_files(tmp_path):
    path = tune.store_path(tmp_path)
    assert tune.load(path) == []  # missing: no records, no warning
    tune.save(path, [_record()])
    assert tune.load(path) == [_record()]
    assert [p.name for p in tmp_path.iterdir()] == [tune.FILENAME]  # no temporary file left behind
    path.write_text("{ not json")
    with pytest.warns(tune.TuningWarning, match="unreadable tuning store"):
        assert tune.load(path) == []
    path.write_text(json.dumps({"format": "something-else", "records": [_record()]}))
    with pytest.warns(tune.TuningWarning, match="not a gpufc-tuning-1 file"):
        assert tune.load(path) == []


def test_parse_shape():
    assert tune.parse_shape("64x512x1024") == (64, 1024, 512)  # MxKxN -> (M, N, K)
    with pytest.raises(ValueError, match="a shape must be MxKxN"):
        tune.parse_shape("64x512")


def test_gpufc_tune_without_a_gpu_exits_nonzero_and_writes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env.update(GPUFC_BACKEND="cpu", GPUFC_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "gpufc", "tune", "64x512x512", "--dir", str(tmp_path)],
                         check=False, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "needs a CUDA GPU" in out.stderr and "Nothing was timed or written" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_candidates_cover_the_table_and_split_only_version_3():
    from gpufc.runtime import backend

    lin = backend.kernels().linear
    got = tune.candidates(64, 512, 512, np.float32)
    names = {name for name, _ in got}
    assert set(lin.DTYPE_CONFIGS[np.dtype(np.float32)]) == names
    split = [(name, chunk) for name, chunk in got if chunk]
    assert split and all(lin.config_by_name(name).version == 3 for name, _ in split)
    assert not [c for _, c in tune.candidates(4096, 4096, 4096, np.float32) if c]  # the grid fills the GPU


def test_recorded_uses_this_environment_s_records_only(monkeypatch, tmp_path):
    # What launch_matmul asks: the store is read once; a record from another kernel source is not used.
    monkeypatch.setattr(tune, "current_environment", lambda: ENV)
    monkeypatch.setattr(tune, "store_path", lambda directory=None: tmp_path / tune.FILENAME)
    monkeypatch.setattr(tune, "_cached", {})
    tune.save(tmp_path / tune.FILENAME, [_record(chunk=512), _record(config="t64x64", shape=(64, 64, 64), source="x")])
    assert tune.recorded(4096, 4096, 4096, np.float32, "id", "NN") == {"config": "v3_t128x128k16w", "chunk": 512}
    assert tune.recorded(64, 64, 64, np.float32, "id", "NN") is None
    (tmp_path / tune.FILENAME).unlink()  # read once per process: still there
    assert tune.recorded(4096, 4096, 4096, np.float32, "id", "NN") is not None
