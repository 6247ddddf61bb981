#!/usr/bin/env bash
# A short follow-up call for a lent GPU (about 4 minutes), for a session whose device
# time is too short for gpu_check.sh: the gpu-marked tests (real-GPU interop, streams,
# large shapes, the fast launch path against Numba's), then only the benchmarks a
# change targets (host call overhead and the matmul configuration sweep). Every
# benchmark row is validated against gpufc.reference before it is timed.
#   usage: OUT=/some/dir GPUFC_COMMIT=<sha> bash bench/gpu_followup.sh [ops...]   (default: overhead configs)
# Writes pytest.txt, bench.log, results.csv, results.json, summary.md into $OUT/<date>_<gpu>_followup/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu_followup}
PY=${PYTHON:-python3}
if [ $# -gt 0 ]; then OPS=("$@"); else OPS=(overhead configs); fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUPY_TF32=0 NVIDIA_TF32_OVERRIDE=0
unset NUMBA_ENABLE_CUDASIM GPUFC_BACKEND
# Same carried NumPy 2.4 wheel as gpu_check.sh (the image's NumPy 2.5 breaks numba-cuda 0.30.4).
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
DEST="$OUT/$(date -u +%Y-%m-%d)_$(echo "${GPU_NAME:-no-GPU}" | tr -cs 'A-Za-z0-9.' '-' | sed 's/^-*//; s/-*$//')_followup"
mkdir -p "$DEST"
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
timeout -k 5 100 $PY -m pytest -q -p no:cacheprovider -rfEs $XDIST -m gpu tests >"$DEST/pytest.txt" 2>&1
RC_TEST=$?
timeout -k 5 125 $PY -m gpufc bench --backend cuda --ops "${OPS[@]}" --out "$DEST" --budget-s 105 --static no --no-plots \
  >"$DEST/bench.log" 2>&1
RC_BENCH=$?
echo "pytest: exit $RC_TEST: $(grep -E '[0-9]+ (passed|failed)' "$DEST/pytest.txt" | tail -1)"
grep -E "FAILED|ERROR" "$DEST/pytest.txt" | head -15
echo "bench: exit $RC_BENCH"
[ -f "$DEST/table.txt" ] && cat "$DEST/table.txt" || tail -30 "$DEST/bench.log"
