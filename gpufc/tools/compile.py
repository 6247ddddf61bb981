"""Compile kernels to PTX and SASS without a GPU: the compile tier and the static report.

``numba.cuda.compile_ptx`` needs only NVVM (numba-cuda's cu12/cu13 extras);
``ptxas`` and ``nvdisasm`` come from the PyPI packages ``nvidia-cuda-nvcc`` and
``nvidia-cuda-nvdisasm``. Run this in a process without the CUDA simulator.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile


def find_tool(name: str) -> str | None:
    """A CUDA binary tool: first the nvidia-* wheels of this environment (they match
    numba-cuda's NVVM, whose PTX an older system ptxas may refuse), then PATH and CUDA_HOME."""
    wheel_roots = [os.path.join(p, "nvidia") for p in sys.path if p and os.path.isdir(os.path.join(p, "nvidia"))]
    for root in wheel_roots:
        for cand in sorted(glob.glob(os.path.join(root, "*", "bin", name))):
            if os.access(cand, os.X_OK):
                return cand
    found = shutil.which(name)
    if found:
        return found
    for root in filter(None, [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]):
        cand = os.path.join(root, "bin", name)
        if os.access(cand, os.X_OK):
            return cand
    return None


class ToolchainMismatch(RuntimeError):
    """ptxas is older than the PTX ISA that numba-cuda's NVVM emits (e.g. a system CUDA 13.0
    ptxas beside NVVM 13.5): install the ``nvidia-cuda-nvcc`` wheel matching ``nvidia-nvvm``."""


@dataclasses.dataclass
class Resources:
    name: str
    arch: str
    registers: int
    shared_bytes: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    local_instructions: int
    sass: str = dataclasses.field(repr=False, default="")

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads


_PTXAS_LINE = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<ss>\d+) bytes spill stores, (?P<sl>\d+) bytes spill loads"
)


def compile_ptx(spec, cc=(9, 0)) -> str:
    from numba import cuda

    bounds = getattr(spec, "launch_bounds", None)
    ptx, _ = cuda.compile_ptx(spec.pyfunc, spec.signature, cc=cc, launch_bounds=bounds)
    return ptx


def assemble(spec, cc=(9, 0), *, disassemble=True) -> Resources:
    """PTX -> cubin with ptxas -v; registers, shared bytes, spills; SASS via nvdisasm."""
    ptxas = find_tool("ptxas")
    if ptxas is None:
        raise FileNotFoundError("ptxas not found: pip install nvidia-cuda-nvcc")
    arch = f"sm_{cc[0]}{cc[1]}"
    ptx = compile_ptx(spec, cc)
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"-arch={arch}", "-O3", src, "-o", cubin], capture_output=True, text=True)
        log = out.stdout + out.stderr
        if out.returncode != 0:
            if "Unsupported .version" in log:
                raise ToolchainMismatch(f"{ptxas}: {log.strip().splitlines()[0]}")
            raise RuntimeError(f"ptxas failed on {spec.name} for {arch}:\n{log}")
        m = _PTXAS_LINE.search(log)
        regs = re.search(r"Used (\d+) registers", log)
        smem = re.search(r"(\d+) bytes smem", log)
        sass = ""
        if disassemble:
            nvdisasm = find_tool("nvdisasm")
            if nvdisasm is None:
                raise FileNotFoundError("nvdisasm not found: pip install nvidia-cuda-nvdisasm")
            sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    local = len(re.findall(r"\b(?:LDL|STL)\b", sass))
    return Resources(
        name=spec.name, arch=arch, registers=int(regs.group(1)) if regs else 0,
        shared_bytes=int(smem.group(1)) if smem else 0,
        spill_stores=int(m.group("ss")) if m else 0, spill_loads=int(m.group("sl")) if m else 0,
        stack_bytes=int(m.group("stack")) if m else 0, local_instructions=local, sass=sass,
    )


# ----------------------------------------------------------------------------
# SASS analysis: the main loop's instruction mix
# ----------------------------------------------------------------------------

_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_SASS_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)(.*?);")
_SASS_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
FMA_OPCODES = ("FFMA", "DFMA")


@dataclasses.dataclass
class LoopMix:
    """Instruction mix of one loop of a kernel's SASS (see :func:`main_loop`)."""

    instructions: int
    fma: int
    counts: dict  # opcode with modifiers (e.g. "LDS.128") -> count
    hmma: int = 0  # tensor-core mma instructions (HMMA.*)
    fma_behind_barrier: int | None = None  # FMA issued after the loop's last BAR before one reads a post-BAR LDS

    @property
    def fma_share(self) -> float:
        return self.fma / self.instructions if self.instructions else 0.0

    @property
    def hmma_share(self) -> float:
        return self.hmma / self.instructions if self.instructions else 0.0

    def count(self, prefix: str) -> int:
        """Instructions whose opcode is ``prefix`` or starts with ``prefix + '.'``."""
        return sum(n for op, n in self.counts.items() if op == prefix or op.startswith(prefix + "."))


