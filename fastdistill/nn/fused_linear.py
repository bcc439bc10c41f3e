from __future__ import annotations

import torch

from fastdistill.functional import fused_linear as _F


class FusedLinearDistillLoss(torch.nn.Module):
    """Module form of :func:`fastdistill.functional.fused_linear_distill_loss` (same options, same maths).

    Example::

        >>> import torch
        >>> from fastdistill import nn as fdnn
        >>> loss_fn = fdnn.FusedLinearDistillLoss(divergence="jsd", hard_weight=0.5, soft_weight=0.5)
        >>> xs = torch.randn(2, 8, 32, requires_grad=True); ws = torch.randn(300, 32, requires_grad=True)
        >>> xt = torch.randn(2, 8, 64); wt = torch.randn(300, 64)
        >>> loss_fn(xs, ws, xt, wt, torch.randint(0, 300, (2, 8))).backward()
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        hard_weight: float = 0.0,
        soft_weight: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "batchmean",
        chunk_size: int | None = None,
        return_parts: bool = False,
        topk_tail: str = "renormalize",
        topk_values: str = "logprobs",
        scale_by_t2: bool = True,
        accum_fp32: bool = False,
    ) -> None:
        super().__init__()
        self.divergence = divergence
        self.beta = beta
        self.temperature = temperature
        self.hard_weight = hard_weight
        self.soft_weight = soft_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.return_parts = return_parts
        self.topk_tail = topk_tail
        self.topk_values = topk_values
        self.scale_by_t2 = scale_by_t2
        self.accum_fp32 = accum_fp32

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ):
        return _F.fused_linear_distill_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            teacher_topk=teacher_topk,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            divergence=self.divergence,
            beta=self.beta,
            temperature=self.temperature,
            hard_weight=self.hard_weight,
            soft_weight=self.soft_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
            return_parts=self.return_parts,
            topk_tail=self.topk_tail,
            topk_values=self.topk_values,
            scale_by_t2=self.scale_by_t2,
            accum_fp32=self.accum_fp32,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
            f"hard_weight={self.hard_weight}, soft_weight={self.soft_weight}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, chunk_size={self.chunk_size}, topk_tail={self.topk_tail!r}"
        )
