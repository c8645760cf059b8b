"""Build the CUDA extension ahead of time: ``python -m lora_kernels.build``.

Uses the ahead-of-time build from ``pip install`` when it matches the running torch; otherwise (or
with ``--jit``) compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` into the JIT cache
(``lora_kernels.cuda.loader.jit_build_dir()``), so that the first CUDA call does not pay for the compile.
``TORCH_CUDA_ARCH_LIST`` picks the targets (e.g. ``9.0a``; default: the visible GPUs).
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_kernels.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jit", action="store_true", help="JIT-build even when the ahead-of-time build is usable")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = p.parse_args(argv)

    from .cuda import loader as cuda
    if not args.jit:
        problem = cuda.aot_problem()
        if problem is None:
            print(f"lora_kernels: the ahead-of-time build {cuda.aot_library()} matches torch "
                  f"{cuda.torch_version()}; nothing to build (--jit builds anyway)")
            return 0
        why = problem
    else:
        why = "--jit"
    blocker = cuda.jit_problem()
    if blocker is not None:
        print(f"lora_kernels: cannot build the CUDA extension: {blocker}", file=sys.stderr)
        return 1
    library = cuda.jit_build(verbose=args.verbose, why=why)
    print(f"lora_kernels: built {library}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
