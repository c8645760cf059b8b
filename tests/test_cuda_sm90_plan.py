"""CPU lane: the host side of the Hopper fused forward -- which kernel and tile a problem gets
(lora_kernels.cuda.lora_linear.sm90_plan and the launcher's choice), and the numerics of the LoRA
tail the sm90 kernel adds as extra K blocks (16-bit hi/lo halves of t), checked in float64."""
import importlib

import pytest
import torch

from lora_kernels.cuda import lora_linear as cl
from tolerances import rand

H100 = ((9, 0), 132)


@pytest.mark.parametrize("M,N,K,expected", [
    (4096, 4096, 4096, cl.SM90_TILE_128x256),   # 32 x 16 = 512 large tiles: 4 full waves
    (2048, 8192, 4096, cl.SM90_TILE_128x256),
    (512, 4096, 4096, cl.SM90_TILE_128x128),    # 4 x 16 = 64 large tiles: half the SMs idle
    (256, 4096, 4096, cl.SM90_TILE_128x64),     # 64 tiles of 128x128, 128 of 128x64
    (64, 1024, 4096, cl.SM90_TILE_128x64),      # 16 tiles: still one wave, the smallest tile
    (63, 4096, 4096, None),                     # decode sizes stay on the sm_80 tile
    (4096, 4096, 4100, None),                   # K % 8: rows not 16-byte multiples (TMA)
    (4096, 4100, 4096, None),                   # N % 8: y's rows
    (4096, 4096, 0, None),
])
def test_sm90_plan_on_hopper(M, N, K, expected):
    assert cl.sm90_plan(M, N, K, *H100, tma_ok=True) == expected


def test_sm90_plan_elsewhere_and_when_it_cannot():
    assert cl.sm90_plan(4096, 4096, 4096, (8, 0), 108, tma_ok=True) is None   # A100: mma.sync kernel
    assert cl.sm90_plan(4096, 4096, 4096, (10, 0), 148, tma_ok=True) is None  # sm_100: no sm_90a code runs there
    assert cl.sm90_plan(4096, 4096, 4096, *H100, tma_ok=False) is None
    assert cl.sm90_plan(4096, 4096, 4096, *H100, tma_ok=True, built=False) is None


def test_tma_readable():
    buf = torch.empty(16, 72, dtype=torch.bfloat16)
    assert buf.data_ptr() % 16 == 0
    assert cl.tma_readable(buf) and cl.tma_readable(buf[:, :40])   # row stride 144 bytes
    assert not cl.tma_readable(buf[:, 1:9])                           # start 2 bytes off
    assert not cl.tma_readable(buf.t())                               # column-major
    assert not cl.tma_readable(torch.empty(16, 36, dtype=torch.bfloat16))  # 72-byte rows
    assert cl.tma_readable(torch.empty(1, 36, dtype=torch.bfloat16))       # one row: its stride is free


@pytest.fixture
def on_device(monkeypatch):
    """The launcher's kernel choice for a pretend device (capability, SMs) and build."""
    def choose(x, weight, tile_kind=0, capability=(9, 0), built=True, out=None):
        monkeypatch.setattr(cl, "device_facts", lambda index: (capability, 132))
        monkeypatch.setattr(cl, "sm90_built", lambda: built)
        return cl._sm90_tile(x, weight, out, tile_kind)
    return choose


def test_launcher_choice(on_device):
    x, w = torch.empty(512, 256, dtype=torch.bfloat16), torch.empty(1024, 256, dtype=torch.bfloat16)
    assert on_device(x, w) == cl.SM90_TILE_128x64   # 512 x 1024: 32 tiles of 128x128, 64 of 128x64
    assert on_device(x, w, capability=(8, 0)) is None
    assert on_device(x, w, built=False) is None
    assert on_device(x, w, tile_kind=1) is None and on_device(x, w, tile_kind=2) is None  # sm_80 tiles forced
    assert on_device(x[:8], w, tile_kind=3) == cl.SM90_TILE_128x256                         # sm90 tiles forced
    assert on_device(x[:8], w, tile_kind=4) == cl.SM90_TILE_128x128
    assert on_device(x[:8], w, tile_kind=5) == cl.SM90_TILE_128x64
    assert on_device(x[:, 1:9], w[:, :8]) is None                       # x 2 bytes off 16-byte alignment
    assert on_device(x, w, out=torch.empty(512, 1030, dtype=torch.bfloat16)[:, :1024]) is None  # y rows


