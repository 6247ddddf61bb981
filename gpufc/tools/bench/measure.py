"""Timers, result rows and the validation maths shared by every benchmark op."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

PEERS = ("gpufc_v1", "cupy", "torch", "copy", "numpy")  # ratio columns, besides gpufc itself
IMPL_ORDER = ("gpufc", "gpufc_layer", "gpufc_v1", "cupy", "torch", "copy", "numpy")
L2_FALLBACK_BYTES = 50 * 2**20  # H100 SXM


_SPIN_SRC = r"""
extern "C" __global__ void gpufc_bench_spin(long long cycles) {
    // Busy-wait on one thread: keeps the GPU busy while the host queues the timed call.
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


def quantiles(times) -> tuple[float, float, float]:
    """(median, p20, p80) of a list of seconds."""
    med, p20, p80 = np.percentile(np.asarray(times, dtype=np.float64), [50, 20, 80])
    return float(med), float(p20), float(p80)


class HostTimer:
    """``perf_counter`` around each call: the cpu and sim backends, and host-side peers."""

    kind = "perf_counter"

    def sync(self):
        pass

    def host_overhead(self, fn) -> float:
        return 0.0

    def measure(self, fn, reps: int, host_s: float = 0.0) -> list[float]:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times


class CudaTimer:
    """CUDA events around each call, after an L2 flush and a GPU busy-wait (see the module doc)."""

    kind = "cuda events"

    def __init__(self, cp, l2_bytes: int | None):
        self.cp = cp
        l2 = int(l2_bytes or L2_FALLBACK_BYTES)
        self.flush_buf = cp.empty(max(2 * l2, 64 * 2**20) // 4, dtype=cp.int32)
        self.clock_khz = int(cp.cuda.Device().attributes.get("ClockRate", 2_000_000))
        self.spin_note = "GPU busy-wait before each timed call"
        try:
            self.spin = cp.RawKernel(_SPIN_SRC, "gpufc_bench_spin")
            self.spin((1,), (1,), (np.int64(1000),))
            self.sync()
        except Exception as err:  # noqa: BLE001 - no NVRTC: events then include launch gaps when the host is slower
            self.spin = None
            self.spin_note = f"no GPU busy-wait ({type(err).__name__}); small-shape times may include host gaps"

    def sync(self):
        self.cp.cuda.Device().synchronize()

    def flush(self):
        self.flush_buf.fill(0)

    def host_overhead(self, fn, calls: int = 3) -> float:
        """Median host time of one call, synchronised before each so the launch queue is empty."""
        times = []
        for _ in range(calls):
            self.sync()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        self.sync()
        return float(np.median(times))

    def measure(self, fn, reps: int, host_s: float = 0.0) -> list[float]:
        cp = self.cp
        # The busy-wait must outlast the host's time from queueing it to queueing the call.
        spin_s = min(20e-3, 1.5 * host_s + 30e-6)
        cycles = np.int64(spin_s * self.clock_khz * 1e3)
        events = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(reps)]
        for start, stop in events:
            self.flush()
            if self.spin is not None:
                self.spin((1,), (1,), (cycles,))
            start.record()
            fn()
            stop.record()
        events[-1][1].synchronize()
        return [cp.cuda.get_elapsed_time(a, b) * 1e-3 for a, b in events]


@dataclasses.dataclass
class Row:
    """One timed (op, shape, implementation)."""

    op: str
    shape: str
    family: str
    dtype: str
    impl: str
    config: str
    median_s: float | None = None
    p20_s: float | None = None
    p80_s: float | None = None
    reps: int = 0
    rate: float | None = None
    unit: str = ""
    work: float = 0.0  # FLOPs, bytes or calls behind ``rate``
    m: int | None = None
    k: int | None = None
    n: int | None = None
    elements: int | None = None
    first_call_s: float | None = None
    host_s: float | None = None  # host time of one call (queue empty), for the timer's busy-wait
    check: str = ""
    rel_err: float | None = None
    ok: bool | None = None
    note: str = ""
    speedups: dict = dataclasses.field(default_factory=dict)


ENV_COLUMNS = ("device", "driver", "cuda_runtime", "backend", "measured_on", "numba", "numba_cuda", "cupy", "torch",
               "numpy", "python", "gpufc", "git_commit", "source_sha256", "date")


def add_speedups(rows: list[Row]) -> None:
    """``speedup_vs_<peer>`` = peer median / row median within each (op, shape, dtype) group.

    A reference must be unique in its group (the config sweep has many gpufc rows: none is one).
    """
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.op, r.shape, r.dtype), []).append(r)
    for members in groups.values():
        timed = [r for r in members if r.median_s]
        names = [r.impl for r in timed]
        refs = {r.impl: r for r in timed if names.count(r.impl) == 1 and r.impl in ("gpufc",) + PEERS}
        for r in timed:
            r.speedups = {peer: ref.median_s / r.median_s for peer, ref in refs.items() if ref is not r}


