"""The CUDA C++ backend: loads the extension ``lora_kernels._C`` and launches its kernels.

Where the extension comes from, in this order:

1. the ahead-of-time build: ``pip install`` compiled ``csrc/`` into ``lora_kernels/_C*.so``
   (setup.py). It is used only if it was compiled against the running torch: the library carries
   a build record (torch version, CUDA runtime) that is read from its bytes *before* loading it,
   so a mismatched build is reported, never loaded;
2. a JIT build with ``torch.utils.cpp_extension.load`` when the AOT build is missing or
   mismatched, the CUDA sources (``csrc/``) and nvcc are present, and ``LORA_KERNELS_NO_JIT`` is
   not set. It announces itself on stderr, builds for ``TORCH_CUDA_ARCH_LIST`` (default: the
   visible GPUs), and caches under ``$LORA_KERNELS_CACHE`` (default ``~/.cache/lora_kernels``) in a
   folder per torch version; ``python -m lora_kernels.build`` runs it ahead of time.

Otherwise :func:`unavailable_reason` says why in one sentence, e.g. ``"cuda: extension not built
(nvcc not found at install time), and no JIT build is possible: nvcc not found (set CUDA_HOME)"``.

Nothing here runs at ``import lora_kernels``: this module is imported on first use of the CUDA
backend, and the library is loaded on first launch (or first availability query).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .backends import BackendUnavailable

PACKAGE_DIR = Path(__file__).resolve().parent
CSRC_DIR = PACKAGE_DIR.parent / "csrc"
SOURCES = ("lora_linear_kernels.cu", "lora_linear.cpp", "bindings.cpp")
SOURCES += ("merge_kernels.cu", "merge.cpp")  # in-place merge (csrc/merge.cuh; launchers in cuda_merge.py)
SOURCES += ("multi_lora_kernels.cu", "multi_lora.cpp")  # multi-adapter shrink / expand
BUILD_STATUS_FILE = PACKAGE_DIR / "_build_status.json"   # written by setup.py
DEFAULT_ARCH_LIST = "8.0;9.0a"                            # the AOT build's targets (setup.py)
JIT_NAME = "lora_kernels_C"
NVCC_FLAGS = ("-O3", "-lineinfo")   # the C++ standard is torch's choice (C++20 for torch >= 2.10)
CXX_FLAGS = ("-O2",)
_RECORD_PREFIX = b"lora_kernels_build_info:"              # csrc/bindings.cpp
_RECORD_END = b";end"

CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_MAX_A_ROWS = 128  # rank r (16-bit adapters) or 2r (fp32 adapters, split into two 16-bit halves)

_lock = threading.Lock()
_loaded: Optional[str] = None          # "aot" or "jit" once the ops are registered
_load_error: Optional[str] = None      # why the last load/build attempt failed


# ---------------------------------------------------------------------------------------------
# Build records and what is there
# ---------------------------------------------------------------------------------------------

def torch_version() -> str:
    """The running torch's release, without the local part ("2.14.1+cu130" -> "2.14.1")."""
    return torch.__version__.split("+")[0]


def read_build_record(library: Path) -> Optional[Dict[str, str]]:
    """The build record compiled into `library` ({"torch": "2.14.1", "cudart": "13000"}), or None."""
    try:
        data = Path(library).read_bytes()
    except OSError:
        return None
    start = data.find(_RECORD_PREFIX)
    end = data.find(_RECORD_END, start)
    if start < 0 or end < 0:
        return None
    fields = data[start + len(_RECORD_PREFIX):end].decode("ascii", "replace").split(";")
    return dict(f.split("=", 1) for f in fields if "=" in f)


def install_status() -> Dict[str, str]:
    """What setup.py recorded about the CUDA build at install time ({} if it left no record)."""
    try:
        return json.loads(BUILD_STATUS_FILE.read_text())
    except (OSError, ValueError):
        return {}


def aot_library() -> Optional[Path]:
    """The ahead-of-time built ``lora_kernels/_C*.so``, if installed."""
    spec = importlib.util.find_spec("lora_kernels._C")
    return Path(spec.origin) if spec is not None and spec.origin else None


def aot_problem() -> Optional[str]:
    """None when the AOT build can be loaded into this torch, else why not (no "cuda: " prefix)."""
    library = aot_library()
    if library is None:
        reason = install_status().get("reason")
        return f"extension not built ({reason})" if reason else "extension not built (no ahead-of-time build is installed)"
    record = read_build_record(library)
    if record is None:
        return f"{library.name} carries no build record (built by an older lora_kernels?); rebuild it"
    if record.get("torch") != torch_version():
        return (f"lora_kernels._C was built against torch {record.get('torch')} but torch {torch_version()} "
                f"is running; reinstall (pip install --no-build-isolation -e .) to rebuild it")
    return None


