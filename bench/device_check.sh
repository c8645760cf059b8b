#!/usr/bin/env bash
# The one GPU check: install, GPU tests, benchmarks; a short summary table last.
#
#   bench/device_check.sh [OUT_DIR]        (default: bench/results)
#
# On the lent H100/H200 (no internet): `pip install --no-deps --no-build-isolation -e .` against the
# machine's torch/triton, CUDA code built for sm_90a only. The device tool brings back at most 8
# files, so OUT_DIR receives three: check.log (everything, summary last), pytest_gpu.log, and
# results.tar with every benchmark's JSON + markdown and the compute-sanitizer logs, rewritten after each step so that a run cut
# short by its time limit still returns what was done. Unpack it into bench/results/ and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RAW=$(mktemp -d)
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
[ -d /usr/local/cuda ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}
REP=${BENCH_REP_MS:-25}
LOG="$OUT/check.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }
failures=0
# bench NAME ARGS...: one benchmark run into $RAW, then refresh results.tar
bench() {
    local name=$1; shift
    local start=$SECONDS
    $PY -m bench "$@" --rep-ms "$REP" --out "$RAW" >>"$LOG" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || failures=$((failures + 1))
    say "bench $name: exit code $rc in $((SECONDS - start)) s"
    tar cf "$OUT/results.tar" -C "$RAW" .
}

say "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

say "== install"
start=$SECONDS
if ! $PY -m pip install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
    say "install FAILED (see $LOG)"; tail -40 "$LOG"; exit 1
fi
say "installed in $((SECONDS - start)) s"

say "== pytest -m gpu"
start=$SECONDS
$PY -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
tests_rc=${PIPESTATUS[0]}
say "pytest -m gpu exit code $tests_rc in $((SECONDS - start)) s"

say "== compute-sanitizer on the CUDA kernel (bench/sanitize_case.py)"
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
sanitizer_rc=0
for tool in memcheck racecheck; do
    start=$SECONDS
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool $tool --error-exitcode 9 $PY bench/sanitize_case.py \
        > "$RAW/sanitizer_$tool.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && sanitizer_rc=$rc
    say "compute-sanitizer --tool $tool: exit code $rc in $((SECONDS - start)) s; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$RAW/sanitizer_$tool.log" | tail -1)"
done
tar cf "$OUT/results.tar" -C "$RAW" .

say "== benchmarks"
bench forward-r16 --suite forward --ranks 16
bench forward-r64 --suite forward --ranks 64 --tokens 16 4096 --layers "8B q/o" "8B gate/up" "70B up" --tag r64
bench merge --suite merge
bench multi --suite multi --quick
bench model --suite model
say "== demo (python -m lora_kernels.demo --quick)"
$PY -m lora_kernels.demo --quick 2>&1 | tail -30 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || failures=$((failures + 1))
bench tune --suite tune --quick
bench training --suite training --ranks 16 --tokens 128 1024 4096 --layers "8B q/o" "8B k/v" "8B gate/up" "8B down"
bench overhead --suite overhead

say "== summary"
$PY -m bench.summarize "$RAW" 2>&1 | tee -a "$LOG"
say "pytest -m gpu exit code $tests_rc; compute-sanitizer exit code $sanitizer_rc; benchmark runs failed: $failures"
[ "$tests_rc" -eq 0 ] && [ "$sanitizer_rc" -eq 0 ] && [ "$failures" -eq 0 ]
