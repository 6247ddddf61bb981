"""The README's performance table, generated from the latest committed GPU result.

Reads ``bench/results/<date>_<gpu>/results.json`` (the latest folder by name
whose rows were measured on the ``cuda`` backend; ``*_followup`` folders, which
hold only the few ops a short follow-up call re-measured, are skipped), prints the markdown table,
and with ``--write`` puts it into README.md between the markers
``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->``. Every figure in
the table comes from that file: the README claims nothing else.

    python bench/make_readme_table.py                 # print
    python bench/make_readme_table.py --write         # update README.md
"""

import argparse
import json
import sys
from pathlib import Path

from common import ROOT

from gpufc.tools.bench import load_rows, markdown_pivot

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
RESULTS = Path(ROOT) / "bench" / "results"


def latest_gpu_result(results: Path = RESULTS):
    """(folder, parsed results.json) of the newest GPU run, or (None, None)."""
    full_runs = (p for p in results.glob("*") if p.is_dir() and not p.name.endswith("_followup"))
    for folder in sorted(full_runs, key=lambda p: p.name, reverse=True):
        path = folder / "results.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        if doc.get("environment", {}).get("backend") == "cuda" and doc.get("rows"):
            return folder, doc
    return None, None


def table(folder: Path, doc: dict, include_configs: bool = False) -> str:
    env = doc["environment"]
    rows = [r for r in load_rows(doc) if include_configs or r.op != "linear_configs"]
    rel = folder.relative_to(Path(ROOT)) if folder.is_relative_to(Path(ROOT)) else folder
    commit = env.get("git_commit") or "unknown"
    lines = [
        (f"Measured on {env.get('device')} (driver {env.get('driver')}, CUDA {env.get('cuda_runtime')}, "
         f"numba-cuda {env.get('numba_cuda')}, CuPy {env.get('cupy')}, PyTorch {env.get('torch')}) on "
         f"{env.get('date')}, gpufc commit `{commit}` (sources sha256 `{env.get('source_sha256')}`); "
         f"every number below is in [`{rel}/results.json`]({rel}/results.json), "
         f"with the method in [bench/README.md](bench/README.md)."),
        "",
        ("Median of repeated runs timed with CUDA events after an L2 flush, float32, TF32 off for every peer. "
         "Rates: TFLOP/s for the linear ops (2 M N K / time; 4 M N K for the backward), GB/s for dropout "
         "(8 bytes per element / time), kcall/s for host overhead. `gpufc vs X` is X's time over gpufc's "
         "(above 1: gpufc is faster). Shapes are `MxKxN`: x (M, K) @ w (K, N). "
         f"FP32 peak {env.get('fp32_peak_tflops')} TFLOP/s (datasheet); measured copy bandwidth "
         f"{env.get('copy_GBps') or 0:.0f} GB/s."),
        "",
        markdown_pivot(rows),
    ]
    failed = [r for r in rows if r.ok is False]
    if failed:
        lines += ["", f"Validation failed for {len(failed)} rows (marked `!`); see the results file."]
    return "\n".join(lines)


def replace_between_markers(text: str, body: str) -> str:
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"README.md needs the markers {START} and {END} (in that order) around the table")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="update README.md between the markers")
    ap.add_argument("--readme", default=str(Path(ROOT) / "README.md"))
    ap.add_argument("--results", default=str(RESULTS), help="folder holding one subfolder per run")
    ap.add_argument("--configs", action="store_true", help="include the per-configuration sweep rows")
    args = ap.parse_args(argv)
    folder, doc = latest_gpu_result(Path(args.results))
    if folder is None:
        body = "No GPU measurement has been committed yet (bench/results/ holds none); see bench/README.md."
    else:
        body = table(folder, doc, args.configs)
    print(body)
    if args.write:
        readme = Path(args.readme)
        readme.write_text(replace_between_markers(readme.read_text(), body))
        print(f"\nupdated {readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
