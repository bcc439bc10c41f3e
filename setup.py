"""Build fastdistill and its optional C++ CPU extension ``fastdistill._C`` (GPU kernels are Triton, compiled at run
time).

Environment:
    FASTDISTILL_SKIP_EXT=1     build no extension now (and, when also set at run time, none on first use either)
    MAX_JOBS                   parallel compile jobs (ninja)

The extension is built here when torch is importable in the build environment (``pip install --no-build-isolation .``
or ``-e .``). In pip's default isolated build there is no torch: the package then installs without ``_C`` and ships
its C++ sources (``fastdistill/csrc``), which ``fastdistill/_jit_ext.py`` compiles against the installed torch on first
use (once, cached). The flags of both builds come from ``fastdistill/_build.py``.
"""

import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_spec():
    """fastdistill/_build.py by path: importing the package would import torch, which the build env may lack."""
    spec = importlib.util.spec_from_file_location("_fastdistill_build", os.path.join(ROOT, "fastdistill", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _load_build_spec()


def extensions():
    if B.env_flag("FASTDISTILL_SKIP_EXT"):
        return [], {}
    try:
        import torch  # noqa: F401  (the extension is built against the torch of this environment)
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "fastdistill: torch is not importable at build time (pip's isolated build); installing without "
            "fastdistill._C: it is compiled against your torch on first use",
            file=sys.stderr,
        )
        return [], {}
    cpp = B.sources("csrc")
    if not cpp:
        return [], {}
    cxx, openmp = B.cxx_flags(), B.openmp_flags()
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
    packages=find_packages(include=["fastdistill", "fastdistill.*"]) + ["fastdistill.kernels", "fastdistill.csrc"],
    # the C++ sources ship inside the package (fastdistill/csrc) for the just-in-time build of _C on first use
    package_dir={"fastdistill.kernels": "kernels", "fastdistill.csrc": "csrc"},
    package_data={"fastdistill.csrc": ["*.cpp", "*.cu", "*.h", "*.cuh"]},
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tqdm", "ninja", "triton; platform_system == 'Linux'"],
    extras_require={
        "triton": ["triton"],
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "expecttest", "matplotlib", "ruff", "triton", "trl"],
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
        "text": ["pillow"],  # fastdistill.textrec: word images rendered from Debian fonts (make data-text)
    },
    entry_points={"console_scripts": ["fastdistill=fastdistill.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
