"""Test lanes.

CPU lane (no CUDA): Triton kernels run under the interpreter, so TRITON_INTERPRET=1 is set here,
before any kernel module is imported. GPU lane (`pytest -m gpu`): tests marked `gpu` run on the
card; elsewhere they are skipped with a reason.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The interpreter is slow and the CPU lane runs on 2 cores: keep hypothesis's example counts small
# and its deadline off (interpreter first calls take a second). The default CPU profile draws from
# a fixed seed, so a CI run is reproducible; HYPOTHESIS_PROFILE=explore draws fresh examples.
settings.register_profile("cpu", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=200, deadline=None, print_blob=True)
settings.register_profile("gpu", max_examples=60, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if HAS_CUDA else "cpu"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (GPU lane: pytest -m gpu on an H100/H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def interpreter_device():
    """The device the CPU-lane Triton tests run on: the CPU, under the interpreter."""
    if not INTERPRETER:
        pytest.skip("the CPU-lane Triton tests need TRITON_INTERPRET=1 (set automatically without CUDA)")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
