"""The compiled extension fastdistill._C: it imports and registers its ops next to the Python custom ops of the same
namespace."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastdistill import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_ext = pytest.mark.skipif(
    _backend.load_extension() is None,
    reason="fastdistill._C is not built (MAX_JOBS=2 python setup.py build_ext --inplace, or FASTDISTILL_SKIP_EXT=1 "
    "was set)",
)


@needs_ext
def test_extension_imports_and_registers_ops():
    import fastdistill._C as ext

    assert ext.cpu_capability() in ("avx2", "default")
    for name in ("distill_loss_rows", "kl_div_rows"):
        assert _backend.has_cpp_op(name), name
        op = getattr(torch.ops.fastdistill, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name
    schema = str(torch.ops.fastdistill.distill_loss_rows.default._schema)
    assert "Tensor? labels" in schema and "bool need_grad" in schema
    assert "float ce_scale=0." in schema and "float soft_scale=1." in schema


@needs_ext
def test_extension_coexists_with_python_custom_ops():
    """The extension's TORCH_LIBRARY(fastdistill) and the Python custom ops (torch.library FRAGMENTs of the same
    namespace) load together, in either order, in one fresh process."""
    code = (
        "import sys, torch\n"
        "order = sys.argv[1]\n"
        "if order == 'python_first':\n"
        "    import fastdistill.ops.distill_loss, fastdistill.ops.kl_div\n"
        "    import fastdistill._C\n"
        "else:\n"
        "    import fastdistill._C\n"
        "    import fastdistill.ops.distill_loss, fastdistill.ops.kl_div\n"
        "ops = torch.ops.fastdistill\n"
        "for name in ('distill_loss', 'kl_div', 'distill_loss_rows', 'kl_div_rows'):\n"
        "    getattr(ops, name)\n"
        "s, t = torch.randn(3, 5), torch.randn(3, 5)\n"
        "rows, grad, ce = ops.distill_loss_rows(s, t, None, torch.ones(1), 0, 0.0, 1.0, -100, 1.0, True)\n"
        "assert rows.shape == (3,) and grad.shape == (3, 5)\n"
        "print('ok')\n"
    )
    for order in ("python_first", "extension_first"):
        out = subprocess.run([sys.executable, "-c", code, order], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0 and out.stdout.strip().endswith("ok"), f"{order}:\n{out.stderr}"


@needs_ext
def test_fake_impls_registered():
    """load_extension registers the fake impls (fastdistill/ops/_extension_fakes.py): FakeTensor can trace the ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s, t = torch.empty(4, 9), torch.empty(4, 9)
        rows, grad, ce = torch.ops.fastdistill.distill_loss_rows(
            s, t, None, torch.ones(1), 0, 0.0, 1.0, -100, 1.0, True
        )
        assert rows.shape == (4,) and rows.dtype == torch.float32 and grad.shape == (4, 9) and ce.numel() == 0
        labels = torch.zeros(4, dtype=torch.long)
        _, _, ce = torch.ops.fastdistill.distill_loss_rows(
            s, t, labels, torch.ones(1), 0, 0.0, 1.0, -100, 1.0, True, 1.0
        )
        assert ce.shape == (4,) and ce.dtype == torch.float32
        rows, grad = torch.ops.fastdistill.kl_div_rows(s, t, torch.ones(1), False, False)
        assert rows.shape == (4,) and grad.numel() == 0