# ---- the LoRA tail: tail_x @ tail_w.T == scale * (x @ A.T) @ B.T to fp32-like accuracy ---------

def _tail_error(dtype, adapter_dtype, M=37, N=24, K=200, r=5, scale=0.75, drop_lo=False):
    torch.manual_seed(0)
    x = rand(M, K, dtype=dtype)
    a = rand(r, K, dtype=adapter_dtype, scale=K ** -0.5)
    b = rand(N, r, dtype=adapter_dtype, scale=r ** -0.5)
    t_out = torch.full((M, r), float("nan"))
    tail_x, tail_w = cl.lora_tail(x, a, b, scale, t_out)
    if drop_lo:  # what a kernel that rounded t to 16 bits once would compute
        tail_x = tail_x.clone()
        tail_x[:, r:2 * r] = 0
    got = tail_x.double() @ tail_w.double().t()   # tensor cores: exact products, fp32 sums (K' small)
    exact = scale * (x.double() @ a.double().t()) @ b.double().t()
    magnitude = scale * (x.double() @ a.double().t()).abs() @ b.double().abs().t()
    t_scale = x.double().abs() @ a.double().abs().t()  # t unscaled, fp32-accurate (A's halves: 2^-16)
    assert ((t_out.double() - x.double() @ a.double().t()).abs() / t_scale).max() < 2 ** -14
    return ((got - exact).abs() / magnitude).max().item(), tail_x, tail_w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype", ["same", torch.float32])
def test_tail_is_fp32_accurate(dtype, adapter_dtype):
    adapter_dtype = dtype if adapter_dtype == "same" else adapter_dtype
    err, tail_x, tail_w = _tail_error(dtype, adapter_dtype)
    # t itself is an fp32 sum over K = 200 (~K * 2^-24 relative), the halves add <= 2^-16 (bf16).
    assert err < 2 ** -14, err
    L = 3 * 5 if adapter_dtype == torch.float32 else 2 * 5
    assert tail_x.shape == (37, 16) and tail_w.shape == (24, 16) and tail_x.dtype == tail_w.dtype == dtype
    assert tail_x.is_contiguous() and tail_w.is_contiguous()
    assert not tail_x[:, L:].any() and not tail_w[:, L:].any()  # zero pad up to 8 columns


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_without_the_low_half_the_tail_is_only_16_bit_accurate(dtype):
    """The bound above is not loose: rounding t to 16 bits once breaks it by orders of magnitude."""
    err, _, _ = _tail_error(dtype, dtype, drop_lo=True)
    assert err > 2 ** -13, err


def test_split16_bounds():
    v = torch.randn(10000, dtype=torch.float64).float()
    for dtype, bound in ((torch.bfloat16, 2 ** -16), (torch.float16, 2 ** -22)):
        if dtype == torch.float16:  # lo ~ 2^-11 v must stay a normal fp16 number (>= 2^-14)
            v = v[v.abs() >= 2 ** -3]
        hi, lo = cl.split16(v, dtype)
        rel = ((v.double() - hi.double() - lo.double()).abs() / v.double().abs()).max().item()
        assert rel <= bound, (dtype, rel)


# ---- the backward's dx on Hopper: plan, choice, tail, launcher and dispatch (host side) -------

