"""CPU lane: the host side of the Hopper multi-adapter linear (lora_kernels/cuda/multi_lora_sm90.py)
-- the per-slot LoRA tail the sm90 tail GEMM adds as extra K blocks, built with the module's own
functions on CPU tensors and checked in float64 (x @ W.T + tail_x @ tail_w.T + bias, what the
kernel computes with fp32 accumulation, against reference.multi_lora_linear), and the dispatch
(sm_90 -> the sm90 kernel, sm_80 / a tail too large / unaligned operands / decode M -> the
mma.sync kernel, with the reason) through the real launcher with the extension's ops replaced by
host emulations. The kernel itself is the single-adapter one: its SASS is checked in
tests/test_cuda_sm90_build.py, its GPU runs in tests/test_cuda_sm90_multi_gpu.py."""
import pytest
import torch

from cases import make_multi_inputs
from lora_kernels import AdapterIndex, reference
from lora_kernels.cuda import lora_linear as cl
from lora_kernels.cuda import multi_lora as cm
from lora_kernels.cuda import multi_lora_sm90 as sm
from tolerances import assert_close

H100 = ((9, 0), 132)


def _tails(inp, token_adapter, t=None):
    """(tail_x, tail_w, t) as the launcher builds them, t from the reference shrink (fp32, what
    the CUDA shrink returns) unless given."""
    if t is None:
        t = reference.lora_shrink(inp.x, inp.lora_a, token_adapter, inp.scales, inp.ranks)
    assert t.dtype == torch.float32
    b_fp32 = inp.lora_b.dtype == torch.float32
    L = inp.lora_a.shape[0]
    return sm.multi_tail_x(t, token_adapter, L, inp.x.dtype, b_fp32), sm.multi_tail_w(inp.lora_b, inp.ranks,
                                                                                      inp.x.dtype), t


def _kernel_emulation(x, weight, tail_x, tail_w, bias):
    """The sm90 tail GEMM: exact 16-bit products, fp32-or-better sums (float64 here), one rounding."""
    y = x.double() @ weight.double().t() + tail_x.double() @ tail_w.double().t()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


CASES = [  # (dist, M, N, K, L, r_max, ranks, dtype, adapter dtype)
    ("none10", 70, 48, 96, 5, 8, "mixed", torch.bfloat16, None),
    ("zipf", 65, 40, 136, 4, 5, [5, 0, 3, 1], torch.float16, None),        # rank-0 slot, Wb = 16 > 2r
    ("decode", 33, 24, 200, 3, 16, [16, 7, 0], torch.bfloat16, torch.float32),  # fp32 B: 3r blocks
    ("prefill", 90, 64, 64, 2, 32, None, torch.float16, torch.float32),
    ("one", 40, 16, 72, 6, 4, "mixed", torch.bfloat16, None),
    ("none", 20, 16, 64, 3, 8, None, torch.float16, None),
]


@pytest.mark.parametrize("dist,M,N,K,L,R,ranks,dtype,adapter_dtype", CASES)
def test_tail_gemm_matches_the_reference(dist, M, N, K, L, R, ranks, dtype, adapter_dtype):
    inp = make_multi_inputs(M, N, K, L, R, dtype, dist=dist, ranks=ranks, adapter_dtype=adapter_dtype, seed=M + L)
    tail_x, tail_w, _ = _tails(inp, inp.token_adapter)
    y = _kernel_emulation(inp.x, inp.weight, tail_x, tail_w, inp.bias)
    fp32_adapters = adapter_dtype == torch.float32
    assert_close(y, inp.linear64(), dtype, torch_out=None if fp32_adapters else inp.linear_torch_expression())


