"""One place that decides which implementation runs an op.

Backends:
    triton  Triton kernels from ``fastdistill.kernels`` (CUDA tensors; CPU tensors only with ``TRITON_INTERPRET=1``)
    cpp     C++ CPU kernels (OpenMP) from ``fastdistill._C``
    torch   the pure-torch reference (always available)

``FASTDISTILL_BACKEND`` forces one; unset or ``auto`` picks per device: CUDA -> triton, CPU -> cpp, falling back to
torch when the preferred one is missing. A forced backend that cannot run the given tensors is a clear error.
Every op and every step of a composite op (the fused lm-head loss's dense or top-k chunk terms) decides here.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import cache

import torch

BACKENDS = ("triton", "cpp", "torch")
_ENV = "FASTDISTILL_BACKEND"
_warned = False


@cache
def load_extension():
    """Return the compiled ``fastdistill._C`` module, or None when it is not available (one warning, once).

    When the install did not build it (pip's isolated build has no torch) or it was built against another torch,
    it is compiled on first use against the loaded torch and cached (``fastdistill/_jit_ext.py``); the fallback
    (CPU ops on the pure-torch backend, CUDA ops on Triton) is only for machines without a compiler / ninja, a failed
    build, or ``FASTDISTILL_SKIP_EXT=1`` / ``FASTDISTILL_DISABLE_EXT=1``.
    """
    if os.environ.get("FASTDISTILL_DISABLE_EXT", "0") == "1":
        _warn_once(
            "FASTDISTILL_DISABLE_EXT=1: fastdistill._C is ignored; CPU ops use the pure-torch backend ('torch') and "
            "CUDA ops use Triton ('triton')."
        )
        return None
    try:
        ext = importlib.import_module("fastdistill._C")
    except ImportError as err:  # not built at install time, or built against another torch (ABI mismatch)
        from fastdistill import _jit_ext

        ext, why = _jit_ext.load_or_build()
        if ext is None:
            _warn_once(
                f"fastdistill._C is not available ({why}; import error: {err}); CPU ops use the pure-torch backend "
                "('torch') and CUDA ops use Triton ('triton')."
            )
            return None
    importlib.import_module("fastdistill.ops._extension_fakes")  # fake impls of the C++ ops (needs them loaded)
    return ext


def _warn_once(msg: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


@cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except ImportError:
        return False


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_cpp_op(name: str) -> bool:
    """True when the extension registered ``fastdistill::<name>``."""
    if load_extension() is None:
        return False
    return hasattr(torch.ops.fastdistill, name)


def requested_backend() -> str:
    value = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{_ENV}={value!r} is not a backend; expected one of {('auto',) + BACKENDS}")
    return value


@torch.compiler.assume_constant_result
def choose_backend(
    device: torch.device,
    *,
    cpp_op: str | None = None,
    backend: str | None = None,
    has_triton: bool = True,
    cpp_runs_torch: bool = False,
) -> str:
    """Pick the backend for tensors on ``device``.

    Args:
        device: where the op's inputs live.
        cpp_op: name of the extension op that implements it on CPU (None: no C++ kernel).
        backend: an explicit choice (overrides ``FASTDISTILL_BACKEND``); ``None`` or ``"auto"`` decides here.
        has_triton: False when the op has no Triton kernel (then ``auto`` on CUDA is torch, ``triton`` an error).
        cpp_runs_torch: for a step of a composite op that has no C++ kernel of its own (the top-k chunk terms of the
            fused lm-head loss): an explicit ``cpp`` runs its torch version instead of raising, so one ``backend``
            argument can be passed to the whole op.

    Under torch.compile the choice is made once at trace time and baked into the graph as a constant.
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend={backend!r} is not a string; expected one of {('auto',) + BACKENDS} or None")
    choice = (backend or requested_backend()).lower()
    if choice not in BACKENDS + ("auto",):
        raise ValueError(f"backend={choice!r} is not a backend; expected one of {('auto',) + BACKENDS}")
    on_cuda = device.type == "cuda"
    if choice == "auto":
        if on_cuda:
            return "triton" if has_triton and triton_available() else "torch"
        if cpp_op is not None and has_cpp_op(cpp_op):
            return "cpp"
        return "torch"
    if choice == "cpp" and cpp_op is None and cpp_runs_torch:
        if on_cuda:
            raise RuntimeError(f"backend 'cpp' runs on CPU tensors, got tensors on {device}")
        return "torch"
    if choice == "triton" and not has_triton:
        raise RuntimeError("backend 'triton' was requested but this op has no Triton kernel; use 'torch'")
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was requested but triton is not installed")
        if not on_cuda and not triton_interpret():
            raise RuntimeError(
                f"backend 'triton' cannot run tensors on {device} unless TRITON_INTERPRET=1 is set before import"
            )
    elif choice == "cpp":
        if on_cuda:
            raise RuntimeError(f"backend 'cpp' runs on CPU tensors, got tensors on {device}")
        if cpp_op is None or not has_cpp_op(cpp_op):
            raise RuntimeError("backend 'cpp' was requested but fastdistill._C is not built (or lacks this op)")
    return choice


def describe() -> str:
    """A one-line summary of what is available, for logs and benchmark rows."""
    ext = load_extension()
    parts = [f"torch {torch.__version__}"]
    origin = "jit" if ext is not None and getattr(ext, "__name__", "") != "fastdistill._C" else "built"
    parts.append("_C: " + (origin if ext is not None else "missing"))
    parts.append("triton: " + ("yes" if triton_available() else "no") + (" (interpret)" if triton_interpret() else ""))
    return ", ".join(parts)
