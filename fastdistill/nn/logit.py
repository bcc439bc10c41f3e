from __future__ import annotations

import torch

from fastdistill.functional import logit as _F


class DistillLoss(torch.nn.Module):
    """Module form of :func:`fastdistill.functional.distill_loss` (same options, same maths).

    Example::

        >>> import torch
        >>> from fastdistill import nn as fdnn
        >>> loss_fn = fdnn.DistillLoss(divergence="reverse_kl", temperature=2.0)
        >>> s = torch.randn(4, 16, 100, requires_grad=True)
        >>> loss_fn(s, torch.randn(4, 16, 100), torch.randint(0, 100, (4, 16))).backward()
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "batchmean",
        scale_by_t2: bool = True,
    ) -> None:
        super().__init__()
        self.divergence = divergence
        self.beta = beta
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.scale_by_t2 = scale_by_t2

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return _F.distill_loss(
            student_logits,
            teacher_logits,
            labels,
            divergence=self.divergence,
            beta=self.beta,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            scale_by_t2=self.scale_by_t2,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, scale_by_t2={self.scale_by_t2}"
        )


class KLDivLoss(torch.nn.Module):
    """Drop-in for :class:`torch.nn.KLDivLoss` with the same arguments and semantics, fused.

    ``input`` is log-probabilities; ``target`` probabilities, or log-probabilities when ``log_target=True``.
    ``size_average`` / ``reduce`` (deprecated in torch) are not accepted.
    """

    def __init__(self, reduction: str = "mean", log_target: bool = False) -> None:
        super().__init__()
        self.reduction = reduction
        self.log_target = log_target

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _F.kl_div(input, target, reduction=self.reduction, log_target=self.log_target)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, log_target={self.log_target}"
