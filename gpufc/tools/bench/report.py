"""Outputs of a benchmark run: CSV, JSON, markdown, the text table, plots, and the static kernel report."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from .environment import source_root
from .measure import IMPL_ORDER, Row, row_dict


def write_csv(path: Path, rows: list[Row], env: dict) -> None:
    dicts = [row_dict(r, env) for r in rows]
    fields = list(dicts[0]) if dicts else [f.name for f in dataclasses.fields(Row)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(dicts)


def write_json(path: Path, rows: list[Row], env: dict, skipped: list[str]) -> None:
    doc = {"environment": env, "method": importlib.import_module(__package__).__doc__, "skipped": skipped,
           "rows": [dataclasses.asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=1, default=str))


def load_rows(doc: dict) -> list[Row]:
    names = {f.name for f in dataclasses.fields(Row)}
    return [Row(**{k: v for k, v in r.items() if k in names}) for r in doc["rows"]]


def fmt_rate(v: float) -> str:
    """Three significant figures, no exponent for the usual ranges."""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _impls_in(rows) -> list[str]:
    present = {r.impl for r in rows}
    return [i for i in IMPL_ORDER if i in present] + sorted(present - set(IMPL_ORDER))


def pivot(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """One line per (op, shape): each implementation's rate, then gpufc's speedup over each peer."""
    impls = _impls_in(rows)
    peers = [p for p in ("cupy", "torch", "copy", "gpufc_v1", "numpy") if p in impls]
    header = ["op", "shape", "unit"] + impls + [f"gpufc vs {p}" for p in peers]
    lines, seen = [], {}
    for r in rows:
        seen.setdefault((r.op, r.shape), []).append(r)
    for (op, shape), members in seen.items():
        by = {}
        for r in members:
            by.setdefault(r.impl, r)
        cells = [op, shape, members[0].unit]
        for i in impls:
            r = by.get(i)
            if r is None:
                cells.append("")
            elif r.rate is None:
                cells.append("error" if r.note.startswith("error") else "")
            else:
                mark = "" if r.ok else "!"
                if op == "linear_configs" and i == "gpufc":
                    best = max((m for m in members if m.impl == "gpufc" and m.rate), key=lambda m: m.rate,
                               default=None)
                    cells.append(f"{fmt_rate(best.rate)} ({best.config}){mark}" if best else "")
                else:
                    cells.append(f"{fmt_rate(r.rate)}{mark}")
        g = by.get("gpufc")
        if op == "linear_configs":
            g = max((m for m in members if m.impl == "gpufc" and m.rate), key=lambda m: m.rate, default=None)
        for p in peers:
            peer = by.get(p)
            if g is not None and peer is not None and g.median_s and peer.median_s:
                ratio = peer.median_s / g.median_s
                cells.append(f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x")
            else:
                cells.append("")
        lines.append(cells)
    return header, lines


def text_table(rows: list[Row], env: dict) -> str:
    header, lines = pivot(rows)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]

    def fmt(cells):
        return "  ".join(str(c).rjust(w) if i > 2 else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    title = (f"gpufc bench | {env.get('measured_on')} | {env.get('device')} | driver {env.get('driver')} | "
             f"CUDA {env.get('cuda_runtime')} | commit {env.get('git_commit') or 'unknown'} "
             f"(src {env.get('source_sha256')}) | {env.get('date')}")
    legend = ("rates: TFLOP/s (linear, 2MNK/t; backward 4MNK/t), GB/s (dropout, 8 B/element/t), "
              "kcall/s (overhead, host); 'gpufc vs X' = X time / gpufc time; '!' = validation failed")
    out = [title, legend, fmt(header), fmt(["-" * w for w in widths])]
    out += [fmt(line) for line in lines]
    return "\n".join(out)


def markdown_pivot(rows: list[Row]) -> str:
    header, lines = pivot(rows)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in line) + " |" for line in lines]
    return "\n".join(out)


def markdown_summary(rows: list[Row], env: dict, skipped: list[str]) -> str:
    lines = [f"# gpufc benchmark: {env.get('measured_on')}", ""]
    if env.get("backend") != "cuda":
        lines += [(f"**{env.get('measured_on')}.** These rows time gpufc's {env.get('backend')} backend; "
                   "no GPU was measured."), ""]
    lines += ["| | |", "|---|---|"]
    for key in ("device", "driver", "cuda_runtime", "cuda_driver_api", "compute_capability", "sm_count", "l2_bytes",
                "date", "git_commit", "source_sha256", "python", "numpy", "numba", "numba_cuda", "cupy", "torch",
                "timer", "tf32", "fp32_peak_tflops", "copy_GBps"):
        if env.get(key) is not None:
            value = env[key]
            if isinstance(value, float):
                value = f"{value:.1f}"
            lines.append(f"| {key} | {value} |")
    lines += ["", "## Summary", "",
              ("Rates: TFLOP/s for the linear ops (2 M N K / time; 4 M N K for the backward), GB/s for dropout "
               "(read + write, 8 bytes per float32 element / time), kcall/s for host overhead. "
               "`gpufc vs X` = X's median time / gpufc's (above 1: gpufc is faster). "
               "`!` marks a failed validation. Shapes are `MxKxN`: x (M, K) @ w (K, N)."), "",
              markdown_pivot(rows), "", "## All rows", "",
              ("| op | shape | impl | config | median ms | p20-p80 ms | reps | rate | unit | first call s | check | "
               "rel err | ok |"), "|" + "---|" * 13]
    for r in rows:
        med = f"{r.median_s * 1e3:.4f}" if r.median_s else ""
        spread = f"{r.p20_s * 1e3:.4f}-{r.p80_s * 1e3:.4f}" if r.median_s else ""
        rate = fmt_rate(r.rate) if r.rate else ""
        first = f"{r.first_call_s:.3f}" if r.first_call_s is not None else ""
        err = f"{r.rel_err:.1e}" if r.rel_err is not None else ""
        check = (r.check + (" " + r.note if r.note else "")).replace("|", "/")
        lines.append(f"| {r.op} | {r.shape} | {r.impl} | {r.config.replace('|', '/')} | {med} | {spread} | {r.reps} "
                     f"| {rate} | {r.unit} | {first} | {check} | {err} | {r.ok} |")
    if skipped:
        lines += ["", f"Skipped ({len(skipped)}, time budget or errors): " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def write_plots(out_dir: Path, rows: list[Row], env: dict, log=print) -> list[Path]:
    """One PNG per op group plus ``plots.png`` with all of them; skipped with a message without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    ops = []
    for r in rows:
        if r.op not in ops and r.rate:
            ops.append(r.op)
    if not ops:
        return []
    written = []
    ncols = min(3, len(ops))
    nrows = -(-len(ops) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.6 * nrows), squeeze=False)
    for ax in axes.flat[len(ops):]:
        ax.set_visible(False)
    for op, ax in zip(ops, axes.flat):
        _plot_op(ax, op, [r for r in rows if r.op == op and r.rate], env)
        single, sax = plt.subplots(figsize=(7.5, 5))
        _plot_op(sax, op, [r for r in rows if r.op == op and r.rate], env)
        _stamp(single, env)
        single.tight_layout()
        path = out_dir / f"plot_{op}.png"
        single.savefig(path, dpi=110)
        plt.close(single)
        written.append(path)
    _stamp(fig, env)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = out_dir / "plots.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path] + written


