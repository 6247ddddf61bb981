"""Static kernel report: what ptxas makes of every kernel gpufc ships. No GPU needed.

For every entry of ``kernels.catalogue.specs()`` it compiles the kernel to PTX
(``numba.cuda.compile_ptx``, sm_90 by default), assembles it with ``ptxas -v``,
disassembles the cubin with ``nvdisasm`` and prints:

- registers per thread, static shared memory bytes, spill bytes (stores + loads)
  and the count of local-memory instructions (LDL/STL) in the SASS;
- theoretical occupancy on an H100 (65536 registers, 228 KiB shared memory,
  2048 threads and 32 blocks per SM; registers allocated per warp in units of
  256; 1 KiB of shared memory reserved per block): resident blocks and warps per
  SM and the binding resource (:func:`gpufc.tools.compile.occupancy`);
- for the matmul kernels, the main loop's instruction mix: the FMA share
  (FFMA/DFMA over all instructions) of the innermost loop holding the most FMA
  instructions, found from the backward branches of the SASS
  (:func:`gpufc.tools.compile.main_loop` documents the definition), with its
  shared loads (LDS, of which 128-bit), global loads and shared stores;
- for the tensor-core kernels (``mma/...``), the whole kernel's HMMA, LDSM
  (ldmatrix) and LDGSTS (cp.async) counts and the main loop's HMMA share (the
  loop with the most HMMA instructions).

Every figure is compile-time evidence, not a measurement on a GPU.

    python bench/kernel_report.py                 # table on stdout
    python bench/kernel_report.py --json out.json # also write the rows as JSON ("-": stdout only)
    python bench/kernel_report.py --match t128x128 --arch sm_80
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FMA_GATE = 0.80  # the compile tier's floor for the large-tile configuration's main loop


def _setup():
    """The backend must be ``cpu`` (no simulator: it cannot compile) before numba is imported."""
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    os.environ["GPUFC_BACKEND"] = "cpu"


_SPECS = None


def _specs():
    global _SPECS
    if _SPECS is None:
        _setup()
        from gpufc.runtime import backend

        _SPECS = backend.kernels().catalogue.specs()
    return _SPECS


def report_row(index: int, cc: tuple[int, int]) -> dict:
    """Compile, assemble and analyse catalogue entry ``index`` for compute capability ``cc``."""
    from gpufc.tools import compile as C

    spec = _specs()[index]
    start = time.perf_counter()
    res = C.assemble(spec, cc)
    row = {
        "name": spec.name,
        "arch": res.arch,
        "registers": res.registers,
        "shared_bytes": res.shared_bytes,
        "spill_bytes": res.spill_bytes,
        "stack_bytes": res.stack_bytes,
        "local_instructions": res.local_instructions,
        "threads": spec.threads,
        "launch_bounds": list(spec.launch_bounds) if spec.launch_bounds else None,
        "compile_s": round(time.perf_counter() - start, 2),
    }
    if spec.threads:
        row["occupancy"] = C.occupancy(spec.threads, res.registers, res.shared_bytes)
    insns, _ = C.sass_instructions(res.sass)
    ops = [o.split(".")[0] for o, _ in insns]
    row["hmma"], row["ldsm"], row["ldgsts"] = ops.count("HMMA"), ops.count("LDSM"), ops.count("LDGSTS")
    if spec.main_loop:
        loop = C.main_loop(res.sass)
        if loop is not None:
            row["main_loop"] = {
                "instructions": loop.instructions,
                "fma": loop.fma,
                "fma_share": round(loop.fma_share, 4),
                "lds": loop.count("LDS"),
                "lds_128": loop.count("LDS.128"),
                "ldg": loop.count("LDG"),
                "sts": loop.count("STS"),
                "bar": loop.count("BAR"),
                "fma_behind_barrier": loop.fma_behind_barrier,
                "hmma": loop.hmma,
                "hmma_share": round(loop.hmma_share, 4),
                "ldsm": loop.count("LDSM"),
                "ldgsts": loop.count("LDGSTS"),
            }
    return row


def build_report(cc=(9, 0), match: str | None = None, jobs: int = 1) -> list[dict]:
    """Rows for every catalogue entry whose name contains ``match`` (all when None)."""
    specs = _specs()
    indices = [i for i, s in enumerate(specs) if match is None or match in s.name]
    if jobs <= 1 or len(indices) <= 1:
        return [report_row(i, cc) for i in indices]
    # Numba compiles hold the GIL: processes, each with its own catalogue (forked after _specs()).
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(report_row, indices, [cc] * len(indices)))


def format_table(rows: list[dict]) -> str:
    head = (f"{'kernel':52s} {'arch':5s} {'regs':>4s} {'smem B':>7s} {'spill':>5s} {'LDL/STL':>7s} "
            f"{'thr':>4s} {'blk/SM':>6s} {'occ':>5s} {'bound':9s} {'loop':>5s} {'FMA%':>6s} {'LDS(.128)':>9s} "
            f"{'LDG':>4s} {'STS':>4s} {'HMMA':>4s} {'LDSM':>4s} {'GSTS':>4s} {'HMMA%':>6s} {'s':>5s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        occ = r.get("occupancy")
        ml = r.get("main_loop")
        lines.append(
            f"{r['name']:52s} {r['arch']:5s} {r['registers']:4d} {r['shared_bytes']:7d} {r['spill_bytes']:5d} "
            f"{r['local_instructions']:7d} {r['threads'] or 0:4d} "
            + (f"{occ['blocks_per_sm']:6d} {occ['occupancy']:5.2f} {occ['limited_by']:9s} " if occ else
               f"{'-':>6s} {'-':>5s} {'-':9s} ")
            + (f"{ml['instructions']:5d} {100 * ml['fma_share']:5.1f}% {ml['lds']:4d}({ml['lds_128']:3d}) "
               f"{ml['ldg']:4d} {ml['sts']:4d} " if ml else f"{'-':>5s} {'-':>6s} {'-':>9s} {'-':>4s} {'-':>4s} ")
            + f"{r.get('hmma', 0):4d} {r.get('ldsm', 0):4d} {r.get('ldgsts', 0):4d} "
            + (f"{100 * ml['hmma_share']:5.1f}% " if ml and ml.get("hmma") else f"{'-':>6s} ")
            + f"{r['compile_s']:5.1f}"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    bad = [r["name"] for r in rows if r["spill_bytes"] or r["local_instructions"] or r["stack_bytes"]]
    out = [f"{len(rows)} kernels; {len(bad)} with spills, stack or local memory" + (f": {bad}" if bad else "")]
    big = [r for r in rows if "/t128x128/" in r["name"] and "main_loop" in r]
    for r in big:
        share = r["main_loop"]["fma_share"]
        verdict = "ok" if share >= FMA_GATE else "BELOW"
        out.append(f"main-loop FMA share {100 * share:.1f}% ({verdict}, gate {100 * FMA_GATE:.0f}%): {r['name']}")
    for r in rows:
        ml = r.get("main_loop")
        if r["name"].startswith("mma/") and ml:
            out.append(f"tensor cores: {r['name']}: {r['hmma']} HMMA, {r['ldsm']} LDSM, {r['ldgsts']} LDGSTS; main loop "
                       f"{ml['hmma']} HMMA in {ml['instructions']} instructions ({100 * ml['hmma_share']:.1f}%)")
    out.append("static figures from ptxas/nvdisasm: not measured on a GPU")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write the rows as JSON to PATH; without PATH (or '-') print only the JSON")
    ap.add_argument("--arch", default="sm_90", help="target, e.g. sm_90 (default) or sm_80")
    ap.add_argument("--match", default=None, help="only kernels whose name contains this")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compile processes")
    args = ap.parse_args(argv)
    arch = args.arch.removeprefix("sm_")
    cc = (int(arch[:-1]), int(arch[-1]))
    _setup()
    from gpufc.tools import compile as C

    if C.find_tool("ptxas") is None or C.find_tool("nvdisasm") is None:
        print("kernel_report: needs ptxas and nvdisasm (pip install nvidia-cuda-nvcc nvidia-cuda-nvdisasm)",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = build_report(cc, args.match, args.jobs)
    doc = {
        "arch": f"sm_{arch}",
        "occupancy_model": "H100: 65536 regs, 228 KiB smem (227 KiB/block), 2048 threads, 32 blocks per SM; "
                           "256-register warp granularity; 1 KiB smem reserved per block",
        "main_loop_definition": "the backward-branch loop of the SASS holding the most HMMA, else the most LDS, "
                                "then FFMA/DFMA, then the shortest; share = FMA (HMMA) / all instructions in it",
        "measured_on_gpu": False,
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    if args.json == "-":
        print(json.dumps(doc, indent=1))
        return 0
    print(format_table(rows))
    print()
    print("\n".join(summary(rows)))
    print(f"compiled in {doc['wall_s']} s with {args.jobs} processes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
