"""Host time per call for small shapes (latency, not GPU time): ``perf_counter``
around each call without synchronising, many calls, median. gpufc.linear and
``FullyConnectedLayer(512, 512).forward`` on a (64, 512) batch against CuPy's
``x @ w + b``, PyTorch ``F.linear`` and NumPy; gpufc.dropout against CuPy and
PyTorch.

    python bench/bench_overhead.py [--quick] [--backend cuda|sim|cpu] [--out DIR]
"""

import sys

from common import run_op

if __name__ == "__main__":
    sys.exit(run_op(["overhead"], default_out="overhead"))
