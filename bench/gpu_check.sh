#!/usr/bin/env bash
# The one prepared call for a lent GPU (bench/README.md): versions, the whole test
# suite on the real GPU, the kernels under compute-sanitizer, and the benchmark
# suite against cuBLAS / PyTorch / a device copy, all inside 7 minutes of wall
# clock. Runs from the source tree without installing anything (no network there).
#
#   usage: OUT=/some/dir bash bench/gpu_check.sh     # default OUT: bench/out/gpu_check
#          GPUFC_COMMIT=<sha>                        # recorded in the rows (no .git travels)
#
# Stages (wall-clock budget; each under `timeout`, so one overrun cannot starve the rest):
#   0 setup + info           ~20 s   NumPy wheel from .whl/, versions, nvidia-smi
#   A tests + sanitizers    <=170 s  in parallel: pytest (GPU tiers, xdist when present),
#                                    pytest compile tier, 4 x compute-sanitizer
#   B benchmarks            <=200 s  python -m gpufc bench (stops starting work at its budget)
# Writes 8 files to $OUT/<date>_<gpu>/ (copy that folder to bench/results/):
#   info.txt pytest.txt sanitizer.txt bench.log results.csv results.json summary.md plots.png
# The last lines printed are the verdict and the summary table.
set -uo pipefail
START=$SECONDS
HARD_LIMIT=${GPU_CHECK_LIMIT_S:-420}
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu_check}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GPU_CHECK_RUNNING=1
# The device image pairs numba-cuda 0.30.4 with NumPy 2.5, whose removal of
# np.row_stack breaks numba-cuda's CUDA target at the first compile. Wheels
# carried in .whl/ (NumPy 2.4.6 for cp312) are put first on the path.
if compgen -G ".whl/*.whl" >/dev/null; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "WARNING: could not install the carried wheels in .whl/; using the image's packages"
  fi
fi
unset NUMBA_ENABLE_CUDASIM GPUFC_BACKEND
# TF32 off for every peer (CuPy reads CUPY_TF32 at import; cuBLAS reads NVIDIA_TF32_OVERRIDE).
export CUPY_TF32=0 NVIDIA_TF32_OVERRIDE=0

if nvidia-smi -L >/dev/null 2>&1; then HAVE_GPU=1; else HAVE_GPU=0; fi
if [ "$HAVE_GPU" = 1 ]; then
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
else
  GPU_NAME="no-GPU"
fi
RUN_NAME="$(date -u +%Y-%m-%d)_$(echo "$GPU_NAME" | tr -cs 'A-Za-z0-9.' '-' | sed 's/^-*//; s/-*$//')"
DEST="$OUT/$RUN_NAME"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$DEST"
left() { echo $(( HARD_LIMIT - (SECONDS - START) )); }
stage() { echo; echo "== $* (t=$((SECONDS - START)) s)"; }

# ---------------------------------------------------------------- 0: info
stage "info"
{
  echo "run: $RUN_NAME   date: $(date -u +%FT%TZ)   host: $(uname -srm)   cpus: $(nproc)"
  echo "GPUFC_COMMIT=${GPUFC_COMMIT:-unset}   CUPY_TF32=$CUPY_TF32   NVIDIA_TF32_OVERRIDE=$NVIDIA_TF32_OVERRIDE"
  if [ "$HAVE_GPU" = 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit --format=csv
  else
    echo "nvidia-smi: no GPU reported: the GPU stages are skipped"
  fi
  timeout 60 $PY -m gpufc info
  timeout 60 $PY - <<'EOF'
import importlib.metadata as md, sys
names = ["numpy", "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "torch", "pytest", "pytest-xdist",
         "matplotlib", "rich", "nvidia-cuda-nvcc", "nvidia-nvvm"]
for n in names:
    try:
        print(f"{n:20s} {md.version(n)}")
    except md.PackageNotFoundError:
        pass
import numpy
print(f"{'numpy loaded from':20s} {numpy.__file__}")
print(f"{'python':20s} {sys.version.split()[0]} ({sys.executable})")
EOF
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -1)
  echo "compute-sanitizer: ${SAN:-not found} $( [ -n "$SAN" ] && "$SAN" --version 2>/dev/null | tail -1)"
} 2>&1 | tee "$DEST/info.txt"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -1)

# ---------------------------------------------------------------- A: tests + sanitizers, in parallel
A_BUDGET=$(( $(left) - 230 )); [ "$A_BUDGET" -gt 170 ] && A_BUDGET=170; [ "$A_BUDGET" -lt 60 ] && A_BUDGET=60
stage "A: pytest + compute-sanitizer in parallel (budget ${A_BUDGET} s)"
XDIST=""
if [ "$HAVE_GPU" = 1 ] && $PY -c "import xdist" 2>/dev/null; then XDIST="-n 6"; fi
if [ "$HAVE_GPU" = 1 ]; then
  MAIN_SEL=(-m "not compile")
