"""Benchmark harness: ``gpufc bench`` and the scripts in the repository's ``bench/`` folder.

Modules: :mod:`.environment` (what ran), :mod:`.measure` (timers, rows, validation maths),
:mod:`.suite` (the ops and their peers), :mod:`.report` (CSV, JSON, markdown, plots, the static
report), :mod:`.cli` (``gpufc bench``).

One suite, run on whatever backend is active:

=========  ===========================================================================
backend    what the numbers are
=========  ===========================================================================
``cuda``   GPU time from CUDA events, against cuBLAS (CuPy), PyTorch, a device copy
``cpu``    host time of the NumPy reference (``perf_counter``): NOT a GPU measurement
``sim``    the Numba CUDA simulator: validation only, timings are meaningless
=========  ===========================================================================

Method, per (op, shape) group (bench/README.md says how to read the output):

1. Validate first. Every implementation's output is compared with
   :mod:`gpufc.reference` in float64 (sampled row blocks for big shapes): the
   norm-wise relative error must stay under ``8 eps sqrt(K)`` (TF32 would land
   near 3e-4 and fail it); gpufc's dropout masks must match the contract bit for
   bit; the peers draw their own masks, so their keep rate and kept values are
   checked instead.
2. Warm up: the first call (JIT compile, cuBLAS handles) is timed separately
   (``first_call_s``) and kept out of the statistics.
3. Time. On ``cuda`` each repetition writes a buffer of twice the L2 size (so
   no input is served from L2), queues a GPU busy-wait longer than the call's
   host overhead (so the events time the GPU work alone, not the launch path),
   then records an event, the call, an event. Median, p20 and p80 of the
   repetitions. Host overhead is its own op (``overhead_*``): ``perf_counter``
   around each call, unsynchronised, many calls.
4. Rate: TFLOP/s = 2 M N K / median (4 M N K for the backward's two products);
   GB/s = the fewest bytes the op must move (each input read once, each output
   written once) / median, the same nominal bytes for every implementation.
5. ``speedup_vs_<peer>`` = peer median / this median, peers measured in the
   same run (> 1: faster than the peer).

TF32 is off for every peer: ``CUPY_TF32=0`` and ``NVIDIA_TF32_OVERRIDE=0`` are
set before CuPy or PyTorch is imported, and torch's ``allow_tf32`` flags are
False. Shapes of the linear ops are written ``MxKxN``: ``x (M, K) @ w (K, N)``.
"""

# ruff: noqa: F401  (this package's names, re-exported for ``gpufc bench`` users and bench/common.py)

from .cli import cmd_bench, configure, main, run
from .environment import MEASURED_ON, environment, fp32_peak_tflops, source_root, source_sha256
from .measure import (
    IMPL_ORDER,
    PEERS,
    CudaTimer,
    HostTimer,
    Row,
    add_speedups,
    dropout_like_check,
    quantiles,
    rel_err,
    row_blocks,
    row_dict,
    to_host,
    tolerance,
)
from .report import (
    load_rows,
    markdown_pivot,
    markdown_summary,
    pivot,
    static_report,
    text_table,
    write_csv,
    write_json,
    write_plots,
)
from .suite import DROP_OFFSET, DROP_P, OPS, SEED, Impl, Suite, plan
