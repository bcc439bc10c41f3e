"""Packaging: `kernels/` ships as `fastdistill.kernels` (no top-level `kernels`) and `csrc/` as `fastdistill/csrc` (the
sources of the just-in-time build); the wheel installs and imports; a plain `pip install .` gets the C++ kernels."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

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
    # the C++ sources (and headers) ship for the just-in-time build of _C
    for name in os.listdir(os.path.join(ROOT, "csrc")):
        if name.endswith((".cpp", ".h", ".cu")):
            assert f"fastdistill/csrc/{name}" in names, name
    assert not any(n.startswith("csrc/") for n in names)
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


# ------------------------------------------------------------------------------- a plain `pip install .` (isolated)
_FIRST_USE = """
import sys, time, torch
import fastdistill
assert "site-packages" in fastdistill.__file__, fastdistill.__file__  # the installed copy, not the checkout
import fastdistill.functional as FD
from fastdistill import _backend
start = time.perf_counter()
backend = _backend.choose_backend(torch.device("cpu"), cpp_op="distill_loss_rows")
seconds = time.perf_counter() - start
s, t = torch.randn(6, 301, dtype=torch.float64), torch.randn(6, 301, dtype=torch.float64)
s32 = s.float().requires_grad_(True)
loss = FD.distill_loss(s32, t.float(), divergence="jsd", beta=0.3)
loss.backward()
from fastdistill import reference as R
s64 = s.clone().requires_grad_(True)
ref = R.distill_loss(s64, t, None, divergence="jsd", beta=0.3)  # float64 maths
ref.backward()
torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
print(f"backend={backend} first_use_s={seconds:.1f} describe={_backend.describe()} ext={sys.modules['fastdistill._C']}")
"""


def _site_mirror(tmp_path):
    """A directory of links to this interpreter's site-packages entries, without fastdistill itself: a fresh venv
    that points at it (a .pth) gets torch, numpy, ninja... without downloading them, and pip cannot touch the
    originals (they are outside that venv)."""
    import site

    mirror = tmp_path / "parent-site"
    mirror.mkdir()
    for sp in site.getsitepackages():
        for entry in sorted(os.listdir(sp)):
            low = entry.lower()
            if "fastdistill" in low or low.endswith(".pth") or (mirror / entry).exists():
                continue
            os.symlink(os.path.join(sp, entry), mirror / entry)
    return mirror


def _copy_source(tmp_path):
    """The checkout's files as a user's clone has them (no build outputs, venvs, caches or compiled _C)."""
    import shutil

    def ignore(directory, names):
        skip = {".git", ".venv", ".cache", "build", "dist", "runs", "__pycache__", ".pytest_cache"}
        out = {n for n in names if n in skip or n.endswith((".so", ".egg-info"))}
        return out | {n for n in names if os.path.islink(os.path.join(directory, n))}  # worktree-only links

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=ignore)
    return src


@pytest.mark.slow
@pytest.mark.cpu_only
def test_plain_pip_install_builds_the_kernels_on_first_use(tmp_path):
    """`pip install .` with pip's build isolation (no torch in the build environment, so no _C at install time) into a
    fresh venv; then two processes at once use distill_loss on CPU: one compiles _C just in time into the cache, the
    other waits for it, both run the C++ kernels and match float64; a third process imports the cached build."""
    import time

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    (Path(purelib) / "parent_site.pth").write_text(str(_site_mirror(tmp_path)) + "\n")
    src = _copy_source(tmp_path)
    ext_dir = tmp_path / "ext-cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTDISTILL_", "PYTHON", "TRITON_", "PIP_"))}
    # the fresh venv first; the ninja binary of the suite's venv stands in for the one `pip install ninja` would put
    # in the fresh venv (its package is found through the mirror, so pip does not install it again)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), os.path.dirname(sys.executable), env.get("PATH", "")])
    env.update(FASTDISTILL_EXT_DIR=str(ext_dir), MAX_JOBS=env.get("MAX_JOBS", "2"), PIP_DISABLE_PIP_VERSION_CHECK="1")

    start = time.perf_counter()
    inst = subprocess.run(
        [py, "-m", "pip", "install", "-v", str(src)], capture_output=True, text=True, env=env, timeout=900
    )
    install_s = time.perf_counter() - start
    log = inst.stdout + inst.stderr
    assert inst.returncode == 0, log[-4000:]
    assert "torch is not importable at build time" in log, "the build saw torch: pip's build isolation did not happen"
    installed = Path(purelib) / "fastdistill"
    assert (installed / "csrc" / "fastdistill.cpp").exists() and (installed / "csrc" / "checks.h").exists()
    assert not list(installed.glob("_C*.so")), "the isolated build was not expected to compile _C"

    # two processes at once (DeepSpeed ranks): one builds, the other waits for its lock; both run the C++ kernels
    start = time.perf_counter()
    procs = [
        subprocess.Popen([py, "-c", _FIRST_USE], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]  # fmt: skip
    try:
        outs = [p.communicate(timeout=1500) for p in procs]
    finally:
        for p in procs:  # on a timeout or an error, no compiler is left running
            if p.poll() is None:
                p.kill()
                p.wait(timeout=60)
    build_s = time.perf_counter() - start
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
        assert "backend=cpp" in out and "_C: jit" in out, out + err[-2000:]
        assert "not available" not in err, err[-2000:]
    building = [err for _, err in outs if "fastdistill: building the C++ kernels for torch" in err]
    assert len(building) == 1, [err[-1000:] for _, err in outs]
    assert str(ext_dir) in building[0]

    start = time.perf_counter()
    again = subprocess.run([py, "-c", _FIRST_USE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    cached_s = time.perf_counter() - start
    assert again.returncode == 0 and "backend=cpp" in again.stdout, again.stderr[-3000:]
    assert "building" not in again.stderr
    print(f"\npip install: {install_s:.0f} s; first use (JIT build): {build_s:.0f} s; cached: {cached_s:.1f} s")
