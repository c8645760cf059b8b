"""The multi-adapter kernels compile for sm_90a (H100/H200) on this CPU-only machine at every
configuration their launchers choose for the benchmark suite (shared/DESIGN.md section 7: every
layer of bench/suites.py, the multi-slice layers' widest slice, every token count of both suites,
L in {8, 128}, ranks 8 to 512; bf16 x with bf16 and fp32 adapters, fp16 x with fp16 and fp32
adapters, fp32 x and adapters), and for each:

* it fits in the shared memory a block may use there;
* ptxas -v reports no spill at all;
* its loops with a tensor-core dot are pipelined, never wait for all copies or MMAs and never
  store a register value to shared memory (no exemption).

The interpreter accepts constructs the compiler rejects, and it cannot see shared memory or
registers: this is the CPU lane's only check of those. (It caught the tf32x3 t @ B product
needing 256 KiB at rank 128.)"""
import itertools

import pytest
import torch

from aot import SM90_MAX_SHARED_BYTES, compiled_in_subprocess, print_compile_report

pytestmark = pytest.mark.slow
NUM_SMS = 132  # H100 SXM / H200
SUITE_RANKS = (8, 16, 32, 64, 128, 256, 512)  # the suite's, the sweep's, 32 (common), the chunked ranks
# The shrink's 64-row pieces start at M >= 64 * PREFILL_PIECES_PER_SM * 132 ~ 16.9K tokens, past
# the suite's largest M: these batch sizes reach that launch too.
BEYOND_SUITE_TOKENS = (65536,)
# (x, W and y's dtype, the adapters'): fp32 is PEFT's default adapters. fp16 takes its own paths
# where 16-bit halves are made (an fp32 A split into x's dtype) and in the chunked epilogue (t2);
# fp32 x its own tiles (4-byte elements).
DTYPES = (("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"), ("fp32", "fp32"))
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _strides(*shape):
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= d
    return list(reversed(out))


def _suite():
    """(K, N, M, R, L) over the suite; N is the widest output (of a multi-slice layer: its widest
    slice, which sizes the expand's grid and config)."""
    from bench import multi, suites
    layers = {(K, N) for _, K, N in suites.LAYERS + suites.MULTI_LAYERS}
    layers |= {(K, max(widths)) for _, K, widths in multi.SLICE_LAYERS}
    tokens = sorted(set(suites.TOKENS) | set(suites.MULTI_TOKENS) | set(BEYOND_SUITE_TOKENS))
    for (K, N), M, R, L in itertools.product(sorted(layers), tokens, SUITE_RANKS, suites.MULTI_ADAPTERS):
        yield K, N, M, R, L


def launch_configs():
    """{kernel config name: (kernel, constexprs, num_warps, num_stages[, launch options])} of every distinct launch
    the multi-adapter launchers make over the suite (the constexprs are what makes a compiled
    variant; the runtime ints are the suite's largest layer)."""
    configs = {}
    for (K, N, M, R, L), (xdt, adt) in itertools.product(_suite(), DTYPES):
        configs.update({f"{name}{'' if xdt == 'bf16' else f' x={xdt}'}": value
                        for name, value in _launches(K, N, M, R, L, xdt, adt).items()})
    return configs


