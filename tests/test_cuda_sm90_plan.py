"""CPU lane: the host side of the Hopper fused forward -- which kernel and tile a problem gets
(lora_kernels.cuda.lora_linear.sm90_plan and the launcher's choice), and the numerics of the LoRA
tail the sm90 kernel adds as extra K blocks (16-bit hi/lo halves of t), checked in float64."""
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
