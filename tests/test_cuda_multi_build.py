"""CPU lane: the CUDA multi-adapter ops (shrink, expand, fused linear) in the extension:
registration, schemas, CPU tensors rejected with a sentence; and the launcher's choices. The
extension tests skip where no extension was built."""
import pytest
import torch

from cases import make_multi_inputs
from lora_kernels.cuda import loader as cuda
from lora_kernels.cuda import multi_lora as cuda_multi

OPS = {
    "cuda_lora_shrink": "lora_kernels::cuda_lora_shrink(Tensor x, Tensor[] lora_a_stacks, Tensor scales, "
                        "Tensor? ranks, Tensor work, Tensor sorted_tokens, int item_m, Tensor(a!) t) -> ()",
    "cuda_lora_expand": "lora_kernels::cuda_lora_expand(Tensor(a!) y, Tensor t, Tensor[] lora_b_stacks, "
                        "Tensor? ranks, Tensor work, Tensor sorted_tokens, int item_m, int offset=0) -> ()",
    "cuda_multi_lora_linear": "lora_kernels::cuda_multi_lora_linear(Tensor x, Tensor weight, Tensor? bias, "
                              "Tensor lora_b_stack, Tensor t, Tensor? ranks, Tensor sorted_tokens, "
                              "Tensor sorted_adapter, Tensor slot_start, Tensor(a!) y, int tile_kind=0, "
                              "int tiles_per_cta=0) -> ()",
}


@pytest.fixture(scope="module")
def extension():
    problem = cuda.aot_problem()
    if problem is not None:
        pytest.skip(f"no usable ahead-of-time build here: {problem}")
    cuda.load(allow_jit=False)


def test_multi_ops_registered_with_their_schemas(extension):
    for name, schema in OPS.items():
        assert str(getattr(torch.ops.lora_kernels, name).default._schema) == schema


def _bf16_inputs():
    inp = make_multi_inputs(6, 5, 8, 3, 4, torch.bfloat16, dist="none10", ranks=[4, 1, 2])
    return inp, inp.index()


def test_multi_ops_on_cpu_tensors_raise_a_sentence(extension):
    inp, index = _bf16_inputs()
    with pytest.raises(RuntimeError, match=r"cuda_lora_shrink: x is on cpu, but the CUDA kernel needs CUDA tensors"):
        torch.ops.lora_kernels.cuda_lora_shrink(inp.x, [inp.lora_a], inp.scales, inp.ranks, index.work(16),
                                                index.sorted_tokens, 16, torch.empty(1, 6, 4))
    y = torch.randn(6, 5, dtype=torch.bfloat16)
    before = y.clone()
    with pytest.raises(RuntimeError, match=r"cuda_lora_expand: y is on cpu, but the CUDA kernel needs CUDA tensors"):
        torch.ops.lora_kernels.cuda_lora_expand(y, torch.randn(1, 6, 4), [inp.lora_b], inp.ranks, index.work(64),
                                                index.sorted_tokens, 64, 0)
    assert torch.equal(y, before)
    with pytest.raises(RuntimeError, match=r"cuda_multi_lora_linear: x is on cpu, but the CUDA kernel needs CUDA tensors"):
        torch.ops.lora_kernels.cuda_multi_lora_linear(inp.x, inp.weight, inp.bias, inp.lora_b, torch.randn(6, 4),
                                                      inp.ranks, index.sorted_tokens, index.sorted_adapter,
                                                      index.slot_start, torch.empty(6, 5, dtype=torch.bfloat16))


def test_input_reasons():
    assert cuda_multi.multi_input_reason(torch.bfloat16, 128) is None
    assert cuda_multi.multi_input_reason(torch.float16, 512) is None
    assert cuda_multi.multi_input_reason(torch.float16, 1, torch.float32) is None
    assert cuda_multi.multi_input_reason(torch.float32, 16) == (
        "cuda: dtype float32 is not supported by the CUDA multi-adapter kernels (float16, bfloat16); "
        "float32 runs on backend='triton'")
    assert cuda_multi.multi_input_reason(torch.bfloat16, 513) == "cuda: r_max 513 exceeds the CUDA multi-adapter kernels' limit of 512"
    assert cuda_multi.multi_input_reason(torch.bfloat16, 8, torch.float64) == "cuda: t must be float32, got float64"


def test_shrink_work_list_choice(monkeypatch):
    """64-token pieces only with at least 2 per SM (as the Triton launcher), else 16."""
    monkeypatch.setattr(cuda_multi, "_num_sms", lambda device: 132)
    assert cuda_multi.shrink_item_m(1, torch.device("cuda")) == 16
    assert cuda_multi.shrink_item_m(64 * 263, torch.device("cuda")) == 16
    assert cuda_multi.shrink_item_m(64 * 263 + 1, torch.device("cuda")) == 64


def test_auto_keeps_triton_first():
    from lora_kernels.ops.multi_lora import AUTO_PREFERENCE
    assert AUTO_PREFERENCE == ("triton", "cuda")