def _launches(K, N, M, R, L, xdt, adt):
    """The launches of one suite case with x of dtype `xdt` and adapters of dtype `adt` (names as
    launch_configs', without the x dtype)."""
    from lora_kernels.triton import multi_lora as ml
    from lora_kernels.triton.lora_linear import block_r_for
    out = {}
    fp32 = adt == "fp32"
    elem = 4 if xdt == "fp32" else 2
    split_a = fp32 and xdt != "fp32"  # an fp32 A over 16-bit x, split into x's dtype
    lora_prec = "tf32x3" if fp32 else "tf32x2"
    b_dtype = _TORCH_DTYPES[adt]
    cfg = ml.linear_config(M, N, K, R, L, elem, NUM_SMS, split_adapters=split_a)
    t_given = block_r_for(R) > ml.RANK_CHUNK or not cfg.fused_shrink  # as ml.multi_lora_linear
    segs = [cfg.segment] if t_given else []
    segs.append(ml.segment_config(M, K, R, elem, NUM_SMS, split_a))  # lora_shrink / shrink_slices alone
    # the chunked kernel's shrink stores t split (t2 / t4) where that kernel takes it so
    split = ml.t_split_for(b_dtype, lora_prec, cfg.tiles.block_m) if t_given else 1
    for sc, t_split in zip(segs, (split, 1)):
        block_r = min(sc.shrink_block_r, ml.T4_SHRINK_MAX_BLOCK_R if t_split > 1 else ml.RANK_CHUNK)
        c = dict(HAS_SCALES=True, HAS_RANKS=True, SPLIT_A=split_a, BLOCK_M=sc.item_m, BLOCK_K=sc.shrink_block_k,
                 BLOCK_R=block_r, PRECISION="tf32", T_SPLIT=t_split)
        out[f"shrink BM={sc.item_m} BK={sc.shrink_block_k} BR={block_r} w{sc.num_warps} s{sc.num_stages}"
            f"{f' t{t_split}' if t_split > 1 else ''} A={adt}"] = (ml.lora_shrink_kernel, c, sc.num_warps, sc.num_stages)
    ec = ml.segment_config(M, N, R, elem, NUM_SMS)  # expand_slices_: y's element size
    block_r, rank_chunked = ml.expand_block_r(R)
    c = dict(HAS_RANKS=True, ITEM_M=ec.expand_item_m, BLOCK_M=min(ml.EXPAND_BLOCK_M, ec.expand_item_m),
             BLOCK_N=ec.expand_block_n, BLOCK_R=block_r, RANK_CHUNKED=rank_chunked, PRECISION=lora_prec)
    out[f"expand item={ec.expand_item_m} BN={ec.expand_block_n} BR={block_r}"
        f"{' chunked' if c['RANK_CHUNKED'] else ''} w{ec.expand_num_warps} B={adt}"] = (
            ml.lora_expand_kernel, c, ec.expand_num_warps, ml.EXPAND_NUM_STAGES)
    t = cfg.tiles
    # M and tiles_per_program are runtime ints neither linear kernel specialises
    # (ml._PER_CALL_INTS): one compiled kernel per tile config stands for every M and every
    # tiles-per-program value (checked by test_per_call_ints_compile_to_one_kernel).
    tiles = f"BM={t.block_m} BN={t.block_n} BK={t.block_k} w{t.num_warps} s{t.num_stages}"
    common = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m,
                  BASE_PRECISION="tf32", LORA_PRECISION=lora_prec)
    if t_given:
        t_split = ml.t_split_for(b_dtype, lora_prec, t.block_m)
        chunk = ml.t_chunk_for(R, b_dtype, t.block_m, t.block_n, t.num_warps, t_split)
        warps = ml.chunked_num_warps(t.num_warps, t.block_n, t_split)
        name = (f"linear t-given {tiles} chunk={chunk}{f' t{t_split} w{warps}' if t_split > 1 else ''}"
                f" adapters={adt}")
        out[name] = (ml.multi_lora_linear_chunked_kernel,
                     dict(HAS_BIAS=True, HAS_RANKS=True, T_SPLIT=t_split, BLOCK_R=chunk, **common),
                     warps, t.num_stages, dict(maxnreg=ml.MAX_REGISTERS))
    else:
        name = f"linear fused-shrink {tiles} BR={t.block_r} adapters={adt}"
        out[name] = (ml.multi_lora_linear_kernel,
                     dict(HAS_BIAS=True, HAS_SCALES=True, HAS_RANKS=True, SPLIT_A=split_a, BLOCK_R=t.block_r,
                          **common),
                     t.num_warps, t.num_stages)
    return out


def _args(kernel, constexprs, xdt, adt):
    """Example runtime arguments (the suite's largest shapes; what the JIT specialises on: pointer
    types, divisibility by 16)."""
    from lora_kernels.triton import multi_lora as ml
    M, N, K, L, R = 4096, 28672, 8192, 128, 512
    ad, xd = "*" + adt, "*" + xdt
    if kernel is ml.lora_shrink_kernel:
        return dict(x_ptr=xd, a_ptr0=ad, a_ptr1=ad, a_ptr2=ad, a_ptr3=ad, scales_ptr="*fp32",
                    ranks_ptr="*i32", work_ptr="*i32", tok_ptr="*i32", t_ptr="*fp32", K=K, R=R, scale=1.0,
                    stride_xm=K, stride_xk=1, **dict(zip(("stride_al", "stride_ar", "stride_ak"), _strides(L, R, K))),
                    stride_ts=M * R, stride_tm=R, stride_tr=1)
    if kernel is ml.lora_expand_kernel:
        # three slices (q/k/v under GQA), as the serving integrations launch them
        return dict(y_ptr=xd, t_ptr="*fp32", b_ptr0=ad, b_ptr1=ad, b_ptr2=ad, b_ptr3=ad,
                    ranks_ptr="*i32", work_ptr="*i32", tok_ptr="*i32", R=R, n0=4096, n1=1024, n2=1024, n3=0,
                    col0=0, col1=4096, col2=4096 + 1024, col3=0, sbl0=4096 * R, sbl1=1024 * R, sbl2=1024 * R, sbl3=0,
                    stride_ym=4096 + 2048, stride_yn=1, stride_ts=M * R, stride_tm=R, stride_tr=1,
                    stride_bn=R, stride_br=1)
    common = dict(x_ptr=xd, w_ptr=xd, bias_ptr=xd, b_ptr=ad, ranks_ptr="*i32", y_ptr=xd,
                  tok_ptr="*i32", sorted_slot_ptr="*i32", slot_start_ptr="*i32", M=M, N=N, K=K, R=R, L=L,
                  tiles_per_program=7,
                  stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1,
                  **dict(zip(("stride_bl", "stride_bn", "stride_br"), _strides(L, N, R))), stride_ym=N, stride_yn=1)
    if kernel is ml.multi_lora_linear_chunked_kernel:
        t_width = constexprs["T_SPLIT"] * R  # t2 / t4: t split (hi, lo) / (hi, hi, lo, lo)
        return dict(common, t_ptr="*fp32", stride_tm=t_width, stride_tr=1)
    return dict(common, a_ptr=ad, scales_ptr="*fp32", scale=1.0,
                **dict(zip(("stride_al", "stride_ar", "stride_ak"), _strides(L, R, K))))


