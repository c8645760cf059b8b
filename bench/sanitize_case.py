"""A few small launches of the CUDA kernels for compute-sanitizer (bench/device_check.sh).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/sanitize_case.py

Each forward case reaches a different path of csrc/lora_linear/lora_linear.cuh (both tile shapes, a CTA
sweeping several tiles, K tails, element-wise loads, split fp32 adapters, strided lora_b, no
bias) or, on Hopper, of csrc/lora_linear/lora_linear_sm90.cuh (both tiles, M/N/K tails, the 3r
tail; as the multi-adapter linear with a per-slot tail, MULTI_SM90_CASES; and each sm90 dx case one
of its backward-dx kernels, B operands MN-major); each merge case one of csrc/merge/merge.cuh
(vector and element accesses, the transposed layout, both MMA kinds, rank chunks, CTAs walking
several tiles, the four modes, a full escape table).
The multi-adapter cases reach csrc/multi_lora/*.cuh: both tiles, the CUDA-core paths, the split
decode shrink (batches of <= 64 tokens), several slices in one launch with GQA widths and an
offset, ranks past 128 (the expand's rank chunks).
Each result is checked (against float64, or bit for bit after an exact cycle) so that a silent
error fails too. Exit status 0 = all right. Sizes are tiny: the sanitizer runs kernels 10-100x
slower.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")  # one cudaMalloc per tensor: exact bounds

import torch  # noqa: E402

from lora_kernels.cuda.lora_linear import lora_linear_fwd  # noqa: E402

# (M, N, K, r, dtype, adapter dtype, tile_kind, tiles_per_cta, what it reaches)
CASES = [
    (3, 72, 136, 16, torch.bfloat16, None, 1, 0, "decode tile, K split across warps"),
    (40, 300, 72, 8, torch.float16, None, 2, 2, "large tile, two tiles per CTA, N tail"),
    (130, 40, 70, 5, torch.bfloat16, None, 2, 0, "K % 8 != 0: element loads, M tail"),
    (20, 64, 64, 64, torch.bfloat16, torch.float32, 1, 0, "fp32 adapter split to 2r = 128 rows"),
    (33, 24, 48, 128, torch.float16, None, 2, 0, "rank 128"),
    # csrc/lora_linear/lora_linear_sm90.cuh (Hopper only; tile_kind 3 = 128x256 with a 2x1 cluster, 4 = 128x128, 5 = 128x64)
    (130, 264, 136, 16, torch.bfloat16, None, 3, 0, "sm90 128x256: M and N tails, odd cluster row, bias"),
    (201, 136, 72, 5, torch.float16, torch.float32, 4, 0, "sm90 128x128: K tail, fp32 adapter (3r tail)"),
    (64, 64, 8, 1, torch.bfloat16, None, 4, 0, "sm90: K = 8 (one partial k-block), rank 1"),
    (100, 136, 200, 16, torch.bfloat16, None, 5, 0, "sm90 128x64: M and K tails"),
]
SM90_TILE_KINDS = (3, 4, 5)


def main() -> int:
    """Inputs are made and checked on the CPU: on the GPU only copies and our kernel run, so the
    sanitizer instruments little besides the kernel under test."""
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s, dtype: (torch.randn(*s, generator=gen, dtype=torch.float64) / 8).to(dtype)  # noqa: E731
    failures = 0
    hopper = torch.cuda.get_device_capability() == (9, 0)
    for M, N, K, r, dtype, adapter_dtype, tile_kind, tiles, what in CASES:
        if tile_kind in SM90_TILE_KINDS and not hopper:
            print(f"skip M={M} N={N} K={K} r={r}: {what} (not an sm_90 GPU)", flush=True)
            continue
        ad = adapter_dtype or dtype
        x, w, a = rnd(M, K, dtype=dtype), rnd(N, K, dtype=dtype), rnd(r, K, dtype=ad)
        b = rnd(r, N, dtype=ad).t()  # strided lora_b
        bias = rnd(N, dtype=dtype) if M % 2 == 0 else None
        gpu = lambda t: None if t is None else t.to("cuda")  # noqa: E731  (.to keeps b's strides)
        y, t = lora_linear_fwd(gpu(x), gpu(w), gpu(a), gpu(b), 0.5, gpu(bias), True,
                               tile_kind=tile_kind, tiles_per_cta=tiles)
        y, t = y.cpu(), t.cpu()
        t_ref = x.double() @ a.double().t()
        ref = x.double() @ w.double().t() + 0.5 * t_ref @ b.double().t() + (0 if bias is None else bias.double())
        err = ((y.double() - ref).norm() / ref.norm()).item()
        t_err = ((t.double() - t_ref).norm() / t_ref.norm()).item()
        ok = err < (1e-2 if dtype == torch.bfloat16 else 2e-3) and t_err < 1e-2
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} M={M} N={N} K={K} r={r} {str(dtype)[6:]}: {what}: "
              f"rel err y {err:.2e}, t {t_err:.2e}", flush=True)
    if hopper:
        failures += dx_cases(rnd)
    else:
        print("skip sm90 dx cases (not an sm_90 GPU)", flush=True)
    failures += merge_cases(rnd)
    return 1 if failures else 0


# (M, N, K, r, dtype, adapter dtype, tile_kind, what it reaches) of the sm90 backward dx
# (lora_linear_sm90_dx_*.cu: dx [M, K] = dy [M, N] @ W [N, K] + [u_hi|u_lo] @ [A; A]; 3 = 128x256, 4 = 128x128)
DX_CASES = [
    (130, 264, 136, 16, torch.bfloat16, None, 3, "sm90 dx 128x256: M and K tails, odd cluster row"),
    (201, 72, 136, 5, torch.float16, torch.float32, 4, "sm90 dx 128x128: N tail (partial k-block), 3r tail"),
    (64, 8, 8, 1, torch.bfloat16, None, 4, "sm90 dx: N = K = 8 (one partial k-block, one partial tile), rank 1"),
    (100, 200, 264, 16, torch.bfloat16, None, 4, "sm90 dx 128x128: K tail across three tiles"),
]


def dx_cases(rnd) -> int:
    """The sm90 backward dx on small problems; inputs made and checked on the CPU."""
    from lora_kernels.cuda.lora_linear import lora_linear_dx
    failures = 0
    for M, N, K, r, dtype, adapter_dtype, tile_kind, what in DX_CASES:
        ad = adapter_dtype or dtype
        dy, w, a, b = rnd(M, N, dtype=dtype), rnd(N, K, dtype=dtype), rnd(r, K, dtype=ad), rnd(N, r, dtype=ad)
        got = lora_linear_dx(dy.cuda(), w.cuda(), a.cuda(), b.cuda(), 0.5, tile_kind=tile_kind)
        if got is None:
            failures += 1
            print(f"FAIL dx M={M} N={N} K={K} r={r}: {what}: the sm90 dx did not run", flush=True)
            continue
        dx, u = got[0].cpu(), got[1].cpu()
        u_ref = dy.double() @ b.double()
        ref = dy.double() @ w.double() + 0.5 * u_ref @ a.double()
        err = ((dx.double() - ref).norm() / ref.norm()).item()
        u_err = ((u.double() - u_ref).norm() / u_ref.norm()).item()
        ok = err < (1e-2 if dtype == torch.bfloat16 else 2e-3) and u_err < 1e-4
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} dx M={M} N={N} K={K} r={r} {str(dtype)[6:]}: {what}: "
              f"rel err dx {err:.2e}, u {u_err:.2e}", flush=True)
    return failures


# (N, K, r, dtype, adapter dtype, layout, what it reaches) of csrc/merge/merge.cuh
MERGE_CASES = [
    (130, 264, 16, torch.bfloat16, None, "contiguous", "16-byte vectors, P and Q tails"),
    (100, 72, 7, torch.float16, torch.float32, "fan_in_fan_out", "transposed layout, 3xTF32"),
    (64, 200, 64, torch.float32, torch.float32, "col_slice", "fp32 weight, slice of a wider buffer"),
    (90, 136, 256, torch.bfloat16, None, "misaligned", "element accesses, four rank chunks"),
]


def merge_cases(rnd) -> int:
    """Every mode of the CUDA merge on each case: a safe merge (count pass + gated merge), a
    plain unmerge, then an exact merge with a too-small escape table (PENDING elements), its
    undo, and a full exact cycle, which must restore the weight bit for bit."""
    from lora_kernels.cuda import merge as cuda_merge
    bits = lambda t: t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)  # noqa: E731
    failures = 0
    for N, K, r, dtype, adapter_dtype, layout, what in MERGE_CASES:
        ad = adapter_dtype or dtype
        if layout == "fan_in_fan_out":
            storage = rnd(K, N, dtype=dtype).cuda()
            w = storage
        elif layout == "col_slice":
            storage = rnd(N, 3 * K, dtype=dtype).cuda()
            w = storage[:, K:2 * K]
        elif layout == "misaligned":
            storage = rnd(N * K + 1, dtype=dtype).cuda()
            w = storage[1:].view(N, K)
        else:
            storage = rnd(N, K, dtype=dtype).cuda()
            w = storage
        fan = layout == "fan_in_fan_out"
        a, b = rnd(r, K, dtype=ad).cuda(), (rnd(N, r, dtype=ad) * 4.0).cuda()  # |delta| ~ |W|: some escape
        logical = (lambda t: t.t()) if fan else (lambda t: t)  # noqa: E731
        w0 = w.clone()
        ref = logical(w0).double() + 0.5 * b.double() @ a.double()
        status = torch.zeros(2, dtype=torch.int32, device="cuda")
        cuda_merge.count_nonfinite_(w, a, b, 0.5, fan_in_fan_out=fan, status=status)
        cuda_merge.apply_(w, a, b, 0.5, fan_in_fan_out=fan, status=status, gated=True)
        err = ((logical(w).double() - ref).norm() / ref.norm()).item()
        ok = int(status[1]) == 0 and err < (1e-2 if dtype == torch.bfloat16 else 2e-3)
        cuda_merge.apply_(w, a, b, 0.5, fan_in_fan_out=fan, subtract=True)
        codes = torch.empty_like(w, dtype=torch.int8)
        for capacity in (3, N * K):  # 3: escapes past the table's end stay unmerged (PENDING)
            w.copy_(w0)
            index = torch.empty(capacity, dtype=torch.int64, device="cuda")
            value = torch.empty(capacity, dtype=dtype, device="cuda")
            status.zero_()
            cuda_merge.merge_exact_(w, a, b, 0.5, fan_in_fan_out=fan, codes=codes, escape_index=index,
                                    escape_value=value, status=status)
            escapes = int(status[0])
            cuda_merge.unmerge_exact_(w, a, b, 0.5, fan_in_fan_out=fan, codes=codes, escape_index=index,
                                      escape_value=value, num_escapes=min(escapes, capacity))
            ok = ok and torch.equal(bits(w), bits(w0))
        torch.cuda.synchronize()
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} merge N={N} K={K} r={r} {str(dtype)[6:]} {layout}: {what}: "
              f"rel err {err:.2e}, {escapes} escapes", flush=True)
    return failures


# ---- Multi-adapter shrink / expand / fused linear (csrc/multi_lora/*.cuh) --------------------------
# (dist, M, N, K, L, r_max, dtype, adapter dtype, shrink item_m, what it reaches); ranks mixed,
# the stacks NaN past each rank (never read), y column-major in the last case.
MULTI_CASES = [
    ("none10", 9, 72, 136, 4, 16, torch.bfloat16, None, 16, "decode pieces: CUDA-core paths, no-adapter rows"),
    ("one", 150, 200, 72, 3, 64, torch.float16, None, 64, "long pieces: 64x64 tensor-core shrink, expand tiles"),
    ("zipf", 40, 96, 64, 6, 32, torch.bfloat16, torch.float32, 16, "fp32 adapters: split A, 3xTF32 expand"),
    ("zipf", 70, 40, 70, 8, 128, torch.float16, None, 64, "K % 8 != 0 (element loads), ranks to 128, strided y"),
]


def main_multi() -> int:
    """The CUDA multi-adapter kernels (shrink, expand, fused linear with both tiles) on small
    batches; inputs made and checked on the CPU."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from cases import make_multi_inputs  # noqa: E402
    from lora_kernels import AdapterIndex, reference  # noqa: E402
    from lora_kernels.cuda.multi_lora import multi_lora_expand_, multi_lora_linear, multi_lora_shrink  # noqa: E402
    failures = 0
    for i, (dist, M, N, K, L, R, dtype, adapter_dtype, item_m, what) in enumerate(MULTI_CASES):
        inp = make_multi_inputs(M, N, K, L, R, dtype, dist=dist, ranks="mixed", adapter_dtype=adapter_dtype, seed=i)
        index = AdapterIndex.from_token_adapters(inp.token_adapter.cuda(), L)
        gpu = lambda t: t.to("cuda")  # noqa: E731
        t = multi_lora_shrink(gpu(inp.x), gpu(inp.lora_a), index, gpu(inp.scales), gpu(inp.ranks),
                              item_m=item_m).cpu()
        y0 = (torch.randn(N, M, dtype=torch.float64) / 4).to(dtype).t() if i == 3 else torch.randn(M, N).to(dtype)
        y = gpu(y0)  # .to keeps y0's strides
        multi_lora_expand_(y, gpu(t), gpu(inp.lora_b), index, gpu(inp.ranks))
        y = y.cpu()
        # the fused op (shrink + base GEMM with the expand epilogue); the small tile for odd cases
        lin = multi_lora_linear(gpu(inp.x), gpu(inp.weight), gpu(inp.lora_a), gpu(inp.lora_b), index, gpu(inp.scales),
                                gpu(inp.bias), gpu(inp.ranks), tile_kind=1 + i % 2, tiles_per_cta=2).cpu()
        t_ref = inp.t64()
        y_ref = reference.lora_expand_(y0.double(), t.double(), inp.lora_b.double(), inp.token_adapter, inp.ranks)
        t_err = ((t.double() - t_ref).norm() / t_ref.norm().clamp_min(1e-30)).item()
        err = ((y.double() - y_ref).norm() / y_ref.norm()).item()
        lin_ref = inp.linear64()
        lin_err = ((lin.double() - lin_ref).norm() / lin_ref.norm()).item()
        untouched = inp.token_adapter < 0
        same = torch.equal(y[untouched].view(torch.int16), y0[untouched].view(torch.int16))
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        ok = err < tol and lin_err < tol and t_err < 1e-2 and same
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} multi {dist} M={M} N={N} K={K} L={L} r_max={R} {str(dtype)[6:]}: {what}: "
              f"rel err t {t_err:.2e}, y {err:.2e}, linear {lin_err:.2e}, no-adapter rows untouched: {same}",
              flush=True)
    return 1 if failures else 0


