#!/usr/bin/env bash
# The one prepared call for a lent GPU: versions, the whole test suite on the real
# GPU, and the version-1 kernels timed against CuPy. Runs from the source tree
# without installing anything (the device machine has no network).
#   usage: bash bench/gpu_check.sh            # writes under $OUT (default bench/out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The device image pairs numba-cuda 0.30.4 with NumPy 2.5, whose removal of
# np.row_stack breaks numba-cuda's CUDA target at the first compile. Wheels
# carried in .whl/ (NumPy 2.4.6 for cp312) are put first on the path.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
unset NUMBA_ENABLE_CUDASIM GPUFC_BACKEND

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; python3 -m gpufc info; } 2>&1 | tee "$OUT/info.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tee "$OUT/pytest.txt" | tail -25
timeout 120 python3 bench/bench_v1.py --out "$OUT/bench_v1.csv" 2>&1 | tee "$OUT/bench_v1.txt"
