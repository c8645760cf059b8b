#!/usr/bin/env bash
# The GPU machine's versions lane: the CPU lane under torch 2.11.0 + triton 3.6.0 (what the
# H100/H200 machines run; tests/lanes/gpu_versions.txt), beside the CPU machine's own versions.
#
#   tests/lanes/gpu_versions.sh quick [PYTEST_ARGS...]   what CI runs: the sm_90a Triton compile
#       tests (triton 3.6's compiler), the torch.compile tests (torch 2.11's dynamo), the version
#       checks -- about 4 min on the CPU machine with a reused venv
#   tests/lanes/gpu_versions.sh full  [PYTEST_ARGS...]   the whole CPU lane (about 20 min on the
#       loaded 2-core CPU machine): before each GPU run (README, "Versions")
#
# The venv (LORA_KERNELS_LANE_VENV, default ~/.cache/lora_kernels/lanes/torch2.11-triton3.6) is
# made on first use (python3.12 as on the GPU machines where there is one, else python3; 2 to 5 min
# and 4.9 GB on the CPU machine), reused, and updated in place when tests/lanes/gpu_versions.txt
# changes.
# lora_kernels is not installed into it: pytest runs from the repository root, which puts this
# checkout first on sys.path.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:-quick}
[ $# -gt 0 ] && shift
VENV=${LORA_KERNELS_LANE_VENV:-$HOME/.cache/lora_kernels/lanes/torch2.11-triton3.6}
REQUIREMENTS=tests/lanes/gpu_versions.txt
STAMP="$VENV/.lora_kernels_requirements"

# python 3.12 as on the GPU machines: on PATH, else a pyenv-installed one, else python3.
base_python() {
    local candidate
    for candidate in "$(command -v python3.12 || true)" "$(pyenv root 2>/dev/null || true)"/versions/3.12*/bin/python3.12; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c "" 2>/dev/null; then
            echo "$candidate"; return
        fi
    done
    command -v python3
}

# Made once, then updated in place (never deleted: others may be using it) when the pins change.
if ! cmp -s "$REQUIREMENTS" "$STAMP"; then
    if ! [ -x "$VENV/bin/python" ]; then
        BASE=$(base_python)
        echo "gpu_versions lane: making $VENV with $BASE (a few minutes, ~5 GB)" >&2
        mkdir -p "$(dirname "$VENV")"
        "$BASE" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q -r "$REQUIREMENTS"
    cp "$REQUIREMENTS" "$STAMP"
fi
"$VENV/bin/python" -c "import torch, triton, numpy; print('gpu_versions lane: python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

PYTEST=("$VENV/bin/python" -m pytest -q -p no:cacheprovider)
case "$MODE" in
    quick)
        "${PYTEST[@]}" tests/test_triton_lora_linear_compile.py tests/test_triton_multi_compile.py \
            tests/test_versions.py tests/test_import.py tests/test_install.py \
            tests/test_training.py tests/test_lora_linear_op.py tests/test_multi_lora.py tests/test_peft.py \
            -k "compile or traces or versions or import or install" "$@" ;;
    full)
        "${PYTEST[@]}" "$@" ;;
    *)
        echo "usage: $0 quick|full [pytest args]" >&2; exit 2 ;;
esac