else
  MAIN_SEL=(-m "reference")  # no GPU: the plumbing only; CI runs the rest
fi
TEST_PATHS=tests
[ "$HAVE_GPU" = 1 ] || TEST_PATHS=tests/test_reference.py
# Each job runs in its own process group (setsid), so whatever a stopped job leaves
# behind (a sanitizer's python, pytest's workers) is killed by that group's id
# before the benchmarks start: nothing else may use the GPU while they time.
SETSID=$(command -v setsid >/dev/null && echo "setsid -w" || true)
GROUPS_A=()
$SETSID timeout -k 5 "$A_BUDGET" $PY -m pytest -v -p no:cacheprovider -rfEs --durations=10 $XDIST "${MAIN_SEL[@]}" \
  $TEST_PATHS >"$WORK/pytest_main.txt" 2>&1 &
PID_MAIN=$!; GROUPS_A+=($!)
PID_COMPILE=""
if [ "$HAVE_GPU" = 1 ]; then
  # CPU-only tier (CI runs it too); here only to see the device image's toolchain pass it.
  $SETSID timeout -k 5 "$A_BUDGET" $PY -m pytest -v -p no:cacheprovider -rfEs -m compile tests \
    >"$WORK/pytest_compile.txt" 2>&1 &
  PID_COMPILE=$!; GROUPS_A+=($!)
fi
PID_TRAIN=""
if [ "$HAVE_GPU" = 1 ]; then
  # gpufc train on the cuda backend: the MLP on the digits must reach 0.95 test accuracy.
  $SETSID timeout -k 5 "$A_BUDGET" $PY -m gpufc train --no-progress >"$WORK/train.txt" 2>&1 &
  PID_TRAIN=$!; GROUPS_A+=($!)
fi
SAN_PIDS=()
TOOLS=(memcheck racecheck initcheck synccheck)
if [ "$HAVE_GPU" = 1 ] && [ -n "$SAN" ]; then
  for tool in "${TOOLS[@]}"; do
    $SETSID timeout -k 5 $(( A_BUDGET - 5 )) "$SAN" --tool "$tool" --launch-timeout 120 --print-limit 25 \
      $PY bench/sanitizer_check.py --deadline-s $(( A_BUDGET - 45 )) >"$WORK/san_$tool.txt" 2>&1 &
    SAN_PIDS+=($!); GROUPS_A+=($!)
  done
  # Positive control: a planted out-of-bounds write must be reported, or "0 errors" means nothing.
  $SETSID timeout -k 5 $(( A_BUDGET - 5 )) "$SAN" --tool memcheck --launch-timeout 120 --print-limit 3 \
    $PY bench/sanitizer_check.py --plant-oob >"$WORK/san_control.txt" 2>&1 &
  SAN_PIDS+=($!); GROUPS_A+=($!)
fi
wait "$PID_MAIN"; RC_MAIN=$?
RC_COMPILE=skipped
[ -n "$PID_COMPILE" ] && { wait "$PID_COMPILE"; RC_COMPILE=$?; }
RC_TRAIN=skipped
[ -n "$PID_TRAIN" ] && { wait "$PID_TRAIN"; RC_TRAIN=$?; }
for pid in "${SAN_PIDS[@]}"; do wait "$pid"; done
if [ -n "$SETSID" ]; then
  for pgid in "${GROUPS_A[@]}"; do kill -KILL -- "-$pgid" 2>/dev/null; done
fi

{
  echo "### pytest ${MAIN_SEL[*]} $XDIST (exit $RC_MAIN; 124 = stopped at ${A_BUDGET} s)"
  cat "$WORK/pytest_main.txt"
  if [ -n "$PID_COMPILE" ]; then
    echo; echo "### pytest -m compile (exit $RC_COMPILE)"; cat "$WORK/pytest_compile.txt"
  fi
  if [ -n "$PID_TRAIN" ]; then
    echo; echo "### python3 -m gpufc train --no-progress (exit $RC_TRAIN)"; cat "$WORK/train.txt"
  fi
} >"$DEST/pytest.txt"
pytest_line() {
  local line
  line=$(grep -E "^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)" "$1" | tail -1)
  if [ -n "$line" ]; then echo "$line"; return; fi
  # Stopped before its summary: count the -v result lines it printed.
  echo "stopped: $(grep -c ' PASSED ' "$1") passed, $(grep -c ' FAILED ' "$1") failed, $(grep -c ' ERROR ' "$1") errors, $(grep -c ' SKIPPED ' "$1") skipped before the stop"
}
PYTEST_SUMMARY="pytest (${MAIN_SEL[*]}): exit $RC_MAIN: $(pytest_line "$WORK/pytest_main.txt")"
[ -n "$PID_COMPILE" ] && PYTEST_SUMMARY="$PYTEST_SUMMARY
pytest (-m compile): exit $RC_COMPILE: $(pytest_line "$WORK/pytest_compile.txt")"
[ -n "$PID_TRAIN" ] && PYTEST_SUMMARY="$PYTEST_SUMMARY
gpufc train (cuda): exit $RC_TRAIN: $(tail -1 "$WORK/train.txt")"

