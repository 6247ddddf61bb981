"""Fully connected forward with ReLU and dropout (p = 0.1): gpufc's one fused kernel
(and version 1 forced) against the unfused chains a user would write: CuPy (cuBLAS
``x @ w``, a cuRAND uniform, one elementwise kernel for bias + relu + mask) and
PyTorch ``F.dropout(F.relu(F.linear(...)))``; TFLOP/s = 2MNK / time, TF32 off.

gpufc's mask is checked bit for bit against gpufc.reference; the peers draw their
own masks, so their keep rate and kept values are checked instead.

    python bench/bench_linear_fused.py [--quick] [--backend cuda|sim|cpu] [--out DIR]
"""

import sys

from common import run_op

if __name__ == "__main__":
    sys.exit(run_op(["fused"], default_out="fused"))
