"""CPU lane: the CUDA multi-adapter shrink / expand *source* (csrc/multi_lora/multi_lora.cuh) on the host emulator.

The kernels are compiled with the host C++ compiler against emulated primitives
(tests/cuda_emulation/host_primitives.h), which check bounds, shared-memory races, barrier and
warp-primitive divergence, and count the stores to each output byte. Every case

* takes its work from a real AdapterIndex (the same one the Triton kernels read),
* fills the stacks past each adapter's rank with NaN (never read) and pads the gaps between rows
  of every input with NaN (a read of a gap poisons the result),
* poisons t, and checks every t element is stored exactly once and matches float64,
* sets y's no-adapter rows to -0.0 and checks they are never stored (bitwise untouched), and
  every other element of y is stored exactly once and matches float64.
Which path a piece takes depends on its length (<= 4 tokens: CUDA cores, else tensor cores); the
cases assert that both occur where they mean to test both.
"""
import pytest
import torch

from cases import make_multi_inputs
from cuda_emulation import driver, multi_driver
from lora_kernels import AdapterIndex, reference
from tolerances import assert_close, rand

pytestmark = pytest.mark.skipif(driver.compiler() is None, reason="no host C++ compiler (g++) to build the emulator")

GEMV_MAX_ROWS = 4  # csrc/multi_lora/multi_lora_plan.h kGemvMaxRows


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return multi_driver.build(tmp_path_factory.mktemp("cuda_multi_emulation"))


def _bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def piece_lengths(index, item_m):
    work = index.work(item_m)
    return work[work[:, 2] > 0, 2].tolist()


def check_shrink(exe, inp, item_m, seed=0, **kw):
    """t from the CUDA source vs float64; every element stored once; returns t."""
    index = inp.index()
    run = multi_driver.run_shrink(exe, inp.x, inp.lora_a, inp.scales, inp.ranks, index, item_m, seed=seed, **kw)
    # 16-bit adapters: exact products, fp32 sums. fp32 adapters: the tensor-core path splits A into
    # two 16-bit halves (about 16 significant bits), so the x dtype's tolerance.
    t_tol = torch.float32 if inp.lora_a.dtype == inp.x.dtype else inp.x.dtype
    assert_close(run.out, inp.t64(), t_tol, what="t")
    assert run.stores.numel() == 0 or (int(run.stores.min()) == 1 and int(run.stores_max.max()) == 1), \
        "every t element is stored exactly once"
    assert run.stray_stores == 0, "no store outside t's elements"
    none = inp.token_adapter < 0
    assert (run.out[none] == 0).all(), "tokens with no adapter get t = 0"
    return run.out


def check_expand(exe, inp, t, item_m=64, seed=0, y0=None, **kw):
    """y += expand(t) from the CUDA source vs float64; rows with no adapter (or rank 0) untouched."""
    index = inp.index()
    M, N = inp.x.shape[0], inp.lora_b.shape[1]
    if y0 is None:
        y0 = rand(M, N, dtype=inp.x.dtype)
    untouched = inp.token_adapter < 0
    if inp.ranks is not None:
        rank_of_token = torch.where(untouched, 0, inp.ranks[inp.token_adapter.clamp(min=0).long()])
        untouched = untouched | (rank_of_token == 0)
    y0[untouched] = -0.0  # any store, even of y + 0, would flip the sign bit
    run = multi_driver.run_expand(exe, y0, t, inp.lora_b, inp.ranks, index, item_m, seed=seed, **kw)
    expected = reference.lora_expand_(y0.double(), t.double(), inp.lora_b.double(), inp.token_adapter, inp.ranks)
    expected[untouched] = y0[untouched].double()
    assert_close(run.out, expected, y0.dtype, what="expand")
    assert torch.equal(_bits(run.out[untouched]), _bits(y0[untouched])), "rows without an adapter were written"
    assert int(run.stores_max[untouched].sum()) == 0, "a row without an adapter was stored to"
    written = run.stores[~untouched]
    assert written.numel() == 0 or (int(written.min()) == 1 and int(run.stores_max[~untouched].max()) == 1), \
        "every y element of a token with an adapter is stored exactly once"
    assert run.stray_stores == 0, "no store outside y's elements"
    return run.out


def check_both(exe, inp, shrink_item_m=16, expand_item_m=64, seed=0):
    t = check_shrink(exe, inp, shrink_item_m, seed=seed)
    return t, check_expand(exe, inp, t, expand_item_m, seed=seed)


DISTS = ["decode", "prefill", "zipf", "one", "none10", "none"]


