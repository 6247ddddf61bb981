"""Stream a dataset larger than any worker's memory through a trained gpufc model with Dask.

    python bench/dask_predict.py

1. Trains a small MLP (64 -> 128 -> 10, relu, dropout) on synthetic data in this
   process, on the cpu backend (a few seconds).
2. Starts a ``distributed.LocalCluster`` of 2 worker processes limited to
   256 MiB each, on the cpu backend (``GPUFC_BACKEND=cpu`` through the nanny's
   ``env=``), and prints the dashboard link.
3. Builds a lazy 512 MiB Dask array of rows from the same 10-class mixture
   (generated chunk by chunk on the workers, never whole anywhere), runs
   ``gpufc.dask.predict`` over it and reduces it to predicted-class counts and
   the accuracy against the known labels.
4. Times the same rows through the model in this process, chunk after chunk,
   beside the cluster's rate.

With a GPU and ``dask_cuda`` installed (``GPUFC_DASK_GPU=1``), step 2 starts a
``dask_cuda.LocalCUDACluster`` (one worker per GPU, the cuda backend) and the
chunks are CuPy arrays generated on the GPU. Not run on a GPU yet: no figure
from this script has been measured on one. Sizes: ``GPUFC_DASK_ROWS`` (default
2Mi rows of 64 float32 = 512 MiB, twice a worker's limit).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import gpufc

FEATURES, CLASSES, HIDDEN = 64, 10, 128
ROWS = int(os.environ.get("GPUFC_DASK_ROWS", str(2 * 2**20)))
# 8 MiB of input rows per chunk: a task also holds the 128-wide hidden layer (16 MiB) and its activation
CHUNK_ROWS = 32 * 2**10
WORKER_MEMORY = "256MiB"
NOISE = 2.0
GPU = os.environ.get("GPUFC_DASK_GPU", "0") == "1"
TRAIN_ROWS, EPOCHS = 10000, 2


def mixture_chunk(centers, xp_name="numpy", block_info=None):
    """Rows r0..r1 of the dataset: row r belongs to class (r * 7919) % C; its center plus Gaussian noise."""
    xp = np if xp_name == "numpy" else __import__(xp_name)
    (r0, r1), _ = block_info[None]["array-location"]
    labels = xp.asarray(mixture_labels(r0, r1))
    rng = xp.random.default_rng(r0)
    x = rng.standard_normal((r1 - r0, centers.shape[1]), dtype=xp.float32)
    x *= xp.float32(NOISE)
    x += xp.asarray(centers)[labels]
    return x


def mixture_labels(r0, r1):
    return (np.arange(r0, r1, dtype=np.int64) * 7919) % CLASSES


def to_host(block):
    return block.get()


def label_chunk(block_info=None):
    (r0, r1), = block_info[None]["array-location"]
    return mixture_labels(r0, r1)


def train(centers):
    """A small MLP fitted in this process on 10k rows of the mixture (cpu backend: seconds)."""
    previous = gpufc.set_backend("cpu")
    try:
        x = mixture_chunk(centers, block_info={None: {"array-location": [(0, TRAIN_ROWS), (0, FEATURES)]}})
        y = mixture_labels(0, TRAIN_ROWS)
        model = gpufc.Sequential(
            gpufc.FullyConnectedLayer(FEATURES, HIDDEN, activation="relu", dropout_rate=0.1, seed=0),
            gpufc.FullyConnectedLayer(HIDDEN, CLASSES, seed=1),
        )
        opt = gpufc.Adam(model, lr=2e-3)
        for _epoch in range(EPOCHS):
            for i in range(0, len(y), 256):
                _, grad = gpufc.softmax_cross_entropy(model.forward(x[i:i + 256]), y[i:i + 256])
                model.backward(grad)
                opt.step()
        return model.eval()
    finally:
        gpufc.set_backend(previous)


def cluster():
    import distributed

    if GPU:
        import dask_cuda

        return dask_cuda.LocalCUDACluster(env={"GPUFC_BACKEND": "cuda"}, silence_logs=logging.ERROR)
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=WORKER_MEMORY,
                                    env={"GPUFC_BACKEND": "cpu"}, silence_logs=logging.ERROR)


def main():
    import dask.array as da
    import distributed

    import gpufc.dask

    centers = (np.random.default_rng(0).standard_normal((CLASSES, FEATURES)) * 0.6).astype(np.float32)
    t0 = time.perf_counter()
    model = train(centers)
    print(f"trained {model!r} in {time.perf_counter() - t0:.1f} s (cpu backend, {EPOCHS} epochs of {TRAIN_ROWS} rows)")

    xp_name = "cupy" if GPU else "numpy"
    meta = np.empty((0, 0), np.float32)
    if GPU:
        import cupy

        meta = cupy.empty((0, 0), cupy.float32)
    chunks = tuple(min(CHUNK_ROWS, ROWS - r) for r in range(0, ROWS, CHUNK_ROWS))
    X = da.map_blocks(mixture_chunk, centers, xp_name, chunks=(chunks, (FEATURES,)), dtype=np.float32, meta=meta)
    labels = da.map_blocks(label_chunk, chunks=(chunks,), dtype=np.int64)
    print(f"dataset: {X.shape} {X.dtype}, {X.nbytes / 2**30:.2f} GiB in {X.numblocks[0]} chunks of "
          f"{CHUNK_ROWS} rows, generated on the workers")

    with cluster() as cl, distributed.Client(cl) as client:
        info = client.run(gpufc.backend_info)
        limits = {w["memory_limit"] for w in client.scheduler_info()["workers"].values()}
        print(f"dashboard: {client.dashboard_link}"
              + ("" if _has_bokeh() else "  (install bokeh to serve it: pip install 'bokeh>=3.1')"))
        print(f"workers: {len(info)}, memory limit each: {', '.join(f'{m / 2**20:.0f} MiB' for m in limits)}, "
              f"backend: {sorted({i['backend'] for i in info.values()})}, "
              f"device: {sorted({str(i['device']) for i in info.values()})}")
        predicted = gpufc.dask.predict(model, X).argmax(axis=1)
        if GPU:  # class indices back to the host: 8 bytes a row
            predicted = predicted.map_blocks(to_host, dtype=np.int64, meta=np.empty((0,), np.int64))
        counts = da.bincount(predicted, minlength=CLASSES)
        correct = (predicted == labels).sum()
        t0 = time.perf_counter()
        counts, correct = da.compute(counts, correct)
        seconds = time.perf_counter() - t0
    counts = [int(c) for c in counts]
    truth = np.bincount(mixture_labels(0, ROWS), minlength=CLASSES).tolist()
    print(f"predicted-class counts: {counts}")
    print(f"true class counts:      {truth}")
    print(f"accuracy: {int(correct) / ROWS:.4f}; cluster: {ROWS / seconds:,.0f} rows/s "
          f"({seconds:.1f} s, generation included)")
    in_process(model, centers, chunks, xp_name)


def in_process(model, centers, chunks, xp_name):
    """The same rows through the same model in this process, chunk after chunk, generation included."""
    backend = "cuda" if GPU else "cpu"
    previous = gpufc.set_backend(backend)
    try:
        if GPU:
            model = model.to("cuda")
        t0, r0 = time.perf_counter(), 0
        for c in chunks:
            x = mixture_chunk(centers, xp_name, block_info={None: {"array-location": [(r0, r0 + c), (0, FEATURES)]}})
            model.forward(x).argmax(axis=1)
            r0 += c
        if GPU:
            import cupy

            cupy.cuda.runtime.deviceSynchronize()
        seconds = time.perf_counter() - t0
    finally:
        gpufc.set_backend(previous)
    print(f"in-process ({backend} backend, one thread): {r0 / seconds:,.0f} rows/s ({seconds:.1f} s)")


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