@pytest.mark.parametrize("M,N,K,expected", [
    (4096, 4096, 4096, cl.SM90_TILE_128x256),   # dx [4096, 4096]: 512 large tiles, 4 full waves
    (8192, 14336, 4096, cl.SM90_TILE_128x256),  # the down projection's dx: reduction over N = 14336
    (512, 4096, 4096, cl.SM90_TILE_128x128),    # 64 large tiles would idle half the SMs
    (256, 4096, 4096, cl.SM90_TILE_128x128),    # (no 128x64 tile is compiled for dx)
    (64, 8, 8, cl.SM90_TILE_128x128),
    (63, 4096, 4096, None),                     # decode-size M: the Triton backward's dx
    (4096, 4100, 4096, None),                   # N % 8: dy's rows not 16-byte multiples
    (4096, 4096, 4100, None),                   # K % 8: W's and dx's rows
    (4096, 4096, 0, None),
    (4096, 0, 4096, None),
])
def test_sm90_dx_plan_on_hopper(M, N, K, expected):
    assert cl.sm90_dx_plan(M, N, K, *H100, tma_ok=True) == expected


def test_sm90_dx_plan_elsewhere_and_when_it_cannot():
    assert cl.sm90_dx_plan(4096, 4096, 4096, (8, 0), 108, tma_ok=True) is None   # A100: today's backward
    assert cl.sm90_dx_plan(4096, 4096, 4096, (10, 0), 148, tma_ok=True) is None
    assert cl.sm90_dx_plan(4096, 4096, 4096, *H100, tma_ok=False) is None
    assert cl.sm90_dx_plan(4096, 4096, 4096, *H100, tma_ok=True, built=False) is None
    assert {t[0] for t in cl.SM90_DX_TILES} == set(cl.TILE_KIND_SM90_DX.values())  # what launch_dx compiles


@pytest.fixture
def hopper_dx(monkeypatch):
    """A pretend sm_90 device (132 SMs) with the sm90 dx kernels built; returns a setter."""
    def set_device(capability=(9, 0), built=True):
        monkeypatch.setattr(cl, "device_facts", lambda index: (capability, 132))
        monkeypatch.setattr(cl, "sm90_dx_built", lambda: built)
    set_device()
    return set_device


def _dx_operands(M=256, N=64, K=96, r=8, dtype=torch.bfloat16, adapter_dtype=None):
    adapter_dtype = adapter_dtype or dtype
    return (rand(M, N, dtype=dtype), rand(N, K, dtype=dtype, scale=N ** -0.5),
            rand(r, K, dtype=adapter_dtype, scale=K ** -0.5), rand(N, r, dtype=adapter_dtype, scale=r ** -0.5))


def test_sm90_dx_choice_says_why(hopper_dx):
    dy, w, a, _ = _dx_operands()
    tile, why = cl.sm90_dx_choice(dy, w, a)
    assert tile == cl.SM90_TILE_128x128 and why.startswith("sm90 dx: tile 128x128 for dx [256, 96]"), why
    refusals = [
        (lambda: cl.sm90_dx_choice(dy, w, a, dropout=True), "not with dropout"),
        (lambda: cl.sm90_dx_choice(dy[:63], w, a), "M = 63 rows is below SM90_MIN_M = 64"),
        (lambda: cl.sm90_dx_choice(dy, w[:, :90], a[:, :90]), "N = 64 and K = 90 must be multiples of 8"),
        (lambda: cl.sm90_dx_choice(dy[:, :60], w[:60], a), "N = 60 and K = 96 must be multiples of 8"),
        (lambda: cl.sm90_dx_choice(dy.t().contiguous().t(), w, a), "dy is not TMA-readable"),
        (lambda: cl.sm90_dx_choice(dy, torch.empty(64, 104, dtype=w.dtype)[:, 1:97], a), "weight is not TMA-readable"),
        (lambda: cl.sm90_dx_choice(dy.float(), w.float(), a.float()), "dtype float32 is not supported"),
        (lambda: cl.sm90_dx_choice(dy, w, rand(129, 96, dtype=torch.bfloat16)), "rank 129 exceeds"),
        (lambda: cl.sm90_dx_choice(dy, w.half(), a), "differ in dtype"),
    ]
    for call, needle in refusals:
        tile, why = call()
        assert tile is None and why.startswith("sm90 dx: ") and needle in why, (needle, why)
    hopper_dx(capability=(8, 0))
    assert cl.sm90_dx_choice(dy, w, a) == (None, "sm90 dx: compute capability 8.0 is not sm_90")
    hopper_dx(built=False)
    assert cl.sm90_dx_choice(dy, w, a) == (None, "sm90 dx: the extension was built without the sm90 dx kernels")


