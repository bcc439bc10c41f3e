"""Fused drop-in of torch.nn.functional.kl_div for the reducing modes.

Row kernel contract (Triton launcher, C++ op ``fastdistill::kl_div_rows``, torch fallback), input/target [N, V]:

    loss_rows[i] = sum_j  t_ij (log t_ij - x_ij)     (t = exp(target) when log_target; 0 where t_ij = 0)   float32 [N]
    grad[i, j]   = -grad_scale * t_ij                                                                    input dtype

``grad_scale`` is a float32 tensor of one element; an empty ``grad`` when ``need_grad`` is False.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdistill import _backend
from fastdistill.divergences import REDUCTION_ID
from fastdistill.ops._autograd import is_exactly_one

REDUCTIONS = ("none", "batchmean", "sum", "mean")  # torch.nn.functional.kl_div's; ids from REDUCTION_ID


def _rows_torch(input, target, grad_scale, log_target, need_grad):
    x = input.float()
    p = target.float().exp() if log_target else target.float()
    log_p = target.float() if log_target else torch.log(p)
    rows = torch.where(p == 0, torch.zeros_like(p), p * (log_p - x)).sum(-1)  # NaN targets stay NaN
    grad = (-p * grad_scale).to(input.dtype) if need_grad else input.new_empty(0)
    return rows, grad


def kl_div_rows(input, target, grad_scale, log_target: bool, need_grad: bool, backend: str):
    args = (input, target, grad_scale, log_target, need_grad)
    if backend == "triton":
        from fastdistill.ops.kl_div_triton import kl_div_rows_triton

        return kl_div_rows_triton(*args)
    if backend == "cpp":
        return torch.ops.fastdistill.kl_div_rows(*args)
    return _rows_torch(*args)


@torch.library.custom_op("fastdistill::kl_div", mutates_args=())
def kl_div_op(
    input: torch.Tensor, target: torch.Tensor, reduction: int, log_target: bool, need_grad: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d input) for reduction in (batchmean, sum, mean), from one fused pass."""
    V = input.shape[-1] if input.dim() else 1
    x = input.reshape(-1, V)
    t = target.reshape(-1, V)
    x = x if x.stride(-1) == 1 else x.contiguous()
    t = t if t.stride(-1) == 1 else t.contiguous()
    if reduction == REDUCTION_ID["batchmean"]:
        denom = input.shape[0] if input.dim() else 1
    elif reduction == REDUCTION_ID["mean"]:
        denom = input.numel()
    else:
        denom = 1
    scale = 1.0 / denom if denom else float("nan")
    grad_scale = torch.full((1,), scale, dtype=torch.float32, device=input.device)
    rows, grad = kl_div_rows(x, t, grad_scale, log_target, need_grad, backend)
    loss = rows.sum() * scale
    return loss, grad


@kl_div_op.register_fake
def _(input, target, reduction, log_target, need_grad, backend):
    return input.new_empty((), dtype=torch.float32), input.new_empty(input.shape if need_grad else (0,))


def _setup_context(ctx, inputs, output):
    # the second output (the precomputed gradient) never gets a gradient itself: without this, autograd would
    # materialize a zero [N, V] tensor for it in backward
    ctx.set_materialize_grads(False)
    ctx.shape = inputs[0].shape
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _unused):
    (grad,) = ctx.saved_tensors
    if not is_exactly_one(grad_loss):
        grad = grad * grad_loss.to(grad.dtype)
    return grad.reshape(ctx.shape), None, None, None, None, None


kl_div_op.register_autograd(_backward, setup_context=_setup_context)


def kl_div(input: torch.Tensor, target: torch.Tensor, reduction: str, log_target: bool, backend: str | None):
    if target.requires_grad or input.dim() == 0:
        return F.kl_div(input, target, reduction=reduction, log_target=log_target)
    if reduction == "none":  # the output is itself [N, V]: nothing to fuse; same zero-probability rule as the kernels
        p = target.exp() if log_target else target
        log_p = target if log_target else torch.log(target)
        return p * torch.where(p == 0, torch.zeros_like(input), log_p - input)
    resolved = _backend.choose_backend(input.device, cpp_op="kl_div_rows", backend=backend)
    need_grad = torch.is_grad_enabled() and input.requires_grad
    loss, _ = kl_div_op(input, target, REDUCTION_ID[reduction], log_target, need_grad, resolved)
    return loss.to(input.dtype)
