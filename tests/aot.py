"""Compile a Triton kernel for a GPU target on a machine without one (no launch).

The JIT's specialisation is reproduced from example argument values (ints equal to 1 become
constants, multiples of 16 and pointers get the divisibility hint), so the compiled kernel is the
one a launch with such arguments would build. Used by the CPU lane to check that kernels compile
for sm_90a and fit in an H100/H200's shared memory."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, Optional

SM90_MAX_SHARED_BYTES = 232448  # 227 KiB: the most one block may use on an H100/H200


def ptxas_path() -> Optional[str]:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else shutil.which("ptxas")


def compile_for(fn, args: Dict, constexprs: Dict, num_warps: int, num_stages: int, capability: int = 90):
    """`args`: name -> example int / float value, or a pointer type string such as "*bf16"."""
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
            kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
            if kind == "constexpr":
                signature[name], constants[name] = "constexpr", spec
            else:
                signature[name] = kind
                if spec == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constants, attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_report(kernel, arch: str = "sm_90a") -> Dict[str, int]:
    """{"registers": n, "spill_bytes": n} from ptxas -v on the kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        out = subprocess.run([ptxas_path(), "--gpu-name", arch, "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, timeout=300).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {"registers": int(regs.group(1)) if regs else -1, "spill_bytes": int(spill.group(1)) if spill else -1}
