"""Small launches of every Triton kernel for compute-sanitizer (bench/device_check.sh runs it under
memcheck, racecheck and initcheck beside bench/sanitize_case.py, the CUDA C++ kernels' script).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/sanitize_triton.py

Odd sizes put every tile on an edge; each result is compared with the float64 reference (computed
on the CPU, so the sanitizer instruments little besides our kernels). Exit status 0 = all right.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")  # one cudaMalloc per tensor: exact bounds

import torch  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels import reference  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
GEN = torch.Generator().manual_seed(0)


def rnd(*shape, dtype, scale=0.25):
    return (torch.randn(*shape, generator=GEN, dtype=torch.float64) * scale).to(dtype)


def report(what: str, out: torch.Tensor, ref: torch.Tensor, dtype) -> bool:
    err = ((out.detach().cpu().double() - ref.double()).norm() / ref.double().norm()).item()
    ok = err <= TOL[dtype]
    print(f"{'ok  ' if ok else 'FAIL'} {what}: rel err {err:.2e}", flush=True)
    return ok


def lora_linear_cases():
    # fp32 at M = 150: the weight gradients' tf32 halves (lora_linear_backward._GradLaunch)
    for M, N, K, r, dtype, p in [(1, 72, 136, 16, torch.bfloat16, 0.0), (37, 130, 70, 5, torch.float16, 0.0),
                                 (150, 96, 64, 64, torch.bfloat16, 0.3), (150, 72, 136, 16, torch.float32, 0.0)]:
        x, w, a, b, bias = (rnd(M, K, dtype=dtype), rnd(N, K, dtype=dtype), rnd(r, K, dtype=dtype),
                            rnd(N, r, dtype=dtype), rnd(N, dtype=dtype))
        xg, ag, bg = (t.cuda().requires_grad_(True) for t in (x, a, b))
        y = lora_kernels.lora_linear(xg, w.cuda(), ag, bg, 0.5, bias.cuda(), dropout_p=p, training=p > 0,
                                     backend="triton")
        dy = rnd(M, N, dtype=dtype)
        y.backward(dy.cuda())
        what = f"lora_linear fwd+bwd M={M} N={N} K={K} r={r} {str(dtype)[6:]} dropout={p}"
        if p == 0.0:
            x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, b))
            y64 = reference.lora_linear(x64, w.double(), a64, b64, 0.5, bias.double())
            y64.backward(dy.double())
            yield report(what + " y", y, y64, dtype)
            for name, g, g64 in (("dx", xg.grad, x64.grad), ("dA", ag.grad, a64.grad), ("dB", bg.grad, b64.grad)):
                yield report(f"{what} {name}", g, g64, dtype)
        else:  # the mask is the kernel's own: check that every element came out finite
            ok = all(torch.isfinite(t).all().item() for t in (y, xg.grad, ag.grad, bg.grad))
            print(f"{'ok  ' if ok else 'FAIL'} {what}: finite outputs and gradients", flush=True)
            yield ok


def merge_cases():
    for N, K, r, dtype in [(72, 136, 16, torch.bfloat16), (33, 70, 7, torch.float16)]:
        w0, a, b = rnd(N, K, dtype=dtype), rnd(r, K, dtype=dtype), rnd(N, r, dtype=dtype)
        ref = w0.double() + 0.5 * b.double() @ a.double()
        w = w0.cuda()
        lora_kernels.merge_(w, a.cuda(), b.cuda(), 0.5, safe_merge=True, backend="triton")
        yield report(f"merge_ safe N={N} K={K} r={r} {str(dtype)[6:]}", w, ref, dtype)
        residual = lora_kernels.MergeResidual()
        w = w0.cuda().t().contiguous().t()  # column-major
        lora_kernels.merge_(w, a.cuda(), b.cuda(), 0.5, residual=residual, backend="triton")
        lora_kernels.unmerge_(w, a.cuda(), b.cuda(), 0.5, residual=residual)
        ok = torch.equal(w.cpu().view(torch.int16), w0.view(torch.int16))
        print(f"{'ok  ' if ok else 'FAIL'} exact merge+unmerge N={N} K={K} column-major: bits restored", flush=True)
        yield ok


def multi_cases():
    M, N, K, L, r_max, dtype = 45, 72, 136, 5, 16, torch.bfloat16
    ids = torch.tensor([(i * 7) % (L + 1) - 1 for i in range(M)], dtype=torch.int32)  # -1 .. L-1, mixed
    ranks = torch.tensor([16, 1, 8, 3, 16], dtype=torch.int32)
    x, w = rnd(M, K, dtype=dtype), rnd(N, K, dtype=dtype)
    a, b = rnd(L, r_max, K, dtype=dtype), rnd(L, N, r_max, dtype=dtype)
    scales = torch.rand(L, generator=GEN) + 0.5
    ref = reference.multi_lora_linear(x.double(), w.double(), a.double(), b.double(), ids.long(),
                                      scales.double(), None, ranks)
    index = lora_kernels.AdapterIndex.from_token_adapters(ids.cuda(), L)
    g = lambda t: t.cuda()  # noqa: E731
    y = lora_kernels.multi_lora_linear(g(x), g(w), g(a), g(b), index, g(scales), None, g(ranks), backend="triton")
    yield report(f"multi_lora_linear M={M} L={L} mixed ranks", y, ref, dtype)
    t = lora_kernels.lora_shrink(g(x), g(a), index, g(scales), g(ranks), backend="triton")
    base = torch.nn.functional.linear(g(x), g(w))
    lora_kernels.lora_expand_(base, t, g(b), index, g(ranks), backend="triton")
    yield report(f"lora_shrink + lora_expand_ M={M} L={L} mixed ranks", base, ref, dtype)
    yield from chunked_split_t_cases()


def chunked_split_t_cases():
    """multi_lora_linear's chunked epilogue on 64-row tiles with t split by the shrink: fp16 B
    (t2) and fp32 B (t4), forced by a config (triton/multi_lora.py t_split_for)."""
    from lora_kernels.triton import multi_lora as ml
    from lora_kernels.triton.lora_linear import ForwardConfig
    M, N, K, L, r_max = 150, 72, 136, 5, 32
    ids = torch.tensor([(i * 7) % (L + 1) - 1 for i in range(M)], dtype=torch.int32)
    ranks = torch.tensor([32, 1, 13, 30, 6], dtype=torch.int32)
    x, w = rnd(M, K, dtype=torch.float16), rnd(N, K, dtype=torch.float16)
    scales = torch.rand(L, generator=GEN) + 0.5
    index = lora_kernels.AdapterIndex.from_token_adapters(ids.cuda(), L)
    cfg = ml.LinearConfig(ForwardConfig(64, 32, 32, 32, 1, 1, 4, 2), False, ml.SegmentConfig(16, 32, 16, 32, 4, 2))
    for adapter_dtype, split in ((torch.float16, 2), (torch.float32, 4)):
        a, b = rnd(L, r_max, K, dtype=adapter_dtype), rnd(L, N, r_max, dtype=adapter_dtype)
        ref = reference.multi_lora_linear(x.double(), w.double(), a.double(), b.double(), ids.long(),
                                          scales.double(), None, ranks)
        assert ml.t_split_for(adapter_dtype, ml.lora_precision_for(adapter_dtype, torch.device("cuda")), 64) == split
        y = ml.multi_lora_linear(x.cuda(), w.cuda(), a.cuda(), b.cuda(), index, scales.cuda(), None, ranks.cuda(), cfg)
        yield report(f"multi_lora_linear chunked t{split} M={M} L={L} {str(adapter_dtype)[6:]} adapters", y, ref,
                     torch.float16)


def main() -> int:
    results = [ok for cases in (lora_linear_cases, merge_cases, multi_cases) for ok in cases()]
    torch.cuda.synchronize()
    print(f"{sum(results)}/{len(results)} Triton sanitizer cases right")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
