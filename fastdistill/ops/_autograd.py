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


def reject_double_backward(op_name: str, grad_loss: torch.Tensor | None) -> None:
    """The loss ops return their gradient precomputed in the forward (closed form, no graph of it): a backward that
    receives no gradient for the loss was reached by differentiating that gradient (double backward, e.g. after
    ``torch.autograd.grad(..., create_graph=True)``), which these ops do not support. Say so instead of failing
    inside."""
    if grad_loss is None:
        raise RuntimeError(
            f"{op_name} does not support double backward (differentiating its gradient, e.g. after "
            "torch.autograd.grad(..., create_graph=True)): the gradient is computed in closed form in the forward "
            "pass. Use the plain-autograd reference (fastdistill.reference / fastdistill.ops.*_ref) for higher-order "
            "derivatives"
        )
