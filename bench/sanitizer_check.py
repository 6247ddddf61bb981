"""One small, ragged launch of every gpufc kernel family, checked against gpufc.reference.

Written to run under compute-sanitizer (memcheck, racecheck, initcheck,
synccheck) from bench/gpu_check.sh: shapes are a few tiles with ragged edges
so every guarded load and store runs, one launch per kernel specialisation,
because the sanitizer slows every launch and Numba compiles each
specialisation on first use. Exits 1 when any output disagrees with the
reference, 2 when no GPU backend is available.

    compute-sanitizer --tool memcheck python3 bench/sanitizer_check.py
"""

import argparse
import os
import sys
import time

import common  # noqa: F401  (puts the source tree first on sys.path)
import numpy as np

os.environ.setdefault("GPUFC_BACKEND", "cuda")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-configs", type=int, default=8, help="fast matmul configurations to launch (largest first)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no new check after this many seconds, so the sanitizer still prints its summary")
    ap.add_argument("--plant-oob", action="store_true",
                    help="positive control: launch only a kernel that writes out of bounds (memcheck must report it)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    from gpufc.runtime import backend

    if backend.get_backend() not in ("cuda", "sim"):
        print(f"sanitizer_check: needs the cuda (or sim) backend, got {backend.get_backend()!r}")
        return 2
    # Touch the device first: the sanitizer waits for the process's first CUDA call.
    backend.numba_cuda().current_context()

    if args.plant_oob:
        return plant_oob()

    import gpufc
    from gpufc import reference as ref
    from gpufc.tools import bench as B
    from gpufc.tools.bench import suite as S

    k = backend.kernels()
    rng = np.random.default_rng(7)
    results = []
    skipped = []

    def data(*shape, dtype=np.float32):
        return rng.standard_normal(shape).astype(dtype)

    def check(name, thunk, k_len=1, dtype=np.float32, exact=False):
        """Run ``thunk() -> (got, want)`` and compare; an exception counts as a failure, the rest still run."""
        if args.deadline_s is not None and time.perf_counter() - t_start > args.deadline_s:
            skipped.append(name)
            print(f"skip {name}: past the {args.deadline_s:.0f} s deadline", flush=True)
            return
        try:
            got, want = thunk()
            got = B.to_host(got)
            if exact:
                ok = got.shape == want.shape and np.array_equal(got, want)
                detail = "bit-exact" if ok else f"{int((got != want).sum())} elements differ"
            else:
                err = B.rel_err(got, want)
                tol = B.tolerance(dtype, k_len)
                ok = err <= tol
                detail = f"rel err {err:.1e} (tol {tol:.1e})"
        except Exception as err:  # noqa: BLE001
            ok, detail = False, f"{type(err).__name__}: {str(err)[:300]}"
        results.append(ok)
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

    def f64(*arrays):
        return [a.astype(np.float64) for a in arrays]

    # Forward through the public API (the configuration gpufc picks), plain and with the full epilogue.
    x, w, b = data(70, 37), data(37, 67), data(67)
    check("linear 70x37x67 +bias (default config)", lambda: (gpufc.linear(x, w, b), ref.linear(*f64(x, w, b))), 37)
    x2, w2, b2 = data(45, 33), data(33, 29), data(29)
    kw = {"activation": "gelu", "dropout_p": 0.3, "seed": 11, "offset": 6}
    fwd = {}

    def forward():
        fwd["y"], fwd["z"] = gpufc.linear_forward(x2, w2, b2, save_preact=True, **kw)
        return fwd["y"], ref.linear(*f64(x2, w2, b2), **kw)

    check("linear 45x33x29 gelu+dropout (offset 6)", forward, 33)
    check("linear 45x33x29 saved pre-activation", lambda: (fwd["z"], ref.linear(*f64(x2, w2, b2))), 33)

    # Every matmul configuration, forced, on a shape ragged against each tile.
    configs = [k.linear.V1] + S.matmul_configs(k)[: args.max_configs]
    want = ref.linear(*f64(x, w, b), activation="relu", dropout_p=0.25, seed=5, offset=8)
    for cfg in configs:
        check(f"matmul {S.config_name(cfg)} 70x37x67 relu+dropout",
              lambda cfg=cfg: (S.kernel_linear(x, w, b, config=cfg, activation="relu", dropout_p=0.25, seed=5,
                                               offset=8), want), 37)

    # Backward: the transposed products, the bias reduction, the fused act/dropout gradient.
    x3, w3, b3, g3 = data(37, 21), data(21, 29), data(29), data(37, 29)
    kw3 = {"activation": "relu", "dropout_p": 0.2, "seed": 3, "offset": 4}
    bwd = {}

    def backward(i):
        if not bwd:
            _, z = gpufc.linear_forward(x3, w3, b3, save_preact=True, **kw3)
            bwd["got"] = gpufc.linear_backward(x3, w3, g3, z, biases=b3, **kw3)
            bwd["want"] = ref.linear_backward(*f64(x3, w3, g3, B.to_host(z)), **kw3)
        return bwd["got"][i], bwd["want"][i]

    for i, (name, k_len) in enumerate((("grad_x", 29), ("grad_w", 37), ("grad_b", 37))):
        check(f"linear_backward 37x21x29 relu+dropout {name}", lambda i=i: backward(i), k_len)

    # Dropout: unaligned offset and odd size (scalar path), aligned (vector path), backward, version 1.
    for n, offset in ((4099, 3), (4096, 8)):
        xd = data(n)
        check(f"dropout n={n} offset={offset}",
              lambda xd=xd, offset=offset: (gpufc.dropout(xd, 0.3, seed=9, offset=offset),
                                           ref.dropout(xd, 0.3, seed=9, offset=offset)), exact=True)
    gd = data(1031)
    check("dropout_backward n=1031", lambda: (gpufc.dropout_backward(gd, 0.5, seed=2, offset=1),
                                              ref.dropout_backward(gd, 0.5, seed=2, offset=1)), exact=True)
    _, forceable = S.dropout_version(k)
    if forceable:
        xv = data(2053)
        check("dropout version 1 n=2053", lambda: (S.kernel_dropout(xv, 0.4, seed=1, offset=5, version=1),
                                                   ref.dropout(xv, 0.4, seed=1, offset=5)), exact=True)

    # float64: its own specialisations.
    x6, w6, b6 = data(19, 23, dtype=np.float64), data(23, 17, dtype=np.float64), data(17, dtype=np.float64)
    check("linear float64 19x23x17", lambda: (gpufc.linear(x6, w6, b6), ref.linear(x6, w6, b6)), 23, np.float64)

    # Tensor cores (compute capability 8.0+): the cp.async path (leading dimensions multiples of 16
    # bytes), the element-by-element path (ragged K), and the backward, in TF32, float16 and bfloat16.
    cuda = backend.numba_cuda()
    if backend.get_backend() == "sim" or tuple(cuda.get_current_device().compute_capability) >= (8, 0):
        formats = [("tf32", np.float32, "tf32"), ("float16", np.float16, "ieee")]
        if ref.bfloat16_dtype() is not None:
            formats.append(("bfloat16", ref.bfloat16_dtype(), "ieee"))
        for fname, dt, prec in formats:
            # TF32 operands are rounded alike in the model: a float32 tolerance; 16-bit outputs: float16's
            tol_dt = np.float32 if prec == "tf32" else np.float16
            for m, kk, n in ((45, 40, 24), (37, 21, 29)):
                xt, wt, bt = data(m, kk).astype(dt), data(kk, n).astype(dt), data(n).astype(dt)
                check(f"linear {fname} {m}x{kk}x{n} gelu+dropout",
                      lambda xt=xt, wt=wt, bt=bt, prec=prec: (
                          np.asarray(B.to_host(gpufc.linear(xt, wt, bt, precision=prec, **kw)), np.float64),
                          ref.linear(xt, wt, bt, precision=prec, **kw).astype(np.float64)), kk, tol_dt)
            gt = data(37, 29).astype(dt)
            xt, wt = data(37, 21).astype(dt), data(21, 29).astype(dt)
            for i, name in enumerate(("grad_x", "grad_w", "grad_b")):
                check(f"linear_backward {fname} 37x21x29 {name}",
                      lambda i=i, xt=xt, wt=wt, gt=gt, prec=prec: (
                          np.asarray(B.to_host(gpufc.linear_backward(xt, wt, gt, precision=prec)[i]), np.float64),
                          ref.linear_backward(xt, wt, gt, precision=prec)[i].astype(np.float64)), 37, tol_dt)

    cuda.synchronize()
    bad = results.count(False)
    print(f"sanitizer_check: {len(results) - bad} ok, {bad} failed, {len(skipped)} not run (deadline), "
          f"{time.perf_counter() - t_start:.1f} s")
    return 1 if bad else 0


cuda = None  # numba.cuda, bound by plant_oob once the backend is settled


def _write_past_end(a):
    # a is (4,), launched with 64 threads: the missing bounds check is the point.
    a[cuda.threadIdx.x] = 1.0


def plant_oob() -> int:
    """Write past the end of a 4-element device array: memcheck must count errors here, which
    shows that its "0 errors" on the real kernels covers Numba-compiled code."""
    global cuda
    from gpufc.runtime import backend

    cuda = backend.numba_cuda()
    kernel = cuda.jit("void(float32[::1])")(_write_past_end)
    a = cuda.device_array(4, dtype=np.float32)
    try:
        kernel[1, 64](a)
        cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - memcheck (or the simulator) turns the fault into an error
        print(f"planted out-of-bounds write raised {type(err).__name__}")
    print("sanitizer_check: planted out-of-bounds write launched (memcheck should report errors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
