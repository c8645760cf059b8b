"""The single-adapter Triton kernels compile for sm_90a (H100/H200) on this CPU-only machine at
the launch plans of the benchmark suite's regimes (decode, mid M with K split, prefill; ranks 16
to 128; 16-bit and fp32 adapters; the backward's dx, u and dA/dB; dropout; bf16 x, and fp16 x
at a sample of them), and for each:

* it fits in a block's shared memory and ptxas -v reports no spill at all;
* every K loop holding a tensor-core dot is software-pipelined: its loads are asynchronous copies
  (no synchronous global load feeding a dot), its waits leave copies in flight (no
  ``async_wait {num = 0}``) and nothing is converted and stored to shared memory mid-iteration;
* per-call ints (M, tiles per program, the K run) are not specialised: M = 1 and M = 4096 with
  the same tiles compile to the same kernel.

The interpreter accepts constructs the compiler rejects and cannot see registers or shared
memory: this is the CPU lane's only check of those."""
import pytest

from aot import SM90_MAX_SHARED_BYTES, compiled_in_subprocess, print_compile_report

pytestmark = pytest.mark.slow
NUM_SMS = 132


def _fwd_case(name, M, N, K, R, *, store_t=False, dropout_out=False, fp32_adapters=False, bias=False,
              dropout=False, force_fused_t=False, m_args=None, x_ty="bf16", base_prec="tf32"):
    """The fused launch of plan_forward(M, N, K, R) (and, separately, its shrink); `m_args`: the M
    the compiled kernel is specialised for, when it differs from the M the plan is for; `x_ty`:
    x's (and W's, y's, the adapters') type; `base_prec`: the base GEMM's (fp32 x: "ieee" unless
    torch allows tf32)."""
    from dataclasses import replace
    from lora_kernels.triton import lora_linear as ll
    elem = 4 if x_ty == "fp32" else 2
    plan = ll.plan_forward(M, N, K, R, elem, NUM_SMS, dropout=dropout, mask_epilogue=dropout_out,
                           split_adapters=fp32_adapters)
    cfg = plan.fused
    if force_fused_t:  # t computed in the fused kernel (a config the tuner may pick)
        cfg = replace(cfg, split_k=1, precompute_t=False)
        plan = ll.plan_forward(M, N, K, R, elem, NUM_SMS, config=cfg, split_adapters=fp32_adapters)
    load_t = plan.shrink is not None
    x_ptr = "*" + x_ty
    adapter = x_ptr  # fp32 adapters reach the kernels as two x-dtype halves (A_HALVES) or via t
    b_ptr = "*fp32" if fp32_adapters else x_ptr
    y_ptr = "*fp32" if plan.fused_grid[1] > 1 else x_ptr
    args = dict(x_ptr=x_ptr, w_ptr=x_ptr, a_ptr=adapter, b_ptr=b_ptr, bias_ptr=x_ptr, y_ptr=y_ptr,
                t_ptr="*fp32", t_store_ptr="*fp32", seed_ptr="*i64", M=m_args or M, N=N, K=K, R=R, scale=2.0,
                dropout_threshold=7, tiles_per_program=cfg.tiles_per_program,
                k_tiles_per_split=plan.k_per_split // cfg.block_k, t_splits=1 if plan.t_reduce else 3,
                stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1, stride_ah=R * K, stride_ar=K, stride_ak=1,
                stride_bn=R, stride_br=1, stride_ys=M * N, stride_ym=N, stride_yn=1, stride_ts=M * R,
                stride_tm=R, stride_tr=1, stride_sm=R, stride_sr=1)
    constexprs = dict(HAS_BIAS=bias, STORE_T=store_t and (not load_t or not plan.t_reduce), LOAD_T=load_t,
                      DROPOUT_OUT=dropout_out, A_HALVES=fp32_adapters and not load_t,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
                      T_CHUNK=ll.t_chunk(cfg.block_r), GROUP_M=cfg.group_m, BASE_PRECISION=base_prec,
                      LORA_PRECISION="tf32x3" if fp32_adapters or x_ty == "fp32" else "tf32x2")
    yield f"fwd {name}", ll.lora_linear_fwd_kernel, args, constexprs, cfg.num_warps, cfg.num_stages
    if load_t and m_args is None:
        yield _shrink_case(f"shrink of {name}", M, K, R, plan.shrink, dropout, fp32_adapters, x_ty, base_prec)