@pytest.mark.parametrize("dist,M,N,K,L,R,ranks,dtype,adapter_dtype", CASES)
def test_tail_layout(dist, M, N, K, L, R, ranks, dtype, adapter_dtype):
    """Shapes, 16-byte rows, each token's block of its own slot only, columns past each rank and
    the block's padding zero (the stacks hold NaN past each rank: none leaks)."""
    inp = make_multi_inputs(M, N, K, L, R, dtype, dist=dist, ranks=ranks, adapter_dtype=adapter_dtype, seed=M + L)
    tail_x, tail_w, t = _tails(inp, inp.token_adapter)
    b_fp32 = adapter_dtype == torch.float32
    wb = sm.tail_block_width(R, b_fp32)
    assert wb % 8 == 0 and wb >= (3 if b_fp32 else 2) * R
    assert tail_x.shape == (M, L * wb) and tail_w.shape == (N, L * wb)
    assert tail_x.dtype == tail_w.dtype == dtype and tail_x.is_contiguous() and tail_w.is_contiguous()
    assert torch.isfinite(tail_x).all() and torch.isfinite(tail_w).all()
    assert (tail_x.stride(0) * tail_x.element_size()) % 16 == 0 and cl.tma_readable(tail_x) and cl.tma_readable(tail_w)
    bx, bw = tail_x.view(M, L, wb), tail_w.view(N, L, wb)
    mine = inp.token_adapter.long()[:, None] == torch.arange(L)[None, :]
    assert not bx[~mine].any(), "a token's tail has entries outside its own slot's block"
    hi, lo = cl.split16(t, dtype)
    rows = inp.token_adapter >= 0
    own = bx[rows, inp.token_adapter[rows].long()]                                  # [m, wb]
    assert torch.equal(own[:, :R], hi[rows]) and torch.equal(own[:, R:2 * R], lo[rows])
    if b_fp32:
        assert torch.equal(own[:, 2 * R:3 * R], hi[rows])
    assert not own[:, (3 if b_fp32 else 2) * R:].any()
    keep = reference.rank_keep(inp.ranks, L, R, "cpu")                             # [L, R]
    for part in range(3 if b_fp32 else 2):
        cols = bw[:, :, part * R:(part + 1) * R]                                      # [N, L, R]
        assert not cols[:, ~keep].any(), "tail_w past a slot's rank is not zero"
        b = inp.lora_b.transpose(0, 1)
        expect = cl.split16(b, dtype)[1 if part == 2 else 0] if b_fp32 else b
        assert torch.equal(cols[:, keep], expect[:, keep])
    assert not bw[:, :, (3 if b_fp32 else 2) * R:].any()


def _lora_term_error(inp, drop_lo=False):
    """max |tail_x @ tail_w.T - delta| / (|t| @ |B|.T) over the tokens with an adapter and rank > 0
    (delta and t in float64); the tail of the others must be exactly zero."""
    tail_x, tail_w, _ = _tails(inp, inp.token_adapter)
    L, R = inp.lora_a.shape[:2]
    if drop_lo:  # what a kernel that rounded t to 16 bits once would compute
        tail_x = tail_x.clone().view(tail_x.shape[0], L, -1)
        tail_x[:, :, R:2 * R] = 0
        tail_x = tail_x.view(tail_x.shape[0], -1)
    got = tail_x.double() @ tail_w.double().t()
    t64 = inp.t64()
    exact = reference.lora_expand_delta(t64, inp.lora_b.double(), inp.token_adapter, inp.ranks)
    magnitude = reference.lora_expand_delta(t64.abs(), inp.lora_b.double().abs(), inp.token_adapter, inp.ranks)
    live = magnitude > 0
    assert not got[~live].any()
    return ((got - exact).abs()[live] / magnitude[live]).max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype", ["same", torch.float32])
def test_lora_term_is_fp32_accurate(dtype, adapter_dtype):
    """t = scale * A x in fp32 (an fp32 sum over K: ~K * 2^-24), its hi/lo halves add <= 2^-16
    (bf16), B's halves (fp32 B) drop t_lo * B_lo (< 2^-16): well inside 2^-14 of |t| |B|."""
    adapter_dtype = dtype if adapter_dtype == "same" else adapter_dtype
    inp = make_multi_inputs(80, 40, 200, 4, 8, dtype, dist="none10", ranks=[8, 3, 0, 5], adapter_dtype=adapter_dtype)
    assert _lora_term_error(inp) < 2 ** -14


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_without_the_low_half_the_lora_term_is_only_16_bit_accurate(dtype):
    """The bound above is not loose: dropping t_lo breaks it by orders of magnitude."""
    inp = make_multi_inputs(80, 40, 200, 4, 8, dtype, dist="decode", ranks=[8, 3, 1, 5])
    assert _lora_term_error(inp, drop_lo=True) > 2 ** -13


