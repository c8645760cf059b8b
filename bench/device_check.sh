#!/usr/bin/env bash
# The one GPU check: install, GPU tests, benchmarks; a short summary table last.
#
#   bench/device_check.sh [OUT_DIR]        (default: bench/results)
#
# On the lent H100/H200 (no internet): `pip install --no-deps --no-build-isolation -e .` against the
# machine's torch/triton, CUDA code built for sm_90a only. The device tool brings back at most 8
# files, so OUT_DIR receives three: check.log (everything, summary last), pytest_gpu.log, and
# results.tar with every benchmark's JSON + markdown, rewritten after each step so that a run cut
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

say "== benchmarks"
bench forward-r16 --suite forward --ranks 16
bench forward-r64 --suite forward --ranks 64 --tokens 16 4096 --layers "8B q/o" "8B gate/up" "70B up" --tag r64
bench model --suite model
say "== demo (python -m lora_kernels.demo --quick)"
$PY -m lora_kernels.demo --quick 2>&1 | tail -30 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || failures=$((failures + 1))
bench tune --suite tune --quick

say "== summary"
$PY - "$RAW" <<'PYEOF' 2>&1 | tee -a "$LOG"
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/*.json")):
    res = json.load(open(path))
    print(f"{path.split('/')[-1]}: {res['meta']['device']}")
    print("  summary:", json.dumps(res["summary"]))
    if res["suite"].startswith("forward"):
        cols = ("skilled", "peft", "ours_triton", "ours_cuda")
        print(f"  {'layer':>11} {'M':>6} {'r':>3} {'base us':>9} " + " ".join(f"{m:>11}" for m in cols))
        for c in res["cases"]:
            rt = c["ratios"]
            cells = " ".join(f"{rt[m]:>11.2f}" if m in rt else f"{'-':>11}" for m in cols)
            print(f"  {c['layer']:>11} {c['M']:>6} {c['r']:>3} {c['times_us'].get('base', float('nan')):>9.1f} {cells}"
                  + ("  FAILED " + "; ".join(c["failed"]) if c["failed"] else ""))
    if res["suite"].startswith("model"):
        from bench.model import brief
        print("\n".join(brief(res)))
PYEOF
say "pytest -m gpu exit code $tests_rc; benchmark runs failed: $failures"
[ "$tests_rc" -eq 0 ] && [ "$failures" -eq 0 ]
