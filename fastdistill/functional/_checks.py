"""Input validation shared by the functional API: every message names the argument, what was given and what was
expected."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {choices}")


def check_tensor(name: str, x, *, dtypes=FLOAT_DTYPES, min_dim: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {x.dtype}; expected one of {tuple(str(d) for d in dtypes)}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, shape: bool = True) -> None:
    """Same device, dtype and (optionally) shape, else a ValueError naming both tensors."""
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; expected the same device")
    if a.dtype != b.dtype:
        raise ValueError(f"{name_a} has dtype {a.dtype} but {name_b} has dtype {b.dtype}; expected the same dtype")
    if shape and a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; expected the same shape"
        )


def check_frozen(name: str, x: torch.Tensor | None) -> None:
    """The teacher is frozen: a teacher tensor that requires grad is almost always a bug (a forgotten no_grad)."""
    if x is not None and x.requires_grad:
        raise ValueError(
            f"{name} requires grad, but the teacher is frozen and gets no gradient; compute it under "
            f"torch.no_grad() or pass {name}.detach()"
        )


def check_labels(name: str, labels: torch.Tensor | None, rows_shape: torch.Size, device: torch.device) -> None:
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name} has dtype {labels.dtype}; expected an integer dtype (e.g. torch.long)")
    if labels.numel() != rows_shape.numel() or (labels.dim() > 1 and labels.shape != rows_shape):
        raise ValueError(
            f"{name} has shape {tuple(labels.shape)}; expected {tuple(rows_shape)} (the logits' shape without the "
            f"vocabulary dimension) or a flat tensor of {rows_shape.numel()} elements"
        )
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the logits are on {device}; expected the same device")


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name}={value!r} is out of range; expected a value in {bracket}{lo}, {hi}]")
