"""nn.Module drop-ins of the intermediate-representation losses (attention / relation, affinity, hints)."""

from __future__ import annotations

import torch

from fastdistill.functional import intermediate as _F


class AttentionDistillLoss(torch.nn.Module):
    """Module form of :func:`fastdistill.functional.attention_distill_loss` (MiniLM attention / MiniLMv2 relations).

    Example::

        >>> import torch
        >>> from fastdistill import nn as fdnn
        >>> loss_fn = fdnn.AttentionDistillLoss(relation_heads=8, causal=True)
        >>> sq = torch.randn(2, 4, 64, 32, requires_grad=True)
        >>> tq = torch.randn(2, 12, 64, 64)
        >>> loss_fn(sq, sq, tq, tq).backward()  # QQ relation
    """

    def __init__(
        self,
        causal: bool = False,
        scale: float | tuple[float, float] | None = None,
        relation_heads: int | None = None,
        reduction: str = "batchmean",
    ) -> None:
        super().__init__()
        self.causal = causal
        self.scale = scale
        self.relation_heads = relation_heads
        self.reduction = reduction

    def forward(
        self,
        student_q: torch.Tensor,
        student_k: torch.Tensor,
        teacher_q: torch.Tensor,
        teacher_k: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _F.attention_distill_loss(
            student_q,
            student_k,
            teacher_q,
            teacher_k,
            attention_mask=attention_mask,
            causal=self.causal,
            scale=self.scale,
            relation_heads=self.relation_heads,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"causal={self.causal}, scale={self.scale}, relation_heads={self.relation_heads}, "
            f"reduction={self.reduction!r}"
        )


class AffinityDistillLoss(torch.nn.Module):
    """Module form of :func:`fastdistill.functional.affinity_distill_loss`."""

    def __init__(self, method: str = "auto") -> None:
        super().__init__()
        self.method = method

    def forward(
        self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return _F.affinity_distill_loss(student_feat, teacher_feat, mask=mask, method=self.method)

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


class HintLoss(torch.nn.Module):
    """Module form of :func:`fastdistill.functional.hint_loss`; owns the projection when the widths differ.

    With ``student_dim != teacher_dim`` (or ``projection=True``) it holds a trainable ``nn.Linear(student_dim,
    teacher_dim, bias=False)``, so put this module's parameters in the student's optimizer.

    Example::

        >>> import torch
        >>> from fastdistill import nn as fdnn
        >>> hint = fdnn.HintLoss(64, 256, kind="cosine")
        >>> hint(torch.randn(4, 32, 64, requires_grad=True), torch.randn(4, 32, 256)).backward()
    """

    def __init__(
        self,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        kind: str = "mse",
        projection: bool | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        if projection is None:
            projection = student_dim is not None and teacher_dim is not None and student_dim != teacher_dim
        if projection and (student_dim is None or teacher_dim is None):
            raise ValueError(
                f"a projection needs student_dim and teacher_dim, got student_dim={student_dim}, "
                f"teacher_dim={teacher_dim}"
            )
        self.projection = torch.nn.Linear(student_dim, teacher_dim, bias=False) if projection else None

    def forward(
        self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return _F.hint_loss(student_feat, teacher_feat, projection=self.projection, kind=self.kind, mask=mask)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class GlimpseHintLoss(HintLoss):
    """Module form of :func:`fastdistill.functional.glimpse_hint_loss` (same options as :class:`HintLoss`)."""

    def forward(  # type: ignore[override]
        self,
        student_attn: torch.Tensor,
        student_feat: torch.Tensor,
        teacher_attn: torch.Tensor,
        teacher_feat: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _F.glimpse_hint_loss(
            student_attn,
            student_feat,
            teacher_attn,
            teacher_feat,
            projection=self.projection,
            kind=self.kind,
            mask=mask,
        )
