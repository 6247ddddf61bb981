"""Dropout forward and backward (p = 0.1) on 1M-256M float32 elements: gpufc (and
version 1 forced) against a device-to-device copy of the same bytes (the bandwidth
ceiling), PyTorch ``F.dropout`` / ``native_dropout_backward`` and CuPy (cuRAND +
one elementwise kernel); GB/s = 8 bytes per element (read + write) / time.

gpufc's output is checked bit for bit against gpufc.reference at both ends of the tensor.

    python bench/bench_dropout.py [--quick] [--backend cuda|sim|cpu] [--out DIR]
"""

import sys

from common import run_op

if __name__ == "__main__":
    sys.exit(run_op(["dropout"], default_out="dropout"))
