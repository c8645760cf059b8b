"""GPU lane (`pytest -m gpu`, an H100/H200): the Hopper fused forward (csrc/lora_linear/lora_linear_sm90.cuh)
on the card against the float64 reference -- both tiles, bf16 and fp16, M/N/K tails, fp32
adapters (the 3r tail), bias dtypes, every element written (poisoned outputs), CUDA graph
capture -- and the dispatch: sm_90 takes it where sm90_plan says, the rest keeps the sm_80 kernel.
The backward's dx on the same kernel (B operands MN-major) likewise, and through autograd: a
CUDA forward's backward takes dx from it where sm90_dx_choice says, dA/dB/dbias from Triton.

Skipped on other GPUs (the sm_80 kernel's own tests are tests/test_cuda_gpu.py); on an sm_90 GPU
an extension without the sm90 kernels fails here with the reason.
"""
import importlib

import pytest
import torch

import lora_kernels
from cases import make_lora_inputs
from cases import require_hopper_with_sm90_kernels
from cases import assert_lora_linear_fwd_matches_float64 as _check
from cases import cuda_lora_linear_fwd as _fwd
from tolerances import assert_close, poison_

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def hopper():
    require_hopper_with_sm90_kernels()




SHAPES = [  # (M, N, K, r): suite shapes and tails (M % 128, N % 256, K % 64, a partial 2x1 cluster)
    (4096, 4096, 4096, 16), (1024, 14336, 4096, 64), (512, 4096, 4096, 128), (333, 1000, 1232, 7),
    (130, 264, 136, 1), (64, 8, 8, 3), (257, 4104, 4096, 33),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile_kind", [3, 4, 5])
@pytest.mark.parametrize("M,N,K,r", SHAPES)
def test_sm90_forward(dtype, tile_kind, M, N, K, r):
    inp = make_lora_inputs(M, N, K, r, dtype, device="cuda")
    y, t = _fwd(inp, tile_kind=tile_kind)
    _check(inp, y, t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", ["none", "same", "fp32"])
def test_sm90_fp32_adapters_and_bias(dtype, bias):
    inp = make_lora_inputs(300, 520, 768, 24, dtype, device="cuda", adapter_dtype=torch.float32, bias=bias != "none")
    if bias == "fp32":
        inp.bias = inp.bias.float()
    y, t = _fwd(inp, tile_kind=4, save_t=bias != "same")
    _check(inp, y, t if bias != "same" else None)


def test_sm90_lora_term_is_fp32_accurate():
    """W ~ -scale * B @ A, so that x @ W.T cancels most of the LoRA term and y is ~1% of it: a
    kernel that rounded t to bf16 once would be off by ~2^-9 of the term, ~20% of y; the hi/lo
    tail keeps it to ~2^-16 of the term."""
    torch.manual_seed(0)
    inp = make_lora_inputs(256, 512, 512, 16, torch.bfloat16, device="cuda", bias=False)
    cancel = -inp.scale * inp.lora_b.double() @ inp.lora_a.double()
    inp.weight = (cancel + 0.01 * torch.randn_like(cancel) * 512 ** -0.5).to(torch.bfloat16)
    y, _ = _fwd(inp, tile_kind=4)
    ref = inp.reference64()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 2 ** -5, err


def test_dispatch_picks_sm90_for_prefill_and_sm80_elsewhere(monkeypatch):
    from lora_kernels.cuda import lora_linear as cl
    used = []
    real = cl._launch_sm90
    monkeypatch.setattr(cl, "_launch_sm90", lambda *a: used.append(a[-1]) or real(*a))
    for M, N, K, expect in ((512, 4096, 1024, [cl.SM90_TILE_128x128]), (4096, 4096, 512, [cl.SM90_TILE_128x256]),
                            (256, 4096, 512, [cl.SM90_TILE_128x64]),
                            (16, 4096, 1024, []), (512, 4096, 1020, []), (512, 4100, 1024, [])):
        used.clear()
        inp = make_lora_inputs(M, N, K, 8, torch.bfloat16, device="cuda")
        y, t = _fwd(inp)
        _check(inp, y, t)
        assert used == expect, (M, N, K, used)


def test_sm90_misaligned_x_falls_back():
    from lora_kernels.cuda import lora_linear as cl
    inp = make_lora_inputs(256, 512, 264, 8, torch.float16, device="cuda")
    inp.x = torch.cat([torch.zeros(1, dtype=inp.x.dtype, device="cuda"), inp.x.flatten()])[1:].view(256, 264)
    assert not cl.tma_readable(inp.x)
    y, t = _fwd(inp)
    _check(inp, y, t)


def test_sm90_cuda_graph_capture_and_replay():
    inp = make_lora_inputs(384, 1024, 512, 16, torch.bfloat16, device="cuda", adapter_dtype=torch.float32)
    static_x = inp.x.clone()
    run = lambda: lora_kernels.lora_linear(static_x, inp.weight, inp.lora_a, inp.lora_b, inp.scale, inp.bias,  # noqa: E731
                                           backend="cuda")
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()  # warm-up (library load, shared-memory opt-in, device facts) outside the capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = run()
        for _ in range(3):
            new_x = torch.randn_like(static_x)
            static_x.copy_(new_x)
            poison_(static_y)
            g.replay()
            torch.cuda.synchronize()
            inp.x = new_x
            _check(inp, static_y)


def test_sm90_op_rejects_bad_input_with_a_sentence():
    x = torch.randn(128, 64, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(64, 64, dtype=torch.bfloat16, device="cuda")
    tail = torch.randn(128, 8, dtype=torch.bfloat16, device="cuda")
    tail_w = torch.randn(64, 8, dtype=torch.bfloat16, device="cuda")
    y = torch.full((128, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    op = torch.ops.lora_kernels.cuda_lora_linear_sm90_fwd
    with pytest.raises(RuntimeError, match=r"cuda_lora_linear_sm90_fwd: tail_w must have shape \[64, 8\]"):
        op(x, w, tail, tail_w[:, :4], None, y, 0)
    with pytest.raises(RuntimeError, match=r"x must start on a 16-byte boundary"):
        op(torch.randn(128 * 64 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(128, 64), w, tail, tail_w, None, y, 0)
    with pytest.raises(RuntimeError, match=r"bias must be float32"):
        op(x, w, tail, tail_w, torch.zeros(64, dtype=torch.bfloat16, device="cuda"), y, 0)
    with pytest.raises(RuntimeError, match=r"tile must be 0 \(128x256\), 1 \(128x128\) or 2 \(128x64\)"):
        op(x, w, tail, tail_w, None, y, 3)
    assert torch.isnan(y).all()  # nothing written


# ---- the backward's dx: dx = dy @ W + scale * (dy @ B) @ A on lora_linear_sm90_dx_*.cu ----------

@pytest.fixture(scope="module")
def dx_built():
    from lora_kernels.cuda import lora_linear as cl
    if not cl.sm90_dx_built():
        pytest.fail("the CUDA extension was built without the sm90 dx kernels (lora_linear_sm90_dx_*.cu)")
    return cl


def _dx_case(M, N, K, r, dtype, adapter_dtype=None, seed=0):
    torch.manual_seed(seed)
    inp = make_lora_inputs(M, N, K, r, dtype, device="cuda", adapter_dtype=adapter_dtype, bias=False)
    dy = torch.randn(M, N, dtype=torch.float64, device="cuda").to(dtype)
    return inp, dy


def _dx_reference(inp, dy):
    """(float64 dx, the same expression in the inputs' own dtypes: the error yardstick)."""
    w, a, b = inp.weight, inp.lora_a, inp.lora_b
    ref = dy.double() @ w.double() + inp.scale * (dy.double() @ b.double()) @ a.double()
    plain = dy @ w + (inp.scale * (dy.to(b.dtype) @ b) @ a).to(dy.dtype)
    return ref, plain


DX_SHAPES = [  # (M, N, K, r): dx is [M, K], reduced over N; tails of M % 128, K % 256, N % 64, ranks 1..128
    (4096, 4096, 4096, 16), (1024, 14336, 4096, 64), (2048, 4096, 14336, 8), (512, 4096, 4096, 128),
    (333, 1000, 1232, 7), (130, 264, 136, 1), (64, 8, 8, 3), (257, 4096, 4104, 33),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile_kind", [3, 4])
@pytest.mark.parametrize("M,N,K,r", DX_SHAPES)
def test_sm90_dx(dx_built, dtype, tile_kind, M, N, K, r):
    cl = dx_built
    inp, dy = _dx_case(M, N, K, r, dtype)
    out = poison_(torch.empty(M, K, dtype=dtype, device="cuda"))
    dx, u = cl.lora_linear_dx(dy, inp.weight, inp.lora_a, inp.lora_b, inp.scale, out=out, tile_kind=tile_kind)
    torch.cuda.synchronize()
    assert dx is out
    ref, plain = _dx_reference(inp, dy)
    assert_close(dx, ref, dtype, torch_out=plain, what="dx")
    assert_close(u, dy.double() @ inp.lora_b.double(), torch.float32, what="u")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,r", [(300, 520, 768, 24), (1024, 4096, 1024, 64), (96, 136, 72, 5)])
def test_sm90_dx_fp32_adapters(dx_built, dtype, M, N, K, r):
    """fp32 A and B: u = dy @ B_hi + dy @ B_lo, the 3r tail [u_hi|u_lo|u_hi] @ [A_hi; A_hi; A_lo]."""
    cl = dx_built
    inp, dy = _dx_case(M, N, K, r, dtype, adapter_dtype=torch.float32)
    out = poison_(torch.empty(M, K, dtype=dtype, device="cuda"))
    dx, _ = cl.lora_linear_dx(dy, inp.weight, inp.lora_a, inp.lora_b, inp.scale, out=out, tile_kind=4)
    torch.cuda.synchronize()
    ref, _ = _dx_reference(inp, dy)
    assert_close(dx, ref, dtype, what="dx")


def test_sm90_dx_lora_term_is_fp32_accurate(dx_built):
    """W ~ -scale * B @ A, so that dy @ W cancels most of dx's LoRA term (dx ~1% of it): a u
    rounded to bf16 once would be off by ~2^-9 of the term, ~20% of dx; the hi/lo tail keeps it
    to ~2^-16 of the term."""
    cl = dx_built
    inp, dy = _dx_case(256, 512, 512, 16, torch.bfloat16)
    cancel = -inp.scale * inp.lora_b.double() @ inp.lora_a.double()
    inp.weight = (cancel + 0.01 * torch.randn_like(cancel) * 512 ** -0.5).to(torch.bfloat16)
    dx, _ = cl.lora_linear_dx(dy, inp.weight, inp.lora_a, inp.lora_b, inp.scale, tile_kind=4)
    ref, _ = _dx_reference(inp, dy)
    err = ((dx.double() - ref).norm() / ref.norm()).item()
    assert err < 2 ** -5, err


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("M", [1024, 40])
def test_fused_lora_linear_backward_on_cuda_takes_dx_from_sm90(dx_built, monkeypatch, dtype, adapter_dtype, M):
    """Gradcheck-style: FusedLoRALinear(backend="cuda") forward and backward on the card against
    the float64 reference's autograd -- dx from the sm90 kernel at M = 1024 (sm90_dx_choice), from
    the Triton backward at M = 40 (below SM90_MIN_M); dA, dB, dbias from Triton either way."""
    cl = dx_built
    from cases import reference_with_grads
    from lora_kernels import FusedLoRALinear
    ops = importlib.import_module("lora_kernels.ops.lora_linear")
    tiles = []
    real = cl._launch_sm90_dx
    monkeypatch.setattr(cl, "_launch_sm90_dx", lambda *a: tiles.append(a[-1]) or real(*a))
    torch.manual_seed(0)
    layer = FusedLoRALinear(1032, 776, 16, lora_alpha=32, device="cuda", dtype=dtype, adapter_dtype=adapter_dtype,
                            backend="cuda")
    with torch.no_grad():
        layer.lora_B.normal_(0, 16 ** -0.5)
        layer.bias.normal_()
    layer.bias.requires_grad_(True)
    x = torch.randn(M, 1032, device="cuda", dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert ops.backward_backend("cuda", x, layer.lora_A) == "cuda"
    assert tiles == ([cl.sm90_dx_choice(dy, layer.weight, layer.lora_A)[0]] if M >= cl.SM90_MIN_M else [])
    from cases import LoraInputs
    inp = LoraInputs(x.detach(), layer.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling,
                     layer.bias.detach())
    _, grads64 = reference_with_grads(inp, dy)
    for name, got in (("x", x.grad), ("lora_a", layer.lora_A.grad), ("lora_b", layer.lora_B.grad),
                      ("bias", layer.bias.grad)):
        assert got.dtype == {"x": dtype, "bias": dtype}.get(name, adapter_dtype or dtype), name
        assert_close(got, grads64[name], dtype, what=f"grad {name}")


def test_sm90_dx_falls_back_where_it_cannot_run(dx_built, monkeypatch):
    """A misaligned dy (an offset view), N % 8 != 0: the backward's dx comes from Triton, right."""
    cl = dx_built
    ops = importlib.import_module("lora_kernels.ops.lora_linear")
    calls = []
    monkeypatch.setattr(cl, "_launch_sm90_dx", lambda *a: calls.append(a))
    for M, N, K, offset in ((256, 264, 512, 1), (256, 260, 512, 0)):
        inp, dy = _dx_case(M, N, K, 8, torch.bfloat16)
        if offset:
            dy = torch.cat([torch.zeros(1, dtype=dy.dtype, device="cuda"), dy.flatten()])[1:].view(M, N)
        tile, why = cl.sm90_dx_choice(dy, inp.weight, inp.lora_a)
        assert tile is None and ("TMA-readable" in why if offset else "multiples of 8" in why), why
        t = (inp.x.double() @ inp.lora_a.double().t()).float()
        dx, _, _, _ = ops.lora_linear_bwd(dy, inp.x, inp.weight, inp.lora_a, inp.lora_b, t, inp.scale, 0.0, None,
                                          None, "cuda", True, True, True)
        assert_close(dx, _dx_reference(inp, dy)[0], torch.bfloat16, what="dx")
    assert calls == []


def test_sm90_dx_op_rejects_bad_input_with_a_sentence(dx_built):
    dy = torch.randn(128, 64, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(64, 96, dtype=torch.bfloat16, device="cuda")
    tail = torch.randn(128, 8, dtype=torch.bfloat16, device="cuda")
    tail_w = torch.randn(8, 96, dtype=torch.bfloat16, device="cuda")
    dx = torch.full((128, 96), float("nan"), dtype=torch.bfloat16, device="cuda")
    op = torch.ops.lora_kernels.cuda_lora_linear_sm90_dx
    with pytest.raises(RuntimeError, match=r"cuda_lora_linear_sm90_dx: tail_w must have shape \[8, 96\]"):
        op(dy, w, tail, tail_w[:4], dx, 0)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[64, 96\]"):
        op(dy, w[:32], tail, tail_w, dx, 0)
    with pytest.raises(RuntimeError, match=r"dy must start on a 16-byte boundary"):
        op(torch.randn(128 * 64 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(128, 64), w, tail, tail_w, dx, 0)
    with pytest.raises(RuntimeError, match=r"tail_x must have dy's dtype"):
        op(dy, w, tail.half(), tail_w, dx, 0)
    with pytest.raises(RuntimeError, match=r"tile must be 0 \(128x256\) or 1 \(128x128\)"):
        op(dy, w, tail, tail_w, dx, 2)
    assert torch.isnan(dx).all()  # nothing written

