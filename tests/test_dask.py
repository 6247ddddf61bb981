"""gpufc.dask on a distributed.LocalCluster of 2 worker processes (cpu backend), and its input checks.

One cluster serves the module (~5 s to start). Its workers get GPUFC_BACKEND=cpu
through the nanny's ``env=``: workers inherit the environment of the process that
starts them (here the test process, which conftest puts on ``sim``), and resolve
their backend from it as any process does.
"""

import logging
import pickle

import numpy as np
import pytest

import gpufc

da = pytest.importorskip("dask.array", reason="gpufc.dask needs the dask extra (pip install 'gpufc[dask]')")
distributed = pytest.importorskip("distributed", reason="gpufc.dask's tests need distributed (the dask extra)")
import dask
from conftest import requires_gpu

import gpufc.dask as gd

WORKER_MEMORY = 300 * 2**20  # per worker; the streaming test's input is 1 GiB


def _cluster_processes(before):
    import psutil

    return [p for p in psutil.Process().children(recursive=True)
            if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def client():
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with (
        distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=2, memory_limit=WORKER_MEMORY,
                                 dashboard_address=None, env={"GPUFC_BACKEND": "cpu"},
                                 silence_logs=logging.ERROR) as cluster,
        distributed.Client(cluster) as c,
    ):
        workers = _cluster_processes(before)
        assert len(workers) == 2, f"expected 2 worker processes, found {workers}"
        yield c
    # no worker outlives the module (multiprocessing's resource tracker lives as long as this process: not ours)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"worker processes left running after the cluster closed: {alive}"


