"""Build fastdistill and its optional C++ CPU extension ``fastdistill._C`` (GPU kernels are Triton, compiled at run
time).

Environment:
    FASTDISTILL_SKIP_EXT=1     build no extension (everything falls back to Triton / the torch reference)
    MAX_JOBS                   parallel compile jobs (ninja)

The extension needs torch at build time: install with ``pip install --no-build-isolation .`` (or ``-e .``). Without
torch importable in the build environment (pip's default isolated build), the package installs without ``_C``.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def extensions():
    if _flag("FASTDISTILL_SKIP_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastdistill: torch is not importable at build time; building without fastdistill._C", file=sys.stderr)
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-std=c++20", "-march=x86-64-v2", "-ffast-math", "-fno-finite-math-only"] + openmp
    if os.uname().machine != "x86_64":
        cxx.remove("-march=x86-64-v2")
    ext = CppExtension("fastdistill._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="fastdistill",
    version="0.1.0",
    description="Kernel-accelerated knowledge distillation: fused losses, a DeepSpeed trainer, dataset distillation",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastdistill", "fastdistill.*"]) + ["fastdistill.kernels"],
    package_dir={"fastdistill.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tqdm", "triton; platform_system == 'Linux'"],
    extras_require={
        "triton": ["triton"],
        "dev": ["pytest", "pytest-timeout", "expecttest", "matplotlib", "ruff", "triton"],
        "train": [
            "deepspeed",
            "transformers",
            "accelerate",
            "gguf",
            "safetensors",
            "tensorboard",
            "tokenizers",
            "pyarrow",  # the teacher cache (Parquet shards, zstd)
        ],
        "dataset": ["scikit-learn", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastdistill=fastdistill.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
