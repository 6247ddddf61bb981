"""Fully connected forward, ``x (M, K) @ w (K, N) + b -> y (M, N)``: gpufc (its chosen
configuration, and version 1 forced) against cuBLAS through CuPy (``x @ w + b``, TF32
off), PyTorch ``F.linear`` and NumPy on the host (small shapes), in TFLOP/s = 2MNK / time.

Shapes: squares 1024-8192, MLP shapes (batch 256-16384 by 1024-4096), small
latency-bound ones; ``--quick`` runs a few small ones. Every implementation is
validated against gpufc.reference (float64, sampled rows) before it is timed.
The method is gpufc/bench.py's docstring.

    python bench/bench_linear.py [--quick] [--backend cuda|sim|cpu] [--out DIR]
"""

import sys

from common import run_op

if __name__ == "__main__":
    sys.exit(run_op(["linear"], default_out="linear"))
