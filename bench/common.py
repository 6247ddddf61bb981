"""Shared by the bench/ scripts: run them from the source tree without installing gpufc.

The harness itself (timers, rows, environment capture, outputs) lives in
:mod:`gpufc.tools.bench`, so ``gpufc bench`` works from an installed package too;
this module puts the source tree first on ``sys.path`` and re-exports it.

    python bench/bench_linear.py --quick            # any backend; see --help
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # this checkout's gpufc, not another installed copy

from gpufc.tools.bench import (
    CudaTimer,
    HostTimer,
    Row,
    Suite,
    environment,
    main,
    quantiles,
    rel_err,
    row_blocks,
    tolerance,
    write_csv,
    write_json,
    write_plots,
)

__all__ = [
    "ROOT",
    "CudaTimer",
    "HostTimer",
    "Row",
    "Suite",
    "environment",
    "main",
    "quantiles",
    "rel_err",
    "row_blocks",
    "run_op",
    "tolerance",
    "write_csv",
    "write_json",
    "write_plots",
]


def run_op(ops, argv=None, default_out=None) -> int:
    """``gpufc bench --ops <ops>`` with this script's default output folder (bench/out/<name>)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in argv and default_out:
        argv += ["--out", os.path.join(ROOT, "bench", "out", default_out)]
    if "--static" not in argv:
        argv += ["--static", "no"]
    return main(["--ops", *ops, *argv])
