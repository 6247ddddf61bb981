"""The default matmul configuration per device class: what runs when nothing was tuned.

``gpufc tune`` (gpufc/tune.py) times the candidates on the user's GPU and keeps the
winner per shape bucket; without a GPU, with tuning off (``GPUFC_TUNE=0``) or for a
shape no record covers, this table decides. It replaces the fixed "largest tile that
gives every SM a block" rule.

Evidence, per device class (the only measurements we have are an H200's, committed
under bench/results/, float32, TF32 off):

- sm_90 (H100 / H200, 132 SMs). 4096^3 configuration sweep (2026-11-28 follow-up run):
  t128x128k16w 40.7 TFLOP/s > t128x128k16 40.1 > t128x128 39.1 > t128x128w 35.2 >
  t128x64 27.9 = t64x64 27.9 > t32x32 16.0. Every large tile beats every smaller one
  by 1.4x while the grid fills the GPU, so the table takes the largest tile whose grid
  gives each SM at least ``fill`` blocks, and falls to split-K where even the smallest
  tile leaves most SMs idle (256x1024x1024 ran at 0.50x cuBLAS, 64x512x512 at 0.44x,
  8x1024x1024 at 0.26x with t32x32 / t128x64, one pass). The version-3 kernels take
  the places of their version-2 peers on static evidence only (ptxas sm_90: main-loop
  FFMA share 0.90 against 0.85, see bench/kernel_report.py): not measured on a GPU.
- other classes (sm_80 and older, newer): the same ranking (no measurement), scaled
  by their SM count.

float64 keeps version 2's tiles (t128x128 needs more than the 48 KiB of static shared
memory in float64): t128x64, t64x64, t32x32, no split-K.
"""

from __future__ import annotations

import numpy as np

from . import splitk

# (configuration, minimum blocks per SM for it to be chosen), largest tile first; the
# last entry is the fallback, with split-K when its grid is small (splitk.choose_chunk).
TABLE = {
    ("sm_90", "float32"): (("v3_t128x128k16w", 1.0), ("v3_t64x64", 1.0), ("v3_t32x32", 0.0)),
    ("sm_90", "float64"): (("t128x64", 1.0), ("t64x64", 1.0), ("t32x32", 0.0)),
}
SPLIT_K = set(splitk.SPLIT_K_CONFIGS)  # fallbacks that may split K (version 3 only)
# Version 3 indexes its operands with 32 bits; an operand of 2**32 elements or more runs
# the version-2 configuration of the same tile instead.
V2_PEER = {"v3_t128x128k16w": "t128x128", "v3_t64x64": "t64x64", "v3_t32x32": "t32x32"}


def device_class(cc: tuple[int, int] | None) -> str:
    """The table's device class for compute capability ``cc``: only sm_90 was measured, so
    every device (and no device: the simulator, a CPU) uses its rows, scaled by its SM count
    in :func:`choose`. A measured class gets its own key here."""
    return "sm_90"


def choose(m: int, n: int, k: int, dtype, sms: int, by_name, cc=None) -> tuple[str, int | None]:
    """``(configuration name, split-K chunk or None)`` for ``(M, K) @ (K, N)`` in ``dtype`` on a
    device with ``sms`` SMs; ``by_name`` maps a name to its configuration (for its grid)."""
    rows = TABLE[(device_class(cc), np.dtype(dtype).name)]
    for name, fill in rows[:-1]:
        gx, gy = by_name(name).grid(m, n)
        if gx * gy >= fill * sms:
            return name, None
    name = rows[-1][0]
    if name in SPLIT_K:
        gx, gy = by_name(name).grid(m, n)
        return name, splitk.choose_chunk(m, n, k, gx * gy, sms)
    return name, None
