"""The Triton multi-adapter kernels under the interpreter (CPU lane): fp32 and fp16.

Every case poisons the outputs first (every element of t and y must be written), fills the
stacks past each adapter's rank with NaN (never read), and checks lora_expand_ leaves rows
without an adapter bitwise untouched."""
from dataclasses import replace

import pytest
import torch
from hypothesis import given, strategies as st

import triton
import triton.language as tl

import lora_kernels
from lora_kernels import reference
from lora_kernels.triton.lora_linear import _tf32_split
from cases import make_multi_inputs
from tolerances import assert_close, assert_close_to_magnitude, poison_, rand

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DISTS = ["decode", "prefill", "zipf", "one", "none10", "none"]


def _ml():
    from lora_kernels.triton import multi_lora
    return multi_lora


def seg(item_m, r_max, block_k=16, block_n=32):
    """Small tiles so that the K loops and N tiles run several times at test sizes."""
    ml = _ml()
    return ml.SegmentConfig(item_m, block_k, 16 if item_m == 16 else ml.block_r_for(r_max), block_n, 4, 1,
                            expand_item_m=item_m)


def lin(block_m, r_max, fused, tiles=1, group_m=1, block_n=32, block_k=16):
    ml = _ml()
    from lora_kernels.triton.lora_linear import ForwardConfig
    tiles_cfg = ForwardConfig(block_m, block_n, block_k, ml.block_r_for(r_max), tiles, group_m, 4, 1)
    return ml.LinearConfig(tiles_cfg, fused, seg(16, r_max))


@pytest.fixture
def gpu_precision(monkeypatch):
    """The launchers choose the GPU's lora precisions (tf32x3 for fp32 B, tf32x2 for 16-bit) for
    the test; the launch cache, whose templates and records hold what was chosen, is emptied
    before and after (launch_templates.py)."""
    from lora_kernels.triton import lora_linear as ll
    monkeypatch.setattr(_ml(), "lora_precision_for", lambda dt, dev: "tf32x3" if dt == torch.float32 else "tf32x2")
    ll.clear_launch_cache()
    yield
    ll.clear_launch_cache()


def _bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _abs(inp):
    """The same inputs with absolute values: the reference on them is the terms' magnitude."""
    return replace(inp, x=inp.x.abs(), weight=inp.weight.abs(), lora_a=inp.lora_a.abs(), lora_b=inp.lora_b.abs(),
                   bias=None if inp.bias is None else inp.bias.abs())


def check_shrink_expand(inp, cfg=None, dtype=None, conditioned=False):
    """Run shrink then expand with poisoned outputs; compare with the float64 reference.

    conditioned: measure errors against the terms' magnitude (randomly drawn tiny shapes)."""
    ml = _ml()
    dtype = dtype or inp.x.dtype
    index = inp.index()
    M, R, N = inp.x.shape[0], inp.lora_a.shape[1], inp.lora_b.shape[1]
    t = poison_(torch.empty(M, R))
    ml.lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks, cfg, out=t)
    if conditioned:
        assert_close_to_magnitude(t, inp.t64(), _abs(inp).t64(), torch.float32, what="t")
    else:
        assert_close(t, inp.t64(), torch.float32, what="t")  # fp32 intermediate, exact products
    none = inp.token_adapter < 0
    y0 = rand(M, N, dtype=dtype)
    y0[none] = -0.0  # any store to these rows, even of y + 0, would flip the sign bit
    y = y0.clone()
    ml.lora_expand_(y, t, inp.lora_b, index, inp.ranks, cfg)
    expected = reference.lora_expand_(y0.double(), t.double(), inp.lora_b.double(), inp.token_adapter, inp.ranks)
    if conditioned:
        magnitude = reference.lora_expand_(y0.double().abs(), t.double().abs(), inp.lora_b.double().abs(),
                                           inp.token_adapter, inp.ranks)
        assert_close_to_magnitude(y, expected, magnitude, dtype, what="expand")
    else:
        assert_close(y, expected, dtype, what="expand")
    assert torch.equal(_bits(y[none]), _bits(y0[none])), "rows without an adapter were written"
    return t, y


