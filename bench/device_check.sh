#!/usr/bin/env bash
# The one GPU check: install, GPU tests, benchmarks; a short summary table last.
#
#   bench/device_check.sh [OUT_DIR]        (default: bench/results)
#
# On the lent H100/H200 (no internet): `pip install --no-deps --no-build-isolation -e .` against the
# machine's torch/triton, CUDA code built for sm_90a only. Writes at most 8 files to OUT_DIR (the
# device tool brings back 8): check.log, pytest_gpu.log, and the benchmark JSON + markdown.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
[ -d /usr/local/cuda ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}
LOG="$OUT/check.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }

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
start=$SECONDS
$PY -m bench --suite forward --ranks 16 --rep-ms ${BENCH_REP_MS:-25} --out "$OUT" >>"$LOG" 2>&1
bench_rc=$?
$PY -m bench --suite forward --ranks 64 --tokens 16 4096 --layers "8B q/o" "8B gate/up" "70B up" \
    --rep-ms ${BENCH_REP_MS:-25} --tag r64 --out "$OUT" >>"$LOG" 2>&1 || bench_rc=$?
$PY -m bench --suite multi --quick --rep-ms ${BENCH_REP_MS:-25} --out "$OUT" >>"$LOG" 2>&1 || bench_rc=$?
say "benchmarks exit code $bench_rc in $((SECONDS - start)) s"

say "== summary"
$PY - "$OUT" <<'PYEOF' 2>&1 | tee -a "$LOG"
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/*-forward*.json")):
    res = json.load(open(path))
    print(f"{path.split('/')[-1]}: {res['meta']['device']}")
    print(f"{'layer':>11} {'M':>6} {'r':>3} {'base us':>9} " + " ".join(f"{m:>10}" for m in ("skilled", "peft", "ours_triton", "ours_cuda")))
    for c in res["cases"]:
        rt = c["ratios"]
        cells = " ".join(f"{rt[m]:>10.2f}" if m in rt else f"{'-':>10}" for m in ("skilled", "peft", "ours_triton", "ours_cuda"))
        print(f"{c['layer']:>11} {c['M']:>6} {c['r']:>3} {c['times_us'].get('base', float('nan')):>9.1f} {cells}"
              + ("  FAILED " + "; ".join(c["failed"]) if c["failed"] else ""))
    print("summary:", json.dumps(res["summary"]))
from bench.multi import brief
for path in sorted(glob.glob(sys.argv[1] + "/*-multi*.json")):
    res = json.load(open(path))
    print(f"{path.split('/')[-1]}: {res['meta']['device']}")
    print("\n".join(brief(res)))
    print("summary:", json.dumps(res["summary"]))
PYEOF
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
