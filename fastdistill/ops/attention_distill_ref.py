"""Materialized pure-torch references of the intermediate-representation losses (attention-distribution KL,
affinity), shared by tests and benchmarks. They form the full [B, H, L, L] / [B, L, L] maps: fine for checking, the
memory cost the fused paths avoid.
"""

from __future__ import annotations

import torch


def valid_keys(attention_mask: torch.Tensor | None, causal: bool, B: int, L: int, device) -> torch.Tensor:
    """Boolean [B, 1, L, L] (query i, key j) of the keys each query may attend to."""
    keep = torch.ones(B, 1, L, L, dtype=torch.bool, device=device)
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, :]
    if causal:
        keep = keep & torch.ones(L, L, dtype=torch.bool, device=device).tril()
    return keep


def valid_rows(attention_mask: torch.Tensor | None, causal: bool, B: int, L: int, device) -> torch.Tensor:
    """Boolean [B, L]: query rows that count (query kept and at least one key to attend to)."""
    keys = valid_keys(attention_mask, causal, B, L, device)[:, 0].any(-1)
    if attention_mask is not None:
        keys = keys & attention_mask.bool()
    return keys


def attention_distill_rows_ref(
    student_q: torch.Tensor,
    student_k: torch.Tensor,
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
    student_scale: float | None = None,
    teacher_scale: float | None = None,
) -> torch.Tensor:
    """Per-row KL(A_t || A_s), [B, H, L], 0 for rows that do not count; q/k are [B, H, L, D] with matching H."""
    B, H, L, Ds = student_q.shape
    Dt = teacher_q.shape[-1]
    ss = Ds**-0.5 if student_scale is None else student_scale
    st = Dt**-0.5 if teacher_scale is None else teacher_scale
    keep = valid_keys(attention_mask, causal, B, L, student_q.device)
    rows = valid_rows(attention_mask, causal, B, L, student_q.device)[:, None, :]
    s = (student_q @ student_k.transpose(-1, -2)) * ss
    t = (teacher_q @ teacher_k.transpose(-1, -2)) * st
    s = s.masked_fill(~keep, float("-inf"))
    t = t.masked_fill(~keep, float("-inf"))
    # rows with no key: give them a dummy all-zero row so log_softmax stays finite, then zero them
    s = torch.where(rows[..., None], s, torch.zeros_like(s))
    t = torch.where(rows[..., None], t, torch.zeros_like(t))
    log_ps, log_pt = s.log_softmax(-1), t.log_softmax(-1)
    pt = log_pt.exp()
    terms = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt))
    out = terms.sum(-1)
    return torch.where(rows, out, torch.zeros_like(out))


def split_relation_heads(x: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """MiniLMv2: [B, H, L, D] -> concatenate heads [B, L, H*D] -> R relation heads [B, R, L, H*D/R]."""
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, relation_heads, H * D // relation_heads).transpose(1, 2)


def attention_distill_loss_ref(
    student_q: torch.Tensor,
    student_k: torch.Tensor,
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | tuple[float, float] | None = None,
    relation_heads: int | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Materialized reference of :func:`fastdistill.functional.attention_distill_loss` (same arguments)."""
    if relation_heads is not None:
        student_q, student_k = (split_relation_heads(x, relation_heads) for x in (student_q, student_k))
        teacher_q, teacher_k = (split_relation_heads(x, relation_heads) for x in (teacher_q, teacher_k))
    ss, st = scale if isinstance(scale, tuple) else (scale, scale)
    rows = attention_distill_rows_ref(student_q, student_k, teacher_q, teacher_k, attention_mask, causal, ss, st)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    B, H, L = rows.shape
    n = valid_rows(attention_mask, causal, B, L, rows.device).sum()
    return rows.sum() / (H * n.clamp(min=1))


def affinity_distill_loss_ref(
    student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Materialized affinity loss: mean over examples of ||A_s - A_t||_F^2 / n^2, A = N N^T with unit rows, masked
    positions removed (n = number of kept positions; examples with none are left out of the mean)."""
    ns = torch.nn.functional.normalize(student_feat, dim=-1)
    nt = torch.nn.functional.normalize(teacher_feat, dim=-1)
    B, L = student_feat.shape[:2]
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=student_feat.device)
    m = mask.bool()[..., None].to(ns.dtype)
    ns, nt = ns * m, nt * m
    diff = ns @ ns.transpose(-1, -2) - nt @ nt.transpose(-1, -2)
    n = mask.bool().sum(-1).to(ns.dtype)
    per = (diff**2).sum((-1, -2)) / n.clamp(min=1) ** 2
    return per.sum() / (n > 0).sum().clamp(min=1)