def test_sm90_dx_device_is_false_off_cuda():
    assert cl.sm90_dx_device(torch.device("cpu")) is False


def _dx_tail_error(dtype, adapter_dtype, drop_lo=False, M=41, N=48, K=72, r=5, scale=0.75):
    torch.manual_seed(0)
    dy, _, a, b = _dx_operands(M, N, K, r, dtype, adapter_dtype)
    u, tail_x, tail_w = cl.dx_tail(dy, a, b, scale)
    if drop_lo:  # what a kernel that rounded scale * u to 16 bits once would compute
        tail_x = tail_x.clone()
        tail_x[:, r:2 * r] = 0
    u64 = dy.double() @ b.double()
    u_scale = dy.double().abs() @ b.double().abs()
    assert u.dtype == torch.float32 and u.shape == (M, r)
    assert ((u.double() - u64).abs() / u_scale).max() < 2 ** -14  # fp32 sums of exact products (B's halves: 2^-16)
    got = tail_x.double() @ tail_w.double()  # tensor cores: exact products, fp32 sums (K' small)
    exact = scale * u64 @ a.double()
    magnitude = scale * u64.abs() @ a.double().abs()
    return ((got - exact).abs() / magnitude).max().item(), tail_x, tail_w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype", ["same", torch.float32])
def test_dx_tail_is_fp32_accurate(dtype, adapter_dtype):
    adapter_dtype = dtype if adapter_dtype == "same" else adapter_dtype
    err, tail_x, tail_w = _dx_tail_error(dtype, adapter_dtype)
    assert err < 2 ** -14, err
    L = 3 * 5 if adapter_dtype == torch.float32 else 2 * 5
    assert tail_x.shape == (41, 16) and tail_w.shape == (16, 72) and tail_x.dtype == tail_w.dtype == dtype
    assert tail_x.is_contiguous() and tail_w.is_contiguous()      # [L8, K]: K contiguous, read MN-major like W
    assert not tail_x[:, L:].any() and not tail_w[L:].any()       # zero pad up to 8 tail columns / rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dx_tail_without_the_low_half_is_only_16_bit_accurate(dtype):
    err, _, _ = _dx_tail_error(dtype, dtype, drop_lo=True)
    assert err > 2 ** -13, err


@pytest.fixture
def emulated_dx_kernel(monkeypatch, hopper_dx):
    """cuda_lora_linear_sm90_dx replaced by its definition in float64 (dx = dy @ W + tail_x @
    tail_w, one rounding), after checking the operands the launcher hands it; records the tiles."""
    tiles = []

    def launch(dy, weight, tail_x, tail_w, dx, tile):
        assert tail_x.shape[1] == tail_w.shape[0] and tail_x.shape[1] % 8 == 0, (tail_x.shape, tail_w.shape)
        for t in (dy, weight, tail_x, tail_w, dx):
            assert cl.tma_readable(t) and t.dtype == dy.dtype
        dx.copy_((dy.double() @ weight.double() + tail_x.double() @ tail_w.double()).to(dx.dtype))
        tiles.append(tile)
    monkeypatch.setattr(cl, "_launch_sm90_dx", launch)
    return tiles


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, None), (torch.float16, torch.float32)])
def test_lora_linear_dx_launcher(emulated_dx_kernel, dtype, adapter_dtype):
    from tolerances import assert_close, poison_
    dy, w, a, b = _dx_operands(200, 64, 136, 7, dtype, adapter_dtype)
    out = poison_(torch.empty(200, 136, dtype=dtype))
    dx, u = cl.lora_linear_dx(dy, w, a, b, 0.5, out=out)
    assert dx is out and emulated_dx_kernel == [cl.SM90_TILE_128x128]
    ref = dy.double() @ w.double() + 0.5 * (dy.double() @ b.double()) @ a.double()
    assert_close(dx, ref, dtype)
    assert_close(u, dy.double() @ b.double(), torch.float32, what="u")
    # tile_kind forces a tile past the M rule, not past the rest
    dx8, _ = cl.lora_linear_dx(dy[:8], w, a, b, 0.5, tile_kind=3)
    assert emulated_dx_kernel[-1] == cl.SM90_TILE_128x256 and dx8.shape == (8, 136)
    assert cl.lora_linear_dx(dy[:8], w, a, b, 0.5) is None
    assert cl.lora_linear_dx(dy, w, a, b, 0.5, dropout=True, tile_kind=4) is None
    assert cl.lora_linear_dx(dy, w, a, b, 0.5, out=torch.empty(200, 140, dtype=dtype)[:, 1:137]) is None
    with pytest.raises(ValueError, match="tile_kind must be 0"):
        cl.lora_linear_dx(dy, w, a, b, 0.5, tile_kind=5)
    assert len(emulated_dx_kernel) == 2


