"""First benchmark: version-1 linear (matmul + bias) and dropout against CuPy, on a GPU.

Validates against gpufc.reference first, warms up, times with CUDA events
(median of 20, p20/p80), and prints TFLOP/s or GB/s with the ratio to the
peer measured in the same run. TF32 is off for CuPy (CUPY_TF32=0 is its default).
"""

import argparse
import csv
import sys

import numpy as np


def timeit(fn, cp, reps=20):
    for _ in range(3):
        fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3)
    return np.percentile(times, [50, 20, 80])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench_v1.csv")
    args = ap.parse_args(argv)
    import cupy as cp

    import gpufc
    from gpufc import reference as ref

    info = gpufc.backend_info()
    if info["backend"] != "cuda":
        sys.exit(f"needs the cuda backend, got {info['backend']}")
    gpu = info["device"]
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096)):
        x = cp.asarray(rng.standard_normal((m, k), dtype=np.float32))
        w = cp.asarray(rng.standard_normal((k, n), dtype=np.float32))
        b = cp.asarray(rng.standard_normal(n, dtype=np.float32))
        y = gpufc.linear(x, w, b)
        want = cp.asnumpy(x[:64]).astype(np.float64) @ cp.asnumpy(w).astype(np.float64) + cp.asnumpy(b)
        err = np.abs(cp.asnumpy(y[:64]) - want).max() / np.abs(want).max()
        assert err < 1e-4, f"gpufc v1 wrong at {m}x{k}x{n}: rel err {err}"
        flops = 2 * m * n * k
        t_g = timeit(lambda: gpufc.linear(x, w, b), cp)
        t_c = timeit(lambda: x @ w + b, cp)
        rows.append(dict(op="linear_fwd", shape=f"{m}x{k}x{n}", impl="gpufc_v1", median_s=t_g[0], p20_s=t_g[1],
                         p80_s=t_g[2], rate=flops / t_g[0] / 1e12, unit="TFLOP/s", ratio_vs_peer=t_c[0] / t_g[0], gpu=gpu))
        rows.append(dict(op="linear_fwd", shape=f"{m}x{k}x{n}", impl="cupy(x@w+b)", median_s=t_c[0], p20_s=t_c[1],
                         p80_s=t_c[2], rate=flops / t_c[0] / 1e12, unit="TFLOP/s", ratio_vs_peer=1.0, gpu=gpu))
    for n in (1 << 24, 1 << 26):
        x = cp.asarray(rng.standard_normal(n, dtype=np.float32))
        y = gpufc.dropout(x, 0.1, seed=1)
        assert np.array_equal(cp.asnumpy(y[:4096]), ref.dropout(cp.asnumpy(x[:4096]), 0.1, seed=1))
        nbytes = 2 * 4 * n
        t_g = timeit(lambda: gpufc.dropout(x, 0.1, seed=1), cp)
        t_c = timeit(lambda: x.copy(), cp)
        rows.append(dict(op="dropout_fwd", shape=str(n), impl="gpufc_v1", median_s=t_g[0], p20_s=t_g[1], p80_s=t_g[2],
                         rate=nbytes / t_g[0] / 1e9, unit="GB/s", ratio_vs_peer=t_c[0] / t_g[0], gpu=gpu))
        rows.append(dict(op="dropout_fwd", shape=str(n), impl="cupy copy", median_s=t_c[0], p20_s=t_c[1], p80_s=t_c[2],
                         rate=nbytes / t_c[0] / 1e9, unit="GB/s", ratio_vs_peer=1.0, gpu=gpu))
    with open(args.out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"GPU: {gpu} | numba-cuda {info['numba_cuda']} | cupy {info['cupy']}")
    print(f"{'op':12s} {'shape':16s} {'impl':14s} {'median ms':>10s} {'rate':>10s}      {'x peer':>7s}")
    for r in rows:
        print(f"{r['op']:12s} {r['shape']:16s} {r['impl']:14s} {r['median_s']*1e3:10.3f} {r['rate']:10.2f} {r['unit']:7s} {r['ratio_vs_peer']:6.2f}")


if __name__ == "__main__":
    main()
