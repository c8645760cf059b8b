"""The single-adapter forward/backward kernels compile for sm_90a (H100/H200) on this CPU-only
machine at the configurations the launchers choose, fit in a block's shared memory there, and do
not spill more than a little (ptxas -v). The interpreter accepts constructs the compiler rejects
and cannot see registers or shared memory: this is the CPU lane's only check of those."""
import pytest

from aot import SM90_MAX_SHARED_BYTES, compiled_in_subprocess, print_compile_report

pytestmark = pytest.mark.slow
NUM_SMS = 132


def _fwd_case(name, M, N, K, R, *, store_t=False, load_t=False, dropout_out=False, split_a=False,
              bias=False, mask_epilogue=False):
    from lora_kernels.triton import lora_linear as ll
    cfg = ll.forward_config(M, N, K, R, 2, NUM_SMS, mask_epilogue, split_a)
    adapter = "*fp32" if split_a else "*bf16"
    args = dict(x_ptr="*bf16", w_ptr="*bf16", a_ptr=adapter, b_ptr=adapter, bias_ptr="*bf16", y_ptr="*bf16",
                t_ptr="*fp32", seed_ptr="*i64", M=M, N=N, K=K, R=R, scale=2.0, dropout_threshold=7,
                stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1, stride_ar=K, stride_ak=1,
                stride_bn=R, stride_br=1, stride_ym=N, stride_yn=1, stride_tm=R, stride_tr=1)
    constexprs = dict(HAS_BIAS=bias, STORE_T=store_t, LOAD_T=load_t, DROPOUT_OUT=dropout_out, SPLIT_A=split_a,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
                      TILES_PER_PROGRAM=cfg.tiles_per_program, GROUP_M=cfg.group_m, BASE_PRECISION="tf32",
                      LORA_PRECISION=ll.lora_precision_for(ll.torch.float32 if split_a else ll.torch.bfloat16,
                                                           ll.torch.device("cuda")))
    return name, ll.lora_linear_fwd_kernel, args, constexprs, cfg.num_warps, cfg.num_stages


def _cases():
    from lora_kernels.triton import lora_linear as ll
    from lora_kernels.triton import lora_linear_backward as lb
    yield _fwd_case("fwd decode M=1 r=16", 1, 4096, 4096, 16, bias=True)
    yield _fwd_case("fwd M=64 r=16", 64, 4096, 4096, 16)
    yield _fwd_case("fwd M=4096 r=16", 4096, 4096, 4096, 16, bias=True)
    yield _fwd_case("fwd M=4096 r=16 store_t", 4096, 4096, 4096, 16, store_t=True)
    yield _fwd_case("fwd M=4096 r=64", 4096, 4096, 4096, 64)
    yield _fwd_case("fwd M=4096 r=128 store_t", 4096, 4096, 4096, 128, store_t=True)
    yield _fwd_case("fwd M=4096 r=16 fp32 adapters", 4096, 4096, 4096, 16, split_a=True)
    yield _fwd_case("fwd M=4096 r=16 load_t (dropout pre-pass)", 4096, 4096, 4096, 16, load_t=True)
    yield _fwd_case("bwd dx M=4096 r=16 dropout", 4096, 4096, 4096, 16, store_t=True, dropout_out=True,
                    mask_epilogue=True)
    sc = ll.shrink_config(4096, 4096, 16, 2, NUM_SMS)
    yield ("shrink M=4096 r=16 dropout", ll.lora_shrink_kernel,
           dict(x_ptr="*bf16", a_ptr="*bf16", t_ptr="*fp32", seed_ptr="*i64", M=4096, K=4096, R=16, t_scale=2.0,
                dropout_threshold=7, stride_xm=4096, stride_xk=1, stride_ar=4096, stride_ak=1, stride_tm=16,
                stride_tr=1),
           dict(DROPOUT=True, SPLIT_A=False, BLOCK_M=sc.block_m, BLOCK_K=sc.block_k, BLOCK_R=sc.block_r,
                PRECISION="tf32"), sc.num_warps, sc.num_stages)
    for R in (16, 128):
        wc = lb.weight_grad_config(16384, 4096, 4096, R, 2, NUM_SMS)
        yield (f"bwd dA/dB M=16384 r={R} dropout", lb.lora_weight_grads_kernel,
               dict(x_ptr="*bf16", u_ptr="*fp32", dy_ptr="*bf16", t_ptr="*fp32", seed_ptr="*i64", da_ptr="*fp32",
                    db_ptr="*fp32", dbias_ptr="*fp32", M=16384, N=4096, K=4096, R=R, rows_per_split=4096,
                    num_a_tiles=64, dropout_threshold=7, da_scale=2.0, db_scale=2.0, stride_xm=4096, stride_xk=1,
                    stride_um=R, stride_ur=1, stride_dym=4096, stride_dyn=1, stride_tm=R, stride_tr=1,
                    stride_das=R * 4096, stride_dar=4096, stride_dak=1, stride_dbs=4096 * R, stride_dbn=R,
                    stride_dbr=1, stride_dbias_s=4096),
               dict(HAS_DA=True, HAS_DB=True, HAS_DBIAS=True, DROPOUT=True, BLOCK_M=wc.block_m,
                    BLOCK_C=wc.block_c, BLOCK_R=wc.block_r, PRECISION="tf32x3"), wc.num_warps, wc.num_stages)


@pytest.fixture(scope="module")
def compiled():
    return compiled_in_subprocess(__file__, timeout=1800)


@pytest.mark.parametrize("name", [c[0] for c in _cases()])
def test_compiles_for_sm90_fits_and_barely_spills(compiled, name):
    report = compiled[name]
    assert report["shared"] <= SM90_MAX_SHARED_BYTES, f"{name}: {report}"
    assert report["registers"] > 0, f"{name}: ptxas -v gave no register count"
    assert report["spill_bytes"] <= 1024, f"{name}: {report}"


if __name__ == "__main__":
    print_compile_report(_cases())
