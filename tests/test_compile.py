"""Compile tier: every kernel specialisation compiles to PTX for sm_80 and sm_90, and
ptxas reports 0 spill bytes and no local memory. Runs in a subprocess without the
simulator (the simulator cannot compile), needs numba-cuda's NVVM and ptxas."""

import json

import pytest

from helpers import run_clean_python

pytestmark = pytest.mark.compile

_SCRIPT = r"""
import json, sys
from gpufc import backend, compile as C
try:
    k = backend.kernels()
    specs = k.catalogue.specs()
    C.compile_ptx(specs[0], (8, 0))
except Exception as err:  # no NVVM in this environment
    print(json.dumps({"skip": f"cannot compile PTX here: {type(err).__name__}: {err}"})); sys.exit(0)
if C.find_tool("ptxas") is None:
    print(json.dumps({"skip": "ptxas not found (pip install nvidia-cuda-nvcc)"})); sys.exit(0)
try:
    C.assemble(specs[0], (8, 0), disassemble=False)
except C.ToolchainMismatch as err:
    print(json.dumps({"skip": f"ptxas cannot assemble this NVVM's PTX: {err}"})); sys.exit(0)
rows = []
for cc in ((8, 0), (9, 0)):
    for s in specs:
        r = C.assemble(s, cc, disassemble=False)
        rows.append(dict(name=s.name, arch=r.arch, regs=r.registers, spill=r.spill_bytes, stack=r.stack_bytes))
print(json.dumps({"rows": rows}))
"""


@pytest.fixture(scope="module")
def compiled():
    out = run_clean_python(_SCRIPT)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result["rows"]


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    archs = {r["arch"] for r in compiled}
    assert archs == {"sm_80", "sm_90"}
    assert len({r["name"] for r in compiled}) * 2 == len(compiled)


def test_no_spills_and_no_stack(compiled):
    bad = [r for r in compiled if r["spill"] or r["stack"]]
    assert not bad, f"{len(bad)} kernels spill or use a stack frame: {bad[:5]}"


def test_registers_fit_a_full_block(compiled):
    # 1024-thread limits aside, every config here launches <= 256 threads: 255 registers is the hard cap.
    assert all(0 < r["regs"] <= 255 for r in compiled)
