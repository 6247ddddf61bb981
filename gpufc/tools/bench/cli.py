"""``gpufc bench``: run the suite, write its outputs, print the summary table last."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import numpy as np

from .environment import MEASURED_ON
from .measure import add_speedups
from .report import markdown_summary, static_report, text_table, write_csv, write_json, write_plots
from .suite import OPS, Stopped, Suite, _raise_stopped, plan


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("cuda", "sim", "cpu"), default=None,
                        help="backend to run on (default: GPUFC_BACKEND, else auto-detected)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="ops to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="few small shapes and short timings (CI smoke runs)")
    parser.add_argument("--out", default="gpufc-bench", help="output folder (default ./gpufc-bench)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new measurements after this many seconds (results so far are kept)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--static", choices=("auto", "yes", "no"), default="auto",
                        help="run bench/kernel_report.py (compile-only); auto: only when no GPU was measured")
    parser.add_argument("--static-timeout", type=float, default=900)


def _progress_factory(total: int, stack):
    """A rich progress bar on a terminal, else None (the per-row log lines are the progress)."""
    if not sys.stderr.isatty():
        return None, None
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        return None, None
    console = Console(stderr=True)
    prog = stack.enter_context(Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                        TimeElapsedColumn(), console=console))
    task = prog.add_task("gpufc bench", total=total)
    state = {"started": False}

    def tick(what):
        if state["started"]:
            prog.advance(task)
        state["started"] = True
        prog.update(task, description=f"gpufc bench: {what}")

    return tick, console


def run(args) -> int:
    """``gpufc bench``: run the suite, write CSV, JSON, markdown and plots, print the summary table last."""
    import contextlib

    if "cupy" not in sys.modules:
        os.environ["CUPY_TF32"] = "0"
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    from gpufc.runtime import backend as _backend

    if args.backend:
        _backend.set_backend(args.backend)
    name = _backend.get_backend()
    quick = bool(args.quick)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ops = list(dict.fromkeys(args.ops))
    if name != "cuda":
        print(f"gpufc bench: backend '{name}': {MEASURED_ON[name]}.", file=sys.stderr)
    total = sum(len(plan(name, quick)[op]) for op in ops)
    with contextlib.ExitStack() as stack:
        tick, console = _progress_factory(total, stack)
        log = (lambda msg: console.print(msg, markup=False, highlight=False)) if console else None
        suite = Suite(name, quick=quick, dtype=np.dtype(args.dtype), budget_s=args.budget_s, log=log, progress=tick)
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
        try:
            rows = suite.run(ops)
        except Stopped as why:  # write what was measured before the stop
            suite.skipped.append(f"stopped by {why} before the suite finished")
            rows = suite.rows
            add_speedups(rows)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if tick:
            tick("done")
    env = suite.env
    write_csv(out_dir / "results.csv", rows, env)
    write_json(out_dir / "results.json", rows, env, suite.skipped)
    (out_dir / "summary.md").write_text(markdown_summary(rows, env, suite.skipped))
    table = text_table(rows, env)
    (out_dir / "table.txt").write_text(table + "\n")
    plots = [] if args.no_plots else write_plots(out_dir, rows, env, log=lambda m: print(m, file=sys.stderr))
    static = None
    if args.static == "yes" or (args.static == "auto" and name != "cuda"):
        static = static_report(out_dir, args.static_timeout, log=lambda m: print(m, file=sys.stderr))
    failed = [r for r in rows if r.ok is False]
    print(f"wrote {out_dir}/results.csv, results.json, summary.md" + (", plots.png" if plots else "")
          + (f"; static report: {static['status']}" if static else ""))
    if suite.skipped:
        print(f"skipped {len(suite.skipped)} measurements (time budget or errors); see summary.md")
    if failed:
        print(f"VALIDATION FAILED for {len(failed)} rows: "
              + "; ".join(f"{r.op} {r.shape} {r.impl}" for r in failed[:10]))
    if name != "cuda":
        print(f"NOTE: {MEASURED_ON[name]}: no GPU was measured.")
    print(table)
    return 1 if failed else 0


def cmd_bench(args) -> int:
    return run(args)


cmd_bench.configure = configure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpufc bench", description="Benchmark gpufc against cuBLAS/PyTorch/NumPy on the active backend.")
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