def _shrink_case(name, M, K, R, sc, dropout, fp32_adapters, x_ty="bf16", base_prec="tf32"):
    from lora_kernels.triton import lora_linear as ll
    from lora_kernels.triton.lora_linear import k_split_plan
    per = k_split_plan(K, sc.block_k, sc.split_k)[1]
    return (name, ll.lora_shrink_kernel,
            dict(x_ptr="*" + x_ty, a_ptr="*" + x_ty, t_ptr="*fp32", seed_ptr="*i64", M=M, K=K, R=R, t_scale=2.0,
                 dropout_threshold=7, k_tiles_per_split=per // sc.block_k, stride_xm=K, stride_xk=1,
                 stride_ah=R * K, stride_ar=K, stride_ak=1, stride_ts=M * R, stride_tm=R, stride_tr=1),
            dict(DROPOUT=dropout, A_HALVES=fp32_adapters, BLOCK_M=sc.block_m, BLOCK_K=sc.block_k,
                 BLOCK_R=sc.block_r, PRECISION=base_prec), sc.num_warps, sc.num_stages)


def _cases():
    from lora_kernels.triton import lora_linear as ll
    from lora_kernels.triton import lora_linear_backward as lb
    yield from _fwd_case("decode M=1 r=16", 1, 4096, 4096, 16, bias=True)
    yield from _fwd_case("decode M=16 r=128", 16, 4096, 4096, 128)
    yield from _fwd_case("decode M=1 r=16 (8B k/v, K split)", 1, 1024, 4096, 16, bias=True)
    yield from _fwd_case("M=128 r=16 (K split)", 128, 4096, 4096, 16, bias=True)
    yield from _fwd_case("M=1024 r=64", 1024, 4096, 4096, 64, bias=True)
    yield from _fwd_case("M=4096 r=16", 4096, 4096, 4096, 16, bias=True)
    yield from _fwd_case("M=4096 r=16 store_t", 4096, 4096, 4096, 16, store_t=True)
    yield from _fwd_case("M=4096 r=128 store_t", 4096, 4096, 4096, 128, store_t=True)
    yield from _fwd_case("M=4096 r=16 fp32 adapters", 4096, 4096, 4096, 16, fp32_adapters=True)
    yield from _fwd_case("M=4096 r=16 fp32 adapters, fused t", 4096, 4096, 4096, 16, fp32_adapters=True,
                         force_fused_t=True)
    yield from _fwd_case("M=4096 r=32 fused t store_t", 4096, 4096, 4096, 32, store_t=True, force_fused_t=True)
    yield from _fwd_case("M=4096 r=16 dropout", 4096, 4096, 4096, 16, dropout=True, store_t=True)
    yield from _fwd_case("bwd dx M=4096 r=16 dropout", 4096, 4096, 4096, 16, store_t=True, dropout_out=True)
    yield from _fwd_case("bwd dx M=4096 r=128 dropout fp32 adapters", 4096, 4096, 4096, 128, store_t=True,
                         dropout_out=True, fp32_adapters=True)
    # fp16 x, W and adapters: fp32 adapters split into fp16 halves, fp16 B in the tf32x2 epilogue
    yield from _fwd_case("decode M=1 r=16 fp16", 1, 4096, 4096, 16, bias=True, x_ty="fp16")
    yield from _fwd_case("M=128 r=16 (K split) fp16", 128, 4096, 4096, 16, bias=True, x_ty="fp16")
    yield from _fwd_case("M=4096 r=16 fp16", 4096, 4096, 4096, 16, bias=True, x_ty="fp16")
    yield from _fwd_case("M=4096 r=128 store_t fp16", 4096, 4096, 4096, 128, store_t=True, x_ty="fp16")
    yield from _fwd_case("M=4096 r=16 fp32 adapters fp16", 4096, 4096, 4096, 16, fp32_adapters=True, x_ty="fp16")
    yield from _fwd_case("bwd dx M=4096 r=16 dropout fp16", 4096, 4096, 4096, 16, store_t=True, dropout_out=True,
                         x_ty="fp16")
    # fp32 x (fp32 adapters): tf32 where torch allows it, else "ieee" (torch's default)
    for prec in ("tf32", "ieee"):
        yield from _fwd_case(f"decode M=1 r=16 fp32 {prec}", 1, 4096, 4096, 16, bias=True, x_ty="fp32",
                             base_prec=prec)
        yield from _fwd_case(f"M=4096 r=16 fp32 {prec}", 4096, 4096, 4096, 16, bias=True, x_ty="fp32",
                             base_prec=prec)
    yield from _fwd_case("M=128 r=16 (K split) fp32", 128, 4096, 4096, 16, x_ty="fp32")
    yield from _fwd_case("M=1024 r=64 fp32", 1024, 4096, 4096, 64, x_ty="fp32")
    yield from _fwd_case("M=4096 r=128 store_t fp32", 4096, 4096, 4096, 128, store_t=True, x_ty="fp32")
    yield from _fwd_case("M=4096 r=16 dropout fp32", 4096, 4096, 4096, 16, dropout=True, store_t=True, x_ty="fp32")
    yield from _fwd_case("bwd dx M=4096 r=128 dropout fp32", 4096, 4096, 4096, 128, store_t=True, dropout_out=True,
                         x_ty="fp32")
    # the same tiles at M = 1 and M = 4096 must be the same compiled kernel (checked below)
    yield from _fwd_case("M=4096 r=16 (decode tiles)", 1, 4096, 4096, 16, bias=True, m_args=4096)
    yield _shrink_case("shrink u M=16384 r=128", 16384, 4096, 128, ll.shrink_config(16384, 4096, 128, 2, NUM_SMS),
                       False, False)
    yield ("splitk reduce", ll.splitk_reduce_kernel,
           dict(ws_ptr="*fp32", y_ptr="*bf16", M=128, N=4096, splits=3, stride_ws=128 * 4096, stride_wm=4096,
                stride_wn=1, stride_ym=4096, stride_yn=1),
           dict(BLOCK_M=ll.REDUCE_BLOCK[0], BLOCK_N=ll.REDUCE_BLOCK[1]), 4, 1)
    # fp32 u / t (cols = r) and A (cols = K) split into bf16 halves; rows is a per-call int (M)
    for rows, cols in ((16384, 16), (1, 16), (128, 4096)):
        block_cols = min(ll.SPLIT_MAX_BLOCK_COLS, ll.block_r_for(cols))
        yield (f"split halves rows={rows} cols={cols}", ll.split_halves_kernel,
               dict(src_ptr="*fp32", out_ptr="*bf16", rows=rows, cols=cols, stride_sr=cols, stride_sc=1,
                    stride_oh=rows * cols, stride_or=cols, stride_oc=1),
               dict(BLOCK_ROWS=ll.SPLIT_BLOCK_ELEMENTS // block_cols, BLOCK_COLS=block_cols), 4, 1)
    # 16-bit x: u and t as bf16 halves, but fp32 when a program walks one row step at a padded
    # rank up to FP32_ONE_STEP_MAX_BLOCK_R (lora_linear_backward._GradLaunch); fp16 x and dy split
    # into bf16 hi + lo in registers (SPLIT_X: with dropout one dot over both, without two); fp32 x
    # and dy into tf32 hi + lo, against u and t in tf32 halves
    for x_ty, M, R, dropout in (("bf16", 16384, 16, True), ("bf16", 16384, 128, True), ("bf16", 16, 128, True),
                                ("bf16", 1, 16, True), ("bf16", 16, 64, True), ("fp16", 16384, 16, True),
                                ("fp16", 16384, 128, True), ("fp16", 16384, 64, False), ("fp16", 16384, 128, False),
                                ("fp32", 16384, 16, True), ("fp32", 16384, 128, True), ("fp32", 16384, 64, False),
                                ("fp32", 16384, 128, False)):
        split_x = x_ty in ("fp16", "fp32")
        wc = lb.weight_grad_config(M, 4096, 4096, R, 4 if x_ty == "fp32" else 2, NUM_SMS, split_x=split_x)
        halves = M > wc.block_m or wc.block_r > lb.FP32_ONE_STEP_MAX_BLOCK_R
        rank_ptr = "*bf16" if halves and x_ty != "fp32" else "*fp32"
        name = f"bwd dA/dB{f' {x_ty}' if split_x else ''} M={M} r={R}{' dropout' if dropout else ''}"
        yield (name + ("" if halves else " fp32 u/t"), lb.lora_weight_grads_kernel,
               dict(x_ptr=f"*{x_ty}", u_ptr=rank_ptr, dy_ptr=f"*{x_ty}", t_ptr=rank_ptr, seed_ptr="*i64",
                    da_ptr="*fp32", db_ptr="*fp32", dbias_ptr="*fp32", M=M, N=4096, K=4096, R=R, rows_per_split=4096,
                    num_a_tiles=64, dropout_threshold=7, da_scale=2.0, db_scale=2.0, stride_xm=4096, stride_xk=1,
                    stride_uh=M * R, stride_um=R, stride_ur=1, stride_dym=4096, stride_dyn=1, stride_th=M * R,
                    stride_tm=R, stride_tr=1,
                    stride_das=R * 4096, stride_dar=4096, stride_dak=1, stride_dbs=4096 * R, stride_dbn=R,
                    stride_dbr=1, stride_dbias_s=4096),
               dict(HAS_DA=True, HAS_DB=True, HAS_DBIAS=True, DROPOUT=dropout, HALVES=halves, SPLIT_X=split_x and halves,
                    BLOCK_M=wc.block_m, BLOCK_C=wc.block_c, BLOCK_R=wc.block_r, PRECISION="tf32x3"),
               wc.num_warps, wc.num_stages)


def _tma_case(name, M, N, K, R, *, w_kn=False, warp_specialize=False, dropout_out=False):
    from lora_kernels.triton import lora_linear as ll
    from lora_kernels.triton import lora_linear_tma as lt
    cfg = ll.plan_forward(M, N, K, R, 2, NUM_SMS, mask_epilogue=dropout_out).fused
    args = dict(x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", bias_ptr="*bf16", y_ptr="*bf16", t_ptr="*fp32",
                seed_ptr="*i64", M=M, N=N, K=K, R=R, scale=2.0, dropout_threshold=7, t_splits=3, num_programs=NUM_SMS,
                stride_xm=K, stride_w=N if w_kn else K, stride_bn=R, stride_br=1, stride_ym=N, stride_ts=M * R,
                stride_tm=R, stride_tr=1)
    constexprs = dict(HAS_BIAS=True, DROPOUT_OUT=dropout_out, W_KN=w_kn, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r, T_CHUNK=ll.t_chunk(cfg.block_r), GROUP_M=cfg.group_m,
                      WARP_SPECIALIZE=warp_specialize, BASE_PRECISION="tf32", LORA_PRECISION="tf32x2")
    warps = lt.WS_NUM_WARPS if warp_specialize else cfg.num_warps  # as launch_tma
    return f"tma {name}", lt.lora_linear_fwd_tma_kernel, args, constexprs, warps, cfg.num_stages


def _tma_cases():
    yield _tma_case("fwd M=4096 r=16", 4096, 4096, 4096, 16)
    yield _tma_case("fwd M=4096 r=128", 4096, 4096, 4096, 128)
    yield _tma_case("dx M=4096 r=16 dropout (W^T)", 4096, 4096, 4096, 16, w_kn=True, dropout_out=True)
    yield _tma_case("fwd M=4096 r=16 warp-specialized", 4096, 4096, 4096, 16, warp_specialize=True)
    yield _tma_case("dx M=4096 r=16 (W^T) warp-specialized", 4096, 4096, 4096, 16, w_kn=True, warp_specialize=True)
    yield _tma_case("fwd M=128 r=16 warp-specialized", 128, 4096, 4096, 16, warp_specialize=True)


def test_case_names_are_unique():
    names = [c[0] for c in _cases()]
    assert len(names) == len(set(names))


@pytest.fixture(scope="module")
def compiled():
    return compiled_in_subprocess(__file__, timeout=2400)


ALL = [c[0] for c in _cases()] + [c[0] for c in _tma_cases()]


@pytest.mark.parametrize("name", ALL)
def test_compiles_for_sm90_fits_and_never_spills(compiled, name):
    report = compiled[name]
    assert report["shared"] <= SM90_MAX_SHARED_BYTES, f"{name}: {report}"
    assert report["registers"] > 0, f"{name}: ptxas -v gave no register count"
    assert report["spill_bytes"] == 0, f"{name}: {report}"


def _masks_an_operand(name):
    """Kernels that apply the dropout mask to a K-loop operand (the forward's t pre-pass, dA): the
    masked tile goes from registers to shared memory by design (one store per step, no wait)."""
    return "dropout" in name and not name.startswith(("fwd", "shrink of bwd"))


def _one_row_step(name):
    """dA/dB with fp32 u / t (bf16 x at M <= BLOCK_M): each program's row loop runs once, so there
    is no next step to overlap; x is converted in registers (stored to shared memory) and the
    tf32x3 dot may wait. The launcher takes that path only there (test_triton_launch_cache)."""
    return name.startswith("bwd dA/dB") and name.endswith("fp32 u/t")


@pytest.mark.parametrize("name", ALL)
def test_k_loops_are_pipelined_and_never_wait_for_all(compiled, name):
    loops = compiled[name]["k_loops"]
    for loop in ([] if _one_row_step(name) else loops):
        assert loop["sync_loads_into_dot"] == 0, f"{name}: {loop}"
        assert loop["async_wait_all"] == 0, f"{name}: {loop}"
        assert loop["mma_wait_all"] == 0, f"{name}: {loop}"
        assert loop["local_stores"] <= (1 if _masks_an_operand(name) else 0), f"{name}: {loop}"
    if not name.startswith(("splitk reduce", "split halves")):  # those two have no dot
        assert loops, f"{name}: no K loop with a dot found in the TTGIR"


WS = [n for n in ALL if n.endswith("warp-specialized")]


def _triton_version():
    import triton
    return tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2])


