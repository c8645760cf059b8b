"""The multi-adapter kernels compile for sm_90a (H100/H200) on this CPU-only machine, at the
configurations the launchers choose, and fit in the shared memory a block may use there.

The interpreter accepts constructs the compiler rejects, and it cannot see shared memory or
registers: this is the CPU lane's only check of those. (It caught the tf32x3 t @ B product
needing 256 KiB at rank 128.)"""
import pytest

from aot import SM90_MAX_SHARED_BYTES, compiled_in_subprocess, print_compile_report

pytestmark = pytest.mark.slow
K, N, L, NUM_SMS = 4096, 4096, 128, 132


def _strides(*shape):
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= d
    return list(reversed(out))


def _cases():
    from lora_kernels.triton import multi_lora as ml
    for M, R, split in [(64, 16, False), (64, 128, True), (65536, 128, False), (65536, 512, False)]:
        cfg = ml.segment_config(M, K, R, 2, NUM_SMS)
        a_type = "*fp32" if split else "*bf16"
        yield (f"shrink M={M} R={R} fp32-A={split}", ml.lora_shrink_kernel,
               dict(x_ptr="*bf16", a_ptr0=a_type, a_ptr1=a_type, a_ptr2=a_type, a_ptr3=a_type, scales_ptr="*fp32",
                    ranks_ptr="*i32", work_ptr="*i32", tok_ptr="*i32", t_ptr="*fp32", K=K, R=R, scale=1.0,
                    stride_xm=K, stride_xk=1,
                    **dict(zip(("stride_al", "stride_ar", "stride_ak"), _strides(L, R, K))), stride_ts=M * R,
                    stride_tm=R, stride_tr=1),
               dict(HAS_SCALES=True, HAS_RANKS=True, SPLIT_A=split, BLOCK_M=cfg.item_m, BLOCK_K=cfg.shrink_block_k,
                    BLOCK_R=min(cfg.shrink_block_r, ml.RANK_CHUNK), PRECISION="tf32"), cfg.num_warps, cfg.num_stages)
    for R in (16, 128, 512):
        cfg = ml.segment_config(1024, K, R, 2, NUM_SMS)
        block_r = min(ml.block_r_for(R), ml.RANK_CHUNK)
        # three slices (q/k/v under GQA), as the serving integrations launch them
        yield (f"expand R={R}", ml.lora_expand_kernel,
               dict(y_ptr="*bf16", t_ptr="*fp32", b_ptr0="*bf16", b_ptr1="*bf16", b_ptr2="*bf16", b_ptr3="*bf16",
                    ranks_ptr="*i32", work_ptr="*i32", tok_ptr="*i32", R=R, n0=N, n1=1024, n2=1024, n3=0,
                    col0=0, col1=N, col2=N + 1024, col3=0, sbl0=N * R, sbl1=1024 * R, sbl2=1024 * R, sbl3=0,
                    stride_ym=N + 2048, stride_yn=1, stride_ts=1024 * R, stride_tm=R, stride_tr=1,
                    stride_bn=R, stride_br=1),
               dict(HAS_RANKS=True, ITEM_M=cfg.expand_item_m, BLOCK_M=ml.EXPAND_BLOCK_M, BLOCK_N=cfg.expand_block_n,
                    BLOCK_R=block_r, RANK_CHUNKED=ml.block_r_for(R) > block_r, PRECISION="tf32x2"), cfg.num_warps, 1)
    for M, R, t_given in [(1, 16, False), (4096, 16, False), (4096, 128, False), (4096, 128, True)]:
        tiles = ml.linear_config(M, N, K, R, L, 2, NUM_SMS).tiles
        yield (f"linear M={M} R={R} t_given={t_given}", ml.multi_lora_linear_kernel,
               dict(x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16", a_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16",
                    scales_ptr="*fp32", ranks_ptr="*i32", t_ptr="*fp32", tok_ptr="*i32", sorted_slot_ptr="*i32",
                    slot_start_ptr="*i32", M=M, N=N, K=K, R=R, L=L, scale=1.0, stride_xm=K, stride_xk=1, stride_wn=K,
                    stride_wk=1,
                    **dict(zip(("stride_al", "stride_ar", "stride_ak"), _strides(L, R, K))),
                    **dict(zip(("stride_bl", "stride_bn", "stride_br"), _strides(L, N, R))),
                    stride_tm=R, stride_tr=1, stride_ym=N, stride_yn=1),
               dict(HAS_BIAS=True, HAS_SCALES=True, HAS_RANKS=True, T_GIVEN=t_given, SPLIT_A=False,
                    BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_R=tiles.block_r,
                    TILES_PER_PROGRAM=tiles.tiles_per_program, GROUP_M=tiles.group_m, BASE_PRECISION="tf32",
                    LORA_PRECISION="tf32x2"), tiles.num_warps, tiles.num_stages)
    for M in (16, 4096):
        R = 512
        tiles = ml.linear_config(M, N, K, R, L, 2, NUM_SMS).tiles
        yield (f"linear chunked M={M} R={R}", ml.multi_lora_linear_chunked_kernel,
               dict(x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16", b_ptr="*bf16", ranks_ptr="*i32", t_ptr="*fp32",
                    y_ptr="*bf16", tok_ptr="*i32", sorted_slot_ptr="*i32", slot_start_ptr="*i32", M=M, N=N, K=K, R=R,
                    L=L, stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1,
                    **dict(zip(("stride_bl", "stride_bn", "stride_br"), _strides(L, N, R))),
                    stride_tm=R, stride_tr=1, stride_ym=N, stride_yn=1),
               dict(HAS_BIAS=True, HAS_RANKS=True, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                    BLOCK_K=tiles.block_k, BLOCK_R=ml.RANK_CHUNK, TILES_PER_PROGRAM=tiles.tiles_per_program,
                    GROUP_M=tiles.group_m, BASE_PRECISION="tf32", LORA_PRECISION="tf32x2"),
               tiles.num_warps, tiles.num_stages)


@pytest.fixture(scope="module")
def compiled():
    return compiled_in_subprocess(__file__, timeout=1200)


@pytest.mark.parametrize("name", [c[0] for c in _cases()])
def test_compiles_for_sm90_and_fits_shared_memory(compiled, name):
    report = compiled[name]
    assert report["shared"] <= SM90_MAX_SHARED_BYTES, f"{name}: {report}"
    assert report["registers"] > 0, f"{name}: ptxas -v gave no register count"
    # Spills are allowed (rank 128 spills a little) but must stay small; a regression that
    # spills kilobytes per thread shows up here.
    assert report["spill_bytes"] <= 1024, f"{name}: {report}"


if __name__ == "__main__":
    print_compile_report(_cases())