def _stamp(fig, env):
    fig.suptitle(f"{env.get('device')} | {env.get('measured_on')} | {env.get('date')}", fontsize=9)


def _plot_op(ax, op, rows, env):
    unit = rows[0].unit
    shapes = []
    for r in rows:
        if r.shape not in shapes:
            shapes.append(r.shape)
    numeric = all(r.family in ("square", "vector") for r in rows)
    if op == "linear_configs":
        labels = [f"{r.impl}\n{r.config[:18]}" if r.impl == "gpufc" else r.impl for r in rows]
        ax.bar(range(len(rows)), [r.rate for r in rows], color=["C0" if r.impl == "gpufc" else "C1" for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30)
    elif unit == "kcall/s":
        impls = _impls_in(rows)
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            vals = [next((1e6 * r.median_s for r in rows if r.shape == s and r.impl == impl), 0.0) for s in shapes]
            ax.bar([i + j * width for i in range(len(shapes))], vals, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes)
        ax.set_ylabel("host time per call (us)")
    else:
        for impl in _impls_in(rows):
            pts = [r for r in rows if r.impl == impl]
            if numeric:
                xs = [r.m if r.family == "square" else r.elements for r in pts]
                order = np.argsort(xs)
                ax.plot([xs[i] for i in order], [pts[i].rate for i in order], "o-", label=impl)
            else:
                ax.plot([shapes.index(r.shape) for r in pts], [r.rate for r in pts], "o-", label=impl)
        if numeric:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M = K = N" if rows[0].family == "square" else "elements")
        else:
            ax.set_xticks(range(len(shapes)), shapes, rotation=30, fontsize=7)
            ax.set_xlabel("shape MxKxN")
        ax.set_ylabel(unit)
        peak = env.get("fp32_peak_tflops")
        if unit == "TFLOP/s" and peak:
            ax.axhline(peak, color="k", ls="--", lw=1, label=f"FP32 peak {peak} (datasheet)")
        bw = env.get("copy_GBps")
        if unit == "GB/s" and bw:
            ax.axhline(bw, color="k", ls=":", lw=1, label=f"measured copy {bw:.0f} GB/s")
        ax.set_ylim(bottom=0)
    ax.set_title(op, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def static_report(out_dir: Path, timeout: float = 900, log=print) -> dict:
    """Run the source tree's ``bench/kernel_report.py --json <out>/kernel_report.json`` in a clean process.

    The process runs without the simulator (compile-only needs real NVVM);
    its printed table goes to ``kernel_report.txt``. Its figures are compile-time
    (ptxas) evidence, not measured on a GPU.
    """
    script = source_root() / "bench" / "kernel_report.py"
    if not script.is_file():
        msg = (f"static kernel report unavailable: {script} not found (it ships with the source tree, "
               "not the installed package)")
        log(msg)
        return {"status": "unavailable", "message": msg}
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM",)}
    env["GPUFC_BACKEND"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source_root()), env.get("PYTHONPATH")]))
    json_path = Path(out_dir).resolve() / "kernel_report.json"
    log(f"static kernel report (compile-only, not measured on a GPU): {script.name} --json {json_path} ...")
    try:
        res = subprocess.run([sys.executable, str(script), "--json", str(json_path)], check=False,
                             capture_output=True, text=True, env=env, timeout=timeout, cwd=str(source_root()))
    except subprocess.TimeoutExpired:
        msg = f"static kernel report: stopped after {timeout:.0f} s"
        log(msg)
        return {"status": "timeout", "message": msg}
    text_path = Path(out_dir) / "kernel_report.txt"
    text_path.write_text(res.stdout + ("\n" + res.stderr if res.returncode else ""))
    status = "ok" if res.returncode == 0 else f"exit {res.returncode}"
    paths = [str(p) for p in (text_path, json_path) if p.is_file()]
    log(f"static kernel report ({status}, not measured on a GPU) written to {', '.join(paths)}")
    return {"status": status, "paths": paths}
