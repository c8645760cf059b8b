"""The in-place merge kernel compiles for sm_90a (H100/H200) on this CPU-only machine in every
mode at the configs its launcher picks (bf16, fp16 and fp32 W, 16-bit and fp32 adapters, ranks 16
to 128, both W layouts), fits in shared memory and never spills (ptxas -v)."""
import pytest

from aot import SM90_MAX_SHARED_BYTES, compiled_in_subprocess, print_compile_report

pytestmark = pytest.mark.slow
MODES = {"apply": 0, "count": 1, "merge_exact": 2, "unmerge_exact": 3}


def _cases():
    from lora_kernels.triton import merge as mg
    for (mode, m), (w_dtype, a_dtype), R, n_contiguous in [
            (mode, dt, R, nc) for mode in MODES.items()
            for dt in (("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"))
            for R in (16, 128) for nc in (False,)] + [
            (("merge_exact", 2), ("fp32", "fp32"), 64, False), (("merge_exact", 2), ("bf16", "bf16"), 16, True),
            (("unmerge_exact", 3), ("bf16", "fp32"), 64, True)]:
        elem = 4 if w_dtype == "fp32" else 2
        cfg = mg.merge_config(4096, 4096, R, elem, n_contiguous, exact=m in (2, 3))
        strides = (1, 4096) if n_contiguous else (4096, 1)
        args = dict(w_ptr="*" + w_dtype, a_ptr="*" + a_dtype, b_ptr="*" + a_dtype, code_ptr="*i8",
                    esc_index_ptr="*i64", esc_value_ptr="*" + w_dtype, status_ptr="*i32", N=4096, K=4096, R=R,
                    scale=2.0, esc_capacity=1024, stride_wn=strides[0], stride_wk=strides[1], stride_ar=4096,
                    stride_ak=1, stride_bn=R, stride_br=1, stride_cn=strides[0], stride_ck=strides[1])
        constexprs = dict(MODE=m, SUBTRACT=False, GATED=m in (0, 2), N_FASTEST=n_contiguous, BLOCK_N=cfg.block_n,
                          BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
                          PRECISION="tf32x3" if a_dtype == "fp32" else "tf32", BITS=8 * elem)
        name = f"{mode} W={w_dtype} adapters={a_dtype} r={R}{' W^T' if n_contiguous else ''}"
        yield name, mg.merge_kernel, args, constexprs, cfg.num_warps, 1


@pytest.fixture(scope="module")
def compiled():
    return compiled_in_subprocess(__file__, timeout=1800)


@pytest.mark.parametrize("name", [c[0] for c in _cases()])
def test_compiles_for_sm90_fits_and_never_spills(compiled, name):
    report = compiled[name]
    assert report["shared"] <= SM90_MAX_SHARED_BYTES, f"{name}: {report}"
    assert report["registers"] > 0, f"{name}: ptxas -v gave no register count"
    assert report["spill_bytes"] == 0, f"{name}: {report}"


if __name__ == "__main__":
    print_compile_report(_cases())
