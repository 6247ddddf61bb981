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

    ptx, _ = cuda.compile_ptx(spec.pyfunc, spec.signature, cc=cc)
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
