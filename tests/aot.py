"""Compile a Triton kernel for a GPU target on a machine without one (no launch).

The JIT's specialisation is reproduced from example argument values (ints equal to 1 become
constants, multiples of 16 and pointers get the divisibility hint), so the compiled kernel is the
one a launch with such arguments would build. Used by the CPU lane to check that kernels compile
for sm_90a and fit in an H100/H200's shared memory.

A compile-test module lists its cases as (name, kernel, args, constexprs, num_warps, num_stages[,
further launch options such as {"maxnreg": n}]),
gets their reports from a fixture returning compiled_in_subprocess(__file__, timeout), and runs
print_compile_report(cases) as its __main__ (what that subprocess executes)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, Optional

SM90_MAX_SHARED_BYTES = 232448  # 227 KiB: the most one block may use on an H100/H200


def ptxas_path() -> Optional[str]:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else shutil.which("ptxas")


def compile_for(fn, args: Dict, constexprs: Dict, num_warps: int, num_stages: int, capability: int = 90,
                options: Optional[Dict] = None):
    """`args`: name -> example int / float value, or a pointer type string such as "*bf16";
    `options`: further launch options of the backend (e.g. maxnreg), as a launch passes them."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], constants[name] = "constexpr", constexprs[name]
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            # honour @triton.jit(do_not_specialize=...): such ints get neither the "== 1"
            # constant nor the divisibility hint, as at a launch
            param = fn.params[i] if hasattr(fn, "params") else None
            specialize = not (param is not None and param.do_not_specialize)
            align = not (param is not None and param.do_not_specialize_on_alignment) and specialize
            kind, spec = native_specialize_impl(BaseBackend, value, False, specialize, align)
            if kind == "constexpr":
                signature[name], constants[name] = "constexpr", spec
            else:
                signature[name] = kind
                if spec == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constants, attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, **(options or {})})


def _triton_ptxas_flags():
    """The register-allocation flags the installed triton passes to ptxas when it builds a cubin
    (triton 3.8 adds --regAllocOptLevel=2, which can change registers and spills)."""
    import inspect
    from triton.backends.nvidia.compiler import CUDABackend
    src = inspect.getsource(CUDABackend.make_cubin)
    return ["-lineinfo"] + (["--regAllocOptLevel=2"] if "--regAllocOptLevel=2" in src else [])


def ptxas_report(kernel, arch: str = "sm_90a") -> Dict[str, int]:
    """{"registers": n, "spill_bytes": n} from ptxas -v on the kernel's PTX, with triton's flags."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        out = subprocess.run([ptxas_path(), *_triton_ptxas_flags(), "--gpu-name", arch, "-v", f.name, "-o",
                              os.devnull], capture_output=True, text=True, timeout=300).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {"registers": int(regs.group(1)) if regs else -1, "spill_bytes": int(spill.group(1)) if spill else -1}


def _loops(ttgir: str):
    """[(header line, body lines incl. nested regions, has a nested scf.for)] of every scf.for.
    Regions open on a line ending in "{" and close on a line starting with "}"."""
    stack, loops = [], []
    for line in ttgir.splitlines():
        s = line.strip()
        if s.startswith("}"):
            region = stack.pop()
            if region is not None:
                loops.append(region)
            if s.endswith("{"):
                stack.append(None)
            continue
        for region in stack:
            if region is not None:
                region[1].append(s)
        if s.endswith("{"):
            if "scf.for" in s:
                for region in stack:
                    if region is not None:
                        region[2] = True
                stack.append([s, [], False])
            else:
                stack.append(None)
    return loops


def k_loop_report(ttgir: str):
    """Per innermost scf.for holding a tensor-core dot (the K loops), what would make it wait:

    * sync_loads_into_dot: values loaded with a synchronous tt.load inside the loop and then put
      into shared memory for the dot (ttg.local_alloc / local_store of the loaded or converted
      value): no copy/MMA overlap for them;
    * async_wait_all: ``ttg.async_wait {num = 0}`` inside the loop (waits for every copy in flight);
    * mma_wait_all: ``warp_group_dot_wait {pendings = 0}`` inside the loop (no wgmma left in
      flight across iterations);
    * local_stores: register -> shared-memory stores inside the loop (a converted operand);
    * async_copies: pipelined cp.async / TMA copies (informative)."""
    out = []
    for header, body, nested in _loops(ttgir):
        if nested or not any(("warp_group_dot " in b or "tt.dot " in b) for b in body):
            continue
        loaded = set()
        for b in body:
            m = re.match(r"(%[\w#]+)(?::\d+)? = tt\.(?:load|descriptor_load) ", b)
            if m:
                loaded.add(m.group(1))
        sync_into_dot = 0
        for b in body:
            m = re.search(r"ttg\.local_(?:alloc|store) (%[\w#]+)", b)
            if m and m.group(1) in loaded:
                sync_into_dot += 1
        out.append({"loop": header[:120],
                    "sync_loads_into_dot": sync_into_dot,
                    "async_wait_all": sum(1 for b in body if "ttg.async_wait" in b and "num = 0 " in b),
                    "mma_wait_all": sum(1 for b in body if "warp_group_dot_wait" in b and "pendings = 0 " in b),
                    "local_stores": sum(1 for b in body if "ttg.local_store" in b
                                        or re.search(r"ttg\.local_alloc %", b) is not None),
                    "async_copies": sum(1 for b in body if "async_copy_global_to_local" in b
                                        or "async_tma_copy_global_to_local" in b)})
    return out


def compile_report(cases: Iterable) -> Dict[str, Dict[str, int]]:
    """name -> {"shared": bytes, "registers": n, "spill_bytes": n, "hash": the compiled kernel's
    cache key, "k_loops": k_loop_report(TTGIR), "warp_specialized": the TTGIR holds a
    ttg.warp_specialize op, "setmaxnreg": the PTX rebalances registers between warp groups,
    "total_warps": warps of a block incl. warp-specialized partitions} of each case compiled for
    sm_90a."""
    out = {}
    for name, fn, args, constexprs, warps, stages, *options in cases:
        kernel = compile_for(fn, args, constexprs, warps, stages, options=options[0] if options else None)
        out[name] = {"shared": kernel.metadata.shared, **ptxas_report(kernel), "hash": kernel.hash,
                     "k_loops": k_loop_report(kernel.asm["ttgir"]),
                     "warp_specialized": "ttg.warp_specialize" in kernel.asm["ttgir"],
                     "setmaxnreg": "setmaxnreg" in kernel.asm["ptx"], "total_warps": kernel.metadata.num_warps}
    return out


def print_compile_report(cases: Iterable) -> None:
    """A compile-test module's __main__: its report as one JSON line on stdout."""
    print(json.dumps(compile_report(cases)))


def compiled_in_subprocess(test_file: str, timeout: int) -> Dict[str, Dict[str, int]]:
    """Runs `test_file` as a script and returns the report it prints; skips the calling test when
    there is no ptxas. The test lane imports the kernels under TRITON_INTERPRET=1, which replaces
    every @triton.jit function by an interpreted one: the compile runs in a fresh process without it."""
    import pytest
    if ptxas_path() is None:
        pytest.skip("no ptxas (bundled with triton's nvidia backend) to compile for sm_90a")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(test_file))
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), here, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, test_file], capture_output=True, text=True, env=env, timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