def test_rows_without_an_adapter_ignore_t():
    """tail_x selects each token's slot block with where: a token with no adapter (or a padding
    row) gets zeros whatever t holds in its row."""
    inp = make_multi_inputs(24, 16, 64, 3, 8, torch.bfloat16, dist="none10", ranks="mixed")
    inp.token_adapter[:4] = -1
    t = reference.lora_shrink(inp.x, inp.lora_a, inp.token_adapter, inp.scales, inp.ranks)
    t[inp.token_adapter < 0] = float("nan")
    tail_x, tail_w, _ = _tails(inp, inp.token_adapter, t)
    assert not tail_x[inp.token_adapter < 0].any() and torch.isfinite(tail_x).all()
    assert_close(_kernel_emulation(inp.x, inp.weight, tail_x, tail_w, inp.bias), inp.linear64(), torch.bfloat16)


def test_padded_capacity_index():
    """A with_capacity index updated with 25 tokens, viewed for 32 rows (a CUDA-graph batch):
    rows 25..31 have no adapter, their tail is zero and y is x @ W.T + bias there."""
    C, M, live, L = 40, 32, 25, 4
    inp = make_multi_inputs(M, 48, 96, L, 8, torch.float16, dist="decode", ranks="mixed")
    index = AdapterIndex.with_capacity(C, L)
    index.update_(inp.token_adapter[:live])
    view = index.padded_to(M)
    assert view.token_adapter.shape == (M,) and (view.token_adapter[live:] == -1).all()
    inp.token_adapter = torch.cat([inp.token_adapter[:live], torch.full((M - live,), -1, dtype=torch.int32)])
    tail_x, tail_w, _ = _tails(inp, view.token_adapter)
    assert not tail_x[live:].any()
    assert_close(_kernel_emulation(inp.x, inp.weight, tail_x, tail_w, inp.bias), inp.linear64(), torch.float16,
                 torch_out=inp.linear_torch_expression())


def test_tail_w_takes_a_strided_stack():
    inp = make_multi_inputs(16, 24, 64, 3, 8, torch.bfloat16, ranks="mixed")
    strided = inp.lora_b.transpose(1, 2).contiguous().transpose(1, 2)  # [L, N, R] with stride 1 along N
    assert torch.equal(sm.multi_tail_w(strided, inp.ranks, torch.bfloat16), sm.multi_tail_w(inp.lora_b, inp.ranks,
                                                                                              torch.bfloat16))


# ---- the plan -------------------------------------------------------------------------------

def test_tail_width():
    assert sm.tail_block_width(16, False) == 32 and sm.tail_block_width(16, True) == 48
    assert sm.tail_block_width(5, False) == 16 and sm.tail_block_width(5, True) == 16
    assert sm.tail_block_width(1, False) == 8 and sm.tail_width(8, 16, False) == 256


@pytest.mark.parametrize("M,N,K,L,R,b_fp32,tile", [
    (4096, 4096, 4096, 8, 16, False, cl.SM90_TILE_128x256),   # tail 256 columns = K / 16
    (4096, 4096, 4096, 16, 16, False, cl.SM90_TILE_128x256),  # 512 = K / 8: the limit, taken
    (512, 4096, 4096, 4, 64, False, cl.SM90_TILE_128x128),
    (256, 4096, 4096, 2, 16, True, cl.SM90_TILE_128x64),
    (4096, 4096, 4096, 16, 16, True, None),                   # fp32 B: 768 > 512
    (4096, 4096, 4096, 32, 16, False, None),                  # 1024 > K / 8
    (63, 4096, 4096, 4, 16, False, None),                     # decode M
    (4096, 4096, 4100, 4, 16, False, None),                   # K % 8
    (4096, 4100, 4096, 4, 16, False, None),                   # N % 8
])
def test_plan_on_hopper(M, N, K, L, R, b_fp32, tile):
    plan = sm.sm90_multi_plan(M, N, K, L, R, b_fp32, *H100, tma_ok=True)
    assert plan.tile == tile
    assert (plan.reason is None) == (tile is not None)