def check_linear(inp, cfg=None, torch_out=True, conditioned=False):
    ml = _ml()
    M, N = inp.x.shape[0], inp.weight.shape[0]
    out = poison_(torch.empty(M, N, dtype=inp.x.dtype))
    y = ml.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.index(), inp.scales, inp.bias,
                             inp.ranks, cfg, out=out)
    assert y is out
    if conditioned:
        assert_close_to_magnitude(y, inp.linear64(), _abs(inp).linear64(), inp.x.dtype)
    else:
        assert_close(y, inp.linear64(), inp.x.dtype, torch_out=inp.linear_torch_expression() if torch_out else None)
    return y


# ---------------------------------------------------------------------------------------------
# Shrink / expand
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("item_m", [16, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
def test_shrink_expand_distributions(interpreter_device, dist, dtype, item_m):
    inp = make_multi_inputs(45, 36, 40, 6, 8, dtype, dist=dist, ranks="mixed", seed=len(dist))
    check_shrink_expand(inp, seg(item_m, 8))


def test_segments_longer_than_a_piece(interpreter_device):
    """A 150-token segment is cut into several 64-token pieces (and ten 16-token ones)."""
    inp = make_multi_inputs(170, 20, 24, 3, 4, dist="one", ranks=[4, 2, 3])
    inp.token_adapter[150:] = 2
    for item_m in (16, 64):
        check_shrink_expand(inp, seg(item_m, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ranks_1_to_128_in_one_batch(interpreter_device, dtype):
    ranks = [1, 2, 7, 16, 33, 64, 100, 128]
    inp = make_multi_inputs(50, 20, 24, 8, 128, dtype, dist="decode", ranks=ranks)
    inp.token_adapter[:8] = torch.arange(8, dtype=torch.int32)  # every rank present
    for cfg in (seg(16, 128), seg(64, 128)):
        check_shrink_expand(inp, cfg)
    check_linear(inp, lin(16, 128, fused=True))
    check_linear(inp, lin(32, 128, fused=False))


@pytest.mark.parametrize("L", [1, 256])
def test_one_and_many_adapter_slots(interpreter_device, L):
    inp = make_multi_inputs(60, 12, 16, L, 4, dist="none10", ranks="mixed")
    check_shrink_expand(inp, None)  # the launchers' own heuristic at this size
    check_linear(inp, None)


@pytest.mark.parametrize("M", [0, 1])
def test_empty_batch_and_one_token(interpreter_device, M):
    inp = make_multi_inputs(M, 9, 10, 4, 4, dist="decode", ranks="mixed")
    if M:
        check_shrink_expand(inp)
        check_linear(inp)
    else:
        ml = _ml()
        assert ml.lora_shrink(inp.x, inp.lora_a, inp.index(), inp.scales, inp.ranks).shape == (0, 4)
        assert ml.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.index(), inp.scales,
                                    inp.bias, inp.ranks).shape == (0, 9)


def test_odd_sizes_and_no_ranks_tensor(interpreter_device):
    inp = make_multi_inputs(19, 17, 33, 3, 5, torch.float16, dist="zipf")
    assert inp.ranks is None
    check_shrink_expand(inp, seg(16, 5))
    check_linear(inp, lin(16, 5, fused=True, tiles=2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_adapters_over_16_bit_base(interpreter_device, dtype):
    """PEFT's default: fp32 adapters; the shrink splits A into two 16-bit halves (with 64-row
    pieces as t^T = A_hi @ x^T + A_lo @ x^T, the split A as the dot's left operand)."""
    inp = make_multi_inputs(70, 24, 40, 4, 8, dtype, dist="prefill", adapter_dtype=torch.float32,
                            ranks="mixed")
    check_shrink_expand(inp, seg(16, 8))
    check_shrink_expand(inp, seg(64, 8))
    check_linear(inp, lin(16, 8, fused=True))
    check_linear(inp, lin(16, 8, fused=False))


def test_non_contiguous_operands(interpreter_device):
    inp = make_multi_inputs(21, 18, 26, 4, 6, torch.float16, dist="zipf", ranks="mixed")
    inp.x = inp.x.t().contiguous().t()                                 # column-major
    inp.lora_a = inp.lora_a.transpose(1, 2).contiguous().transpose(1, 2)  # [L, K, R] storage
    inp.lora_b = inp.lora_b.transpose(0, 1).contiguous().transpose(0, 1)  # [N, L, R] storage
    inp.weight = inp.weight.t().contiguous().t()
    check_shrink_expand(inp, seg(16, 6))
    check_linear(inp, lin(16, 6, fused=True))
    check_linear(inp, lin(16, 6, fused=False))
    # y and t as strided views of wider buffers
    ml, index = _ml(), inp.index()
    t_wide = poison_(torch.empty(21, 12))
    t = ml.lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks, out=t_wide[:, ::2])
    assert_close(t, inp.t64(), torch.float32, what="strided t")
    y_wide = rand(21, 36, dtype=torch.float16)
    y0 = y_wide[:, 1::2].clone()
    ml.lora_expand_(y_wide[:, 1::2], t, inp.lora_b, index, inp.ranks)
    expected = reference.lora_expand_(y0.double(), t.double(), inp.lora_b.double(), inp.token_adapter, inp.ranks)
    assert_close(y_wide[:, 1::2], expected, torch.float16, what="strided y")


# ---------------------------------------------------------------------------------------------
# Fused multi_lora_linear
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False], ids=["shrink-in-kernel", "t-precomputed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
def test_linear_distributions(interpreter_device, dist, dtype, fused):
    inp = make_multi_inputs(45, 40, 36, 6, 8, dtype, dist=dist, ranks="mixed", seed=len(dist))
    check_linear(inp, lin(32, 8, fused, tiles=2, group_m=2))


@pytest.mark.parametrize("fused", [True, False], ids=["shrink-in-kernel", "t-precomputed"])
def test_linear_last_run_of_n_tiles_shorter(interpreter_device, fused):
    """tiles_per_program is a runtime int: 5 N tiles of 16 at 3 tiles per program make runs of 3
    and 2 tiles (the second program stops at the last tile), 2 row blocks, grouped order."""
    inp = make_multi_inputs(21, 70, 24, 3, 8, dist="zipf", ranks="mixed", seed=3)
    check_linear(inp, lin(16, 8, fused, tiles=3, group_m=2, block_n=16))


def test_linear_single_and_multi_segment_blocks(interpreter_device):
    """Row blocks wholly inside one segment take the fused K loop; blocks that straddle segments
    (and the no-adapter tail) take the per-segment loops. Both in one launch."""
    inp = make_multi_inputs(80, 24, 20, 3, 8, dist="one", ranks=[8, 3, 5])
    inp.token_adapter[:40] = 1
    inp.token_adapter[40:70] = 2
    inp.token_adapter[70:] = -1
    for block_m in (16, 32):
        check_linear(inp, lin(block_m, 8, fused=True, tiles=3))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_rank_zero_slots_and_bias(interpreter_device, bias):
    inp = make_multi_inputs(30, 20, 16, 3, 4, dist="decode", ranks=[0, 4, 0], bias=bias)
    check_linear(inp, lin(16, 4, fused=True))
    check_linear(inp, lin(16, 4, fused=False))


def test_public_op_triton_backend_3d(interpreter_device):
    inp = make_multi_inputs(24, 14, 18, 5, 6, torch.float16, dist="none10", ranks="mixed")
    y = lora_kernels.multi_lora_linear(inp.x.view(2, 12, 18), inp.weight, inp.lora_a, inp.lora_b, inp.index(),
                                       inp.scales, inp.bias, inp.ranks, backend="triton")
    assert y.shape == (2, 12, 14)
    assert_close(y.view(24, 14), inp.linear64(), torch.float16)


@given(M=st.integers(1, 70), N=st.integers(1, 40), K=st.integers(1, 40), L=st.integers(1, 12),
       r_max=st.integers(1, 20), dist=st.sampled_from(DISTS), fused=st.booleans(), block_m=st.sampled_from([16, 32]),
       seed=st.integers(0, 1000))
def test_hypothesis_matches_reference(interpreter_device, M, N, K, L, r_max, dist, fused, block_m, seed):
    """Random shapes, mappings and ranks. Errors are measured against the terms' magnitude: a
    drawn M = 1, r = 1 case is a single dot product, and one that nearly cancels has an
    unbounded relative error in any precision (fp32 sums of 26 terms exceed 1e-5 relative in
    ~0.4% of draws) -- that flaked once before this yardstick."""
    inp = make_multi_inputs(M, N, K, L, r_max, dist=dist, ranks="mixed", seed=seed)
    check_shrink_expand(inp, seg(16 if seed % 2 else 64, r_max), conditioned=True)
    check_linear(inp, lin(block_m, r_max, fused, tiles=1 + seed % 3), conditioned=True)


# ---------------------------------------------------------------------------------------------
# Device-side helpers and launch heuristics
# ---------------------------------------------------------------------------------------------

@triton.jit
def _split_kernel(t_ptr, hi_ptr, lo_ptr):
    offs = tl.arange(0, 1024)
    hi, lo = _tf32_split(tl.load(t_ptr + offs))
    tl.store(hi_ptr + offs, hi)
    tl.store(lo_ptr + offs, lo)


def test_tf32_split_is_exact_and_hi_is_tf32(interpreter_device):
    """The GPU path of t @ B ("tf32x2"): hi has its low 13 mantissa bits zero (a tf32 MMA reads it
    exactly), hi + lo == t exactly, and truncating lo to tf32 (what the MMA does) keeps ~21 bits."""
    t = torch.randn(1024) * torch.logspace(-20, 20, 1024)
    hi, lo = torch.empty_like(t), torch.empty_like(t)
    _split_kernel[(1,)](t, hi, lo)
    assert ((hi.view(torch.int32) & 0x1FFF) == 0).all()
    assert torch.equal(hi + lo, t)
    lo_tf32 = (lo.view(torch.int32) & ~0x1FFF).view(torch.float32)  # hardware truncation
    rel = ((hi.double() + lo_tf32.double() - t.double()).abs() / t.double().abs()).max()
    assert rel < 2.0 ** -20


@triton.jit
def _hi_again_kernel(t_ptr, hi_ptr, diff_ptr):
    from lora_kernels.triton.multi_lora import _tf32_hi_again
    offs = tl.arange(0, 1024)
    t = tl.load(t_ptr + offs)
    _, lo = _tf32_split(t)
    tl.store(hi_ptr + offs, _tf32_hi_again(t))
    tl.store(diff_ptr + offs, t - lo)


def test_second_hi_values_equal_the_split_bitwise(interpreter_device):
    """_epilogue_dot's second reads of t_hi / b_hi (separate values for the compiler) are the
    split's hi exactly: _tf32_hi_again(t) and t - lo."""
    t = torch.randn(1024) * torch.logspace(-20, 20, 1024)
    hi, lo = torch.empty_like(t), torch.empty_like(t)
    _split_kernel[(1,)](t, hi, lo)
    again, diff = torch.empty_like(t), torch.empty_like(t)
    _hi_again_kernel[(1,)](t, again, diff)
    assert torch.equal(again.view(torch.int32), hi.view(torch.int32))
    assert torch.equal(diff.view(torch.int32), hi.view(torch.int32))


@triton.jit
def _epilogue_dot_kernel(t_ptr, b_ptr, out_ptr, PRECISION: tl.constexpr, SEPARATE_B: tl.constexpr):
    from lora_kernels.triton.multi_lora import _epilogue_dot
    offs_m = tl.arange(0, 16)
    offs_r = tl.arange(0, 32)
    offs_n = tl.arange(0, 16)
    t = tl.load(t_ptr + offs_m[:, None] * 32 + offs_r[None, :])
    b = tl.load(b_ptr + offs_r[:, None] * 16 + offs_n[None, :])
    acc = _epilogue_dot(t, b, tl.zeros((16, 16), dtype=tl.float32), PRECISION, SEPARATE_B)
    tl.store(out_ptr + offs_m[:, None] * 16 + offs_n[None, :], acc)


@pytest.mark.parametrize("separate_b", [False, True])
@pytest.mark.parametrize("precision,b_dtype", [("tf32x2", torch.bfloat16), ("tf32x3", torch.float32)])
def test_epilogue_dot_products_sum_to_t_at_b(interpreter_device, precision, b_dtype, separate_b):
    """The GPU paths' split products (the interpreter's tf32 dots are fp32-exact, so this checks
    the algebra: a missing or doubled hi/lo term is off by ~2^-11, the kept terms by < 2^-20)."""
    t = torch.randn(16, 32) * 3.0
    b = torch.randn(32, 16).to(b_dtype)
    out = torch.empty(16, 16)
    _epilogue_dot_kernel[(1,)](t, b, out, precision, separate_b)
    ref = t.double() @ b.double()
    mag = t.double().abs() @ b.double().abs()
    assert ((out.double() - ref).abs() / mag).max() < 2.0 ** -20


def test_wgmma_chunk_epilogue_splits_t_into_bf16_halves(interpreter_device, gpu_precision):
    """The GPU path of the chunked epilogue on wgmma tiles (BLOCK_M >= 64) with bf16 B: t as
    bf16 hi + lo halves against B itself (_split16_dot), forced here by the GPU's precision
    choice. A cancelling case: columns 2j and 2j+1 of each A are equal up to 2^-6 of their size
    and B's are opposite, so the adapter term is t's small differences. t rounded to bf16 alone
    (t_lo dropped) is 13x over the bf16 tolerance here (1.3e-1); hi + lo keeps ~16 bits and passes."""
    inp = make_multi_inputs(70, 40, 48, 3, 32, torch.bfloat16, dist="zipf", ranks=[32, 16, 30], bias=False,
                            poison_padding=False, seed=3)
    a, b = inp.lora_a.double(), inp.lora_b.double()
    a[:, 1::2] = a[:, 0::2] * (1 + 2.0 ** -6 * torch.randn(a[:, 0::2].shape, dtype=torch.float64))
    b[:, :, 1::2] = -b[:, :, 0::2]
    inp = replace(inp, lora_a=a.to(torch.bfloat16), lora_b=b.to(torch.bfloat16),
                  weight=inp.weight * 1e-3)
    keep = reference.rank_keep(inp.ranks, 3, 32, "cpu")
    inp.lora_a.masked_fill_(~keep[:, :, None], float("nan"))
    inp.lora_b.masked_fill_(~keep[:, None, :], float("nan"))
    check_linear(inp, lin(64, 32, fused=False), torch_out=False)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t4", [True, False], ids=["t4", "untransposed"])
def test_wgmma_chunk_epilogue_fp32_b_takes_t_split(interpreter_device, monkeypatch, x_dtype, t4, gpu_precision):
    """The GPU path of the chunked epilogue on wgmma tiles (BLOCK_M >= 64) with fp32 B: the
    shrink stores t split (t4: hi, hi, lo, lo columns) and the epilogue's transposed dots take B's
    hi and lo from two masked loads (_rank_chunks_dot_split), forced here by the GPU's precision
    choice. The interpreter's tf32 dots are fp32-exact, so this checks the algebra: the adapter
    term dominates y (W scaled by 1e-3), so with fp32 x a dropped hi/lo half of B or t (~2^-11
    of it; B's lo dropped gave 1.4e-4) is far over the fp32 bound (at most twice the plain-torch
    error, >= 5e-7); bf16 x checks the path's layout and masks at a 16-bit x. Ranks 32, 13, 30
    and 5 (not multiples of the 4-entry chunk) end the chunks mid-way; the stacks past each rank
    are NaN; 70 rows: two 64-row blocks, one partial. "untransposed": SPLIT_T_ENABLED off (what
    bench/multi.py times beside it), the tf32x3 epilogue on the same tiles."""
    ml = _ml()
    monkeypatch.setattr(ml, "SPLIT_T_ENABLED", t4)
    assert ml.t_split_for(torch.float32, "tf32x3", 64) == (4 if t4 else 1)
    inp = make_multi_inputs(70, 40, 48, 4, 32, x_dtype, adapter_dtype=torch.float32, dist="zipf",
                            ranks=[32, 13, 30, 5], seed=5)
    inp = replace(inp, weight=inp.weight * 1e-3)
    check_linear(inp, lin(64, 32, fused=False))


def test_wgmma_chunk_epilogue_fp16_b_takes_t_split(interpreter_device, gpu_precision):
    """The GPU path of the chunked epilogue on wgmma tiles (BLOCK_M >= 64) with fp16 B: the
    shrink stores t split (t2: t_hi's columns, then t_lo's) and the epilogue's transposed dots
    take B itself at both (_rank_chunks_dot_split), forced here by the GPU's precision choice
    (the interpreter's tf32 dots are fp32-exact, so this checks the algebra and the layout). A
    cancelling case as the bf16 one's: A's columns 2j and 2j+1 equal up to 2^-6 of their size and
    B's opposite, so the adapter term is t's small differences: t_hi alone (t_lo's columns
    stored as zeros) gave 2.0e-2, 10x the fp16 tolerance, where the path gives 2.2e-4. Ranks 32,
    16, 30 and 6 (even: every column has its partner): whole 8-entry chunks, then a chunk to the
    rank (30, 6: its exact mask); the stacks past each rank are NaN; 70 rows: two 64-row blocks,
    one partial."""
    ml = _ml()
    assert ml.t_split_for(torch.float16, "tf32x2", 64) == 2
    inp = make_multi_inputs(70, 40, 48, 4, 32, torch.float16, dist="zipf", ranks=[32, 16, 30, 6], bias=False,
                            poison_padding=False, seed=7)
    a, b = inp.lora_a.double(), inp.lora_b.double()
    a[:, 1::2] = a[:, 0::2] * (1 + 2.0 ** -6 * torch.randn(a[:, 0::2].shape, dtype=torch.float64))
    b[:, :, 1::2] = -b[:, :, 0::2]
    inp = replace(inp, lora_a=a.to(torch.float16), lora_b=b.to(torch.float16), weight=inp.weight * 1e-3)
    keep = reference.rank_keep(inp.ranks, 4, 32, "cpu")
    inp.lora_a.masked_fill_(~keep[:, :, None], float("nan"))
    inp.lora_b.masked_fill_(~keep[:, None, :], float("nan"))
    check_linear(inp, lin(64, 32, fused=False), torch_out=False)
    # the launch record this call made (key: kind, M, N, K, R, L, dtypes of x, A, B, device type,
    # lora precision, ...; triton/multi_lora.py multi_lora_linear)
    records = [rec for key, rec in ml._LAUNCHES.items()
               if key[:6] == ("linear", 70, 40, 48, 32, 4) and key[8] == torch.float16 and key[10] == "tf32x2"]
    assert records and all(rec.t_split == 2 and rec.t_width == 64 for rec in records)


def test_segment_and_linear_heuristics():
    ml = _ml()
    assert ml.segment_config(64, 4096, 16, 2, 132).item_m == 16           # decode
    assert ml.segment_config(65536, 4096, 64, 2, 132).item_m == 64        # long prefill
    assert ml.segment_config(65536, 4096, 64, 2, 132).shrink_block_r == 64
    assert ml.expected_segments_per_block(1, 128, 16) == 1.0
    assert ml.expected_segments_per_block(16, 128, 16) == 16.0
    # one token, rank 16: 16-wide tiles fill the 132 SMs, so t in the kernel would re-read A per
    # 16 columns of W; the segmented shrink reads it once
    assert not ml.linear_config(1, 4096, 4096, 16, 128, 2, 132).fused_shrink
    assert not ml.linear_config(1, 4096, 4096, 64, 128, 2, 132).fused_shrink    # A re-read > W/2
    assert not ml.linear_config(64, 4096, 4096, 16, 128, 2, 132).fused_shrink   # many adapters
    assert ml.linear_config(4096, 4096, 4096, 16, 8, 2, 132).fused_shrink       # long segments
    # padded ranks >= 64 and fp32 adapters never hold t in the fused kernel (it spilled): t comes
    # from the segmented shrink, so the rank does not narrow the tile
    for r in (64, 128, 512):
        assert not ml.linear_config(4096, 4096, 4096, r, 8, 2, 132).fused_shrink
    assert not ml.linear_config(4096, 4096, 4096, 16, 8, 2, 132, split_adapters=True).fused_shrink
    big_rank = ml.linear_tiles(4096, 4096, 4096, 128, 2, 132)
    assert big_rank.block_n == ml.linear_tiles(4096, 4096, 4096, 16, 2, 132).block_n
    runs = -(-4096 // big_rank.block_n) // big_rank.tiles_per_program
    assert (4096 // big_rank.block_m) * runs >= 132
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert ml.t_chunk_for(8, bf16, 64, 64, 4) == 16 and ml.t_chunk_for(512, bf16, 64, 64, 4) == ml.T_CHUNK
    assert ml.t_chunk_for(512, fp32, 64, 64, 4) == ml.T_CHUNK_FP32_B   # mma.sync / interpreter
    # fp32 B (t4) and fp16 B (t2) on GPU wgmma tiles: t split (_rank_chunks_dot_split), a dot of
    # K = 16 per chunk, 8 warps from BLOCK_N 128 on; bf16 B keeps t whole (_split16_dot)
    assert ml.t_split_for(fp32, "tf32x3", 64) == 4 and ml.t_split_for(fp32, "tf32x3", 16) == 1
    assert ml.t_split_for(fp16, "tf32x2", 64) == 2 and ml.t_split_for(fp16, "tf32x2", 16) == 1
    assert ml.t_split_for(bf16, "tf32x2", 64) == 1 and ml.t_split_for(fp32, "ieee", 64) == 1
    assert ml.t_split_for(fp16, "ieee", 64) == 1
    assert ml.t_chunk_for(512, fp32, 64, 64, 4, t_split=4) == 4 and ml.t_chunk_for(512, fp16, 64, 64, 4, t_split=2) == 8
    assert ml.chunked_num_warps(4, 128, 4) == 8 and ml.chunked_num_warps(4, 64, 4) == 4
    assert ml.chunked_num_warps(4, 128, 2) == 8 and ml.chunked_num_warps(4, 128, 1) == 4
    # bf16 B on wgmma tiles with 64 accumulator registers per thread: _split16_dot's second one
    assert ml.t_chunk_for(512, bf16, 128, 128, 8) == ml.T_CHUNK_SPLIT16_WIDE
    assert ml.t_chunk_for(512, bf16, 64, 128, 4) == ml.T_CHUNK_SPLIT16_WIDE
    assert ml.t_chunk_for(512, fp16, 128, 128, 8) == ml.T_CHUNK   # t whole: tf32x2
    assert ml.t_chunk_for(512, bf16, 16, 128, 4) == ml.T_CHUNK    # mma.sync tiles: tf32x2
    assert ml.expand_block_r(128) == (128, False) and ml.expand_block_r(512) == (ml.EXPAND_RANK_CHUNK, True)
