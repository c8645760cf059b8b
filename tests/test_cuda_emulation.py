"""CPU lane: the CUDA fused forward's *source* (csrc/lora_linear/lora_linear.cuh), run on the host emulator.

No GPU here, so the kernel is compiled with the host C++ compiler against emulated primitives
(tests/cuda_emulation/host_primitives.h: PTX fragment layouts, cp.async landing early or late,
randomly scheduled threads) that check bounds, shared-memory races, barrier divergence and how
often each output byte is stored. This catches tiling, fragment-index, tail-handling and
pipeline bugs; it cannot catch compiler or hardware-specific problems (the GPU lane and
compute-sanitizer in bench/device_check.sh do that).
"""
import pytest
import torch

from cases import LoraInputs, make_lora_inputs
from cuda_emulation import driver
from lora_kernels.cuda.lora_linear import split_fp32_adapter
from tolerances import REL_TOL, assert_close, rand

pytestmark = pytest.mark.skipif(driver.compiler() is None, reason="no host C++ compiler (g++) to build the emulator")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return driver.build(tmp_path_factory.mktemp("cuda_emulation"))


def _run(exe, inp: LoraInputs, **kw):
    """Emulate the launcher's path: fp32 adapters go in split, as lora_kernels.cuda.lora_linear does."""
    a = inp.lora_a
    a_split = a.dtype == torch.float32
    if a_split:
        a = split_fp32_adapter(a, inp.x.dtype)
    return driver.run(exe, inp.x, inp.weight, a, inp.lora_b, inp.scale, inp.bias, a_split=a_split, **kw)


def _check(run, inp: LoraInputs, save_t=True):
    dtype = inp.x.dtype
    # (the plain-torch yardstick cannot mix an fp32 bias into a 16-bit F.linear)
    mixed_bias = inp.bias is not None and inp.bias.dtype != dtype
    assert_close(run.y, inp.reference64(), dtype, torch_out=None if mixed_bias else inp.torch_expression())
    M, N = run.y.shape
    assert run.y_stores.numel() == 0 or (int(run.y_stores.min()) == 1 and int(run.y_stores_max.max()) == 1), \
        "every y element is stored exactly once"
    assert run.stray_y_stores == 0, "no store outside y's elements"
    if save_t:
        t_ref = inp.x.double() @ inp.lora_a.double().t()
        # 16-bit adapters: exact products, fp32 sums. fp32 adapters: A is split into two 16-bit
        # halves, about 16 significant bits (bf16) -- the tolerance of the x dtype.
        t_tol_dtype = torch.float32 if inp.lora_a.dtype == dtype else dtype
        assert_close(run.t, t_ref, t_tol_dtype, what="t")
        assert run.t_stores.numel() == 0 or int(run.t_stores.min()) == 1
    assert run.stray_t_stores == 0


# (M, N, K, r, dtype, options): each line reaches a path the others do not.
CASES = [
    # decode tile (M <= 32): one row, odd N, K a multiple of 8 (cp.async path)
    (1, 70, 200, 7, torch.bfloat16, {}),
    (16, 33, 64, 16, torch.float16, {"bias_fp32": True}),
    (19, 40, 40, 8, torch.bfloat16, {"tiles_per_cta": 2}),           # two row blocks, t reused
    (32, 64, 130, 128, torch.float16, {}),                           # largest rank, K tail of 2
    # large tile
    (33, 24, 48, 5, torch.bfloat16, {}),                              # smallest M on the large tile
    (150, 200, 70, 5, torch.bfloat16, {"tiles_per_cta": 2}),          # K % 8 != 0: element loads
    (130, 136, 72, 16, torch.float16, {"bias": False}),
    (40, 24, 48, 128, torch.float16, {}),                              # rank 128: 3 stages
    (300, 300, 40, 33, torch.bfloat16, {"tiles_per_cta": 2, "group_m": 2}),  # grouped order, uneven runs
    (5, 300, 100, 64, torch.float16, {"tile_kind": 2, "tiles_per_cta": 3}),
    # fp32 adapters (split into 16-bit halves), fp32 lora_b on the 3xTF32 path
    (20, 50, 64, 64, torch.bfloat16, {"adapter_dtype": torch.float32}),  # 2r = 128 rows of A
    (140, 72, 56, 9, torch.float16, {"adapter_dtype": torch.float32, "tile_kind": 2}),
    # layouts: strided x rows, column-major weight copied by the launcher, misaligned x start
    (50, 40, 64, 4, torch.bfloat16, {"x_layout": "strided_rows"}),
    (7, 24, 64, 3, torch.float16, {"leads": {"x": 1}}),                # x not 16-byte aligned
    (40, 72, 136, 16, torch.bfloat16, {"leads": {"w": 3}, "tile_kind": 2}),  # W alone element-wise
    (3, 40, 72, 8, torch.float16, {"leads": {"a": 1}}),                # A alone element-wise
    (45, 30, 24, 2, torch.bfloat16, {"b_layout": "transposed", "ldy": 33, "ldt": 5}),
    (9, 1, 1, 1, torch.float16, {}),                                   # N = K = r = 1
    (4, 12, 16, 3, torch.bfloat16, {"save_t": False}),
]