SAN_SUMMARY=""
{
  if [ "$HAVE_GPU" = 0 ]; then
    echo "compute-sanitizer: skipped (no GPU)"
  elif [ -z "$SAN" ]; then
    echo "compute-sanitizer: skipped (not found on PATH or under /usr/local/cuda*)"
  fi
  for tool in "${TOOLS[@]}"; do
    f="$WORK/san_$tool.txt"
    [ -f "$f" ] || continue
    echo "### compute-sanitizer --tool $tool python3 bench/sanitizer_check.py"
    cat "$f"
    echo
  done
} >"$DEST/sanitizer.txt"
if [ -f "$WORK/san_control.txt" ]; then
  {
    echo "### positive control: compute-sanitizer --tool memcheck python3 bench/sanitizer_check.py --plant-oob"
    cat "$WORK/san_control.txt"
  } >>"$DEST/sanitizer.txt"
fi
for tool in "${TOOLS[@]}"; do
  f="$WORK/san_$tool.txt"
  [ -f "$f" ] || continue
  summary=$(grep -E "(ERROR|RACECHECK|INITCHECK|SYNCCHECK) SUMMARY" "$f" | sed 's/^=* *//' | paste -sd ';' -)
  if [ -z "$summary" ]; then  # stopped before its summary: count the reports it printed
    summary="stopped; $(grep -cE '^========= (Invalid|Error|Uninitialized|Barrier|Warning: Race|Program hit)' "$f") error reports before the stop"
  fi
  checks=$(grep -E "^sanitizer_check:" "$f" | tail -1)
  SAN_SUMMARY="$SAN_SUMMARY
$(printf '%-10s %s | %s' "$tool" "${summary:-no summary line (stopped or failed; see sanitizer.txt)}" "${checks:-checks did not finish}")"
done
if [ -f "$WORK/san_control.txt" ]; then
  control=$(grep -E "ERROR SUMMARY" "$WORK/san_control.txt" | tail -1 | sed 's/^=* *//')
  SAN_SUMMARY="$SAN_SUMMARY
$(printf '%-10s %s' control "planted OOB write: ${control:-no summary line} (expect >= 1 error)")"
fi
[ -z "$SAN_SUMMARY" ] && SAN_SUMMARY="
compute-sanitizer: skipped (no GPU or not found)"
echo "$PYTEST_SUMMARY"
echo "${SAN_SUMMARY#?}"

# ---------------------------------------------------------------- B: benchmarks
B_BUDGET=$(( $(left) - 25 )); [ "$B_BUDGET" -gt 200 ] && B_BUDGET=200
if [ "$HAVE_GPU" = 1 ]; then BENCH_ARGS=(--backend cuda); else BENCH_ARGS=(--backend cpu --quick); fi
stage "B: python -m gpufc bench ${BENCH_ARGS[*]} (budget ${B_BUDGET} s; log in bench.log)"
if [ "$B_BUDGET" -gt 20 ]; then
  timeout -k 5 $(( B_BUDGET + 20 )) $PY -m gpufc bench "${BENCH_ARGS[@]}" --out "$WORK/bench" \
    --budget-s $(( B_BUDGET - 15 )) --static no >"$DEST/bench.log" 2>&1
  RC_BENCH=$?
else
  echo "no time left for the benchmarks" >"$DEST/bench.log"; RC_BENCH=skipped
fi
for f in results.csv results.json summary.md plots.png; do
  [ -f "$WORK/bench/$f" ] && cp "$WORK/bench/$f" "$DEST/"
done
grep -E "^(VALIDATION FAILED|skipped|wrote)" "$DEST/bench.log" | head -5

# ---------------------------------------------------------------- verdict + table (last)
stage "verdict"
echo "$PYTEST_SUMMARY"
echo "${SAN_SUMMARY#?}"
echo "benchmarks: exit $RC_BENCH (1 = a validation failed, 124 = stopped at the time limit)"
echo "files: $DEST/ ($(ls "$DEST" | tr '\n' ' '))"
echo "total wall time: $((SECONDS - START)) s"
echo
if [ -f "$WORK/bench/table.txt" ]; then
  cat "$WORK/bench/table.txt"
else
  tail -40 "$DEST/bench.log"
fi
rm -rf "$WORK"