@pytest.mark.parametrize("dist", DISTS)
def test_distributions(emulator, dist):
    """Every token distribution; both shrink tiles (16- and 64-token pieces), fp16 and bf16."""
    dtype = torch.bfloat16 if len(dist) % 2 else torch.float16
    inp = make_multi_inputs(70, 36, 40, 6, 16, dtype, dist=dist, ranks="mixed", seed=len(dist))
    t = check_shrink(emulator, inp, 16, seed=1)
    check_shrink(emulator, inp, 64, seed=2)
    check_expand(emulator, inp, t, 64, seed=3)


def test_short_and_long_pieces_in_one_launch(emulator):
    """Segments of 1..4 tokens (CUDA-core path) next to 5..64-token ones (tensor cores), several
    pieces per segment, rows tiles partly past a piece's length, ranks mixed."""
    counts = [1, 3, 4, 5, 17, 40, 70, 2]
    ids = torch.cat([torch.full((c,), i, dtype=torch.int32) for i, c in enumerate(counts)])
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
    inp = make_multi_inputs(len(ids), 40, 48, 8, 32, torch.bfloat16, ranks=[32, 1, 9, 16, 24, 3, 32, 17])
    inp.token_adapter = ids
    for item_m in (16, 64):
        lengths = piece_lengths(inp.index(), item_m)
        assert min(lengths) <= GEMV_MAX_ROWS < max(lengths)
    t = check_shrink(emulator, inp, 16)
    check_shrink(emulator, inp, 64)
    check_expand(emulator, inp, t, 64)
    check_expand(emulator, inp, t, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ranks_1_to_128_in_one_batch(emulator, dtype):
    """Every rank chunk of the shrink (16 and 64 wide) and every rank chunk of the expand; columns
    past each rank NaN in the stacks (never read) and in t (never read by the expand)."""
    ranks = [1, 2, 7, 16, 33, 64, 100, 128]
    inp = make_multi_inputs(60, 24, 24, 8, 128, dtype, dist="zipf", ranks=ranks, seed=5)
    inp.token_adapter[:8] = torch.arange(8, dtype=torch.int32)
    inp.token_adapter[8:20] = 7  # rank 128 on a long (tensor-core) piece
    inp.token_adapter[20:27] = 0  # rank 1 on a long piece
    t = check_shrink(emulator, inp, 16)
    check_shrink(emulator, inp, 64)
    t_poisoned = t.clone()
    keep = reference.rank_keep(inp.ranks, 8, 128, "cpu")[inp.token_adapter.long()]
    t_poisoned[~keep] = float("nan")
    check_expand(emulator, inp, t_poisoned, 64)


@pytest.mark.parametrize("L", [1, 256])
def test_one_and_many_slots(emulator, L):
    inp = make_multi_inputs(40, 20, 16, L, 8, torch.bfloat16, dist="none10", ranks="mixed", seed=L)
    check_both(emulator, inp)


def test_one_token(emulator):
    inp = make_multi_inputs(1, 33, 24, 4, 16, torch.float16, dist="decode", ranks="mixed", seed=3)
    check_both(emulator, inp)
    check_shrink(emulator, inp, 64)


def test_all_tokens_without_adapter(emulator):
    inp = make_multi_inputs(30, 20, 24, 4, 8, torch.bfloat16, dist="none", ranks="mixed")
    t = check_shrink(emulator, inp, 16)
    assert (t == 0).all()
    check_expand(emulator, inp, t)


def test_empty_segments_and_rank_zero_slot(emulator):
    """Slots with no tokens cost nothing; a loaded slot of rank 0 behaves as no adapter."""
    ids = torch.tensor([4, 4, 0, -1, 4, 0, 7, 2, 2, 2, 2, 2, 2, -1], dtype=torch.int32)
    inp = make_multi_inputs(len(ids), 18, 20, 8, 8, torch.float16, ranks=[8, 5, 0, 3, 8, 1, 2, 6])
    inp.token_adapter = ids
    t = check_shrink(emulator, inp, 16)
    assert (t[ids == 2] == 0).all()
    check_expand(emulator, inp, t)


def test_odd_sizes_no_ranks_tensor(emulator):
    """K and N not multiples of 8 (element loads of x, the row tails of every tile), no ranks."""
    inp = make_multi_inputs(45, 33, 37, 3, 5, torch.bfloat16, dist="prefill", seed=2)
    assert inp.ranks is None
    check_both(emulator, inp, 16, 64)
    check_shrink(emulator, inp, 64)


def test_long_k_runs_the_pipeline(emulator):
    """K spans several K slices of both tiles (4+ stages of the cp.async pipeline) with a tail."""
    inp = make_multi_inputs(24, 16, 600, 3, 16, torch.float16, dist="prefill", ranks="mixed", seed=4)
    check_shrink(emulator, inp, 16)
    check_shrink(emulator, inp, 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_adapters(emulator, dtype):
    """PEFT's default: fp32 adapters over a 16-bit base. Shrink: fp32 FMAs on CUDA cores, A split
    into two 16-bit halves on tensor cores; expand: 3xTF32."""
    inp = make_multi_inputs(50, 40, 56, 4, 16, dtype, dist="zipf", adapter_dtype=torch.float32, ranks="mixed",
                            seed=6)
    inp.token_adapter[:3] = 3  # (and zipf leaves short pieces on the rare slots)
    t = check_shrink(emulator, inp, 16)
    check_shrink(emulator, inp, 64)
    check_expand(emulator, inp, t)


def test_strided_and_misaligned_operands(emulator):
    """x rows padded and x starting off 16-byte alignment (element loads); the A stack in [L, K, R]
    storage is copied by the launcher, so here: A rows padded; t written into a wider buffer; y a
    column-major view; t read with strides; B stored [N, L, R] and transposed along the rank."""
    M, N, K, L, R = 30, 24, 32, 4, 8
    inp = make_multi_inputs(M, N, K, L, R, torch.float16, dist="zipf", ranks="mixed", seed=7)
    inp.x = rand(M, K + 8, dtype=torch.float16)[:, :K]
    inp.lora_a = torch.cat([inp.lora_a, rand(L, R, 8, dtype=torch.float16)], dim=2)[:, :, :K]
    t_buf = torch.full((M, R + 3), float("nan"))
    t = check_shrink(emulator, inp, 16, t_out=t_buf[:, :R])
    check_shrink(emulator, inp, 16, leads={"x": 1, "a0": 3})
    y0 = rand(N, M, dtype=torch.float16).t()
    t_strided = t.t().contiguous().t()
    inp.lora_b = inp.lora_b.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    check_expand(emulator, inp, t_strided, y0=y0)
    inp.lora_b = inp.lora_b.transpose(1, 2).contiguous().transpose(1, 2)  # unit stride along N
    check_expand(emulator, inp, t, y0=rand(M, N, dtype=torch.float16), leads={"b0": 1})


def test_every_schedule_gives_the_same_bits(emulator):
    """Fixed summation order whatever the thread schedule and cp.async timing: bitwise equal."""
    inp = make_multi_inputs(40, 20, 136, 4, 16, torch.bfloat16, dist="zipf", ranks="mixed", seed=8)
    index = inp.index()
    y0 = rand(40, 20, dtype=torch.bfloat16)
    runs = []
    for seed in (1, 2, 3):
        t = multi_driver.run_shrink(emulator, inp.x, inp.lora_a, inp.scales, inp.ranks, index, 16, seed=seed).out
        y = multi_driver.run_expand(emulator, y0, t, inp.lora_b, inp.ranks, index, 64, seed=seed).out
        runs.append((t, y))
    for t, y in runs[1:]:
        assert torch.equal(_bits(t), _bits(runs[0][0]))
        assert torch.equal(_bits(y), _bits(runs[0][1]))


def test_out_of_range_rank_is_clamped_not_read_out_of_bounds(emulator):
    """The op reports ranks > r_max asynchronously on a GPU; the kernels clamp, so nothing past the
    stack is read (the emulator faults on any out-of-bounds access)."""
    inp = make_multi_inputs(20, 12, 16, 3, 8, torch.bfloat16, dist="decode", seed=9, poison_padding=False)
    inp.ranks = torch.tensor([8, 200, -5], dtype=torch.int32)
    index = inp.index()
    run = multi_driver.run_shrink(emulator, inp.x, inp.lora_a, inp.scales, inp.ranks, index, 16)
    clamped = inp.ranks.clamp(0, 8)
    expected = reference.lora_shrink(inp.x.double(), inp.lora_a.double(), inp.token_adapter, inp.scales.double(),
                                     clamped)
    assert_close(run.out, expected, torch.float32, what="t")
    y0 = rand(20, 12, dtype=torch.bfloat16)
    y = multi_driver.run_expand(emulator, y0, run.out, inp.lora_b, inp.ranks, index, 64).out
    assert_close(y, reference.lora_expand_(y0.double(), run.out.double(), inp.lora_b.double(), inp.token_adapter,
                                           clamped), torch.bfloat16)


def test_index_is_shared_with_triton():
    """The CUDA kernels read AdapterIndex.work(16 | 64) and sorted_tokens: the same views the
    Triton launchers pass (a regression guard on the layout both rely on)."""
    index = AdapterIndex.from_token_adapters(torch.tensor([2, -1, 0, 2, 2], dtype=torch.int32), 3)
    assert index.work(16).dtype == torch.int32 and index.work(16).is_contiguous()
    assert index.work(64).tolist()[:3] == [[0, 0, 1], [2, 1, 3], [-1, 4, 1]]
    assert index.sorted_tokens.tolist() == [2, 0, 3, 4, 1]


# ---------------------------------------------------------------------------------------------
# multi_lora_linear: the segmented shrink, then the base GEMM over the sorted token order with
# the per-segment expand in its epilogue (csrc/multi_lora/multi_lora_linear.cuh)
# ---------------------------------------------------------------------------------------------

SMALL, LARGE = 1, 2  # csrc/lora_linear/lora_linear_plan.h tile kinds: 16x32 (decode), 128x128


def check_linear(exe, inp, seed=0, **kw):
    """y from the CUDA source (shrink, then the fused kernel) vs float64; every element stored once."""
    t = check_shrink(exe, inp, 16, seed=seed)
    run = multi_driver.run_linear(exe, inp.x, inp.weight, inp.lora_b, inp.bias, t, inp.ranks, inp.index(), seed=seed,
                                  **kw)
    mixed_bias = inp.bias is not None and inp.bias.dtype != inp.x.dtype  # no plain-torch yardstick for it
    assert_close(run.out, inp.linear64(), inp.x.dtype,
                 torch_out=None if mixed_bias or inp.lora_a.dtype != inp.x.dtype else inp.linear_torch_expression())
    assert run.stores.numel() == 0 or (int(run.stores.min()) == 1 and int(run.stores_max.max()) == 1), \
        "every y element is stored exactly once"
    assert run.stray_stores == 0, "no store outside y's elements"
    return run


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("tile_kind", [SMALL, LARGE], ids=["small-tile", "large-tile"])
def test_linear_distributions(emulator, dist, tile_kind):
    dtype = torch.float16 if len(dist) % 2 else torch.bfloat16
    inp = make_multi_inputs(45, 40, 36, 6, 16, dtype, dist=dist, ranks="mixed", seed=len(dist))
    check_linear(emulator, inp, tile_kind=tile_kind, tiles_per_cta=2)


def test_linear_blocks_across_segments_grouped_order(emulator):
    """Row blocks inside one segment, blocks straddling segments and the no-adapter tail; several
    row blocks and N tiles per CTA in the grouped order, uneven runs; both tiles."""
    ids = torch.cat([torch.full((n,), s, dtype=torch.int32) for s, n in ((2, 140), (0, 9), (-1, 5), (1, 3))])
    inp = make_multi_inputs(len(ids), 300, 40, 3, 8, torch.bfloat16, ranks=[8, 3, 5])
    inp.token_adapter = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))]
    check_linear(emulator, inp, tile_kind=LARGE, tiles_per_cta=2, group_m=2)
    check_linear(emulator, inp, tile_kind=SMALL, tiles_per_cta=3, group_m=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_ranks_1_to_128(emulator, dtype):
    ranks = [1, 2, 7, 16, 33, 64, 100, 128]
    inp = make_multi_inputs(40, 24, 32, 8, 128, dtype, dist="zipf", ranks=ranks, seed=11)
    inp.token_adapter[:8] = torch.arange(8, dtype=torch.int32)
    check_linear(emulator, inp, tile_kind=SMALL)
    check_linear(emulator, inp, tile_kind=LARGE)


def test_linear_fp32_adapters_and_bias(emulator):
    inp = make_multi_inputs(36, 40, 48, 4, 16, torch.bfloat16, dist="none10", adapter_dtype=torch.float32,
                            ranks="mixed", seed=12)
    inp.bias = inp.bias.float()
    check_linear(emulator, inp, tile_kind=SMALL)
    check_linear(emulator, inp, tile_kind=LARGE)


def test_linear_odd_sizes_layouts_no_bias(emulator):
    """K % 8 != 0 (element loads), x off 16-byte alignment, y rows padded to an odd stride (no
    paired stores), t with strides, B transposed along the rank, no bias, no ranks tensor."""
    inp = make_multi_inputs(21, 33, 37, 3, 5, torch.float16, dist="zipf", bias=False, seed=13)
    check_linear(emulator, inp, tile_kind=SMALL, ldy=35)
    inp.lora_b = inp.lora_b.transpose(1, 2).contiguous().transpose(1, 2)
    run = check_linear(emulator, inp, tile_kind=LARGE, leads={"x": 1})
    assert run.plan["aligned16"] == 0


def test_linear_all_tokens_without_adapter_and_one_token(emulator):
    inp = make_multi_inputs(20, 24, 16, 4, 8, torch.bfloat16, dist="none", ranks="mixed")
    run = check_linear(emulator, inp, tile_kind=SMALL)
    base = inp.x.double() @ inp.weight.double().t() + inp.bias.double()
    assert_close(run.out, base, torch.bfloat16)
    check_linear(emulator, make_multi_inputs(1, 40, 24, 256, 4, torch.float16, ranks="mixed", seed=3))


def test_linear_every_schedule_gives_the_same_bits(emulator):
    inp = make_multi_inputs(40, 40, 136, 4, 16, torch.bfloat16, dist="zipf", ranks="mixed", seed=8)
    t = inp.t64().float()
    outs = [multi_driver.run_linear(emulator, inp.x, inp.weight, inp.lora_b, inp.bias, t, inp.ranks, inp.index(),
                                    tile_kind=SMALL, seed=s).out for s in (1, 2)]
    assert torch.equal(_bits(outs[0]), _bits(outs[1]))


@pytest.mark.parametrize("bad_slot", [6, 2 ** 30, -7])
def test_work_list_slots_outside_the_stacks_read_as_no_adapter(emulator, bad_slot):
    """Issue 11: a work list whose slot values lie outside [-1, L) (not built by AdapterIndex, or
    corrupted) must not index ranks, scales, A or B with them: the kernels read such a slot as -1
    (t = 0, y untouched), as the Triton kernels treat invalid ids."""
    L = 4
    inp = make_multi_inputs(40, 24, 32, L, 16, torch.float16, dist="decode", ranks="mixed", seed=3)
    good = inp.index()
    data = good.data.clone()
    index = AdapterIndex.from_data(data, good.num_tokens, L)
    for item_m in (16, 64):
        work = index.work(item_m)
        first = int((work[:, 2] > 0).nonzero()[0])
        start, length = int(work[first, 1]), int(work[first, 2])
        work[first, 0] = bad_slot
        hit = index.sorted_tokens[start:start + length].long()
        ids = inp.token_adapter.clone()
        ids[hit] = -1
        expected_t = reference.lora_shrink(inp.x, inp.lora_a, ids, inp.scales, inp.ranks)
        if item_m == 16:
            run = multi_driver.run_shrink(emulator, inp.x, inp.lora_a, inp.scales, inp.ranks, index, 16)
            assert_close(run.out, expected_t.double(), torch.float32, what="t")
            assert (run.out[hit] == 0).all()
        else:
            y0 = rand(40, 24, dtype=torch.float16)
            t = expected_t.float()
            run = multi_driver.run_expand(emulator, y0.clone(), t, inp.lora_b, inp.ranks, index, 64)
            expected = reference.lora_expand_(y0.double(), t.double(), inp.lora_b.double(), ids, inp.ranks)
            assert_close(run.out, expected, torch.float16, what="expand")
            assert torch.equal(_bits(run.out[hit]), _bits(y0[hit])), "rows of the bad piece were written"


@pytest.mark.parametrize("tile_kind", [SMALL, LARGE], ids=["small-tile", "large-tile"])
def test_capacity_index_padded_rows(emulator, tile_kind):
    """Issue 12: a persistent index (capacity 80) updated with 30 live tokens and viewed for 45
    rows (a padded graph batch): shrink, expand and the fused linear read positions [0, M) only,
    rows 30..44 get no adapter (t = 0, expand leaves them, linear = base)."""
    live, M, C = 30, 45, 80
    inp = make_multi_inputs(M, 40, 36, 5, 16, torch.bfloat16, dist="decode", ranks="mixed", seed=11)
    ids = inp.token_adapter.clone()
    index = AdapterIndex.with_capacity(C, 5).update_(ids[:live]).padded_to(M)
    ids[live:] = -1
    inp.token_adapter = ids
    t = multi_driver.run_shrink(emulator, inp.x, inp.lora_a, inp.scales, inp.ranks, index, 16,
                                t_out=torch.zeros(M, 16)).out  # the op zeroes a padded view's t first
    assert_close(t, inp.t64(), torch.float32, what="t")
    assert (t[live:] == 0).all()
    y0 = rand(M, 40, dtype=torch.bfloat16)
    run = multi_driver.run_expand(emulator, y0.clone(), t, inp.lora_b, inp.ranks, index, 64)
    expected = reference.lora_expand_(y0.double(), t.double(), inp.lora_b.double(), ids, inp.ranks)
    assert_close(run.out, expected, torch.bfloat16, what="expand")
    assert torch.equal(_bits(run.out[live:]), _bits(y0[live:]))
    lin = multi_driver.run_linear(emulator, inp.x, inp.weight, inp.lora_b, inp.bias, t, inp.ranks, index,
                                  tile_kind=tile_kind, tiles_per_cta=2)
    assert_close(lin.out, inp.linear64(), torch.bfloat16, what="linear")
    assert lin.stores.numel() == 0 or (int(lin.stores.min()) == 1 and int(lin.stores_max.max()) == 1)


# ---------------------------------------------------------------------------------------------
# Issue 12: several output slices in one launch (grid z = slice), ranks up to 512
# ---------------------------------------------------------------------------------------------

def slice_stacks(inp, widths, seed=0, adapter_dtype=None):
    """(A stacks S x [L, R, K], B stacks S x [L, N_s, R]) beside inp's, NaN past each rank."""
    torch.manual_seed(seed)
    L, R, K = inp.lora_a.shape
    dtype = adapter_dtype or inp.lora_a.dtype
    keep = reference.rank_keep(inp.ranks, L, R, "cpu")
    a_stacks, b_stacks = [], []
    for n in widths:
        a = rand(L, R, K, dtype=dtype, scale=K ** -0.5)
        b = rand(L, n, R, dtype=dtype, scale=R ** -0.5)
        a.masked_fill_(~keep[:, :, None], float("nan"))
        b.masked_fill_(~keep[:, None, :], float("nan"))
        a_stacks.append(a)
        b_stacks.append(b)
    return a_stacks, b_stacks


def untouched_rows(inp):
    none = inp.token_adapter < 0
    if inp.ranks is None:
        return none
    return none | (inp.ranks[inp.token_adapter.clamp(min=0).long()] == 0)


def check_slices_shrink(exe, inp, a_stacks, item_m, seed=0):
    """t [S, M, R] from one launch of the CUDA source vs float64 per slice; each element stored once."""
    index = inp.index()
    run = multi_driver.run_shrink(exe, inp.x, a_stacks, inp.scales, inp.ranks, index, item_m, seed=seed)
    assert run.plan["grid_z"] == len(a_stacks), "one launch: a grid z extent of S slices"
    t_tol = torch.float32 if a_stacks[0].dtype == inp.x.dtype else inp.x.dtype
    for s, a in enumerate(a_stacks):
        expected = reference.lora_shrink(inp.x.double(), a.double(), inp.token_adapter, inp.scales.double(), inp.ranks)
        assert_close(run.out[s], expected, t_tol, what=f"t[{s}]")
    assert int(run.stores.min()) == 1 and int(run.stores_max.max()) == 1, "every t element is stored exactly once"
    assert run.stray_stores == 0
    assert (run.out[:, inp.token_adapter < 0] == 0).all(), "tokens with no adapter get t = 0"
    return run.out


def check_slices_expand(exe, inp, t, b_stacks, item_m=64, offset=0, extra=0, seed=0, y0=None):
    """y[:, col_s : col_s + N_s] += slice s, one launch; every other element of y keeps its bits
    and is never stored (rows without an adapter, columns before `offset` and after the slices)."""
    index = inp.index()
    M, widths = inp.x.shape[0], [b.shape[1] for b in b_stacks]
    width = offset + sum(widths) + extra
    if y0 is None:
        y0 = rand(M, width, dtype=inp.x.dtype)
    rows = untouched_rows(inp)
    y0[rows] = -0.0  # any store, even of y + 0, would flip the sign bit
    run = multi_driver.run_expand(exe, y0, t, b_stacks, inp.ranks, index, item_m, offset=offset, seed=seed)
    assert run.plan["grid_z"] == len(b_stacks)
    written = torch.zeros(M, width, dtype=torch.bool)
    expected = y0.double().clone()
    col = offset
    for s, b in enumerate(b_stacks):
        part = reference.lora_expand_(y0[:, col:col + b.shape[1]].double(), t[s].double(), b.double(),
                                      inp.token_adapter, inp.ranks)
        expected[:, col:col + b.shape[1]] = part
        written[:, col:col + b.shape[1]] = True
        col += b.shape[1]
    written[rows] = False
    expected[~written] = y0[~written].double()
    assert_close(run.out, expected, y0.dtype, what="expand")
    assert torch.equal(_bits(run.out[~written]), _bits(y0[~written])), "an element outside the slices was written"
    assert int(run.stores_max[~written].sum()) == 0, "an element outside the slices was stored to"
    if written.any():
        assert int(run.stores[written].min()) == 1 and int(run.stores_max[written].max()) == 1, \
            "every slice element of a token with an adapter is stored exactly once"
    assert run.stray_stores == 0
    return run


GQA = [136, 34, 34]  # q, k, v of a tiny GQA layer: q spans two 128-column tiles, k/v one (narrower)


@pytest.mark.parametrize("widths", [[24], [16, 16], GQA, [8, 24, 8, 130]], ids=["S1", "S2-gate-up", "S3-qkv", "S4"])
def test_slices_in_one_launch(emulator, widths):
    """S = 1..4 slices, GQA's different widths (each slice's own tail masking; CTAs past a narrow
    slice's width return), -1 tokens and a rank-0 slot, NaN past every rank, both shrink tiles,
    both expand work lists, an offset and columns past the slices."""
    S = len(widths)
    dtype = torch.bfloat16 if S % 2 else torch.float16
    inp = make_multi_inputs(45, 8, 40, 5, 16, dtype, dist="none10", ranks=[16, 5, 0, 9, 1], seed=S)
    inp.token_adapter[:3] = 1  # a short piece (CUDA cores) beside the long ones (tensor cores)
    inp.token_adapter[3:25] = 3
    inp.token_adapter[25:27] = 2  # rank 0: behaves as no adapter
    lengths = piece_lengths(inp.index(), 16)
    assert min(lengths) <= GEMV_MAX_ROWS < max(lengths)
    a_stacks, b_stacks = slice_stacks(inp, widths, seed=S)
    t = check_slices_shrink(emulator, inp, a_stacks, 16, seed=1)
    check_slices_shrink(emulator, inp, a_stacks, 64, seed=2)
    # odd columns / row stride: element updates of y; then even ones: paired 32-bit updates
    run = check_slices_expand(emulator, inp, t, b_stacks, 64, offset=3, extra=2, seed=3)
    assert run.plan["y_pairs0"] == 0
    run = check_slices_expand(emulator, inp, t, b_stacks, 16, offset=0, extra=0, seed=4)
    assert all(run.plan[f"y_pairs{s}"] == 1 for s in range(S))


def test_slices_with_their_own_b_layouts_and_fp32_adapters(emulator):
    """Each expand slice reads its B with its own strides (rank-contiguous, transposed along the
    rank, rows padded); fp32 adapters (the shrink's A halves, the expand's 3xTF32); t with strides;
    a column-major y."""
    inp = make_multi_inputs(30, 8, 32, 4, 8, torch.float16, dist="zipf", ranks="mixed", seed=21)
    inp.token_adapter[:2] = 0
    a_stacks, b_stacks = slice_stacks(inp, [20, 12, 12], seed=5, adapter_dtype=torch.float32)
    t = check_slices_shrink(emulator, inp, a_stacks, 16)
    b_stacks[1] = b_stacks[1].transpose(1, 2).contiguous().transpose(1, 2)  # unit stride along N
    b_stacks[2] = torch.cat([b_stacks[2], rand(4, 12, 3)], dim=2)[:, :, :8]  # rank rows padded
    t_strided = t.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # [S, M, R] stored [M, S, R]
    y0 = rand(3 + 44, 30, dtype=torch.float16).t()
    check_slices_expand(emulator, inp, t_strided, b_stacks, 64, offset=3, y0=y0)


@pytest.mark.parametrize("R,ranks", [(200, [200, 129, 0, 7]), (256, [256, 128, 1, 255]), (512, [512, 300, 0, 64])],
                         ids=["r200", "r256", "r512"])
def test_large_ranks(emulator, R, ranks):
    """r_max past 128: the shrink's rank chunks, the expand's 128-wide chunks of t (one to four,
    the last partial: 129 = 128 + 1, 200, 300), both expand paths; stacks NaN past each rank and
    t NaN past each token's rank (never read)."""
    inp = make_multi_inputs(26, 20, 24, 4, R, torch.bfloat16, dist="decode", ranks=ranks, seed=R)
    ids = torch.tensor([0] * 3 + [1] * 9 + [3] * 6 + [2] * 2 + [-1] * 2 + [0] * 4, dtype=torch.int32)
    inp.token_adapter = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(R))]
    lengths = piece_lengths(inp.index(), 64)
    assert min(lengths) <= GEMV_MAX_ROWS < max(lengths)
    a_stacks, b_stacks = slice_stacks(inp, [20, 9], seed=R)
    t = check_slices_shrink(emulator, inp, a_stacks, 16)
    check_slices_shrink(emulator, inp, a_stacks[:1], 64)
    keep = reference.rank_keep(inp.ranks, 4, R, "cpu")[inp.token_adapter.clamp(min=0).long()]
    keep[inp.token_adapter < 0] = False
    t_poisoned = t.clone()
    t_poisoned[:, ~keep] = float("nan")
    check_slices_expand(emulator, inp, t_poisoned, b_stacks, 64, offset=1, extra=1)
    # the single-stack form (t [M, R]) through the same launch
    check_expand(emulator, inp, t_poisoned[0], 64)


