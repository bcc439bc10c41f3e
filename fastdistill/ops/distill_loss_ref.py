"""The torch fallback of the distill-loss row kernel: what runs where neither the C++ nor the Triton kernels can.

Same contract as the kernels (see ``fastdistill.ops.distill_loss``): per row the divergence (times ``loss_scale``), an
optional cross-entropy term, and the gradient w.r.t. the student logits computed in the forward,

    grad[i] = grad_scale * (soft_scale * loss_scale / T * dD/dz_i + ce_scale * (softmax(student[i]) - onehot(label_i)))

With a common width ``v_common`` = Vc < Vs (a teacher narrower than the student) the divergence's softmaxes span the
columns ``[:Vc]`` of both rows, the cross-entropy the student's whole row, and the columns ``[Vc:]`` get the
cross-entropy's gradient alone (0 without it), in the same block loop.

It must cost a user without a compiler nothing against the plain eager formula (``F.kl_div(F.log_softmax(s),
F.log_softmax(t), log_target=True)`` with autograd), so it works on blocks of rows: every float32 temporary is
[rows_per_block, V], written in place where possible, and the only [N, V] tensor is the gradient itself (eager keeps
both log-softmaxes and makes two more [N, V] tensors in backward). Forward KL, the common case, has its own short
path (two log-softmaxes, two exps, one dot per row); the other divergences use the closed-form gradient below.
"""

from __future__ import annotations

import math

import torch

from fastdistill.divergences import DIVERGENCE_ID, DIVERGENCES
from fastdistill.reference import divergence_rows

# float32 elements per block of rows (16 MiB per temporary): few enough ops per call that thread start-up and barriers
# stay small next to the work, small next to the [N, V] gradient
_BLOCK_ELEMENTS = 1 << 22


def student_grad(s: torch.Tensor, t: torch.Tensor, divergence: int, beta: float) -> torch.Tensor:
    """Closed-form d D / d (student logits / T) for log-probabilities s, t [C, V] (fp32).

    For D(p_s) with a_j = dD/dp_s,j the softmax chain rule gives g = p_s * (a - sum_k p_s,k a_k); the KLs simplify.
    Entries where the student probability is 0 get 0 (masked vocabulary).
    """
    name = DIVERGENCES[divergence]
    ps, pt = s.exp(), t.exp()
    if name == "forward_kl":
        return ps.sub_(pt)
    zero = torch.zeros_like(s)
    keep = ps > 0
    if name == "reverse_kl":
        a = torch.where(keep, s - t, zero)
    elif name == "tvd":
        # a = sign(ps - pt) / 2 takes three values, so a_j - sum_k ps_k a_k is formed from the student masses P+, P-,
        # P0 where ps > pt, ps < pt, ps == pt (a = 1/2: (2 P- + P0) / 2P, a = -1/2: -(2 P+ + P0) / 2P, a = 0:
        # (P- - P+) / 2P), never as the difference of two numbers near 1/2 (a dominant token would cancel)
        d = ps - pt
        pos, neg = d > 0, d < 0
        p_pos = torch.where(pos, ps, zero).sum(-1, keepdim=True)
        p_neg = torch.where(neg, ps, zero).sum(-1, keepdim=True)
        p_zero = torch.where(pos | neg, zero, ps + d * 0).sum(-1, keepdim=True)  # d * 0: a NaN row stays NaN
        inv_two_p = 0.5 / (p_pos + p_neg + p_zero)
        c = torch.where(pos, (2 * p_neg + p_zero) * inv_two_p, (p_neg - p_pos) * inv_two_p)
        return ps.mul_(torch.where(neg, -(2 * p_pos + p_zero) * inv_two_p, c))
    else:
        both = keep | (pt > 0)
        s_, t_ = torch.where(both, s, zero), torch.where(both, t, zero)
        if name == "jsd":
            log_m = torch.logaddexp(s_ + math.log1p(-beta), t_ + math.log(beta))
            a = (1 - beta) * torch.where(keep, s_ - log_m, zero)
        elif name == "skew_forward_kl":  # m = beta p_t + (1 - beta) p_s
            if beta == 1.0:
                return zero
            log_m = t_ if beta == 0.0 else torch.logaddexp(t_ + math.log(beta), s_ + math.log1p(-beta))
            a = -(1 - beta) * torch.exp(t_ - log_m) * (pt > 0)
        else:  # skew_reverse_kl: m = beta p_s + (1 - beta) p_t
            if beta == 1.0:  # the table's "zero": exactly, not sum(ps) - 1 rounded
                return zero
            if beta == 0.0:
                log_m = t_
            else:
                log_m = torch.logaddexp(s_ + math.log(beta), t_ + math.log1p(-beta))
            a = torch.where(keep, s_ - log_m - beta * torch.exp(s_ - log_m), zero)
    a = torch.where(keep, a, zero)
    return ps.mul_(a - (ps * a).sum(-1, keepdim=True))


