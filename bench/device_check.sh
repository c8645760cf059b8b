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
#
# Device time is scarce (15 minutes a session, 10 a call), so the work comes in stages and the
# script watches a budget: STAGES picks them (default: all, in this order), and no step starts
# once BUDGET_S seconds (default 540) have passed; each step is also cut off at the budget. The
# install runs every time (a warm machine keeps the build, so a second call is quick). E.g.
#   STAGES="tests sanitize" bench/device_check.sh $OUT                  # correctness first
#   STAGES="forward merge multi training" bench/device_check.sh $OUT    # then the numbers
#
# Packages the GPU machine lacks (it has no internet) travel as wheels in .whl/ (git-ignored; fill
# it with bench/device_wheels.sh and name .whl in the device tool's `carry`): they are installed
# first, e.g. nvidia-cutlass, whose CUTLASS/CuTe headers the sm90 CUDA kernels compile against.
# The GPU lane runs on 8 workers when pytest-xdist is there (Triton compiles dominate it); a red
# test never stops the run: every later stage still runs, and pytest prints a one-line summary per
# failure. Rehearsal off the GPU machine: INSTALL=0 QUICK=1 BUDGET_S=300 bench/device_check.sh /tmp/x
# (QUICK=1 gives every benchmark --quick: tiny shapes, whatever device is here).
#
# Before a GPU run, on the CPU machine: tests/lanes/gpu_versions.sh full (the CPU lane under this
# machine's torch 2.11 + triton 3.6, ~20 min there), so that a version problem is not found here.
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
STAGES=" ${STAGES:-tests sanitize forward merge multi training demo model overhead tune} "
BUDGET_S=${BUDGET_S:-540}
LOG="$OUT/check.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }
failures=0
tests_rc=skipped
sanitizer_rc=skipped
wanted() { [[ "$STAGES" == *" $1 "* ]]; }
left() { echo $((BUDGET_S - SECONDS)); }
# in_budget NAME: whether a step may start (and say so when it may not)
in_budget() {
    if [ "$(left)" -lt 30 ]; then say "skip $1: past the ${BUDGET_S} s budget"; return 1; fi
}
# bench NAME ARGS...: one benchmark run into $RAW, cut off at the budget, then refresh results.tar
bench() {
    local name=$1; shift
    wanted "$name" || return 0
    in_budget "$name" || return 0
    local start=$SECONDS
    local args=("$@")
    # QUICK=1 (a rehearsal): the suite's own quick shapes, not the GPU shapes asked for
    [ "${QUICK:-0}" = 1 ] && args=("${args[@]:0:2}" --quick)
    timeout "$(left)" $PY -m bench "${args[@]}" --rep-ms "$REP" --out "$RAW" >>"$LOG" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || failures=$((failures + 1))
    say "bench $name: exit code $rc in $((SECONDS - start)) s"
    tar cf "$OUT/results.tar" -C "$RAW" .
}

say "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

if [ "${INSTALL:-1}" = 1 ]; then  # INSTALL=0: use the package as it is (a dry run off the GPU machine)
    say "== install"
    start=$SECONDS
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl >>"$LOG" 2>&1 \
            && say "installed wheels: $(cd .whl && ls *.whl | tr '\n' ' ')" || say "wheel install FAILED"
    fi
    # REQUIRE_CUDA: a failed CUDA build is an error here (setup.py would otherwise install pure
    # Python quietly). It is reported, counted, and the package installed without the extension,
    # so that the Triton lanes and benchmarks still run.
    if ! LORA_KERNELS_REQUIRE_CUDA=1 $PY -m pip install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
        failures=$((failures + 1))
        say "CUDA extension build FAILED (see $LOG): installing without it"; grep -E "error|Error" "$LOG" | head -20
        if ! $PY -m pip install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
            say "install FAILED (see $LOG)"; tail -40 "$LOG"; exit 1
        fi
    fi
    say "installed in $((SECONDS - start)) s"
fi

if wanted tests && in_budget tests; then
    say "== pytest -m gpu"
    start=$SECONDS
    WORKERS=()
    $PY -c "import xdist" 2>/dev/null && WORKERS=(-n "${PYTEST_WORKERS:-8}")
    timeout "$(left)" $PY -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short "${WORKERS[@]}" 2>&1 \
        | tee "$OUT/pytest_gpu.log" | tail -40
    tests_rc=${PIPESTATUS[0]}
    say "pytest -m gpu exit code $tests_rc in $((SECONDS - start)) s"
fi

if wanted sanitize && in_budget sanitize; then
    say "== compute-sanitizer (bench/sanitize_case.py: CUDA C++ kernels; bench/sanitize_triton.py: Triton kernels)"
    SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
    sanitizer_rc=0
    [ -x "$SANITIZER" ] || { say "compute-sanitizer not found ($SANITIZER)"; sanitizer_rc=127; }
    for script in sanitize_case sanitize_triton; do
        for tool in memcheck racecheck initcheck; do
            [ -x "$SANITIZER" ] || break 2
            in_budget "sanitizer $tool $script" || break 2
            start=$SECONDS
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(left)" "$SANITIZER" --tool $tool --error-exitcode 9 \
                $PY bench/$script.py > "$RAW/${script}_$tool.log" 2>&1
            rc=$?
            [ $rc -ne 0 ] && sanitizer_rc=$rc
            say "compute-sanitizer --tool $tool $script: exit code $rc in $((SECONDS - start)) s; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$RAW/${script}_$tool.log" | tail -1)"
        done
    done
    tar cf "$OUT/results.tar" -C "$RAW" .
fi

say "== benchmarks"
bench forward --suite forward --ranks 16
bench forward --suite forward --ranks 64 --tokens 16 4096 --layers "8B q/o" "8B gate/up" "70B up" --tag r64
bench merge --suite merge
bench multi --suite multi --quick
bench training --suite training --ranks 16 --tokens 128 1024 4096 --layers "8B q/o" "8B k/v" "8B gate/up" "8B down"
if wanted demo && in_budget demo; then
    say "== demo (python -m lora_kernels.demo --quick)"
    timeout "$(left)" $PY -m lora_kernels.demo --quick 2>&1 | tail -30 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failures=$((failures + 1))
fi
bench model --suite model
bench overhead --suite overhead
bench tune --suite tune --quick
# the tuner writes lora_kernels/configs/<card>.json: bring it back to commit (issue 16)
if ls lora_kernels/configs/*.json >/dev/null 2>&1; then
    mkdir -p "$RAW/configs" && cp lora_kernels/configs/*.json "$RAW/configs/" && tar cf "$OUT/results.tar" -C "$RAW" .
fi

say "== summary"
$PY -m bench.summarize "$RAW" 2>&1 | tee -a "$LOG"
say "stages:$STAGES; pytest -m gpu exit code $tests_rc; compute-sanitizer exit code $sanitizer_rc; benchmark runs failed: $failures; $SECONDS s"
[[ "$tests_rc" == 0 || "$tests_rc" == skipped ]] && [[ "$sanitizer_rc" == 0 || "$sanitizer_rc" == skipped ]] && [ "$failures" -eq 0 ]
