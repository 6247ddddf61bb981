"""The benchmark suite: per op and shape, gpufc and its peers, validated then timed."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import sys
import time

import numpy as np

from .environment import environment
from .measure import (
    CudaTimer,
    HostTimer,
    Row,
    add_speedups,
    dropout_like_check,
    quantiles,
    rel_err,
    row_blocks,
    to_host,
    tolerance,
)

OPS = ("linear", "fused", "dropout", "overhead", "backward", "configs")
SEED = 1234
DROP_P = 0.1  # the fused and standalone dropout rate
DROP_OFFSET = 4096  # a multiple of 4, as every layer's offset is (the mask contract's offset rule, docs/architecture.md)

# (M, K, N) by family. MLP shapes: batch 256-16384 by 1024-4096 features.
SQUARES = (1024, 2048, 4096, 8192)
MLP = ((256, 1024, 1024), (256, 4096, 4096), (2048, 1024, 4096), (2048, 4096, 1024),
       (16384, 1024, 4096), (16384, 4096, 1024))
SMALL = ((64, 512, 512), (8, 1024, 1024), (256, 256, 256))


def _sq(sizes):
    return [("square", (s, s, s)) for s in sizes]


def plan(backend: str, quick: bool) -> dict:
    """Shapes per op for ``backend``: (family, (M, K, N)) for the linear ops, element counts for dropout."""
    if backend == "cuda" and not quick:
        return {
            "linear": _sq(SQUARES) + [("mlp", s) for s in MLP] + [("small", s) for s in SMALL],
            "fused": _sq(SQUARES) + [("mlp", MLP[2]), ("mlp", MLP[5]), ("small", SMALL[0])],
            "dropout": [1 << 20, 1 << 24, 1 << 26, 1 << 28],
            "overhead": [(64, 512, 512)],
            "backward": _sq((1024, 4096)) + [("mlp", MLP[4]), ("small", SMALL[0])],
            "configs": [("square", (4096, 4096, 4096)), ("square", (8192, 8192, 8192)), ("mlp", MLP[3])],
        }
    if backend == "cuda":
        return {
            "linear": _sq((1024, 2048)) + [("mlp", MLP[2]), ("small", SMALL[0])],
            "fused": _sq((1024,)) + [("small", SMALL[0])],
            "dropout": [1 << 20, 1 << 24],
            "overhead": [(64, 512, 512)],
            "backward": _sq((1024,)) + [("small", SMALL[0])],
            "configs": [("square", (1024, 1024, 1024))],
        }
    if backend == "cpu" and not quick:
        return {
            "linear": _sq((256, 512, 1024)) + [("mlp", (256, 1024, 1024)), ("small", SMALL[0])],
            "fused": _sq((256, 512)) + [("small", SMALL[0])],
            "dropout": [1 << 16, 1 << 20],
            "overhead": [(64, 512, 512)],
            "backward": _sq((256, 512)) + [("small", SMALL[0])],
            "configs": [],
        }
    if backend == "cpu":
        return {
            "linear": [("small", (64, 128, 96)), ("square", (256, 256, 256))],
            "fused": [("small", (64, 128, 96))],
            "dropout": [1 << 14],
            "overhead": [(64, 128, 96)],
            "backward": [("small", (64, 128, 96))],
            "configs": [],
        }
    # sim: every CUDA thread runs in Python; a few ragged tiles only.
    return {
        "linear": [("small", (33, 19, 18))],
        "fused": [("small", (33, 19, 18))],
        "dropout": [1000],
        "overhead": [(8, 16, 16)],
        "backward": [("small", (17, 9, 13))],
        "configs": [] if quick else [("small", (33, 19, 18))],
    }


def _kernel_attr(k, name):
    """``name`` from gpufc.kernels.linear (e.g. CONFIGS, choose_config), None where this tree lacks it."""
    return getattr(k.linear, name, None)


def matmul_configs(k) -> list:
    """The fast matmul configurations (empty when only version 1 exists)."""
    configs = _kernel_attr(k, "CONFIGS")
    return list(configs) if configs else []


def config_name(cfg) -> str:
    return str(getattr(cfg, "name", cfg))


def chosen_config(k, m: int, n: int, kk: int, dtype) -> str:
    """The name of the configuration gpufc picks for this shape, or "default" when it cannot be asked."""
    choose = _kernel_attr(k, "choose_config")
    if choose is None:
        return config_name(k.linear.V1)
    values = {"m": m, "n": n, "k": kk, "dtype": np.dtype(dtype), "trans_a": False, "trans_b": False}
    try:
        params = inspect.signature(choose).parameters
        kwargs = {name: values[name.lower()] for name in params if name.lower() in values}
        return config_name(choose(**kwargs))
    except Exception:  # noqa: BLE001
        return "default"


def dropout_version(k) -> tuple[int | None, bool]:
    """(the dropout version gpufc's host API runs, whether ``version=1`` can be forced)."""
    version = getattr(k.dropout, "VERSION", None)
    return version, version not in (None, 1)


def kernel_linear(x, w, b, *, config, activation=None, dropout_p=0.0, seed=0, offset=0):
    """:func:`gpufc.linear` with the matmul configuration forced through its ``config=`` keyword."""
    import gpufc

    return gpufc.linear(x, w, b, activation=activation, dropout_p=dropout_p, seed=seed, offset=offset,
                        config=config_name(config))


def kernel_dropout(x, p, *, seed, offset, version):
    """:func:`gpufc.dropout` with the kernel version forced: the same steps, the version's launch plan."""
    from gpufc import functional as F
    from gpufc.runtime import backend as _backend
    from gpufc.runtime import transfer as _tx

    kd = _backend.kernels().dropout
    xo = _tx.operand(x, "x")
    drop = F.Dropout.make(p, seed, offset, True)
    with _tx.stream_scope(None) as s:
        xv, _keep = _tx.device_view(xo, (xo.size,))
        yv, yh = _tx.empty(xo.shape, xo.dtype)
        if version == 1:
            plan = kd.dropout_plan(xo.size, xo.dtype, 1, False, 0, None, kd.THREADS, s.device, s.stream)
            plan(xv, yv, *drop.words(xo.dtype))
        else:
            F._dropout_into(xv, yv, xo.size, xo.dtype, drop, s)
    return _tx.to_caller(yh, xo)


@dataclasses.dataclass
class Impl:
    """One implementation of a group: ``fn()`` runs it once and returns its output."""

    name: str
    config: str
    fn: object
    host: bool = False  # timed on the host (NumPy peer), not with CUDA events
    own_mask: bool = False  # draws its own dropout mask (peers): validated statistically


class Stopped(BaseException):
    """SIGTERM (e.g. from ``timeout``): stop measuring, keep what was measured."""


def _raise_stopped(signum, frame):
    raise Stopped(f"signal {signum}")


class Suite:
    """Runs the ops of :func:`plan` on the active backend and collects :class:`Row` entries."""

    def __init__(self, backend: str, *, quick: bool, dtype=np.float32, budget_s: float | None = None,
                 log=None, progress=None):
        import gpufc

        self.gpufc = gpufc
        self.backend = backend
        self.quick = quick
        self.dtype = np.dtype(dtype)
        self.deadline = time.monotonic() + budget_s if budget_s else math.inf
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.progress = progress
        self.rows: list[Row] = []
        self.skipped: list[str] = []
        self.cp = self.torch = None
        self.k = None
        if backend == "cuda":
            self.cp = _import_cupy()
            self.torch = _import_torch(self.log)
        if backend in ("cuda", "sim"):
            from gpufc.runtime import backend as _backend

            self.k = _backend.kernels()
        self.env = environment(backend, self.cp, self.torch)
        self.env["tf32"] = _tf32_statement(self.torch)
        if self.cp is not None:
            self.timer = CudaTimer(self.cp, self.env.get("l2_bytes"))
            self.env["timer"] = f"CUDA events; L2 flush of {2 * (self.env.get('l2_bytes') or 0) >> 20} MiB; " \
                                + self.timer.spin_note
        else:
            self.timer = HostTimer()
        self.host_timer = HostTimer()
        self.fast_configs = matmul_configs(self.k) if self.k is not None else []
        self.drop_default, self.drop_v1 = dropout_version(self.k) if self.k is not None else (None, False)

    # -- arrays ---------------------------------------------------------------

    def randn(self, shape, seed, scale=1.0):
        if self.cp is not None:
            rs = self.cp.random.RandomState(seed)
            return rs.standard_normal(shape, dtype=self.dtype) * self.dtype.type(scale)
        rng = np.random.default_rng(seed)
        return (rng.standard_normal(shape, dtype=np.float64) * scale).astype(self.dtype)

    def free(self):
        if self.cp is not None:
            self.cp.get_default_memory_pool().free_all_blocks()
        if self.torch is not None:
            self.torch.cuda.empty_cache()

    def torch_view(self, a):
        return self.torch.from_dlpack(a)

    # -- measuring one implementation ----------------------------------------

    def _reps(self, est_s: float) -> int:
        if self.backend == "sim":
            return 1
        target = 0.05 if self.quick else 0.2
        lo = 3 if est_s > 0.05 else 5
        hi = 20 if self.quick else 100
        return int(min(hi, max(lo, target / max(est_s, 1e-7))))

    def time_impl(self, impl: Impl, row: Row, validate) -> Row | None:
        """Validate, warm up, time ``impl``; returns the row (with a note on failure), None if out of time."""
        label = f"{row.op} {row.shape} {impl.name}"
        if time.monotonic() > self.deadline:
            self.skipped.append(label)
            return None
        timer = self.host_timer if impl.host else self.timer
        try:
            t0 = time.perf_counter()
            out = impl.fn()
            timer.sync()
            row.first_call_s = time.perf_counter() - t0
            row.check, row.rel_err, row.ok = validate(impl, out)
            del out
            if self.backend == "sim":
                est = row.first_call_s
            else:
                t0 = time.perf_counter()
                impl.fn()
                timer.sync()
                est = time.perf_counter() - t0
            if impl.host:
                row.host_s = None
            elif est > 20e-3:  # a long call hides any host overhead; don't spend calls measuring it
                row.host_s = 1e-3
            else:
                row.host_s = timer.host_overhead(impl.fn)
            times = timer.measure(impl.fn, self._reps(est), row.host_s or 0.0)
        except Exception as err:  # noqa: BLE001 - one broken implementation must not end a one-shot run
            row.ok = False
            row.note = f"error: {type(err).__name__}: {str(err)[:300]}"
            self.log(f"  {label}: {row.note}")
            self.rows.append(row)
            return row
        row.median_s, row.p20_s, row.p80_s = quantiles(times)
        row.reps = len(times)
        row.rate = row.work / row.median_s / _UNIT_SCALE[row.unit]
        self.rows.append(row)
        flag = "ok" if row.ok else "VALIDATION FAILED"
        self.log(f"  {label:52s} {row.median_s * 1e3:10.4f} ms  [{row.p20_s * 1e3:.4f}, {row.p80_s * 1e3:.4f}]  "
                 f"{row.rate:9.2f} {row.unit:8s} {flag}")
        return row

    def _tick(self, what: str):
        if self.progress is not None:
            self.progress(what)

    # -- ops -----------------------------------------------------------------

    def run(self, ops) -> list[Row]:
        shapes = plan(self.backend, self.quick)
        for op in ops:
            if op not in OPS:
                raise ValueError(f"ops must be among {OPS}, got {op!r}")
        if self.cp is not None:
            self.measure_copy_bandwidth()
        for op in ops:
            runner = getattr(self, f"op_{op}")
            for item in shapes[op]:
                self._tick(f"{op} {item}")
                if time.monotonic() > self.deadline:
                    self.skipped.append(f"{op} {item}: time budget")
                    continue
                try:
                    runner(item)
                except Exception as err:  # noqa: BLE001 - e.g. out of memory: note it, go on with the next shape
                    self.log(f"  {op} {item}: skipped: {type(err).__name__}: {str(err)[:300]}")
                    self.skipped.append(f"{op} {item}: {type(err).__name__}")
                finally:
                    self.free()
        add_speedups(self.rows)
        copies = [r.rate for r in self.rows if r.impl == "copy" and r.rate]
        if copies:
            self.env["copy_GBps"] = max([self.env.get("copy_GBps") or 0.0] + copies)
        return self.rows

    def measure_copy_bandwidth(self, nbytes: int = 1 << 30):
        """The bandwidth ceiling: a device-to-device copy, counting bytes read plus written."""
        cp = self.cp
        src = cp.empty(nbytes // 4, dtype=cp.float32)
        src.fill(1)
        dst = cp.empty_like(src)

        def fn():
            dst.data.copy_from_device_async(src.data, src.nbytes)

        fn()
        times = self.timer.measure(fn, 10 if self.quick else 20, 0.0)
        med = quantiles(times)[0]
        self.env["copy_GBps"] = 2 * nbytes / med / 1e9
        self.env["copy_bytes"] = nbytes
        self.log(f"device-to-device copy of {nbytes >> 20} MiB: {self.env['copy_GBps']:.0f} GB/s (read + write)")

    def _linear_inputs(self, m, kk, n, seed):
        x = self.randn((m, kk), seed)
        w = self.randn((kk, n), seed + 1, 1.0 / math.sqrt(kk))
        b = self.randn((n,), seed + 2)
        return x, w, b

    def _linear_reference(self, x, w, b, m, n, activation, p):
        """Float64 reference rows: ``{(r0, r1): (with dropout, before dropout)}``."""
        from gpufc import reference as ref

        w64, b64 = to_host(w).astype(np.float64), to_host(b).astype(np.float64)
        out = {}
        for r0, r1 in row_blocks(m):
            x64 = to_host(x[r0:r1]).astype(np.float64)
            pre = ref.linear(x64, w64, b64, activation=activation)
            post = ref.linear(x64, w64, b64, activation=activation, dropout_p=p, seed=SEED,
                              offset=DROP_OFFSET + r0 * n) if p > 0 else pre
            out[(r0, r1)] = (post, pre)
        return out

    def _linear_validator(self, refs, kk, p):
        from gpufc import reference as ref

        tol = tolerance(self.dtype, kk)
        scale = float(ref.dropout_scale(p, self.dtype)) if p > 0 else 1.0

        def validate(impl: Impl, out):
            if impl.own_mask and p > 0:
                parts = [dropout_like_check(to_host(out[r0:r1]), pre, p, scale, tol) for (r0, r1), (_, pre) in
                         refs.items()]
                ok = all(pt[2] for pt in parts)
                return "; ".join(pt[0] for pt in parts[:1]), max(pt[1] for pt in parts), ok
            err = max(rel_err(to_host(out[r0:r1]), post) for (r0, r1), (post, _) in refs.items())
            rows = sum(r1 - r0 for r0, r1 in refs)
            return f"{rows} rows vs float64 reference, tol {tol:.1e}", err, err <= tol

        return validate

    def _linear_group(self, op, family, shape, activation, p):
        m, kk, n = shape
        x, w, b = self._linear_inputs(m, kk, n, SEED + m + kk + n)
        refs = self._linear_reference(x, w, b, m, n, activation, p)
        validate = self._linear_validator(refs, kk, p)
        flops = 2.0 * m * n * kk
        impls = self._linear_impls(op, x, w, b, m, kk, n, activation, p, flops)
        for impl in impls:
            row = Row(op=op, shape=f"{m}x{kk}x{n}", family=family, dtype=self.dtype.name, impl=impl.name,
                      config=impl.config, unit="TFLOP/s", work=flops, m=m, k=kk, n=n)
            self.time_impl(impl, row, validate)

    def _linear_impls(self, op, x, w, b, m, kk, n, activation, p, flops):
        gpufc = self.gpufc
        kw = {"activation": activation, "dropout_p": p, "seed": SEED, "offset": DROP_OFFSET} if op == "fused" else {}
        label = "relu+dropout fused in the epilogue" if op == "fused" else "matmul+bias"
        cfg = chosen_config(self.k, m, n, kk, self.dtype) if self.k is not None else "NumPy reference"
        impls = [Impl("gpufc", f"gpufc.linear, {label}, config {cfg}", lambda: gpufc.linear(x, w, b, **kw))]
        if self.k is not None and self.fast_configs and (op == "linear" or flops <= 2.0 * 4096**3):
            v1 = self.k.linear.V1
            impls.append(Impl("gpufc_v1", f"{config_name(v1)} (version 1, forced)",
                              lambda: kernel_linear(x, w, b, config=v1, **kw)))
        if self.cp is not None:
            impls.append(self._cupy_linear(op, x, w, b, activation, p))
        if self.torch is not None:
            impls.append(self._torch_linear(op, x, w, b, activation, p))
        if op == "linear" and (self.backend == "cpu" or flops <= 2.0 * 1024**3):
            xh, wh, bh = to_host(x), to_host(w), to_host(b)
            impls.append(Impl("numpy", "x @ w + b on the host CPU", lambda: xh @ wh + bh, host=True))
        return impls

    def _cupy_linear(self, op, x, w, b, activation, p):
        cp = self.cp
        if op == "linear":
            return Impl("cupy", "x @ w + b: cuBLAS SGEMM + add kernel, TF32 off", lambda: x @ w + b)
        from gpufc import reference as ref

        assert activation == "relu", "the CuPy chain implements relu only"
        rs = cp.random.RandomState(SEED)
        kern = _cupy_bias_relu_dropout(cp)
        scale = ref.dropout_scale(p, self.dtype)

        def chain():
            z = x @ w
            u = rs.random_sample(z.shape, dtype=cp.float32)
            return kern(z, b, u, np.float32(p), scale)

        return Impl("cupy", "cuBLAS x@w, cuRAND uniform, 1 elementwise kernel (bias+relu+mask)", chain,
                    own_mask=True)

    def _torch_linear(self, op, x, w, b, activation, p):
        torch = self.torch
        F = torch.nn.functional
        xt, bt = self.torch_view(x), self.torch_view(b)
        wt = self.torch_view(w).t().contiguous()  # nn.Linear's (out, in) weight layout
        if op == "linear":
            return Impl("torch", "F.linear (addmm), allow_tf32=False", lambda: F.linear(xt, wt, bt))
        return Impl("torch", "F.dropout(F.relu(F.linear(...))), allow_tf32=False",
                    lambda: F.dropout(F.relu(F.linear(xt, wt, bt)), p, training=True), own_mask=True)

    def op_linear(self, item):
        family, shape = item
        self._linear_group("linear", family, shape, None, 0.0)

    def op_fused(self, item):
        family, shape = item
        self._linear_group("fused", family, shape, "relu", DROP_P)

    def op_configs(self, item):
        """Every fast configuration forced at one shape, beside cuBLAS (tuning evidence)."""
        if not self.fast_configs:
            self.log("  configs: no fast matmul configurations in this tree (version 1 only)")
            return
        _, (m, kk, n) = item
        x, w, b = self._linear_inputs(m, kk, n, SEED + 7)
        refs = self._linear_reference(x, w, b, m, n, None, 0.0)
        validate = self._linear_validator(refs, kk, 0.0)
        flops = 2.0 * m * n * kk
        valid = _kernel_attr(self.k, "DTYPE_CONFIGS") or {}
        names = valid.get(self.dtype, [config_name(c) for c in self.fast_configs])
        impls = [Impl("gpufc", config_name(cfg), lambda cfg=cfg: kernel_linear(x, w, b, config=cfg))
                 for cfg in self.fast_configs if config_name(cfg) in names]
        if self.cp is not None:
            impls.append(Impl("cupy", "x @ w + b: cuBLAS SGEMM + add kernel, TF32 off", lambda: x @ w + b))
        for impl in impls:
            row = Row(op="linear_configs", shape=f"{m}x{kk}x{n}", family="config", dtype=self.dtype.name,
                      impl=impl.name, config=impl.config, unit="TFLOP/s", work=flops, m=m, k=kk, n=n)
            self.time_impl(impl, row, validate)

    # -- dropout -------------------------------------------------------------

    def op_dropout(self, n):
        from gpufc import reference as ref

        gpufc, cp, torch = self.gpufc, self.cp, self.torch
        p, seed, offset = DROP_P, SEED, DROP_OFFSET
        x = self.randn((n,), SEED + 11)
        g = self.randn((n,), SEED + 12)
        scale = ref.dropout_scale(p, self.dtype)
        nbytes = 2.0 * n * self.dtype.itemsize
        blocks = [(0, min(n, 4096))] + ([(n - 4099, n)] if n > 8192 else [])

        def exact(arr, fn):
            def validate(impl: Impl, out):
                if impl.own_mask:
                    pre = to_host(arr[:65536]).astype(np.float64)
                    return dropout_like_check(to_host(out[:65536]), pre, p, float(scale), 1e-6)
                for s0, s1 in blocks:
                    want = fn(to_host(arr[s0:s1]), p, seed=seed, offset=offset + s0)
                    if not np.array_equal(to_host(out[s0:s1]), want):
                        bad = int((to_host(out[s0:s1]) != want).sum())
                        return f"{bad} of {s1 - s0} elements differ from the reference at [{s0}, {s1})", None, False
                return f"bit-exact vs reference on {sum(b1 - b0 for b0, b1 in blocks)} elements", 0.0, True
            return validate

        def copy_check(arr):
            def validate(impl, out):
                same = np.array_equal(to_host(out[:4096]), to_host(arr[:4096]))
                return "copy equals its source (4096 elements)", 0.0, same
            return validate

        fwd = [Impl("gpufc", f"gpufc.dropout, version {self.drop_default or 1}",
                    lambda: gpufc.dropout(x, p, seed=seed, offset=offset))]
        bwd = [Impl("gpufc", f"gpufc.dropout_backward, version {self.drop_default or 1}",
                    lambda: gpufc.dropout_backward(g, p, seed=seed, offset=offset))]
        if self.drop_v1:
            fwd.append(Impl("gpufc_v1", "version 1 (forced)",
                            lambda: kernel_dropout(x, p, seed=seed, offset=offset, version=1)))
            bwd.append(Impl("gpufc_v1", "version 1 (forced; the backward is the forward's kernel)",
                            lambda: kernel_dropout(g, p, seed=seed, offset=offset, version=1)))
        if cp is not None:
            rs = cp.random.RandomState(SEED)
            drop_k = _cupy_dropout(cp)
            mask_k = _cupy_masked_scale(cp)
            keep = rs.random_sample((n,), dtype=cp.float32) >= p
            fwd.append(Impl("cupy", "cuRAND uniform + 1 elementwise kernel",
                            lambda: drop_k(x, rs.random_sample((n,), dtype=cp.float32), np.float32(p), scale),
                            own_mask=True))
            bwd.append(Impl("cupy", "1 elementwise kernel with a stored bool mask", lambda: mask_k(g, keep, scale),
                            own_mask=True))
        if torch is not None:
            F = torch.nn.functional
            xt, gt = self.torch_view(x), self.torch_view(g)
            _, tmask = torch.ops.aten.native_dropout(xt, p, True)
            fscale = float(scale)
            fwd.append(Impl("torch", "F.dropout (writes a 1-byte mask too)", lambda: F.dropout(xt, p, training=True),
                            own_mask=True))
            bwd.append(Impl("torch", "aten.native_dropout_backward (reads a 1-byte mask)",
                            lambda: torch.ops.aten.native_dropout_backward(gt, tmask, fscale), own_mask=True))
        for op, impls, arr, fn in (("dropout_fwd", fwd, x, ref.dropout), ("dropout_bwd", bwd, g, ref.dropout_backward)):
            validate = exact(arr, fn)
            copy = self._copy_impl(arr)
            for impl in impls + ([copy] if copy is not None else []):
                row = Row(op=op, shape=str(n), family="vector", dtype=self.dtype.name, impl=impl.name,
                          config=impl.config, unit="GB/s", work=nbytes, elements=n)
                self.time_impl(impl, row, copy_check(arr) if impl.name == "copy" else validate)

    def _copy_impl(self, src):
        """The bandwidth ceiling: a copy of the same bytes (device to device; on the host for cpu)."""
        if self.cp is not None:
            dst = self.cp.empty_like(src)
            return Impl("copy", "cudaMemcpyAsync device to device, same bytes",
                        lambda: (dst.data.copy_from_device_async(src.data, src.nbytes), dst)[1])
        if self.backend == "cpu":
            dst = np.empty_like(src)
            return Impl("copy", "np.copyto on the host, same bytes", lambda: (np.copyto(dst, src), dst)[1])
        return None

    # -- backward ------------------------------------------------------------

    def op_backward(self, item):
        family, shape = item
        for variant, activation, p in (("backward", None, 0.0), ("backward_relu_dropout", "relu", DROP_P)):
            self._backward_group(variant, family, shape, activation, p)
            self.free()

    def _backward_group(self, op, family, shape, activation, p):
        from gpufc import reference as ref

        gpufc, cp, torch = self.gpufc, self.cp, self.torch
        m, kk, n = shape
        x, w, b = self._linear_inputs(m, kk, n, SEED + 21 + m)
        g = self.randn((m, n), SEED + 24)
        seed, offset = SEED, DROP_OFFSET
        scale = float(ref.dropout_scale(p, self.dtype)) if p > 0 else 1.0
        z = None
        if activation is not None:
            _, z = gpufc.linear_forward(x, w, b, activation=activation, dropout_p=p, seed=seed, offset=offset,
                                        save_preact=True)
        # gpufc's own mask (its dropout kernel, validated by the dropout op) for the peers and column checks.
        keep = gpufc.dropout(self._ones(m, n), p, seed=seed, offset=offset) != 0 if p > 0 else None

        x64, w64 = to_host(x).astype(np.float64), to_host(w).astype(np.float64)
        rows, cols = row_blocks(m), row_blocks(n)
        tol = tolerance(self.dtype, max(m, kk, n))

        def gprime(g_part, z_part, keep_part):
            gp = to_host(g_part).astype(np.float64)
            if keep_part is not None:
                gp = np.where(to_host(keep_part), gp * scale, 0.0)
            if activation is not None:
                gp = gp * ref.activation_grad(to_host(z_part).astype(np.float64), activation)
            return gp

        def validator(z_of, keep_of, transpose_w=False, exact_rows=False):
            def validate(impl, out):
                gx, gw, gb = out
                if transpose_w:
                    gw = gw.t()
                errs = []
                for r0, r1 in rows:
                    if exact_rows and p > 0:  # the contract's mask, from the reference, for gpufc
                        gp = ref.dropout_backward(to_host(g[r0:r1]).astype(np.float64), p, seed=seed,
                                                  offset=offset + r0 * n)
                        gp = gp if activation is None else gp * ref.activation_grad(
                            to_host(z_of[r0:r1]).astype(np.float64), activation)
                    else:
                        gp = gprime(g[r0:r1], None if z_of is None else z_of[r0:r1],
                                    None if keep_of is None else keep_of[r0:r1])
                    errs.append(rel_err(to_host(gx[r0:r1]), gp @ w64.T))
                for c0, c1 in cols:
                    gp = gprime(g[:, c0:c1], None if z_of is None else z_of[:, c0:c1],
                                None if keep_of is None else keep_of[:, c0:c1])
                    errs.append(rel_err(to_host(gw[:, c0:c1]), x64.T @ gp))
                    errs.append(rel_err(to_host(gb[c0:c1]), gp.sum(axis=0)))
                err = max(errs)
                what = "grad_x rows, grad_w and grad_b columns vs float64 reference"
                return f"{what}, tol {tol:.1e}", err, err <= tol
            return validate

        flops = 4.0 * m * n * kk
        bkw = {"biases": b, "activation": activation, "dropout_p": p, "seed": seed, "offset": offset}
        groups = [(Impl("gpufc", "gpufc.linear_backward (default configs)",
                        lambda: gpufc.linear_backward(x, w, g, z, **bkw)), validator(z, keep, exact_rows=True))]
        if cp is not None:
            groups.append(self._cupy_backward(x, w, g, z, keep, scale, validator))
        elif self.backend == "cpu":
            groups.append(self._numpy_backward(x, w, g, z, keep, scale, activation, validator))
        if torch is not None:
            groups.append(self._torch_backward(x, w, b, g, activation, p, validator))
        for impl, validate in groups:
            row = Row(op=op, shape=f"{m}x{kk}x{n}", family=family, dtype=self.dtype.name, impl=impl.name,
                      config=impl.config, unit="TFLOP/s", work=flops, m=m, k=kk, n=n)
            self.time_impl(impl, row, validate)

    def _ones(self, m, n):
        xp = self.cp if self.cp is not None else np
        return xp.ones((m, n), dtype=self.dtype)

    def _cupy_backward(self, x, w, g, z, keep, scale, validator):
        cp = self.cp
        kern = _cupy_relu_dropout_grad(cp) if z is not None else None
        s = self.dtype.type(scale)

        def chain():
            gz = g
            if keep is not None and z is not None:
                gz = kern(g, keep, z, s)
            return gz @ w.T, x.T @ gz, gz.sum(axis=0)

        what = "cuBLAS g@w.T, x.T@g, sum" + (" after 1 elementwise kernel (stored mask, relu')" if z is not None
                                              else "")
        return Impl("cupy", what, chain), validator(z, keep)

    def _numpy_backward(self, x, w, g, z, keep, scale, activation, validator):
        s = self.dtype.type(scale)

        def chain():
            gz = g
            if keep is not None and z is not None:
                gz = np.where(keep & (z > 0), g * s, self.dtype.type(0))
            return gz @ w.T, x.T @ gz, gz.sum(axis=0)

        return Impl("numpy", "x.T @ g, g @ w.T, sum on the host", chain, host=True), validator(z, keep)

    def _torch_backward(self, x, w, b, g, activation, p, validator):
        torch = self.torch
        F = torch.nn.functional
        xt = self.torch_view(x).detach().clone().requires_grad_()
        wt = self.torch_view(w).t().contiguous().requires_grad_()
        bt = self.torch_view(b).detach().clone().requires_grad_()
        gt = self.torch_view(g)
        zt = F.linear(xt, wt, bt)
        tkeep = None
        if activation is None:
            yt = zt
        else:
            yt, tkeep = torch.ops.aten.native_dropout(F.relu(zt), p, True)
        inputs = (xt, wt, bt)

        def fn():
            return torch.autograd.grad(yt, inputs, gt, retain_graph=True)

        what = "torch.autograd.grad through F.linear" + (" + relu + native_dropout" if activation else "")
        z_of = zt.detach() if activation is not None else None
        return Impl("torch", what, fn, own_mask=True), validator(z_of, tkeep, transpose_w=True)

    # -- host overhead -------------------------------------------------------

    def op_overhead(self, shape):
        """Host time of one call (not GPU time): perf_counter around each call, no synchronisation."""
        gpufc, cp, torch = self.gpufc, self.cp, self.torch
        m, kk, n = shape
        x, w, b = self._linear_inputs(m, kk, n, SEED + 31)
        layer = gpufc.FullyConnectedLayer(kk, n, seed=SEED)
        placement = "weights as constructed (NumPy)"
        mover = getattr(layer, "to", None)
        if cp is not None and callable(mover):
            try:
                layer = mover("cuda") or layer
                placement = "weights on the device (layer.to('cuda'))"
            except Exception as err:  # noqa: BLE001
                placement = f"weights as constructed (layer.to('cuda') failed: {type(err).__name__})"
        lin = [Impl("gpufc", "gpufc.linear(x, w, b)", lambda: gpufc.linear(x, w, b)),
               Impl("gpufc_layer", f"FullyConnectedLayer({kk}, {n}).forward(x), {placement}",
                    lambda: layer.forward(x))]
        xd = self.randn((m, kk), SEED + 32)
        drop = [Impl("gpufc", "gpufc.dropout(x, 0.1)", lambda: gpufc.dropout(xd, DROP_P, seed=SEED))]
        if cp is not None:
            rs = cp.random.RandomState(SEED)
            drop_k = _cupy_dropout(cp)
            lin.append(Impl("cupy", "x @ w + b", lambda: x @ w + b))
            drop.append(Impl("cupy", "cuRAND uniform + 1 elementwise kernel",
                             lambda: drop_k(xd, rs.random_sample(xd.shape, dtype=cp.float32), np.float32(DROP_P),
                                            np.float32(1 / (1 - DROP_P)))))
        if torch is not None:
            F = torch.nn.functional
            xt, bt, xdt = self.torch_view(x), self.torch_view(b), self.torch_view(xd)
            wt = self.torch_view(w).t().contiguous()
            lin.append(Impl("torch", "F.linear", lambda: F.linear(xt, wt, bt)))
            drop.append(Impl("torch", "F.dropout", lambda: F.dropout(xdt, DROP_P, training=True)))
        if cp is not None or self.backend == "cpu":
            xh, wh, bh = to_host(x), to_host(w), to_host(b)
            lin.append(Impl("numpy", "x @ w + b on host arrays (includes the compute)", lambda: xh @ wh + bh))
        layer_w = to_host(layer.weights) if layer.weights is not None else None
        layer_b = to_host(layer.biases) if getattr(layer, "biases", None) is not None else None
        self._overhead_group("overhead_linear", f"{m}x{kk}x{n}", lin, x, w, b, layer_w, layer_b)
        self._overhead_group("overhead_dropout", f"{m}x{kk}", drop, xd, None, None, None, None)

    def _overhead_group(self, op, shape, impls, x, w, b, layer_w, layer_b):
        from gpufc import reference as ref

        calls = {"cuda": 2000, "cpu": 500, "sim": 5}[self.backend] // (5 if self.quick else 1)
        x64 = to_host(x).astype(np.float64)

        def validate(impl, out):
            got = to_host(out)
            if op == "overhead_dropout":
                if impl.name == "gpufc":
                    ok = np.array_equal(got, ref.dropout(to_host(x), DROP_P, seed=SEED))
                    return "bit-exact vs reference", 0.0, ok
                return dropout_like_check(got, x64, DROP_P, float(ref.dropout_scale(DROP_P, self.dtype)), 1e-6)
            ww, bb = (layer_w, layer_b) if impl.name == "gpufc_layer" else (to_host(w), to_host(b))
            want = x64 @ ww.astype(np.float64) + (0.0 if bb is None else bb.astype(np.float64))
            err = rel_err(got, want)
            tol = tolerance(self.dtype, x.shape[-1])
            return f"all rows vs float64 reference, tol {tol:.1e}", err, err <= tol

        for impl in impls:
            row = Row(op=op, shape=shape, family="call", dtype=self.dtype.name, impl=impl.name, config=impl.config,
                      unit="kcall/s", work=1.0)
            if time.monotonic() > self.deadline:
                self.skipped.append(f"{op} {shape} {impl.name}")
                continue
            try:
                t0 = time.perf_counter()
                out = impl.fn()
                self.timer.sync()
                row.first_call_s = time.perf_counter() - t0
                row.check, row.rel_err, row.ok = validate(impl, out)
                times = _host_call_times(impl.fn, calls, self.timer.sync)
            except Exception as err:  # noqa: BLE001
                row.ok, row.note = False, f"error: {type(err).__name__}: {str(err)[:300]}"
                self.log(f"  {op} {shape} {impl.name}: {row.note}")
                self.rows.append(row)
                continue
            row.median_s, row.p20_s, row.p80_s = quantiles(times)
            row.reps = len(times)
            row.rate = 1.0 / row.median_s / 1e3
            row.note = "host time per call, unsynchronised" + ("" if self.backend == "cuda" else " (includes compute)")
            self.rows.append(row)
            self.log(f"  {op} {shape} {impl.name:12s} {row.median_s * 1e6:9.1f} us/call  "
                     f"[{row.p20_s * 1e6:.1f}, {row.p80_s * 1e6:.1f}]  {'ok' if row.ok else 'VALIDATION FAILED'}")


def _host_call_times(fn, calls: int, sync, batch: int = 50) -> list[float]:
    """perf_counter around each call, without synchronising; the queue is drained between batches."""
    for _ in range(min(20, calls)):
        fn()
    sync()
    times = []
    while len(times) < calls:
        for _ in range(min(batch, calls - len(times))):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        sync()
    return times


_UNIT_SCALE = {"TFLOP/s": 1e12, "GB/s": 1e9, "kcall/s": 1e3}


def _import_cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def _import_torch(log):
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        log("torch sees no GPU: the PyTorch peer is left out")
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    # CuPy's events are recorded on the legacy default stream: torch must queue there too.
    if torch.cuda.current_stream().cuda_stream != 0:
        log("torch's current stream is not the legacy default stream: the PyTorch peer is left out")
        return None
    return torch


def _tf32_statement(torch) -> str:
    parts = [f"CUPY_TF32={os.environ.get('CUPY_TF32')}", f"NVIDIA_TF32_OVERRIDE={os.environ.get('NVIDIA_TF32_OVERRIDE')}"]
    if torch is not None:
        parts.append(f"torch allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    return "TF32 off: " + ", ".join(parts)


def _cupy_bias_relu_dropout(cp):
    return cp.ElementwiseKernel(
        "T z, T b, float32 u, float32 p, T s", "T y",
        "T a = z + b; y = (u >= p && a > (T)0) ? a * s : (T)0",
        "gpufc_bench_bias_relu_dropout",
    )


def _cupy_dropout(cp):
    return cp.ElementwiseKernel("T x, float32 u, float32 p, T s", "T y", "y = u >= p ? x * s : (T)0",
                                "gpufc_bench_dropout")


def _cupy_masked_scale(cp):
    return cp.ElementwiseKernel("T g, bool m, T s", "T y", "y = m ? g * s : (T)0", "gpufc_bench_masked_scale")


def _cupy_relu_dropout_grad(cp):
    return cp.ElementwiseKernel("T g, bool m, T z, T s", "T y", "y = (m && z > (T)0) ? g * s : (T)0",
                                "gpufc_bench_relu_dropout_grad")