def test_backward_backend_of_a_cuda_forward(monkeypatch):
    ops = importlib.import_module("lora_kernels.ops.lora_linear")
    x, a = torch.empty(4, 8, dtype=torch.float16), torch.empty(2, 8, dtype=torch.float16)
    fallback = ops.backward_backend("cuda", x, a)
    assert fallback in ("triton", "torch")                # a CPU x: never the sm90 dx
    monkeypatch.setattr(cl, "sm90_dx_device", lambda device: True)  # an sm_90 device with the dx kernels
    assert ops.backward_backend("cuda", x, a) == "cuda"
    monkeypatch.setattr(cl, "sm90_dx_device", lambda device: False)  # sm_80, or a build without them
    assert ops.backward_backend("cuda", x, a) == fallback
    assert ops.backward_backend("triton", x, a) == "triton" and ops.backward_backend("torch", x, a) == "torch"


@pytest.mark.parametrize("M,expect_sm90", [(96, True), (40, False)])
@pytest.mark.parametrize("need", ["all", "x_only", "no_x"])
def test_backward_takes_dx_from_the_sm90_kernel(emulated_dx_kernel, monkeypatch, M, expect_sm90, need):
    """lora_linear_bwd with backend "cuda" (what backward_backend gives a CUDA forward on Hopper):
    dx from the sm90 launcher where sm90_dx_choice allows (M >= 64 here), else from the fallback;
    dA, dB, dbias always from the fallback (Triton under the interpreter, or torch) -- and every
    gradient equals the torch backward's on the same inputs."""
    ops = importlib.import_module("lora_kernels.ops.lora_linear")
    from tolerances import assert_close
    dtype = torch.float16
    N, K, r, scale = 24, 40, 4, 0.5
    x, w = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype, scale=K ** -0.5)
    a, b = rand(r, K, dtype=dtype, scale=K ** -0.5), rand(N, r, dtype=dtype, scale=r ** -0.5)
    dy = rand(M, N, dtype=dtype)
    t = (x.double() @ a.double().t()).float()
    need_x, need_ab = need != "no_x", need != "x_only"
    args = (dy, x, w, a, b, t if need_ab else None, scale, 0.0, None, torch.float32 if need_ab else None)
    tb = importlib.import_module("lora_kernels.triton.lora_linear_backward")
    shrinks, real_shrink = [], tb.launch_shrink
    monkeypatch.setattr(tb, "launch_shrink", lambda *a, **k: shrinks.append(1) or real_shrink(*a, **k))
    got = ops.lora_linear_bwd(*args, "cuda", need_x, need_ab, need_ab)
    if ops._fallback_backward(x, a) == "triton" and expect_sm90 and need == "all":
        assert shrinks == []  # dA's u = dy @ B came from the sm90 launcher, not a second pass over dy
    ref = ops.lora_linear_bwd(*(g.double() if isinstance(g, torch.Tensor) and g.is_floating_point() else g
                                for g in args), "torch", need_x, need_ab, need_ab)
    assert emulated_dx_kernel == ([cl.SM90_TILE_128x128] if expect_sm90 and need_x else [])
    for g, g64, name, needed in zip(got, ref, ("dx", "dA", "dB", "dbias"), (need_x, need_ab, need_ab, need_ab)):
        if needed:
            assert_close(g, g64, dtype if name in ("dx", "dA", "dB") else torch.float32, what=name)
        else:
            assert g.numel() == 0, name
