"""Packaging: `kernels/` ships as `fastdistill.kernels` (no top-level `kernels`); the wheel installs and imports."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.cpu_only
def test_wheel_layout_and_import(tmp_path):
    env = dict(os.environ, FASTDISTILL_SKIP_EXT="1")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            ROOT,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fastdistill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastdistill/kernels/__init__.py" in names
    assert "fastdistill/kernels/distill_loss.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` package would clash on PyPI"
    assert "fastdistill/functional/__init__.py" in names and "fastdistill/ops/distill_loss.py" in names
    # install into a throwaway target and import it from there (not from the checkout)
    target = tmp_path / "site"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert inst.returncode == 0, inst.stderr[-3000:]
    code = (
        "import fastdistill, fastdistill.kernels, torch; import fastdistill.functional as FD; "
        "print(fastdistill.__file__); s = torch.randn(3, 5, requires_grad=True); "
        "FD.distill_loss(s, torch.randn(3, 5), backend='torch').backward(); print('ok')"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(target)),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert str(target) in run.stdout and run.stdout.strip().endswith("ok")