@pytest.mark.parametrize("R", [256, 512])
def test_linear_large_ranks(emulator, R):
    """multi_lora_linear at r_max 256 / 512: the epilogue walks the rank 8 columns a step."""
    inp = make_multi_inputs(24, 40, 32, 3, R, torch.float16, dist="zipf", ranks=[R, R // 2 + 3, 0], seed=R)
    inp.token_adapter[:5] = 1
    check_linear(emulator, inp, tile_kind=SMALL)
    check_linear(emulator, inp, tile_kind=LARGE)


def test_slices_every_schedule_gives_the_same_bits(emulator):
    inp = make_multi_inputs(36, 8, 40, 3, 16, torch.bfloat16, dist="zipf", ranks="mixed", seed=31)
    a_stacks, b_stacks = slice_stacks(inp, [20, 10, 10], seed=3)
    index = inp.index()
    y0 = rand(36, 40, dtype=torch.bfloat16)
    runs = []
    for seed in (1, 2):
        t = multi_driver.run_shrink(emulator, inp.x, a_stacks, inp.scales, inp.ranks, index, 16, seed=seed).out
        y = multi_driver.run_expand(emulator, y0, t, b_stacks, inp.ranks, index, 64, seed=seed).out
        runs.append((t, y))
    assert torch.equal(_bits(runs[0][0]), _bits(runs[1][0])) and torch.equal(_bits(runs[0][1]), _bits(runs[1][1]))


def test_slice_count_and_rank_limits_in_the_plan(emulator):
    """The plan refuses 5 slices and r_max 513 (the launcher's sentences name them)."""
    inp = make_multi_inputs(6, 8, 16, 2, 513, torch.float16, seed=1)
    with pytest.raises(AssertionError, match=r"r_max must be in \[1, 512\]"):
        multi_driver.run_shrink(emulator, inp.x, inp.lora_a, inp.scales, None, inp.index(), 16)
    small = make_multi_inputs(6, 8, 16, 2, 4, torch.float16, seed=1)
    with pytest.raises(AssertionError, match="S out of range"):
        multi_driver.run_shrink(emulator, small.x, [small.lora_a] * 5, small.scales, None, small.index(), 16)


@pytest.mark.parametrize("R,adapter_dtype", [(16, None), (40, torch.float32)], ids=["r16", "r40-fp32-adapters"])
def test_split_decode_shrink(emulator, R, adapter_dtype):
    """row_split 4 (the split decode shrink): each 16-token piece runs as 4 CTAs of 4 rows on CUDA
    cores. A 16-token single-adapter batch, then pieces of every length 1..16 (sub-pieces partly
    or wholly past a piece's length), -1 tokens, two slices; every t element stored once."""
    one = make_multi_inputs(16, 8, 40, 3, R, torch.bfloat16, dist="one", ranks="mixed", seed=R,
                            adapter_dtype=adapter_dtype)
    one.token_adapter[:] = 0
    run = multi_driver.run_shrink(emulator, one.x, one.lora_a, one.scales, one.ranks, one.index(), 16, row_split=4)
    assert run.plan["grid_x"] >= 1 and run.plan["grid_y"] == 4 * ((R + 15) // 16)
    t_tol = torch.float32 if adapter_dtype is None else torch.bfloat16
    assert_close(run.out, one.t64(), t_tol, what="t, one adapter")
    assert int(run.stores.min()) == 1 and int(run.stores_max.max()) == 1 and run.stray_stores == 0
    counts = [16, 13, 9, 5, 4, 1, 2]
    ids = torch.cat([torch.full((c,), i, dtype=torch.int32) for i, c in enumerate(counts)] +
                    [torch.full((3,), -1, dtype=torch.int32)])
    inp = make_multi_inputs(len(ids), 8, 40, len(counts), R, torch.float16, ranks="mixed", seed=R + 1,
                            adapter_dtype=adapter_dtype)
    inp.token_adapter = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(R))]
    a_stacks, _ = slice_stacks(inp, [8, 8], seed=R, adapter_dtype=adapter_dtype)
    run = multi_driver.run_shrink(emulator, inp.x, a_stacks, inp.scales, inp.ranks, inp.index(), 16, row_split=4)
    t_tol = torch.float32 if adapter_dtype is None else torch.float16
    for s, a in enumerate(a_stacks):
        expected = reference.lora_shrink(inp.x.double(), a.double(), inp.token_adapter, inp.scales.double(), inp.ranks)
        assert_close(run.out[s], expected, t_tol, what=f"t[{s}]")
    assert int(run.stores.min()) == 1 and int(run.stores_max.max()) == 1 and run.stray_stores == 0
    with pytest.raises(AssertionError, match="row_split must be 1, or 4 with item_m 16"):
        multi_driver.run_shrink(emulator, inp.x, a_stacks, inp.scales, inp.ranks, inp.index(), 64, row_split=4)
