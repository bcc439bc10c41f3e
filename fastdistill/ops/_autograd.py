"""Helpers shared by the custom ops' autograd registrations."""

from __future__ import annotations

import torch


def is_exactly_one(grad_output: torch.Tensor) -> bool:
    """True when ``grad_output`` is a plain eager tensor equal to 1, so backward can hand over the gradient
    precomputed in the forward without a multiply. Under torch.compile / tracing (fake or functional tensors) the
    value is unknown, so it answers False and the multiply stays in the graph (where it fuses)."""
    if torch.compiler.is_compiling() or type(grad_output) is not torch.Tensor:
        return False
    return grad_output.numel() == 1 and bool(grad_output == 1)
