"""Pure-torch references of every fastdistill op.

One reference per op, shared by the tests (in float64), the benchmarks (the "torch eager" provider) and the last-resort
CPU fallback. They materialize everything and favour clarity over speed; gradients come from autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdistill.divergences import DIVERGENCES, REDUCTIONS, canonical_divergence


def _safe_term(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """p * a with 0 where p == 0 (so 0 * log 0 and masked vocabulary entries give 0, not NaN, in value and grad)."""
    keep = p > 0
    return p * torch.where(keep, a, torch.zeros_like(a))


def divergence_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row divergence between softmax(teacher / T) and softmax(student / T), computed in the input dtype.

    Shape: logits [N, V] -> [N]. See ``fastdistill.functional.distill_loss`` for the definitions.
    """
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    ps, pt = s.exp(), t.exp()
    if divergence in DIVERGENCES:
        divergence = DIVERGENCES[canonical_divergence(divergence, beta)]  # the table's beta = 0 / 1 conventions
    if divergence in ("jsd", "skew_forward_kl", "skew_reverse_kl"):
        # entries masked in both models (-inf in both): keep log-mixtures finite so their gradient is 0, not NaN
        keep = (ps > 0) | (pt > 0)
        s, t = torch.where(keep, s, torch.zeros_like(s)), torch.where(keep, t, torch.zeros_like(t))
    if divergence == "forward_kl":
        return _safe_term(pt, t - s).sum(-1)
    if divergence == "reverse_kl":
        return _safe_term(ps, s - t).sum(-1)
    if divergence == "tvd":
        return 0.5 * (ps - pt).abs().sum(-1)
    if divergence == "jsd":
        # m = (1 - beta) p_s + beta p_t ; JSD = beta KL(p_t || m) + (1 - beta) KL(p_s || m)
        log_m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
        return beta * _safe_term(pt, t - log_m).sum(-1) + (1 - beta) * _safe_term(ps, s - log_m).sum(-1)
    if divergence == "skew_forward_kl":
        # DistiLLM SKL: KL(p_t || beta p_t + (1 - beta) p_s)
        log_m = _log_mix(t, s, beta)
        return _safe_term(pt, t - log_m).sum(-1)
    if divergence == "skew_reverse_kl":
        # DistiLLM SRKL: KL(p_s || beta p_s + (1 - beta) p_t)
        log_m = _log_mix(s, t, beta)
        return _safe_term(ps, s - log_m).sum(-1)
    raise ValueError(f"divergence={divergence!r} is not supported; expected one of {DIVERGENCES}")


def _log_mix(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * exp(a) + (1 - w) * exp(b)) with the w = 0 and w = 1 end points exact."""
    if w == 1.0:
        return a
    if w == 0.0:
        return b
    return torch.logaddexp(a + math.log(w), b + math.log1p(-w))


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    scale_by_t2: bool = True,
) -> torch.Tensor:
    """Reference of ``fastdistill.functional.distill_loss`` (materialized, autograd, input dtype)."""
    V = student_logits.shape[-1]
    rows = divergence_rows(student_logits.reshape(-1, V), teacher_logits.reshape(-1, V), divergence, beta, temperature)
    if scale_by_t2:
        rows = rows * (temperature * temperature)
    if labels is not None:
        valid = labels.reshape(-1) != ignore_index
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        n_valid = valid.sum()
    else:
        n_valid = torch.tensor(rows.shape[0], device=rows.device)
    if reduction == "none":
        return rows.reshape(student_logits.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / n_valid.clamp(min=1).to(rows.dtype)
    raise ValueError(f"reduction={reduction!r} is not supported; expected one of {REDUCTIONS}")


def kl_div(
    input: torch.Tensor, target: torch.Tensor, reduction: str = "mean", log_target: bool = False
) -> torch.Tensor:
    """Reference of ``fastdistill.nn.KLDivLoss``: exactly ``torch.nn.functional.kl_div``."""
    return F.kl_div(input, target, reduction=reduction, log_target=log_target)