def _data(rows, k, n, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(dtype)
    w = rng.standard_normal((k, n)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    return x, w, b


def _row_starts(chunks):
    return np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(int)


CHUNKINGS = {
    "uneven": ((10, 40, 3, 50), -1),
    "single": ((103,), -1),
    "split columns": ((10, 40, 3, 50), (5, 7)),
}


def test_workers_resolve_their_own_backend(client):
    assert set(client.run(gpufc.get_backend).values()) == {"cpu"}
    assert gpufc.get_backend() != "cpu"  # the test process is on the kernels: nothing leaked from it


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_linear_equals_the_eager_call(client, cpu_backend, chunking):
    rows_chunks, col_chunks = CHUNKINGS[chunking]
    x, w, b = _data(103, 12, 7)
    kw = {"activation": "gelu", "dropout_p": 0.3, "seed": 11, "offset": 6}
    y = gd.linear(da.from_array(x, chunks=(rows_chunks, col_chunks)), w, b, **kw)
    assert y.chunks == (rows_chunks, (7,))
    got = y.compute()
    assert type(got) is np.ndarray and got.dtype == np.float32
    # bit for bit: the eager call on each chunk at the chunk's global offset (offset + first row * N)
    starts = _row_starts(rows_chunks)
    per_chunk = [gpufc.linear(x[s:s + c], w, b, **{**kw, "offset": kw["offset"] + s * 7})
                 for s, c in zip(starts, rows_chunks)]
    assert np.array_equal(got, np.concatenate(per_chunk))
    # the whole array's mask exactly; its values to rounding (BLAS sums by block size)
    whole = gpufc.linear(x, w, b, **kw)
    keep = gpufc.reference.dropout_keep_mask(whole.shape, 0.3, 11, 6)
    assert (got[~keep] == 0).all()
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)


def test_linear_without_dropout_and_on_an_empty_array(client, cpu_backend):
    x, w, b = _data(0, 12, 7, np.float64)
    got = gd.linear(da.from_array(x), w, b, activation="relu", dropout_p=0.5, seed=1).compute()
    assert got.shape == (0, 7) and got.dtype == np.float64
    x, w, _ = _data(30, 4, 3, np.float64)
    got = gd.linear(da.from_array(x, chunks=(7, 4)), w, dropout_p=0.5, training=False).compute()
    assert np.array_equal(got, np.concatenate([x[i:i + 7] @ w for i in range(0, 30, 7)]))


@pytest.mark.parametrize("shape,chunks", [((103, 12), ((10, 40, 3, 50), (5, 7))), ((103, 12), (103, 12)),
                                          ((0, 12), (0, 12)), ((9, 5, 3), (4, 2, 3)), ((37,), (5,))])
def test_dropout_is_bit_identical_to_the_eager_call(client, cpu_backend, shape, chunks):
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    got = gd.dropout(da.from_array(x, chunks=chunks), 0.4, seed=2**40 + 3, offset=5).compute()
    assert np.array_equal(got, gpufc.dropout(x, 0.4, seed=2**40 + 3, offset=5))


def _model():
    return gpufc.Sequential(
        gpufc.FullyConnectedLayer(12, 16, activation="relu", dropout_rate=0.25, seed=0),
        gpufc.DropoutLayer(0.5, seed=1),
        gpufc.Sequential(gpufc.FullyConnectedLayer(16, 8, activation="tanh", seed=2),
                         gpufc.FullyConnectedLayer(8, 5, bias=False, seed=3)),
    )


@pytest.mark.parametrize("chunking", ["uneven", "single", "empty"])
def test_predict_equals_the_eager_model_in_evaluation_mode(client, cpu_backend, chunking):
    rows_chunks = {"uneven": (10, 40, 3, 50), "single": (103,), "empty": (0,)}[chunking]
    x = np.random.default_rng(4).standard_normal((sum(rows_chunks), 12)).astype(np.float32)
    model = _model()  # in training mode: predict evaluates it without changing it
    got = gd.predict(model, da.from_array(x, chunks=(rows_chunks, 12))).compute()
    assert model.training and model[0].offset == 0 and model[1].offset == 0
    assert got.shape == (x.shape[0], 5) and got.dtype == np.float32
    starts = _row_starts(rows_chunks)
    model.eval()
    per_chunk = [model.forward(x[s:s + c]) for s, c in zip(starts, rows_chunks)]
    assert np.array_equal(got, np.concatenate(per_chunk))
    np.testing.assert_allclose(got, model.forward(x), rtol=1e-5, atol=1e-6)


def _pickled_sizes(collection):
    graph = collection.__dask_graph__()
    return {key: len(pickle.dumps(value)) for key, value in dict(graph).items()}


@pytest.mark.parametrize("op", ["predict", "linear"])
def test_parameters_are_one_graph_key_not_one_per_chunk(op):
    """40 chunks, 256 KiB of weights: the graph holds one copy of them (40 if they rode with each task)."""
    k, n = 128, 256
    w = np.random.default_rng(5).standard_normal((k, n))
    X = da.ones((4000, k), chunks=(100, k))  # lazy: the graph holds no data but the parameters
    if op == "predict":
        layer = gpufc.FullyConnectedLayer(k, n, dtype=np.float64, seed=0)
        layer.weights[...] = w
        y = gd.predict(layer, X)
    else:
        y = gd.linear(X, w, np.zeros(n), dropout_p=0.1, seed=1)
    for graph_of in (y, dask.optimize(y)[0]):
        sizes = sorted(_pickled_sizes(graph_of).values())
        assert len(sizes) >= 40
        assert sizes[-1] >= w.nbytes > 16 * sizes[-2]  # one value holds the weights, every other is small


def test_rows_are_resplit_when_merged_columns_would_pass_the_chunk_size(client, cpu_backend):
    x, w, b = _data(1000, 100, 3, np.float64)
    X = da.from_array(x, chunks=(500, 50))
    with dask.config.set({"array.chunk-size": "64KiB"}):
        y = gd.linear(X, w, b, dropout_p=0.5, seed=9, offset=1)
    assert max(y.chunks[0]) * 100 * 8 <= 64 * 1024 and y.chunks[1] == (3,)
    got = y.compute()
    keep = gpufc.reference.dropout_keep_mask((1000, 3), 0.5, 9, 1)
    assert (got[~keep] == 0).all()
    np.testing.assert_allclose(got, gpufc.linear(x, w, b, dropout_p=0.5, seed=9, offset=1), rtol=1e-12)


def test_streams_an_input_far_larger_than_a_worker_memory_limit(client):
    """1 GiB of lazily generated rows through a nearest-center classifier on workers limited to 300 MiB each."""
    rows, k, c, chunk = 4 * 2**20, 64, 10, 64 * 2**10
    centers = (np.random.default_rng(6).standard_normal((c, k)) * 3).astype(np.float32)

    # defined here, so that it travels by value: a module-level function would make each worker import
    # this test module, and with it conftest, which switches the worker's environment to the simulator
    def rows_of_the_mixture(block_info=None):
        """Row r is class r % c: its center plus uniform noise in [-0.5, 0.5)."""
        (r0, r1), _ = block_info[None]["array-location"]
        x = np.random.default_rng(r0).random((r1 - r0, k), dtype=np.float32)
        x -= np.float32(0.5)
        x += centers[np.arange(r0, r1) % c]
        return x

    X = da.map_blocks(rows_of_the_mixture, chunks=((chunk,) * (rows // chunk), (k,)), dtype=np.float32,
                      meta=np.empty((0, 0), np.float32))
    assert X.nbytes >= 3 * WORKER_MEMORY
    workers = set(client.scheduler_info()["workers"])
    # logits_j = x . c_j - |c_j|^2 / 2: the nearest center wins; the centers are far apart against the noise
    model = gpufc.FullyConnectedLayer(k, c, seed=0)
    model.weights[...] = centers.T
    model.biases[...] = -0.5 * (centers.astype(np.float64) ** 2).sum(axis=1)
    counts = da.bincount(gd.predict(model, X).argmax(axis=1), minlength=c).compute()
    assert counts.tolist() == [len(range(j, rows, c)) for j in range(c)]
    assert set(client.scheduler_info()["workers"]) == workers  # no worker died on the way (a restart renames it)
    assert set(client.run(gpufc.get_backend).values()) == {"cpu"}


def test_a_failed_chunk_fails_the_compute_with_the_worker_error(client):
    def chunk(block_info=None):
        (r0, r1), _ = block_info[None]["array-location"]
        if r0 == 20:
            raise ValueError("chunk at row 20 is broken")
        return np.ones((r1 - r0, 4), np.float32)

    X = da.map_blocks(chunk, chunks=((10,) * 4, (4,)), dtype=np.float32, meta=np.empty((0, 0), np.float32))
    with pytest.raises(ValueError, match="chunk at row 20 is broken"):
        gd.predict(gpufc.FullyConnectedLayer(4, 2, seed=0), X).compute()


def test_bad_inputs_name_the_argument_and_the_shapes():
    x, w, b = _data(20, 6, 3)
    X = da.from_array(x, chunks=(5, 6))
    with pytest.raises(TypeError, match=r"X must be a dask.array.Array.*numpy.ndarray"):
        gd.linear(x, w, b)
    with pytest.raises(TypeError, match="X must be a dask.array.Array"):
        gd.predict(gpufc.FullyConnectedLayer(6, 3), x)
    with pytest.raises(TypeError, match="X must be a dask.array.Array"):
        gd.dropout(x, 0.5)
    with pytest.raises(ValueError, match=r"X must have shape \(rows, 5\).*weights.shape=\(5, 3\).*X.shape=\(20, 6\)"):
        gd.linear(X, w[:5], b)
    with pytest.raises(ValueError, match=r"model\[1\] takes 4 inputs.*previous layer's output has 3 columns"):
        gd.predict(gpufc.Sequential(gpufc.FullyConnectedLayer(6, 3), gpufc.FullyConnectedLayer(4, 2)), X)
    with pytest.raises(ValueError, match=r"model takes 7 inputs.*X has 6 columns \(X.shape=\(20, 6\)\)"):
        gd.predict(gpufc.FullyConnectedLayer(7, 2), X)
    with pytest.raises(TypeError, match="X.dtype=float32 and weights.dtype=float64"):
        gd.linear(X, w.astype(np.float64), b)
    with pytest.raises(TypeError, match="X.dtype=float32 and biases.dtype=float64"):
        gd.linear(X, w, b.astype(np.float64))
    with pytest.raises(TypeError, match=r"X.dtype=float64 does not match model\[0\]'s dtype float32"):
        gd.predict(gpufc.Sequential(gpufc.FullyConnectedLayer(6, 3)), X.astype(np.float64))
    with pytest.raises(ValueError, match=r"biases must have shape \(3,\)"):
        gd.linear(X, w, b[:2])
    with pytest.raises(TypeError, match="weights must be a NumPy or CuPy array.*dask array"):
        gd.linear(X, da.from_array(w), b)
    with pytest.raises(TypeError, match="model must be a gpufc Module"):
        gd.predict(lambda v: v, X)
    with pytest.raises(ValueError, match=r"X must have shape \(rows, 6\).*X.shape=\(6,\)"):
        gd.linear(da.from_array(w[:, 0]), w, b)
    with pytest.raises(ValueError, match="activation must be one of"):
        gd.linear(X, w, b, activation="swish")
    with pytest.raises(ValueError, match="p must be a finite number"):
        gd.dropout(X, 1.5)
    with pytest.raises(TypeError, match="floating-point.*int64"):
        gd.dropout(da.ones((4, 4), dtype=np.int64, chunks=2), 0.5)
    wide = da.ones((4, 4096), dtype=np.float64, chunks=(2, 1024))  # one row: 32 KiB
    with dask.config.set({"array.chunk-size": "16KiB"}), pytest.raises(
        ValueError, match=r"X has shape \(4, 4096\).*one row is 4096 elements.*cannot be merged"
    ):
        gd.dropout(wide, 0.5)
    unknown = X[X[:, 0] > 0]  # row chunk sizes unknown until computed
    with pytest.raises(ValueError, match="unknown row chunk sizes.*compute_chunk_sizes"):
        gd.linear(unknown, w, b, dropout_p=0.5)
    assert gd.linear(unknown, w, b).shape[1] == 3  # no dropout: no offsets, nothing to know


@pytest.mark.gpu
@requires_gpu
def test_cupy_chunks_on_a_local_cuda_cluster():
    """On a lent GPU: one dask-cuda worker, CuPy chunks in and out, equal to the eager cuda call per chunk."""
    cp = pytest.importorskip("cupy")
    dask_cuda = pytest.importorskip("dask_cuda")
    x, w, b = _data(4096, 256, 64)
    X = da.from_array(cp.asarray(x), chunks=(1000, 256))
    with (
        dask_cuda.LocalCUDACluster(n_workers=1, env={"GPUFC_BACKEND": "cuda"}, silence_logs=logging.ERROR) as cl,
        distributed.Client(cl),
    ):
        y = gd.linear(X, w, b, activation="relu", dropout_p=0.2, seed=3)
        assert type(y._meta).__module__.startswith("cupy")
        got = y.compute()
    assert type(got).__module__.startswith("cupy")
    starts = _row_starts(X.chunks[0])
    want = [gpufc.linear(cp.asarray(x[s:s + c]), cp.asarray(w), cp.asarray(b), activation="relu", dropout_p=0.2,
                         seed=3, offset=s * 64) for s, c in zip(starts, X.chunks[0])]
    assert bool((got == cp.concatenate(want)).all())