@pytest.mark.parametrize("name", WS)
def test_warp_specialization_takes_effect_on_sm90(compiled, name):
    """triton 3.6 (the GPU machines', checked by tests/lanes/gpu_versions.sh) and 3.8 (the CPU
    machine's) specialize the persistent TMA loop on sm_90 (one TMA producer warp group, two
    consumers, registers rebalanced with setmaxnreg) under the conditions in
    triton/lora_linear_tma.py: 12 warps, 168 registers, no spill under both."""
    if _triton_version() < (3, 6):
        pytest.skip("sm_90 warp specialization is checked with triton 3.6 and 3.8; older triton was not tried")
    report = compiled[name]
    assert report["warp_specialized"], f"{name}: no ttg.warp_specialize in the TTGIR: {report}"
    assert report["setmaxnreg"], f"{name}: no setmaxnreg in the PTX: {report}"
    assert report["total_warps"] > 4, f"{name}: {report}"


def test_unspecialized_variants_stay_plain(compiled):
    assert not any(compiled[n]["warp_specialized"] for n in ALL if n not in WS)


def test_per_call_ints_compile_to_one_kernel(compiled):
    assert compiled["fwd M=4096 r=16 (decode tiles)"]["hash"] == compiled["fwd decode M=1 r=16"]["hash"]
    assert compiled["split halves rows=1 cols=16"]["hash"] == compiled["split halves rows=16384 cols=16"]["hash"]


if __name__ == "__main__":
    import itertools
    print_compile_report(itertools.chain(_cases(), _tma_cases()))
