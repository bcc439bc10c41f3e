"""Reference of ``fastdistill.functional.fused_linear_distill_loss``: materialized logits, plain autograd.

Shared by the tests (in float64) and the benchmark (the "torch eager" and "torch.compile" providers, in the input
dtype). It favours clarity: the full [N, Vs] and [N, Vt] logits exist, and the dense divergence is
``fastdistill.reference.distill_loss`` on the common vocabulary prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdistill.reference import distill_loss, divergence_rows


def topk_divergence_rows(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    divergence: str,
    beta: float,
    temperature: float,
    tail: str,
    values_kind: str = "logprobs",
) -> torch.Tensor:
    """Per-row divergence between a top-k teacher and the student's full softmax, over k + 1 buckets (k tokens and
    the tail "every other token"); see ``fastdistill.ops.fused_linear_distill`` for the definitions."""
    ls_full = F.log_softmax(student_logits / temperature, dim=-1)
    ls_k = ls_full.gather(1, indices)
    off = torch.ones_like(ls_full, dtype=torch.bool).scatter(1, indices, False)
    ls_tail = torch.logsumexp(ls_full.masked_fill(~off, -math.inf), dim=-1, keepdim=True)
    ls = torch.cat([ls_k, ls_tail], dim=-1)
    v = values.to(ls.dtype)
    if tail == "renormalize":
        v = v / temperature if values_kind == "logits" else v  # log-probs are already at temperature T
        lq = torch.cat([F.log_softmax(v, dim=-1), torch.full_like(ls_tail, -math.inf)], dim=-1)
    else:
        rest = 1 - v.exp().sum(-1, keepdim=True)
        lq = torch.cat([v, torch.where(rest > 0, rest.clamp_min(1e-300).log(), torch.full_like(rest, -math.inf))], -1)
    return divergence_rows(ls, lq, divergence, beta, 1.0)


def fused_linear_distill_loss_ref(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    topk_tail: str = "renormalize",
    topk_values: str = "logprobs",
    scale_by_t2: bool = True,
    return_parts: bool = False,
    **_unused,
):
    """Same arguments and result as the fused function, with the logits materialized."""
    Hs = student_hidden.shape[-1]
    lead = student_hidden.shape[:-1]
    x = student_hidden.reshape(-1, Hs)
    N = x.shape[0]
    s = F.linear(x, student_weight, student_bias)
    Vs = s.shape[-1]
    lab = labels.reshape(-1) if labels is not None else None
    valid = lab != ignore_index if lab is not None else torch.ones(N, dtype=torch.bool, device=s.device)
    n_valid = valid.sum().clamp(min=1).to(s.dtype)
    zeros = torch.zeros(N, dtype=s.dtype, device=s.device)

    if teacher_topk is not None:
        values, indices = teacher_topk
        soft_rows = topk_divergence_rows(
            s,
            values.reshape(N, -1),
            indices.reshape(N, -1).long(),
            divergence,
            beta,
            temperature,
            topk_tail,
            topk_values,
        )
        soft_rows = soft_rows * (temperature**2 if scale_by_t2 else 1.0)
    elif teacher_weight is not None:
        with torch.no_grad():
            t = F.linear(teacher_hidden.reshape(N, -1), teacher_weight, teacher_bias).to(s.dtype)
        Vc = min(Vs, t.shape[-1])  # padding mismatch: both softmaxes over the common prefix
        soft_rows = distill_loss(
            s[:, :Vc],
            t[:, :Vc],
            divergence=divergence,
            beta=beta,
            temperature=temperature,
            reduction="none",
            scale_by_t2=scale_by_t2,
        )
    else:
        soft_rows = zeros
    soft_rows = torch.where(valid, soft_rows, zeros)
    if lab is not None and hard_weight != 0:
        ce_rows = F.cross_entropy(s, lab.long(), ignore_index=ignore_index, reduction="none")
        ce_rows = torch.where(valid, ce_rows, zeros)
    else:
        ce_rows = zeros

    def reduce(rows):
        if reduction == "none":
            return rows.reshape(lead)
        if reduction == "sum":
            return rows.sum()
        return rows.sum() / n_valid

    loss = reduce(hard_weight * ce_rows + soft_weight * soft_rows)
    if return_parts:
        return loss, reduce(ce_rows).detach(), reduce(soft_rows).detach()
    return loss