def test_plan_reasons():
    def why(*args, **kw):
        return sm.sm90_multi_plan(*args, **kw).reason
    assert "compute capability 8.0" in why(4096, 4096, 4096, 4, 16, False, (8, 0), 108, tma_ok=True)
    assert "no sm90 kernels" in why(4096, 4096, 4096, 4, 16, False, *H100, tma_ok=True, built=False)
    assert "not TMA-readable" in why(4096, 4096, 4096, 4, 16, False, *H100, tma_ok=False)
    assert "M = 16 tokens is below 64" in why(16, 4096, 4096, 4, 16, False, *H100, tma_ok=True)
    assert "K = 4100 and N = 4096 must be positive multiples of 8" in why(4096, 4096, 4100, 4, 16, False, *H100,
                                                                          tma_ok=True)
    tail = why(4096, 4096, 4096, 32, 16, False, *H100, tma_ok=True)
    assert "L * Wb = 32 * 32 = 1024 columns to K = 4096, more than K / 8" in tail and "not measured" in tail
    for reason in (tail, why(16, 4096, 4096, 4, 16, False, *H100, tma_ok=True)):
        assert reason.startswith("cuda: multi_lora_linear runs the mma.sync kernel")


# ---- the dispatch, through the launcher with the extension emulated on the host ----------------

@pytest.fixture
def launcher(monkeypatch):
    """cuda.multi_lora.multi_lora_linear on CPU tensors for a pretend device and build: the
    extension's ops replaced by host emulations (the shrink by the reference; the sm90 op checks
    what the C++ launcher checks, then computes in float64); returns (run, log of the kernels used)."""
    from lora_kernels.cuda import loader
    log = []
    monkeypatch.setattr(loader, "load", lambda *a, **k: None)

    def shrink(x, a, index, scales, ranks, out=None, item_m=0):
        t = reference.lora_shrink(x, a, index.token_adapter, scales, ranks)
        return t if out is None else out.copy_(t)

    def sm90_fwd(x, weight, tail_x, tail_w, bias, y, tile):
        M, N, L = x.shape[0], weight.shape[0], tail_x.shape[1]
        assert tail_x.shape == (M, L) and tail_w.shape == (N, L) and y.shape == (M, N)
        for ten in (x, weight, tail_x, tail_w, y):
            assert ten.dtype == x.dtype and cl.tma_readable(ten)
        assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous() and bias.data_ptr() % 16 == 0)
        assert tile in (0, 1, 2)
        log.append(("sm90", tile))
        y.copy_(_kernel_emulation(x, weight, tail_x, tail_w, bias))

    def mma_sync(x, weight, bias, lora_b, t, ranks, sorted_tokens, sorted_adapter, slot_start, y, tile_kind, tiles):
        log.append(("mma.sync", tile_kind))
        y.fill_(float("nan"))  # not emulated: only which kernel ran is checked on this path

    monkeypatch.setattr(cm, "multi_lora_shrink", shrink)
    monkeypatch.setattr(torch.ops.lora_kernels, "cuda_lora_linear_sm90_fwd", sm90_fwd, raising=False)
    monkeypatch.setattr(torch.ops.lora_kernels, "cuda_multi_lora_linear", mma_sync, raising=False)

    def run(inp, capability=(9, 0), built=True, out=None, tile_kind=0, index=None):
        monkeypatch.setattr(cl, "device_facts", lambda i: (capability, 132))
        monkeypatch.setattr(cl, "sm90_built", lambda: built)
        log.clear()
        index = index or inp.index()
        y = cm.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales, inp.bias, inp.ranks,
                                 out=out, tile_kind=tile_kind)
        return y, list(log)
    return run


def _prefill(**kw):  # tail = 4 * 16 = 64 columns <= K / 8 = 64: the sm90 path's shape
    return make_multi_inputs(128, 64, 512, 4, 8, torch.bfloat16, dist="zipf", ranks=[8, 0, 3, 5], **kw)


def test_sm90_dispatch_on_hopper(launcher):
    inp = _prefill()
    y, used = launcher(inp)
    assert used == [("sm90", cl.SM90_TILE_128x64)]
    assert_close(y, inp.linear64(), torch.bfloat16, torch_out=inp.linear_torch_expression())


