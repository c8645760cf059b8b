"""CPU lane: the CUDA multi-adapter ops (shrink, expand, fused linear) in the extension:
registration, schemas, CPU tensors rejected with a sentence; and the launcher's choices. The
extension tests skip where no extension was built."""
import pytest
import torch

from cases import make_multi_inputs
from lora_kernels import reference
from lora_kernels.cuda import loader as cuda
from lora_kernels.cuda import multi_lora as cuda_multi

OPS = {
    "cuda_lora_shrink": "lora_kernels::cuda_lora_shrink(Tensor x, Tensor[] lora_a_stacks, Tensor scales, "
                        "Tensor? ranks, Tensor work, Tensor sorted_tokens, int item_m, Tensor(a!) t, "
                        "int row_split=1) -> ()",
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


def test_split_decode_shrink_choice():
    """Batches of <= 64 tokens with 16-token pieces run each piece as 4 CTAs; others as one."""
    assert cuda_multi.shrink_row_split(16, 16) == 4
    assert cuda_multi.shrink_row_split(64, 16) == 4
    assert cuda_multi.shrink_row_split(65, 16) == 1
    assert cuda_multi.shrink_row_split(16, 64) == 1


def test_auto_keeps_triton_first():
    from lora_kernels.ops.multi_lora import AUTO_PREFERENCE
    assert AUTO_PREFERENCE == ("triton", "cuda")


class _FakeCudaOps:
    """Stands in for torch.ops.lora_kernels' CUDA shrink / expand (the extension's C++ op checks
    are the GPU lane's): records each launch and computes it with the float64 reference on the
    CPU, asserting the launcher's contract (1..4 slices, one set of A strides, t rows disjoint
    with unit column stride)."""

    def __init__(self, ids):
        self.ids, self.shrinks, self.expands = ids, [], []

    def cuda_lora_shrink(self, x, stacks, scales, ranks, work, sorted_tokens, item_m, t, row_split):
        assert row_split == cuda_multi.shrink_row_split(x.shape[0], item_m)
        assert 1 <= len(stacks) <= 4 and all(a.stride() == stacks[0].stride() for a in stacks)
        assert t.shape[0] == len(stacks) and cuda_multi._t_rows_disjoint(t)
        self.shrinks.append(len(stacks))
        for s, a in enumerate(stacks):
            t[s].copy_(reference.lora_shrink(x.double(), a.double(), self.ids, scales.double(), ranks))

    def cuda_lora_expand(self, y, t, stacks, ranks, work, sorted_tokens, item_m, offset):
        assert 1 <= len(stacks) <= 4 and t.shape[0] == len(stacks)
        self.expands.append((len(stacks), offset))
        for s, b in enumerate(stacks):
            view = y[:, offset:offset + b.shape[1]]
            view.copy_(reference.lora_expand_(view.double(), t[s].double(), b.double(), self.ids, ranks))
            offset += b.shape[1]


def test_cuda_launcher_groups_slices_into_launches_of_four(monkeypatch):
    """lora_kernels.cuda.multi_lora hands slice lists to one shrink and one expand launch per 4
    slices (6 slices: 4 + 2, the second expand starting after the first four slices' columns);
    A stacks with other strides start a launch of their own; an `out` whose rows the kernel
    cannot write in place (non-unit column stride) goes through a dense copy."""
    from lora_kernels import AdapterIndex
    M, K, L, R, widths, offset = 9, 12, 3, 4, [5, 3, 3, 4, 2, 6], 2
    inp = make_multi_inputs(M, 4, K, L, R, torch.float32, dist="none10", ranks=[4, 0, 2], poison_padding=False)
    fake = _FakeCudaOps(inp.token_adapter)
    monkeypatch.setattr(cuda_multi.loader, "load", lambda: None)
    monkeypatch.setattr(torch.ops, "lora_kernels", fake)
    index = AdapterIndex.from_token_adapters(inp.token_adapter, L)
    a_stacks = [torch.randn(L, R, K) for _ in widths]
    b_stacks = [torch.randn(L, n, R) for n in widths]
    t = cuda_multi.multi_lora_shrink(inp.x, a_stacks, index, inp.scales, inp.ranks, item_m=16)
    assert t.shape == (6, M, R) and fake.shrinks == [4, 2]
    expected_t = torch.stack([reference.lora_shrink(inp.x.double(), a.double(), inp.token_adapter,
                                                    inp.scales.double(), inp.ranks) for a in a_stacks])
    assert torch.allclose(t.double(), expected_t)
    y0 = torch.randn(M, offset + sum(widths) + 1)
    y = cuda_multi.multi_lora_expand_(y0.clone(), t, b_stacks, index, inp.ranks, offset=offset)
    assert fake.expands == [(4, offset), (2, offset + sum(widths[:4]))]
    expected = y0.double().clone()
    col = offset
    for s, b in enumerate(b_stacks):
        expected[:, col:col + b.shape[1]] = reference.lora_expand_(y0[:, col:col + b.shape[1]].double(),
                                                                   t[s].double(), b.double(), inp.token_adapter,
                                                                   inp.ranks)
        col += b.shape[1]
    assert torch.allclose(y.double(), expected, atol=1e-5)
    # a stack laid out otherwise (rows padded) splits the group; a column-strided out is copied into
    fake.shrinks.clear()
    odd = torch.cat([a_stacks[1], torch.randn(L, R, 3)], dim=2)[:, :, :K]
    out = torch.full((M, R, 3), float("nan")).permute(2, 0, 1)  # [3, M, R], column stride 3
    assert not cuda_multi._t_rows_disjoint(out)
    cuda_multi.multi_lora_shrink(inp.x, [a_stacks[0], odd, a_stacks[2]], index, inp.scales, inp.ranks, out=out,
                                 item_m=16)
    assert fake.shrinks == [1, 1, 1]
    assert torch.allclose(out.double(), expected_t[:3])
    # the single-stack form keeps its [M, R] t and calls the same ops with one slice
    fake.shrinks.clear()
    t1 = cuda_multi.multi_lora_shrink(inp.x, a_stacks[0], index, inp.scales, inp.ranks, item_m=16)
    assert t1.shape == (M, R) and fake.shrinks == [1]


def test_t_rows_disjoint_rule():
    t = torch.empty(2, 5, 8)
    assert cuda_multi._t_rows_disjoint(t)
    assert cuda_multi._t_rows_disjoint(torch.empty(5, 2, 8).transpose(0, 1))  # [S, M, R] stored [M, S, R]
    assert cuda_multi._t_rows_disjoint(torch.empty(2, 5, 11)[:, :, :8])       # rows padded
    assert not cuda_multi._t_rows_disjoint(torch.empty(8).expand(2, 5, 8))    # every row one memory
    assert not cuda_multi._t_rows_disjoint(torch.empty(2, 8, 5).transpose(1, 2))  # column stride 5


# ---------------------------------------------------------------------------------------------
# The kernels as built for sm_80 (the mma.sync path every GPU of the AOT build runs): no local
# memory. ptxas -v on csrc/multi_lora/multi_lora_kernels.cu (torch-free: about 20 s on 2 cores).
# ---------------------------------------------------------------------------------------------

MULTI_KERNELS = 10  # shrink 2 dtypes x 2 tiles, expand 2 dtypes, fused linear 2 dtypes x 2 tiles


@pytest.mark.slow
def test_multi_kernels_do_not_spill_on_sm80(tmp_path):
    import re
    import subprocess
    from pathlib import Path
    from lora_kernels import _toolkit
    home, how = _toolkit.find_toolkit()
    if home is None:
        pytest.skip(f"no CUDA toolkit: {how}")
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    cmd = [str(home / "bin" / "nvcc"), "-std=c++17", "-O3", "-lineinfo", "-gencode", "arch=compute_80,code=sm_80",
           "-Xptxas", "-v", f"-I{csrc}", "-c", str(csrc / "multi_lora" / "multi_lora_kernels.cu"),
           "-o", str(tmp_path / "multi_lora_kernels.o")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    kernels = re.findall(r"Compiling entry function '(\S+)' for 'sm_80'\n.*\n\s+(\d+) bytes stack frame, "
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads\nptxas info\s+: Used (\d+) registers",
                         done.stderr)
    print("sm_80 multi kernels (registers):", [(name[15:70], int(regs)) for name, *_, regs in kernels])
    assert len(kernels) == MULTI_KERNELS, done.stderr[-4000:]
    assert all((stack, st, ld) == ("0", "0", "0") for _, stack, st, ld, _ in kernels), done.stderr[-4000:]