# The Hopper multi-adapter linear (lora_kernels/cuda/multi_lora_sm90.py: the sm90 tail GEMM of
# csrc/lora_linear/lora_linear_sm90.cuh with a per-slot LoRA tail; Hopper only), each tile forced:
# (dist, M, N, K, L, r_max, dtype, adapter dtype, tile_kind, what it reaches); ranks mixed, NaN past them.
MULTI_SM90_CASES = [
    ("none10", 130, 264, 136, 3, 8, torch.bfloat16, None, 3, "sm90 128x256: M and N tails, per-slot tail 48 columns"),
    ("zipf", 100, 136, 72, 4, 5, torch.float16, torch.float32, 4, "sm90 128x128: fp32 B (3r blocks), Wb = 16 > 3r"),
    ("one", 64, 64, 8, 2, 1, torch.bfloat16, None, 5, "sm90 128x64: K = 8, rank-1 slots"),
]


def main_multi_sm90() -> int:
    """The sm90 multi-adapter path on small batches (skipped off Hopper); inputs made and checked on the CPU."""
    if torch.cuda.get_device_capability() != (9, 0):
        print("skip the sm90 multi-adapter cases (not an sm_90 GPU)", flush=True)
        return 0
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from cases import make_multi_inputs  # noqa: E402
    from lora_kernels import AdapterIndex  # noqa: E402
    from lora_kernels.cuda.multi_lora import multi_lora_linear  # noqa: E402
    failures = 0
    for i, (dist, M, N, K, L, R, dtype, adapter_dtype, tile_kind, what) in enumerate(MULTI_SM90_CASES):
        inp = make_multi_inputs(M, N, K, L, R, dtype, dist=dist, ranks="mixed", adapter_dtype=adapter_dtype, seed=i)
        index = AdapterIndex.from_token_adapters(inp.token_adapter.cuda(), L)
        gpu = lambda t: None if t is None else t.to("cuda")  # noqa: E731
        lin = multi_lora_linear(gpu(inp.x), gpu(inp.weight), gpu(inp.lora_a), gpu(inp.lora_b), index, gpu(inp.scales),
                                gpu(inp.bias), gpu(inp.ranks), tile_kind=tile_kind).cpu()
        ref = inp.linear64()
        err = ((lin.double() - ref).norm() / ref.norm()).item()
        ok = err < (1e-2 if dtype == torch.bfloat16 else 2e-3)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} multi sm90 {dist} M={M} N={N} K={K} L={L} r_max={R} {str(dtype)[6:]}: "
              f"{what}: rel err {err:.2e}", flush=True)
    return 1 if failures else 0