PER_CALL_VARIANTS = ("per-call ints: M=1 tiles=1", "per-call ints: M=4095 tiles=8")
PER_CALL_KERNELS = ("linear t-given", "linear fused-shrink")  # multi_lora_linear_(chunked_)kernel


def _dtypes_of(name):
    """(x dtype, adapter dtype) of a launch_configs name."""
    xdt = name.rsplit("x=", 1)[1] if " x=" in name else "bf16"
    return xdt, "fp32" if "fp32" in name else xdt


def _cases():
    configs = sorted(launch_configs().items())
    for name, (kernel, constexprs, warps, stages, *options) in configs:
        yield (name, kernel, _args(kernel, constexprs, *_dtypes_of(name)), constexprs, warps, stages, *options)
    # the first config of each linear kernel again at other per-call ints: the same compiled kernel
    for prefix in PER_CALL_KERNELS:
        name, (kernel, constexprs, warps, stages, *options) = next(c for c in configs if c[0].startswith(prefix))
        for variant, M, tiles in zip(PER_CALL_VARIANTS, (1, 4095), (1, 8)):
            args = dict(_args(kernel, constexprs, *_dtypes_of(name)), M=M, tiles_per_program=tiles)
            yield (f"{name} [{variant}]", kernel, args, constexprs, warps, stages, *options)


@pytest.fixture(scope="module")
def compiled():
    return compiled_in_subprocess(__file__, timeout=2400)


@pytest.mark.parametrize("name", [c[0] for c in _cases()])
def test_compiles_for_sm90_fits_and_never_spills(compiled, name):
    report = compiled[name]
    assert report["shared"] <= SM90_MAX_SHARED_BYTES, f"{name}: {report}"
    assert report["registers"] > 0, f"{name}: ptxas -v gave no register count"
    assert report["spill_bytes"] == 0, f"{name}: {report}"


@pytest.mark.parametrize("name", [c[0] for c in _cases()])
def test_k_loops_are_pipelined_and_never_wait_for_all(compiled, name):
    """Every innermost loop with a tensor-core dot (K loops, the expand's row loop, rank-chunk
    loops): no synchronous load into a dot operand, no wait for all copies or all MMAs, no
    register -> shared-memory store (tests/aot.py k_loop_report). No exemption: the chunked
    epilogue on wgmma tiles with fp32 or fp16 B takes t split (multi_lora._rank_chunks_dot_split)."""
    loops = compiled[name]["k_loops"]
    assert loops, f"{name}: no K loop with a dot found in the TTGIR"
    for loop in loops:
        assert loop["sync_loads_into_dot"] == 0, f"{name}: {loop}"
        assert loop["async_wait_all"] == 0, f"{name}: {loop}"
        assert loop["mma_wait_all"] == 0, f"{name}: {loop}"
        assert loop["local_stores"] == 0, f"{name}: {loop}"


@pytest.mark.parametrize("prefix", PER_CALL_KERNELS)
def test_per_call_ints_compile_to_one_kernel(compiled, prefix):
    """M and tiles_per_program vary per call (issue 16, point 6): for each linear kernel (the
    chunked one and the fused-shrink one), 1 vs 8 tiles and M = 1 vs 4095 (odd, not a multiple of
    16) must not make another compiled variant than the suite config's (M = 4096, 7 tiles)."""
    variants = [n for n in compiled if n.startswith(prefix) and n.endswith(tuple(f"[{v}]" for v in PER_CALL_VARIANTS))]
    assert len(variants) == len(PER_CALL_VARIANTS), variants
    hashes = {compiled[n]["hash"] for n in variants}
    assert len(hashes) == 1, hashes
    base = variants[0].rsplit(" [", 1)[0]
    assert compiled[base]["hash"] in hashes


if __name__ == "__main__":
    print_compile_report(_cases())
