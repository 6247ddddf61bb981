"""The static report's SASS reading (gpufc/tools/compile.py) on hand-written SASS: the main
loop and the FMA a loop issues behind its barrier before it needs a new shared load."""

import pytest

from gpufc.tools import compile as C

pytestmark = pytest.mark.reference


def _sass(lines):
    out, addr = [], 0
    for line in lines:
        if line.endswith(":"):
            out.append(line)
            continue
        out.append(f"        /*{addr:04x}*/                   {line} ;")
        addr += 16
    return "\n".join(out)


LOOP = [
    "MOV R1, c[0x0][0x28]",
    ".L_x_0:",
    "FFMA R10, R20, R6, R10",  # old registers: they cover the new slice's shared loads
    "FFMA R11, R21, R7, R11",
    "FFMA R12, R2, R8, R12",  # reads R2, loaded behind the barrier: the wait
    "LDS.128 R40, [R5+0x10]",
    "STS [R9], R20",
    "BAR.SYNC.DEFER_BLOCKING 0x0",
    "LDS.128 R2, [R5]",  # the new slice's first fragments, R2..R5
    "FFMA R13, R30, R31, R13",
    "@P0 BRA `(.L_x_0)",
    "EXIT",
]


def test_fma_behind_the_barrier_counts_until_the_first_read_of_a_new_load():
    loop = C.main_loop(_sass(LOOP))
    assert loop.fma == 4 and loop.instructions == 9 and loop.count("LDS") == 2
    # after BAR: 1 FFMA, then around the back edge 2 more before the one that reads R2
    assert loop.fma_behind_barrier == 3


def test_no_barrier_no_figure():
    loop = C.main_loop(_sass([line for line in LOOP if not line.startswith("BAR")]))
    assert loop.fma_behind_barrier is None
