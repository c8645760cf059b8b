"""Determinism and concurrency (issue "Reliability"): every op gives bitwise-identical results
across repeated runs; on the GPU, ops run on the caller's current stream and from two streams and
two threads at once."""
import threading

import pytest
import torch

import lora_kernels
from cases import make_lora_inputs
from tolerances import assert_close


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_linear_is_bitwise_deterministic(backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    inp = make_lora_inputs(None, 40, 36, 6, torch.float32, lead=(3, 11))
    first = lora_kernels.lora_linear(*inp.args(), backend=backend)
    for _ in range(3):
        assert torch.equal(lora_kernels.lora_linear(*inp.args(), backend=backend), first)


def test_lora_linear_gradients_are_bitwise_deterministic():
    inp = make_lora_inputs(33, 20, 18, 4, torch.float32)
    grads = []
    for _ in range(3):
        a = inp.lora_a.clone().requires_grad_(True)
        b = inp.lora_b.clone().requires_grad_(True)
        x = inp.x.clone().requires_grad_(True)
        lora_kernels.lora_linear(x, inp.weight, a, b, inp.scale, inp.bias).square().sum().backward()
        grads.append((x.grad, a.grad, b.grad))
    for later in grads[1:]:
        assert all(torch.equal(g, h) for g, h in zip(grads[0], later))


@pytest.mark.gpu
def test_gpu_forward_is_bitwise_deterministic():
    inp = make_lora_inputs(4096, 1024, 4096, 16, torch.bfloat16, device="cuda")
    first = lora_kernels.lora_linear(*inp.args())
    for _ in range(5):
        assert torch.equal(lora_kernels.lora_linear(*inp.args()), first)


@pytest.mark.gpu
def test_gpu_runs_on_the_callers_stream():
    """On a side stream, the op is queued behind a long sleep and a write of x: if it ran on any
    other stream it would read x before that write and match the old x."""
    inp = make_lora_inputs(512, 768, 1024, 16, torch.bfloat16, device="cuda")
    x_new = torch.randn_like(inp.x)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time before the write below
        inp.x.copy_(x_new)
        y = lora_kernels.lora_linear(*inp.args())
    torch.cuda.synchronize()
    assert_close(y, inp.reference64(), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_two_streams_at_once():
    inputs = [make_lora_inputs(512, 768, 1024, 16, torch.bfloat16, device="cuda") for _ in range(2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = [None, None]
    torch.cuda.synchronize()
    for _ in range(10):  # interleave launches so both streams have work queued at once
        for i, (inp, s) in enumerate(zip(inputs, streams)):
            with torch.cuda.stream(s):
                outs[i] = lora_kernels.lora_linear(*inp.args())
    torch.cuda.synchronize()
    for inp, out in zip(inputs, outs):
        assert_close(out, inp.reference64(), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_two_threads_at_once():
    inputs = [make_lora_inputs(256, 512, 512, 8, torch.float16, device="cuda") for _ in range(2)]
    results, errors = [None, None], []

    def work(i):
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                for _ in range(20):
                    results[i] = lora_kernels.lora_linear(*inputs[i].args())
                torch.cuda.current_stream().synchronize()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for inp, out in zip(inputs, results):
        assert_close(out, inp.reference64(), torch.float16)


# ---------------------------------------------------------------------------------------------
# Every other op: bitwise-identical repeats (CPU lane: torch and the interpreter; GPU lane: the card)
# ---------------------------------------------------------------------------------------------

def _repeat_equal(fn, times=3):
    first = fn()
    for _ in range(times - 1):
        again = fn()
        assert all(torch.equal(a, b) for a, b in zip(first, again)), "results differ between runs"


def _merge_runs(device, backend, dtype):
    from cases import make_merge_inputs
    inp = make_merge_inputs(40, 72, 8, dtype, device=device)
    def run():
        w = inp.weight.clone()
        lora_kernels.merge_(w, inp.lora_a, inp.lora_b, inp.scale, backend=backend)
        residual = lora_kernels.MergeResidual()
        w2 = inp.weight.clone()
        lora_kernels.merge_(w2, inp.lora_a, inp.lora_b, inp.scale, residual=residual, backend=backend)
        return w, w2, residual.codes
    return run


def _multi_runs(device, backend, dtype):
    from cases import make_multi_inputs
    inp = make_multi_inputs(70, 48, 40, 6, 16, dtype, device=device, dist="zipf", ranks="mixed")
    def run():
        index = inp.index()
        y = lora_kernels.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales,
                                           inp.bias, inp.ranks, backend=backend)
        t = lora_kernels.lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks, backend=backend)
        y2 = torch.nn.functional.linear(inp.x, inp.weight)
        lora_kernels.lora_expand_(y2, t, inp.lora_b, index, inp.ranks, backend=backend)
        return y, t, y2
    return run


@pytest.mark.parametrize("make_runs", [_merge_runs, _multi_runs], ids=["merge", "multi"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_other_ops_are_bitwise_deterministic(make_runs, backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    _repeat_equal(make_runs("cpu", backend, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("make_runs", [_merge_runs, _multi_runs], ids=["merge", "multi"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_other_ops_are_bitwise_deterministic(make_runs, dtype):
    _repeat_equal(make_runs("cuda", "auto", dtype), times=5)