# Several output slices in one shrink and one expand launch, ranks past 128 (issue 12):
# (dist, M, slice widths, K, L, r_max, dtype, shrink item_m, expand offset, what it reaches).
MULTI_SLICE_CASES = [
    ("none10", 40, [136, 34, 34], 64, 5, 32, torch.bfloat16, 16, 3,
     "GQA q/k/v in one launch: the narrow slices' CTAs past their width return, offset"),
    ("zipf", 70, [72, 72, 8, 40], 48, 4, 300, torch.float16, 64, 0,
     "4 slices, r_max 300: shrink rank chunks, the expand's 3 chunks of t"),
    ("decode", 12, [64, 64], 136, 3, 512, torch.bfloat16, 16, 1,
     "decode pieces at r_max 512: CUDA-core paths over 4 rank chunks"),
]


def main_multi_slices() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from cases import make_multi_inputs  # noqa: E402
    from lora_kernels import AdapterIndex, reference  # noqa: E402
    from lora_kernels.cuda.multi_lora import multi_lora_expand_, multi_lora_shrink  # noqa: E402
    failures = 0
    for i, (dist, M, widths, K, L, R, dtype, item_m, offset, what) in enumerate(MULTI_SLICE_CASES):
        inp = make_multi_inputs(M, 8, K, L, R, dtype, dist=dist, ranks="mixed", seed=10 + i)
        gen = torch.Generator().manual_seed(i)
        keep = reference.rank_keep(inp.ranks, L, R, "cpu")
        a_stacks = [(torch.randn(L, R, K, generator=gen) * K ** -0.5).to(dtype) for _ in widths]
        b_stacks = [(torch.randn(L, n, R, generator=gen) * R ** -0.5).to(dtype) for n in widths]
        for a, b in zip(a_stacks, b_stacks):  # never read
            a.masked_fill_(~keep[:, :, None], float("nan"))
            b.masked_fill_(~keep[:, None, :], float("nan"))
        index = AdapterIndex.from_token_adapters(inp.token_adapter.cuda(), L)
        gpu = lambda t: t.to("cuda")  # noqa: E731
        t = multi_lora_shrink(gpu(inp.x), [gpu(a) for a in a_stacks], index, gpu(inp.scales), gpu(inp.ranks),
                              item_m=item_m).cpu()
        y0 = torch.randn(M, offset + sum(widths) + 2).to(dtype)
        y = gpu(y0)
        multi_lora_expand_(y, gpu(t), [gpu(b) for b in b_stacks], index, gpu(inp.ranks), offset=offset)
        y = y.cpu()
        y_ref, col, t_err = y0.double().clone(), offset, 0.0
        for s, (a, b) in enumerate(zip(a_stacks, b_stacks)):
            t_ref = reference.lora_shrink(inp.x.double(), a.double(), inp.token_adapter, inp.scales.double(),
                                          inp.ranks)
            t_err = max(t_err, ((t[s].double() - t_ref).norm() / t_ref.norm().clamp_min(1e-30)).item())
            y_ref[:, col:col + b.shape[1]] = reference.lora_expand_(y0[:, col:col + b.shape[1]].double(),
                                                                    t[s].double(), b.double(), inp.token_adapter,
                                                                    inp.ranks)
            col += b.shape[1]
        err = ((y.double() - y_ref).norm() / y_ref.norm()).item()
        outside = torch.ones_like(y0, dtype=torch.bool)
        outside[:, offset:col] = False
        same = torch.equal(y[outside].view(torch.int16), y0[outside].view(torch.int16))
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        ok = err < tol and t_err < 1e-2 and same
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} multi slices {widths} {dist} M={M} K={K} L={L} r_max={R} "
              f"{str(dtype)[6:]}: {what}: rel err t {t_err:.2e}, y {err:.2e}, columns outside untouched: {same}",
              flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(max(main(), main_multi(), main_multi_sm90(), main_multi_slices()))