def row_dict(r: Row, env: dict) -> dict:
    d = dataclasses.asdict(r)
    speedups = d.pop("speedups")
    for peer in ("gpufc",) + PEERS:
        d[f"speedup_vs_{peer}"] = speedups.get(peer)
    for key in ENV_COLUMNS:
        d[key] = env.get(key)
    return d


# ----------------------------------------------------------------------------
# Array helpers
# ----------------------------------------------------------------------------


def to_host(a) -> np.ndarray:
    """NumPy copy of a NumPy, CuPy or torch array (or slice of one)."""
    if isinstance(a, np.ndarray):
        return a
    root = type(a).__module__.split(".", 1)[0]
    if root == "cupy":
        return a.get()
    if root == "torch":
        return a.detach().cpu().numpy()
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return np.asarray(a)


def row_blocks(m: int, s: int = 8) -> list[tuple[int, int]]:
    """Sampled row ranges: the first, a middle and the last ``s`` rows (all rows when few)."""
    if m <= 3 * s:
        return [(0, m)]
    mid = m // 2 + 1
    return [(0, s), (mid, mid + s), (m - s, m)]


def rel_err(got, want) -> float:
    """Norm-wise relative error ``||got - want|| / ||want||`` in float64; inf for NaN."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return math.inf
    diff = float(np.linalg.norm(got - want))
    den = float(np.linalg.norm(want))
    err = diff / den if den > 0 else diff
    return err if math.isfinite(err) else math.inf


def tolerance(dtype, k: int) -> float:
    """Norm-wise bound for a length-k float dot product against float64: 8 eps sqrt(k) (+ 1e-6 for float32).

    Random rounding errors grow like eps sqrt(k); TF32 (eps 2**-11) lands near 3e-4
    whatever k, so it fails the float32 bound up to k ~ 10**5.
    """
    eps = float(np.finfo(dtype).eps)
    return 8 * eps * math.sqrt(max(k, 1)) + (1e-6 if np.dtype(dtype) == np.float32 else 0.0)


def dropout_like_check(got, pre, p: float, scale: float, tol: float) -> tuple[str, float, bool]:
    """For a peer that draws its own mask: values where kept equal ``pre * scale``; keep rate ~ 1 - p.

    ``pre`` is the reference before dropout (float64); only elements clearly nonzero count.
    """
    got = np.asarray(got, dtype=np.float64)
    eligible = np.abs(pre) > 1e-3 * (np.abs(pre).max() + 1e-30)
    kept = (got != 0) & eligible
    count, kept_n = int(eligible.sum()), int(kept.sum())
    expect = (1.0 - p) * count
    sd = math.sqrt(max(count * p * (1.0 - p), 1e-12))
    rate_ok = abs(kept_n - expect) <= 6 * sd + 1
    err = rel_err(got[kept], pre[kept] * scale) if kept_n else 0.0
    # Zeros of the activation must stay zeros (beyond float32 rounding across the relu's kink).
    stray = int(((pre == 0) & (np.abs(got) > 1e-3 * (np.abs(pre).max() + 1e-30))).sum())
    ok = rate_ok and err <= tol and stray == 0
    return f"own mask: keep {kept_n}/{count} (expect {expect:.0f} +- {6 * sd:.0f}), kept rel err {err:.1e}", err, ok
