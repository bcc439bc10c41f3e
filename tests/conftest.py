"""Test set-up: the device under test, and Triton's interpreter on machines without a GPU.

``FASTDISTILL_TEST_DEVICE=cuda`` runs the suite's device-parametrized tests on the GPU (``make gpu-check``); without
CUDA the Triton kernels run under ``TRITON_INTERPRET=1`` at small sizes, so the GPU code is still exercised.
"""

import os

import torch

if not torch.cuda.is_available():
    # must be set before any @triton.jit function is created (fastdistill.kernels is imported lazily by the ops)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402

warnings.filterwarnings("ignore", message="fastdistill._C is not available")

DEVICE = torch.device(os.environ.get("FASTDISTILL_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: runs only on the CPU (skipped by make gpu-check)")
    config.addinivalue_line("markers", "slow: long-running (multi-process, real models)")


@pytest.fixture
def device():
    return DEVICE


def available_backends(device: torch.device = DEVICE, *, cpp_op: str | None = None, cuda_op: str | None = None):
    """Backends that can run ``cpp_op`` on ``device`` here (torch always; triton on CUDA or in the interpreter; cpp
    where the extension is built). ``cuda_op`` is accepted and ignored: there is no CUDA C++ backend any more."""
    from fastdistill import _backend

    out = ["torch"]
    if _backend.triton_available() and (device.type == "cuda" or _backend.triton_interpret()):
        out.append("triton")
    if device.type == "cpu" and cpp_op and _backend.has_cpp_op(cpp_op):
        out.append("cpp")
    return out
