"""Fully connected backward, plain and through ReLU + dropout: grad_x = g' @ w.T,
grad_w = x.T @ g', grad_b = sum(g') with g' = dropout'(g) * relu'(z) (mask
regenerated from (seed, offset)). gpufc.linear_backward against CuPy (cuBLAS
products + one elementwise kernel with a stored mask) and PyTorch autograd;
TFLOP/s = 4MNK / time.

    python bench/bench_backward.py [--quick] [--backend cuda|sim|cpu] [--out DIR]
"""

import sys

from common import run_op

if __name__ == "__main__":
    sys.exit(run_op(["backward"], default_out="backward"))