def sass_instructions(sass: str) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """``([(opcode, operands), ...], {label: index of the next instruction})`` of nvdisasm output."""
    insns: list[tuple[str, str]] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        lab = _SASS_LABEL.match(line)
        if lab:
            labels[lab.group(1)] = len(insns)
            continue
        m = _SASS_INSN.search(line)
        if m:
            insns.append((m.group(1), m.group(2)))
    return insns, labels


def main_loop(sass: str) -> LoopMix | None:
    """The main (K) loop of a matmul kernel's SASS, or None when it has no loop.

    Loops are the ranges of backward branches (a ``BRA`` to an earlier label: the
    instructions from the label through the branch). In a tensor-core kernel the
    main loop is the one with the most HMMA instructions (its shared reads are
    LDSM); otherwise it is the one
    that reads shared memory most (the most LDS instructions: a tiled GEMM's K
    loop feeds every FMA from shared memory, while an epilogue loop reads a few
    staged values and may hold more FMA of its own, e.g. float64 erf), then the
    one with the most FMA (FFMA/DFMA), then the shortest range, so an inner loop
    wins over the loop around it. Its FMA share is FMA instructions / all
    instructions in the range (branch and barrier included): an upper bound on
    the fraction of FMA peak it can reach, since each SM scheduler issues one
    instruction per cycle."""
    insns, labels = sass_instructions(sass)
    best = None
    for pos, (op, operands) in enumerate(insns):
        if not op.startswith("BRA"):
            continue
        t = _SASS_TARGET.search(operands)
        if not t or t.group(1) not in labels or labels[t.group(1)] > pos:
            continue
        full = insns[labels[t.group(1)]: pos + 1]
        body = [o for o, _ in full]
        fma = sum(1 for o in body if o.split(".")[0] in FMA_OPCODES)
        lds = sum(1 for o in body if o.split(".")[0] == "LDS")
        hmma = sum(1 for o in body if o.split(".")[0] == "HMMA")
        key = (hmma, lds, fma, -len(body))
        if best is None or key > best[0]:
            best = (key, body, fma, hmma, full)
    if best is None:
        return None
    _, body, fma, hmma, full = best
    counts: dict[str, int] = {}
    for o in body:
        counts[o] = counts.get(o, 0) + 1
    return LoopMix(instructions=len(body), fma=fma, counts=counts, hmma=hmma,
                   fma_behind_barrier=_fma_behind_barrier(full))


_SASS_REG = re.compile(r"\bR(\d+)\b")


def _fma_behind_barrier(loop: list[tuple[str, str]]) -> int | None:
    """FMA instructions a loop issues after its last barrier (BAR), around the back edge, before
    the first one that reads a register loaded by a shared load (LDS) issued after that barrier:
    the work that covers the new slice's first shared-memory latency (None without a BAR).
    Register dependencies only: nvdisasm does not print the scoreboard waits."""
    bars = [i for i, (op, _) in enumerate(loop) if op.startswith("BAR")]
    if not bars:
        return None
    pending: set[int] = set()
    count = 0
    for op, operands in loop[bars[-1] + 1:] + loop[:bars[-1]]:
        regs = [int(r) for r in _SASS_REG.findall(operands)]
        if op.startswith("LDS") and regs:
            width = 4 if ".128" in op else 2 if ".64" in op else 1
            pending.update(range(regs[0], regs[0] + width))
        elif op.split(".")[0] in FMA_OPCODES:
            if pending.intersection(regs[1:]):
                return count
            count += 1
    return count


# ----------------------------------------------------------------------------
# Theoretical occupancy
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """Per-SM resources that bound resident blocks (CUDA occupancy calculator rules)."""

    name: str
    registers: int = 65536
    shared_bytes: int = 228 * 1024
    max_shared_per_block: int = 227 * 1024
    threads: int = 2048
    blocks: int = 32
    reg_granularity: int = 256  # registers are allocated per warp in units of 256
    shared_granularity: int = 128
    shared_reserved_per_block: int = 1024  # the driver reserves 1 KiB per block (sm_80+)
    warp_size: int = 32


H100 = SMLimits("H100 (sm_90)")


def occupancy(threads_per_block: int, registers: int, shared_bytes: int, sm: SMLimits = H100) -> dict:
    """Theoretical occupancy of a kernel on ``sm``: resident blocks per SM, the
    resident warps' share of the maximum, and which resource binds."""
    warps = -(-threads_per_block // sm.warp_size)
    regs_per_warp = -(-max(registers, 1) * sm.warp_size // sm.reg_granularity) * sm.reg_granularity
    smem = -(-(shared_bytes + sm.shared_reserved_per_block) // sm.shared_granularity) * sm.shared_granularity
    limits = {
        "threads": sm.threads // (warps * sm.warp_size),
        "blocks": sm.blocks,
        "registers": sm.registers // (regs_per_warp * warps),
        "shared": sm.shared_bytes // smem if shared_bytes <= sm.max_shared_per_block else 0,
    }
    blocks = min(limits.values())
    bound = min(limits, key=lambda k: limits[k])
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy": blocks * warps / (sm.threads // sm.warp_size),
        "limited_by": bound,
    }
