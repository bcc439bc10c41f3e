"""Just-in-time build of ``fastdistill._C`` on first use, when the install did not build it.

A plain ``pip install .`` builds in an isolated environment without torch, so the wheel has no ``_C``; it ships the
C++ sources instead (``fastdistill/csrc``). On first use this module compiles them with
``torch.utils.cpp_extension.load`` (ninja) against the torch that is loaded, with the flags of ``setup.py`` (both read
``fastdistill/_build.py``), into a cache directory keyed by torch / Python version and a hash of the sources and
flags, as DeepSpeed's op builders do::

    $FASTDISTILL_EXT_DIR  or  $TORCH_EXTENSIONS_DIR/fastdistill  or  ~/.cache/torch_extensions/fastdistill
        torch2.13.0+cpu-py311-cpu-<hash>/fastdistill_C.so

Later processes import the cached library directly (no compiler or ninja needed then). A file lock (``flock``, which
the kernel releases when its holder dies) makes concurrent processes, e.g. DeepSpeed ranks, build once: the others
wait and import the result. A failed build is remembered in its directory (``build-failed.log``), so every later
process falls back at once with the same reason instead of compiling again; delete that file to retry.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import shutil
import sys
import sysconfig
import time
from types import ModuleType

import torch

from fastdistill import _build

EXT_NAME = "fastdistill_C"
ENV_DIR = "FASTDISTILL_EXT_DIR"
_OK = "build-ok"
_FAILED = "build-failed.log"
# CPU seconds of one C++ translation unit (csrc/kl_div_cpu.cpp: 16 s user time; the kernel files take longer), for the
# progress line only
_SECONDS_PER_SOURCE = 25


def _package_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def cache_root() -> str:
    """The directory under which builds are cached (``FASTDISTILL_EXT_DIR``, else ``TORCH_EXTENSIONS_DIR``/
    fastdistill, else torch's default extensions root/fastdistill)."""
    if os.environ.get(ENV_DIR):
        return os.path.abspath(os.path.expanduser(os.environ[ENV_DIR]))
    from torch.utils.cpp_extension import get_default_build_root

    return os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(), "fastdistill")


def _plan() -> dict | None:
    """Sources, flags and the cache directory of this torch; None when no C++ sources are found."""
    csrc = _build.find_csrc(_package_dir())
    if csrc is None:
        return None
    cpp = _build.sources(csrc)
    cflags = _build.cxx_flags()
    h = hashlib.sha256()
    for path in _build.source_files(csrc):
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(repr((cflags, sysconfig.get_config_var("EXT_SUFFIX"), os.uname().machine)).encode())
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-cpu-{h.hexdigest()[:16]}"
    return {
        "csrc": csrc,
        "sources": cpp,
        "cflags": cflags,
        "dir": os.path.join(cache_root(), tag),
    }


def _library(directory: str) -> str:
    return os.path.join(directory, EXT_NAME + (".pyd" if sys.platform == "win32" else ".so"))


def _import(directory: str) -> ModuleType:
    """Import the built library as ``fastdistill._C`` (its init function is ``PyInit_fastdistill_C``)."""
    spec = importlib.util.spec_from_file_location(EXT_NAME, _library(directory))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return _register(module)


def _register(module: ModuleType) -> ModuleType:
    """Make ``import fastdistill._C`` return the just-in-time built module."""
    import fastdistill

    sys.modules["fastdistill._C"] = module
    fastdistill._C = module
    return module


@contextlib.contextmanager
def _exclusive(path: str):
    """An exclusive lock on ``path`` for the block; released by the OS if this process dies while holding it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's own lock file in the build directory still serialises builds
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _find_ninja() -> bool:
    """ninja on PATH, or the one the ``ninja`` wheel installed next to this Python (a venv whose bin/ is not on PATH):
    then that directory is put on PATH, where torch's build looks for it."""
    if shutil.which("ninja"):
        return True
    candidates = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError):
        import ninja

        candidates.insert(0, ninja.BIN_DIR)
    for directory in candidates:
        if directory and shutil.which("ninja", path=directory):
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return True
    return False


def _missing_tools() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler: {cxx!r} is not on PATH (install g++ or clang, or set CXX)"
    if not _find_ninja():
        return "ninja is not installed (pip install ninja)"
    return None


def _estimate_seconds(n_sources: int) -> int:
    jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    return _SECONDS_PER_SOURCE * math.ceil(n_sources / max(1, min(jobs, n_sources)))


def load_or_build() -> tuple[ModuleType | None, str]:
    """``(module, "")`` with the cached or freshly built extension, or ``(None, why)`` when it cannot be had.

    Honours ``FASTDISTILL_SKIP_EXT=1`` (no build at run time either).
    """
    if _build.env_flag("FASTDISTILL_SKIP_EXT"):
        return None, "FASTDISTILL_SKIP_EXT=1: no just-in-time build"
    plan = _plan()
    if plan is None:
        searched = " or ".join(_build.csrc_dirs(_package_dir()))
        return None, f"it was not built at install time and its C++ sources are not in {searched}"
    directory = plan["dir"]
    if os.path.exists(os.path.join(directory, _OK)):  # built before: no compiler or ninja needed
        return _import(directory), ""
    missing = _missing_tools()
    if missing:
        return None, f"it was not built at install time and cannot be built here: {missing}"
    os.makedirs(directory, exist_ok=True)
    with _exclusive(os.path.join(directory, "fastdistill.lock")):
        if os.path.exists(os.path.join(directory, _OK)):  # another process built it while this one waited
            return _import(directory), ""
        failed = os.path.join(directory, _FAILED)
        if os.path.exists(failed):
            return None, f"its just-in-time build failed before (log: {failed}; delete that file to retry)"
        return _build_locked(plan, failed)


def _build_locked(plan: dict, failed: str) -> tuple[ModuleType | None, str]:
    from torch.utils.cpp_extension import load

    directory = plan["dir"]
    # torch's own lock file stays behind when a builder is killed and would make every later build wait forever;
    # under our lock nobody else is building in this directory, so a leftover one is stale
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(directory, "lock"))
    print(
        f"fastdistill: building the C++ kernels for torch {torch.__version__} (once, about "
        f"{_estimate_seconds(len(plan['sources']))} s) into {directory}",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    try:
        module = load(
            name=EXT_NAME,
            sources=plan["sources"],
            extra_cflags=plan["cflags"],
            extra_ldflags=_build.openmp_flags(),
            extra_include_paths=[plan["csrc"]],
            build_directory=directory,
            with_cuda=False,
            is_python_module=True,
            verbose=False,
        )
    except Exception as err:  # a compiler error, a missing header, a killed compiler: remember it, fall back
        with open(failed, "w") as f:
            f.write(f"{type(err).__name__}: {err}\n")
        last = [line for line in str(err).splitlines() if line.strip()][-3:]
        return None, f"its just-in-time build failed ({' | '.join(last)}; full log: {failed})"
    with open(os.path.join(directory, _OK), "w") as f:
        f.write(f"built in {time.perf_counter() - start:.1f} s\n")
    return _register(module), ""