def test_sm90_dispatch_fp32_adapters_and_bias(launcher):
    inp = make_multi_inputs(128, 64, 768, 4, 8, torch.float16, dist="none10", ranks="mixed",
                            adapter_dtype=torch.float32)  # tail 4 * 24 = 96 <= 768 / 8
    inp.bias = inp.bias.float()
    y, used = launcher(inp)
    assert used == [("sm90", cl.SM90_TILE_128x64)]
    assert_close(y, inp.linear64(), torch.float16)


def test_sm90_dispatch_with_a_padded_index(launcher):
    """t's rows past the live tokens are zeroed by the launcher, the tail is zero there."""
    inp = _prefill()
    live = 100
    index = AdapterIndex.with_capacity(160, 4)
    index.update_(inp.token_adapter[:live])
    inp.token_adapter[live:] = -1
    y, used = launcher(inp, index=index.padded_to(128))
    assert used == [("sm90", cl.SM90_TILE_128x64)]
    assert_close(y, inp.linear64(), torch.bfloat16)


@pytest.mark.parametrize("case,expect", [
    ("sm80", ("mma.sync", 0)),
    ("not built", ("mma.sync", 0)),
    ("tail too large", ("mma.sync", 0)),
    ("unaligned x", ("mma.sync", 0)),
    ("unaligned out", ("mma.sync", 0)),
    ("decode M", ("mma.sync", 0)),
    ("forced mma.sync", ("mma.sync", 2)),
    ("forced sm90 tile", ("sm90", cl.SM90_TILE_128x128)),
    ("switched off", ("mma.sync", 0)),
])
def test_dispatch_falls_back(launcher, monkeypatch, case, expect):
    inp = _prefill()
    kw = {}
    if case == "switched off":  # bench/multi.py's ours_linear_cuda_mma
        monkeypatch.setattr(sm, "ENABLED", False)
    elif case == "sm80":
        kw["capability"] = (8, 0)
    elif case == "not built":
        kw["built"] = False
    elif case == "tail too large":
        inp = make_multi_inputs(128, 64, 256, 4, 8, torch.bfloat16, dist="zipf", ranks="mixed")  # 64 > 256 / 8
    elif case == "unaligned x":
        inp.x = torch.cat([inp.x.new_zeros(1), inp.x.flatten()])[1:].view(inp.x.shape)
        assert not cl.tma_readable(inp.x)
    elif case == "unaligned out":
        kw["out"] = torch.empty(128, 68, dtype=torch.bfloat16)[:, :64]  # 136-byte rows
    elif case == "decode M":
        inp = make_multi_inputs(32, 64, 512, 4, 8, torch.bfloat16, dist="zipf", ranks="mixed")
    elif case == "forced mma.sync":
        kw["tile_kind"] = 2
    elif case == "forced sm90 tile":
        inp = make_multi_inputs(128, 64, 256, 4, 8, torch.bfloat16, dist="zipf", ranks="mixed")  # tail past K / 8
        kw["tile_kind"] = 4
    y, used = launcher(inp, **kw)
    assert used == [expect]
    if expect[0] == "sm90":
        assert_close(y, inp.linear64(), torch.bfloat16)


def test_choice_reason_names_the_launch(monkeypatch):
    monkeypatch.setattr(cl, "device_facts", lambda i: ((9, 0), 132))
    monkeypatch.setattr(cl, "sm90_built", lambda: True)
    inp = make_multi_inputs(128, 64, 256, 4, 8, torch.bfloat16, dist="zipf")
    plan = sm.sm90_multi_choice(inp.x, inp.weight, inp.lora_b, None)
    assert plan.tile is None and "L * Wb = 4 * 16 = 64 columns to K = 256" in plan.reason
    assert "tile_kind=1 forces it" in sm.sm90_multi_choice(inp.x, inp.weight, inp.lora_b, None, tile_kind=1).reason
    assert sm.sm90_multi_choice(inp.x, inp.weight, inp.lora_b, None, tile_kind=5) == (cl.SM90_TILE_128x64, None)