def jit_problem() -> Optional[str]:
    """None when a JIT build can run here, else why not."""
    if os.environ.get("LORA_KERNELS_NO_JIT", "0") not in ("", "0"):
        return "JIT builds are off (LORA_KERNELS_NO_JIT is set)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA support"
    missing = [s for s in SOURCES if not (CSRC_DIR / s).exists()]
    if missing:
        return f"the CUDA sources are not part of this install ({CSRC_DIR} lacks {', '.join(missing)})"
    from torch.utils.cpp_extension import CUDA_HOME  # deferred: importing it is not free
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "nvcc not found (set CUDA_HOME to a CUDA toolkit)"
    if shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").exists():
        return "ninja not found (pip install ninja)"
    return None


def jit_build_dir() -> Path:
    """One cache folder per torch release and CUDA version: a JIT build never meets another ABI."""
    root = Path(os.environ.get("LORA_KERNELS_CACHE", Path.home() / ".cache" / "lora_kernels"))
    return root / f"torch{torch_version()}-cuda{torch.version.cuda}"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _with_venv_on_path():
    """torch's cpp_extension looks for `ninja` on PATH; a venv's own bin need not be on it."""
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def jit_build(verbose: bool = False, why: str = "") -> Path:
    """Compile csrc/ with torch.utils.cpp_extension.load (cached) and register the ops."""
    global _loaded
    from torch.utils.cpp_extension import load

    _with_venv_on_path()
    build_dir = jit_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs' architectures"
    print(f"lora_kernels: JIT-building the CUDA extension ({why or 'on request'}) for {archs} in {build_dir}; "
          f"the first build takes a minute or more, later runs reuse it", file=sys.stderr, flush=True)
    start = time.time()
    load(name=JIT_NAME, sources=[str(CSRC_DIR / s) for s in SOURCES], extra_include_paths=[str(CSRC_DIR)],
         extra_cflags=list(CXX_FLAGS), extra_cuda_cflags=list(NVCC_FLAGS), build_directory=str(build_dir),
         is_python_module=False, verbose=verbose)
    library = build_dir / f"{JIT_NAME}.so"
    print(f"lora_kernels: CUDA extension ready ({library}, {time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    _loaded = "jit"
    return library


def _ops_registered() -> bool:
    return hasattr(torch.ops.lora_kernels, "cuda_lora_linear_fwd")


def load(allow_jit: bool = True) -> str:
    """Register the CUDA ops (AOT library, else JIT build); returns "aot", "jit" or "preloaded".

    Raises BackendUnavailable with the reason when neither works."""
    global _loaded, _load_error
    with _lock:
        if _loaded is not None:
            return _loaded
        if _ops_registered():  # someone imported lora_kernels._C (or loaded a build) already
            _loaded = "preloaded"
            return _loaded
        problem = aot_problem()
        if problem is None:
            try:
                torch.ops.load_library(str(aot_library()))
                _loaded = "aot"
                return _loaded
            except OSError as e:  # e.g. a CUDA runtime library missing at run time
                problem = f"lora_kernels._C failed to load: {str(e).splitlines()[0]}"
        if _load_error is not None:
            raise BackendUnavailable(_load_error)
        blocker = jit_problem()
        if blocker is not None or not allow_jit:
            raise BackendUnavailable(f"cuda: {problem}" + (f", and no JIT build is possible: {blocker}" if blocker else ""))
        try:
            jit_build(why=problem)
        except Exception as e:  # compiler errors: keep the first lines, don't retry on every call
            first = " ".join(str(e).strip().splitlines()[:3])[:500]
            _load_error = f"cuda: {problem}, and the JIT build failed: {type(e).__name__}: {first}"
            raise BackendUnavailable(_load_error) from e
        return _loaded


def unavailable_reason() -> Optional[str]:
    """None when the CUDA backend can run (loading the AOT library, or a JIT build to come on first
    use), else a sentence saying why not. Never compiles anything."""
    if torch.version.cuda is None:
        return f"cuda: torch {torch.__version__} has no CUDA support"
    if _loaded is not None:
        return None
    if _load_error is not None:
        return _load_error
    problem = aot_problem()
    if problem is None:
        try:
            load(allow_jit=False)
            return None
        except BackendUnavailable as e:
            problem = str(e)[len("cuda: "):]
    blocker = jit_problem()
    if blocker is None:
        return None  # built on first use
    return f"cuda: {problem}, and no JIT build is possible: {blocker}"


def input_reason(x_dtype: torch.dtype, adapter_dtype: torch.dtype, rank: int) -> Optional[str]:
    """None when the CUDA kernel takes inputs of these dtypes and rank, else why not."""
    if x_dtype not in CUDA_DTYPES:
        return (f"cuda: dtype {str(x_dtype).replace('torch.', '')} is not supported by the CUDA kernel "
                f"(float16, bfloat16); float32 runs on backend='triton'")
    split = adapter_dtype == torch.float32
    limit = CUDA_MAX_A_ROWS // 2 if split else CUDA_MAX_A_ROWS
    if rank > limit:
        extra = " for float32 adapters (they run as a pair of 16-bit halves, 2r rows)" if split else ""
        return f"cuda: rank {rank} exceeds the CUDA kernel's limit of {limit}{extra}"
    return None


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------

def _unit_stride_along_k(t: torch.Tensor) -> torch.Tensor:
    """The kernel reads rows as contiguous runs (16-byte cp.async when aligned): other layouts are
    copied. Row strides stay free (slices, padded rows)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def split_fp32_adapter(lora_a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[2r, K] 16-bit (A_hi; A_lo) with A_hi = A rounded to `dtype`, A_lo = (A - A_hi) rounded:
    x.A^T = x.A_hi^T + x.A_lo^T keeps about 16 significant bits of A (bf16) on 16-bit tensor cores."""
    hi = lora_a.to(dtype)
    lo = (lora_a - hi.float()).to(dtype)
    return torch.cat([hi, lo])


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scale: float, bias: Optional[torch.Tensor], save_t: bool,
                    out: Optional[torch.Tensor] = None, t_out: Optional[torch.Tensor] = None,
                    tile_kind: int = 0, tiles_per_cta: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the CUDA fused forward on validated inputs (the Triton launcher's contract).

    x [M, K] float16/bfloat16, weight [N, K] x's dtype, lora_a [r, K] and lora_b [N, r] in x's
    dtype or float32, bias [N] (x's dtype or float32) or None. Returns (y [M, N] in x.dtype,
    t [M, r] float32 = x @ lora_a.T if save_t else an empty [0, r]). `out` / `t_out` receive y / t
    when given (tests poison them); tile_kind (1 small-M, 2 large) and tiles_per_cta override the
    heuristics (tests use them to reach every path at small sizes).

    Layouts: x, weight and lora_a are read row by row, so a tensor whose last dimension is not
    unit-stride (a transposed weight, a column-major x) is copied first -- on every call, which
    for the weight costs a pass over N x K: keep weights row-major. Row strides are free. An fp32
    lora_a is split into 16-bit halves (two small extra kernels per call)."""
    load()
    M, K = x.shape
    N, r = weight.shape[0], lora_a.shape[0]
    reason = input_reason(x.dtype, lora_a.dtype, r)
    if reason is not None:
        raise BackendUnavailable(f"lora_linear: {reason}")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    t = t_out if t_out is not None else torch.empty((M if save_t else 0, r), dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        if save_t and M > 0:
            t.copy_(x.float() @ lora_a.float().t())
        return y, t
    a_split = lora_a.dtype == torch.float32
    a = split_fp32_adapter(lora_a, x.dtype) if a_split else _unit_stride_along_k(lora_a)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    torch.ops.lora_kernels.cuda_lora_linear_fwd(
        _unit_stride_along_k(x), _unit_stride_along_k(weight), a, lora_b, bias, float(scale), a_split,
        save_t, y, t, tile_kind, tiles_per_cta)
    return y, t


# ---------------------------------------------------------------------------------------------
# Multi-adapter (segmented) shrink / expand: csrc/multi_lora.{cuh,cpp}
# ---------------------------------------------------------------------------------------------

MULTI_MAX_R = 128  # csrc/multi_lora_plan.h kMultiMaxRank: the expand keeps t [rows, r_max] on chip
# The shrink's work-list piece size follows the Triton launcher's rule (triton/multi_lora.py,
# segment_config; reasoning there, not measured): 64-token pieces (the 64 x 64 tile, each A tile
# reused over 64 tokens) only when there are at least 2 of them per SM, else 16-token pieces
# (more CTAs for the few pieces of a small batch). The expand always takes 64-token pieces: its
# CTAs come from N tiles, and a piece of <= 16 tokens is one piece in either list.
MULTI_PREFILL_PIECES_PER_SM = 2
MULTI_EXPAND_ITEM_M = 64
_NUM_SMS: Dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def multi_input_reason(dtype: torch.dtype, r_max: int, t_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when the CUDA multi-adapter kernels take inputs of this dtype and r_max, else why not.
    (Adapters may be in x's dtype or float32, as the ops' validation allows.)"""
    if dtype not in CUDA_DTYPES:
        return (f"cuda: dtype {str(dtype).replace('torch.', '')} is not supported by the CUDA multi-adapter "
                f"kernels (float16, bfloat16); float32 runs on backend='triton'")
    if r_max > MULTI_MAX_R:
        return f"cuda: r_max {r_max} exceeds the CUDA multi-adapter kernels' limit of {MULTI_MAX_R}"
    if t_dtype is not None and t_dtype != torch.float32:
        return f"cuda: t must be float32, got {str(t_dtype).replace('torch.', '')}"
    return None


def shrink_item_m(num_tokens: int, device: torch.device) -> int:
    """16 or 64: the work list (and tile) the shrink uses for a batch of `num_tokens` tokens."""
    pieces64 = (num_tokens + 63) // 64
    return 64 if pieces64 >= MULTI_PREFILL_PIECES_PER_SM * _num_sms(device) else 16


def _ranks_int32(ranks: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels read ranks as contiguous int32 (int64 ranks cost one tiny cast kernel)."""
    return None if ranks is None else ranks.to(torch.int32).contiguous()


def multi_lora_shrink(x: torch.Tensor, lora_a_stack: torch.Tensor, index, scales: torch.Tensor,
                      ranks: Optional[torch.Tensor], out: Optional[torch.Tensor] = None,
                      item_m: int = 0) -> torch.Tensor:
    """t [M, r_max] float32 = lora_shrink on validated inputs (see reference.lora_shrink): x [M, K]
    float16/bfloat16, lora_a_stack [L, r_max, K] in x's dtype or float32, index an AdapterIndex,
    scales [L], ranks [L] int | None. Every element of t is written. `out` receives t (tests
    poison it); item_m (16 or 64) overrides the work-list choice (tests reach both tiles).

    x and the stack are read along K as contiguous runs: a stack whose last dimension is not
    unit-stride is copied on every call (keep stacks contiguous, as MultiLoRALinear does)."""
    load()
    M = x.shape[0]
    R = lora_a_stack.shape[1]
    t = torch.empty((M, R), dtype=torch.float32, device=x.device) if out is None else out
    if M == 0:
        return t
    item_m = item_m or shrink_item_m(M, x.device)
    a = lora_a_stack if lora_a_stack.shape[2] <= 1 or lora_a_stack.stride(2) == 1 else lora_a_stack.contiguous()
    torch.ops.lora_kernels.cuda_lora_shrink(_unit_stride_along_k(x), a, scales.to(torch.float32).contiguous(),
                                            _ranks_int32(ranks), index.work(item_m), index.sorted_tokens, item_m, t)
    return t


def multi_lora_expand_(y: torch.Tensor, t: torch.Tensor, lora_b_stack: torch.Tensor, index,
                       ranks: Optional[torch.Tensor], item_m: int = MULTI_EXPAND_ITEM_M) -> torch.Tensor:
    """In place y[m] += lora_b_stack[i, :, :rank_i] @ t[m, :rank_i] for tokens with an adapter
    (see reference.lora_expand_) on validated inputs: y [M, N] float16/bfloat16 (any strides),
    t [M, r_max] float32, lora_b_stack [L, N, r_max] in y's dtype or float32 (any strides).
    Rows of tokens with no adapter are never stored to."""
    load()
    torch.ops.lora_kernels.cuda_lora_expand(y, t, lora_b_stack, _ranks_int32(ranks), index.work(item_m),
                                            index.sorted_tokens, item_m)
    return y


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a_stack: torch.Tensor, lora_b_stack: torch.Tensor,
                      index, scales: torch.Tensor, bias: Optional[torch.Tensor], ranks: Optional[torch.Tensor],
                      out: Optional[torch.Tensor] = None, tile_kind: int = 0, tiles_per_cta: int = 0,
                      item_m: int = 0) -> torch.Tensor:
    """y [M, N] = x @ weight.T + bias + each token's adapter (see reference.multi_lora_linear) on
    validated inputs: x [M, K] float16/bfloat16, weight [N, K] x's dtype, stacks [L, r_max, K] and
    [L, N, r_max] in x's dtype or float32, bias [N] (x's dtype or float32) or None.

    Two launches: the segmented shrink (t [M, r_max] fp32), then the base GEMM over the sorted
    token order with each segment's t . B^T added in its epilogue and y stored once
    (csrc/multi_lora_linear.cuh). `out` receives y (tests poison it); tile_kind (1 small-M,
    2 large), tiles_per_cta and item_m (the shrink's work list) override the heuristics."""
    load()
    M, N = x.shape[0], weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    if M == 0 or N == 0:
        return y
    t = multi_lora_shrink(x, lora_a_stack, index, scales, ranks, item_m=item_m)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    torch.ops.lora_kernels.cuda_multi_lora_linear(
        _unit_stride_along_k(x), _unit_stride_along_k(weight), bias, lora_b_stack, t, _ranks_int32(ranks),
        index.sorted_tokens, index.sorted_adapter, index.slot_start, y, tile_kind, tiles_per_cta)
    return y
