"""Triton launcher of the fused ``kl_div`` row kernel (contract in ``fastdistill/ops/kl_div.py``)."""

from __future__ import annotations

import contextlib

import torch

from fastdistill.kernels.kl_div import kl_div_rows_kernel
from fastdistill.ops.distill_loss_triton import launch_config


def kl_div_rows_triton(
    input: torch.Tensor, target: torch.Tensor, grad_scale: torch.Tensor, log_target: bool, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of the pointwise KL (float32 [N]) and, when ``need_grad``, ``-grad_scale * t`` ([N, V]).

    Args:
        input: log-probabilities [N, V], last dim contiguous, any row stride.
        target: probabilities (log-probabilities with ``log_target``), same shape and dtype.
        grad_scale: float32 tensor of one element on the device (the reduction's 1 / denominator).
        log_target: whether ``target`` holds log-probabilities.
        need_grad: when False, no [N, V] memory is written and an empty gradient is returned.

    Example::

        >>> rows, grad = kl_div_rows_triton(x, t, torch.full((1,), 1 / x.shape[0], device=x.device), False, True)
    """
    if input.dim() != 2 or input.shape != target.shape:
        raise ValueError(
            f"input and target must be [N, V] of the same shape, got {tuple(input.shape)} and {tuple(target.shape)}"
        )
    if input.stride(-1) != 1 or target.stride(-1) != 1:
        raise ValueError(f"input and target need a unit last-dim stride, got {input.stride()} and {target.stride()}")
    if grad_scale.numel() != 1 or grad_scale.dtype != torch.float32:
        raise ValueError(f"grad_scale must be a float32 tensor of one element, got {grad_scale.dtype}")
    N, V = input.shape
    loss_rows = torch.empty(N, dtype=torch.float32, device=input.device)
    grad = torch.empty((N, V), dtype=input.dtype, device=input.device) if need_grad else input.new_empty(0)
    if N == 0 or V == 0:
        return loss_rows.zero_(), grad
    block, num_warps = launch_config(V, input.device)
    # launch on the tensors' GPU, not on whichever device is current
    with torch.cuda.device(input.device) if input.device.type == "cuda" else contextlib.nullcontext():
        kl_div_rows_kernel[(N,)](
            input,
            target,
            grad_scale.reshape(1).to(input.device),
            loss_rows,
            grad if need_grad else None,
            input.stride(0),
            target.stride(0),
            V,  # the gradient is allocated contiguous
            V,
            LOG_TARGET=bool(log_target),
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return loss_rows, grad