def _ids(case):
    M, N, K, r, dtype, opts = case
    return f"M{M}-N{N}-K{K}-r{r}-{str(dtype)[6:]}" + "".join(f"-{k}" for k in opts)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_kernel_source_on_emulator(emulator, case):
    M, N, K, r, dtype, opts = case
    opts = dict(opts)
    adapter_dtype = opts.pop("adapter_dtype", None)
    x_layout = opts.pop("x_layout", "contiguous")
    b_layout = opts.pop("b_layout", "contiguous")
    bias = opts.pop("bias", True)
    bias_fp32 = opts.pop("bias_fp32", False)
    save_t = opts.pop("save_t", True)
    inp = make_lora_inputs(M, N, K, r, dtype, adapter_dtype=adapter_dtype, bias=bias)
    if x_layout == "strided_rows":  # row stride K + 8: rows stay 16-byte aligned, gaps hold NaN
        inp.x = rand(M, K + 8, dtype=dtype)[:, :K]
    if b_layout == "transposed":
        inp.lora_b = inp.lora_b.t().contiguous().t()
    if bias_fp32:
        inp.bias = inp.bias.float()
    run = _run(emulator, inp, save_t=save_t, seed=M * 1000 + N, **opts)
    if x_layout == "strided_rows" and K % 8:
        assert run.plan["x_aligned16"] == 0
    for operand, lead in opts.get("leads", {}).items():  # an offset operand loads element-wise, the rest in 16-byte chunks
        assert {k: run.plan[f"{k}_aligned16"] for k in "xwa"} == {k: int(k != operand or lead % 8 == 0) for k in "xwa"}
    _check(run, inp, save_t=save_t)


@pytest.mark.parametrize("N,tiles", [(768, 2), (640, 2), (512, 1)])
def test_tiles_per_cta_counts_waves(emulator, N, tiles):
    """4 SMs, one row block: 6 tiles as 1 per CTA take 2 waves of 1 tile, as 2 per CTA one wave of
    2 -- the same time, half the t work, so 2 (the old rule, CTAs >= SMs, took 1); 5 tiles the
    same (3 CTAs, the last sweeping 1); 4 tiles fill the 4 SMs once: 1."""
    inp = make_lora_inputs(3, N, 8, 4, torch.bfloat16)
    run = _run(emulator, inp, tile_kind=2, num_sms=4)
    assert run.plan["tiles_per_cta"] == tiles
    _check(run, inp)


def test_k_zero_gives_bias(emulator):
    """K = 0: no K tiles at all; y = bias, t = 0."""
    M, N, r = 5, 9, 3
    x = torch.empty(M, 0, dtype=torch.bfloat16)
    inp = LoraInputs(x, torch.empty(N, 0, dtype=torch.bfloat16), torch.empty(r, 0, dtype=torch.bfloat16),
                     rand(N, r, dtype=torch.bfloat16), 0.5, rand(N, dtype=torch.bfloat16))
    run = _run(emulator, inp)
    assert torch.equal(run.y, inp.bias.expand(M, N))
    assert torch.equal(run.t, torch.zeros(M, r))


def test_every_schedule_gives_the_same_bits(emulator):
    """Sums run in a fixed order whatever the thread schedule and cp.async timing: bitwise equal."""
    inp = make_lora_inputs(20, 40, 136, 16, torch.bfloat16)
    runs = [_run(emulator, inp, seed=s) for s in (1, 2, 3)]
    for r in runs[1:]:
        assert torch.equal(r.y.view(torch.int16), runs[0].y.view(torch.int16))
        assert torch.equal(r.t, runs[0].t)


def test_split_adapter_keeps_16_bits():
    a = rand(8, 64, dtype=torch.float32)
    parts = split_fp32_adapter(a, torch.bfloat16)
    assert parts.shape == (16, 64) and parts.dtype == torch.bfloat16 and parts.is_contiguous()
    rebuilt = parts[:8].float() + parts[8:].float()
    assert ((rebuilt - a).norm() / a.norm()).item() < 2.0 ** -15
    assert REL_TOL[torch.bfloat16] > 2.0 ** -15
