"""The compiled extension fastdistill._C: it imports and registers its ops next to the Python custom ops of the same
namespace."""

from __future__ import annotations

import glob
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


# ---------------------------------------------------------------------------- just-in-time build: the fallbacks
# (the build itself, from a plain `pip install .` in a fresh venv, is tests/test_packaging.py)
_BLOCK_C = """
import sys, warnings
class _Block:  # as if the install had not built fastdistill._C
    def find_spec(self, name, path=None, target=None):
        if name == "fastdistill._C":
            raise ImportError("No module named 'fastdistill._C' (blocked by the test)")
sys.meta_path.insert(0, _Block())
warnings.simplefilter("always")
import torch
from fastdistill import _backend
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    choice = _backend.choose_backend(torch.device("cpu"), cpp_op="distill_loss_rows")
    _backend.choose_backend(torch.device("cpu"), cpp_op="distill_loss_rows")
msgs = [str(w.message) for w in caught if "fastdistill._C" in str(w.message)]
print("choice=" + choice)
print("warnings=%d" % len(msgs))
for m in msgs:
    print("warning: " + m)
"""


def _run_blocked(tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("FASTDISTILL_")}
    full.update(FASTDISTILL_EXT_DIR=str(tmp_path / "ext"), **env)
    out = subprocess.run(
        [sys.executable, "-c", _BLOCK_C], capture_output=True, text=True, cwd=ROOT, env=full, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_jit_build_without_a_compiler_falls_back_with_one_warning(tmp_path):
    out = _run_blocked(tmp_path, CXX="fastdistill-no-such-compiler")
    assert "choice=torch" in out and "warnings=1" in out, out
    assert "no C++ compiler" in out and "fastdistill-no-such-compiler" in out and "'torch'" in out, out
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").rglob("*.so"))


def test_jit_build_failure_is_reported_and_remembered(tmp_path):
    """A compiler that fails: one warning with the reason and the log's path; the next process does not retry."""
    fake = tmp_path / "bin" / "failing-c++"
    fake.parent.mkdir()
    fake.write_text(  # answers torch's version probe, fails every compile
        '#!/bin/sh\ncase "$*" in *--version*|*-dumpversion*|*-dumpfullversion*) exec c++ "$@";; esac\n'
        "echo 'fatal error: simulated compiler failure' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    out = _run_blocked(tmp_path, CXX=str(fake))
    assert "choice=torch" in out and "warnings=1" in out, out
    assert "just-in-time build failed (" in out and "build-failed.log" in out, out
    (log,) = (tmp_path / "ext").rglob("build-failed.log")
    assert "simulated compiler failure" in log.read_text()
    again = _run_blocked(tmp_path, CXX=str(fake))
    assert "failed before" in again and str(log) in again, again


def test_skip_ext_at_run_time_builds_nothing(tmp_path):
    out = _run_blocked(tmp_path, FASTDISTILL_SKIP_EXT="1")
    assert "choice=torch" in out and "FASTDISTILL_SKIP_EXT=1" in out, out
    assert not (tmp_path / "ext").exists()


# ------------------------------------------------------------------------------------- GPU code generation, no GPU
def _triton_kernels() -> set[str]:
    """Every launchable Triton kernel in kernels/: the public @triton.jit functions (helpers start with '_')."""
    import ast

    names = set()
    for path in glob.glob(os.path.join(ROOT, "kernels", "*.py")):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                if any("jit" in ast.unparse(d) for d in node.decorator_list):
                    names.add(node.name)
    return names


@pytest.mark.slow
@pytest.mark.cpu_only
def test_every_triton_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    """The interpreter accepts code that the compiler rejects (e.g. non-constexpr globals), and register pressure
    only shows in real code generation: benchmarks/triton_aot.py compiles every kernel, at the block sizes and warps
    its launcher picks, for sm_80 and sm_90 (no GPU: Triton ships ptxas) and fails on any spill (there is no
    allow-list), on shared memory over the architecture's limit, and on bf16 rows not read with 16-byte vector
    loads."""
    import csv

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton install has no bundled ptxas")
    out_csv = tmp_path / "triton_aot.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(ROOT, "benchmarks", "triton_aot.py")
    out = subprocess.run(
        [sys.executable, script, "--arch", "80", "90", "--csv", str(out_csv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    expected = _triton_kernels()
    assert len(expected) >= 7, expected
    for arch in ("sm_80", "sm_90"):
        compiled = {r["kernel"] for r in rows if r["arch"] == arch}
        assert expected <= compiled, f"{arch}: no SPECS entry in benchmarks/triton_aot.py for {expected - compiled}"
    for r in rows:
        # no allow-list: the script fails on any spill, and the CSV says so too
        assert int(r["spill_bytes"]) == 0 and int(r["stack_bytes"]) == 0, r
        assert 0 < int(r["registers"]) <= 255, r
    # every input dtype the attention launcher accepts on the GPU is compiled at its own configuration
    attention = {r["launch"].split()[1] for r in rows if r["kernel"] == "attention_distill_dk_kernel"}
    assert {"bf16", "fp16", "fp32"} <= attention, attention