def _forward_kl_block(s32: torch.Tensor, t32: torch.Tensor, temperature: float, need_grad: bool):
    """Forward KL rows and p_s - p_t (the gradient w.r.t. z / T) of one block, with three [C, V] temporaries."""
    inv_t = 1.0 / temperature
    ls = torch.log_softmax(s32 * inv_t if temperature != 1.0 else s32, dim=-1)
    lt = torch.log_softmax(t32 * inv_t if temperature != 1.0 else t32, dim=-1)
    pt = lt.exp()
    diff = lt.sub_(ls)  # log p_t - log p_s, in place of log p_t
    diff.masked_fill_(pt == 0, 0.0)  # 0 * log 0 (masked vocabulary) counts 0, not NaN
    rows = torch.linalg.vecdot(pt, diff)
    if not need_grad:
        return rows, None
    return rows, ls.exp_().sub_(pt)  # p_s - p_t, in place of log p_s


def distill_loss_rows_torch(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    grad_scale: torch.Tensor,
    divergence: int,
    beta: float,
    temperature: float,
    ignore_index: int,
    loss_scale: float,
    need_grad: bool,
    ce_scale: float = 0.0,
    soft_scale: float = 1.0,
    v_common: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row contract in torch (``divergence`` already canonical), block by block; returns (rows, grad, ce_rows)."""
    from fastdistill.ops.distill_loss import check_rows

    Vc = check_rows(student, teacher, labels, soft_scale, ce_scale, v_common)
    N, V = student.shape
    device = student.device
    rows = torch.zeros(N, dtype=torch.float32, device=device)
    ce_rows = torch.zeros(N if ce_scale != 0 else 0, dtype=torch.float32, device=device)
    grad = torch.empty((N, V) if need_grad else (0,), dtype=student.dtype, device=device)
    valid = None if labels is None else labels != ignore_index
    soft_coef = grad_scale * (soft_scale * loss_scale / temperature)  # [1] on the device: no host sync
    ce_coef = grad_scale * ce_scale
    block = max(1, _BLOCK_ELEMENTS // max(V, 1))
    for r0 in range(0, N, block):
        r1 = min(r0 + block, N)
        s_full = student[r0:r1].float()  # views when already float32 (never written)
        s32, t32 = s_full[:, :Vc], teacher[r0:r1, :Vc].float()
        if divergence == DIVERGENCE_ID["forward_kl"]:
            rows_b, g = _forward_kl_block(s32, t32, temperature, need_grad)
        else:
            rows_b = divergence_rows(s32, t32, DIVERGENCES[divergence], beta, temperature)
            g = None
            if need_grad:
                inv_t = 1.0 / temperature
                ls = torch.log_softmax(s32 * inv_t if temperature != 1.0 else s32, dim=-1)
                lt = torch.log_softmax(t32 * inv_t if temperature != 1.0 else t32, dim=-1)
                g = student_grad(ls, lt, divergence, beta)
                del ls, lt
        rows[r0:r1] = rows_b * loss_scale
        if g is not None:
            g.mul_(soft_coef)
            if Vc < V:  # the student's columns past the common width: no divergence term
                g = torch.cat([g, g.new_zeros(g.shape[0], V - Vc)], dim=1)
        if ce_scale != 0:
            lab = labels[r0:r1]
            target = torch.where(lab != ignore_index, lab, torch.zeros_like(lab))[:, None].long()
            log_p1 = torch.log_softmax(s_full, dim=-1)  # the student's whole row
            ce_rows[r0:r1] = -log_p1.gather(1, target).squeeze(1)
            if g is not None:
                p1 = log_p1.exp_()
                p1.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=p1.dtype))
                g.add_(p1.mul_(ce_coef))
            del log_p1
        if g is not None:
            if valid is not None:
                g.masked_fill_(~valid[r0:r1, None], 0.0)
            grad[r0:r1].copy_(g)  # a float32 -> student dtype cast for low-precision inputs
        del g
    if valid is not None:
        rows.masked_fill_(~valid, 0.0)
        if ce_scale != 0:
            ce_rows.masked_fill_(~valid, 0.0)
    return rows, grad, ce_rows
