"""Test lanes.

CPU lane (no CUDA): Triton kernels run under the interpreter, so TRITON_INTERPRET=1 is set here,
before any kernel module is imported, and the interpreter's bfloat16 tl.dot is fixed
(tests/interpreter_fixes.py) so that the bf16 kernels are checked before a GPU runs them. GPU
lane (`pytest -m gpu`): tests marked `gpu` run on the card; elsewhere they are skipped with a
reason.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402


def _interpreter_numpy_problem():
    """triton < 3.8's interpreter calls int() on 1-element arrays, a TypeError since numpy 2.4
    (measured: triton 3.6 + numpy 2.5 fails 282 CPU-lane tests). The test extra pins numpy < 2.4;
    an environment that missed the pin is stopped here with the reason, not with 282 failures."""
    import numpy
    import triton
    version = lambda v: tuple(int(p) for p in v.split("+")[0].split(".")[:2])  # noqa: E731
    if version(triton.__version__) < (3, 8) and version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter needs numpy < 2.4, found numpy "
                f"{numpy.__version__}: pip install 'numpy<2.4' (pyproject.toml's test extra pins it)")
    return None


if INTERPRETER:
    _problem = _interpreter_numpy_problem()
    if _problem:
        raise pytest.UsageError(_problem)
    from interpreter_fixes import fix_bf16  # noqa: E402
    fix_bf16()

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
