"""How ``fastdistill._C`` is compiled: the one specification that ``setup.py`` (install time) and the just-in-time build
on first use (``fastdistill/_jit_ext.py``) share, so both produce the same extension.

Imports nothing but the standard library at module level: ``setup.py`` loads this file by path, in build environments
that may have no torch.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

SOURCE_SUFFIXES = (".cpp", ".h")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def csrc_dirs(package_dir: str) -> list[str]:
    """Where the C++ sources may be, first match wins: ``fastdistill/csrc`` (shipped inside an installed wheel) and
    ``csrc/`` next to the package (a source checkout or an editable install)."""
    return [os.path.join(package_dir, "csrc"), os.path.join(os.path.dirname(package_dir), "csrc")]


def find_csrc(package_dir: str) -> str | None:
    for path in csrc_dirs(package_dir):
        if glob.glob(os.path.join(path, "*.cpp")):
            return path
    return None


def sources(csrc: str) -> list[str]:
    """The extension's C++ sources, sorted (the GPU kernels are Triton, compiled at run time)."""
    return sorted(glob.glob(os.path.join(csrc, "*.cpp")))


def source_files(csrc: str) -> list[str]:
    """Every file the build reads (sources and headers): what the just-in-time cache key hashes."""
    return sorted(p for p in glob.glob(os.path.join(csrc, "*")) if p.endswith(SOURCE_SUFFIXES))


def openmp_flags() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def cxx_flags() -> list[str]:
    flags = ["-O3", "-std=c++20", "-march=x86-64-v2", "-ffast-math", "-fno-finite-math-only"] + openmp_flags()
    if platform.machine() != "x86_64":
        flags.remove("-march=x86-64-v2")
    return flags
