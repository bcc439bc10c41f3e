"""Triton launcher of the distillation-loss row kernel (contract in ``fastdistill/ops/distill_loss.py``)."""

from __future__ import annotations

import contextlib
import math

import torch
import triton

from fastdistill.divergences import TWO_PASS_IDS
from fastdistill.kernels.distill_loss import distill_loss_rows_kernel
from fastdistill.ops.distill_loss import check_rows

# In the interpreter every tile op is a numpy call: small tiles keep multi-tile code paths exercised on CPU shapes.
_INTERPRET_MAX_BLOCK_V = 1024
# On the GPU, 4096 elements per tile = 8 per thread at 16 warps: 16-byte vector loads of bf16 / fp16 rows.
_GPU_MAX_BLOCK_V = 4096


def launch_config(
    V: int, device: torch.device, block_v: int | None = None, divergence: int | None = None, has_tail: bool = False
) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of ``V`` logits on ``device``; ``block_v`` overrides the tile width.
    ``divergence`` (a canonical id; None for other row kernels) picks the warps of the 4096-wide tiles: 16, but 8 for
    the two-pass kernels (forward / reverse KL), where ptxas spilled 24 B at 16 warps (forward KL, bf16 / fp16, sm_80:
    it settles on 40 registers), while the three-pass kernels spill 8 B at 8 warps (JSD + CE on sm_80, skew reverse
    KL on sm_90). ``has_tail`` (a teacher narrower than the student, Vc < V) takes 8 warps too: JSD + CE with the
    student-only tail put 16 B on the stack at 16 warps on sm_90 and none at 8 on sm_80 or sm_90.
    ``benchmarks/triton_aot.py`` compiles these launches and fails on any spill."""
    cap = _INTERPRET_MAX_BLOCK_V if device.type == "cpu" else _GPU_MAX_BLOCK_V
    block = block_v if block_v is not None else min(triton.next_power_of_2(V), cap)
    wide = block >= 4096 and divergence not in TWO_PASS_IDS and not has_tail
    num_warps = 16 if wide else 8 if block >= 2048 else 4
    return block, num_warps


def _check(student: torch.Tensor, teacher: torch.Tensor, grad_scale: torch.Tensor):
    if student.stride(-1) != 1 or teacher.stride(-1) != 1:
        raise ValueError(
            f"student and teacher need a unit last-dim stride, got {student.stride()} and {teacher.stride()}"
        )
    if student.dtype != teacher.dtype:
        raise ValueError(f"student has dtype {student.dtype} but teacher has {teacher.dtype}; expected the same dtype")
    if grad_scale.numel() != 1 or grad_scale.dtype != torch.float32:
        raise ValueError(
            f"grad_scale must be a float32 tensor of one element, got {grad_scale.dtype} of shape "
            f"{tuple(grad_scale.shape)}"
        )


def distill_loss_rows_triton(
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
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss (float32 [N]), when ``need_grad`` the scaled student gradient ([N, V], student dtype), and the
    per-row cross-entropy (float32 [N]; empty when ``ce_scale`` is 0).

    ``divergence`` is a canonical id (JSD only for 0 < beta < 1); see the row contract for the maths.

    Args:
        student, teacher: logits [N, Vs] and [N, Vt], last dim contiguous, any row stride, same dtype.
        labels: int [N] or None; rows equal to ``ignore_index`` get loss 0 and gradient 0.
        grad_scale: float32 tensor of one element on the device, read by the kernel (no host sync).
        divergence / beta / temperature / loss_scale: see ``fastdistill.ops.distill_loss``.
        need_grad: when False, no [N, V] memory is written and an empty gradient is returned.
        ce_scale: != 0 fuses the hard term: ce_rows = lse(student) - student[label] (T = 1) and
            grad_scale * ce_scale * (softmax(student) - onehot(label)) added to the gradient; needs ``labels``.
        soft_scale: weight of the divergence's gradient (grad_scale * soft_scale * d loss_rows / d student).
        v_common: the common width Vc (-1: min(Vs, Vt)); the divergence spans [:Vc] of both rows, the
            cross-entropy the student's whole row, and the student's columns [Vc:] get the CE gradient alone.
        block_v: tile width override (tests use it to force several tiles per row).

    Example::

        >>> rows, grad, _ = distill_loss_rows_triton(s, t, None, torch.ones(1, device=s.device), 0, 0.5, 1.0, -100, 1.0,
        ...                                       True)
    """
    _check(student, teacher, grad_scale)
    Vc = check_rows(student, teacher, labels, soft_scale, ce_scale, v_common)
    N, V = student.shape
    loss_rows = torch.empty(N, dtype=torch.float32, device=student.device)
    grad = torch.empty((N, V), dtype=student.dtype, device=student.device) if need_grad else student.new_empty(0)
    ce_rows = torch.empty(N if ce_scale != 0 else 0, dtype=torch.float32, device=student.device)
    if N == 0 or V == 0:
        return loss_rows.zero_(), grad, ce_rows.zero_()
    if labels is not None:
        labels = labels.contiguous()
    grad_scale = grad_scale.reshape(1).to(student.device)
    block, num_warps = launch_config(V, student.device, block_v, divergence, has_tail=Vc < V)
    log_beta = math.log(beta) if beta > 0.0 else float("-inf")
    log_1m_beta = math.log1p(-beta) if beta < 1.0 else float("-inf")
    # launch on the tensors' GPU, not on whichever device is current
    with torch.cuda.device(student.device) if student.device.type == "cuda" else contextlib.nullcontext():
        distill_loss_rows_kernel[(N,)](
            student,
            teacher,
            labels,
            grad_scale,
            loss_rows,
            grad if need_grad else None,
            ce_rows if ce_scale != 0 else None,
            student.stride(0),
            teacher.stride(0),
            V,  # the gradient is allocated contiguous
            V,
            Vc,
            1.0 / temperature,
            float(beta),
            log_beta,
            log_1m_beta,
            float(loss_scale),
            int(ignore_index),
            float(soft_scale),
            float(ce_scale),
            DIVERGENCE=int(divergence),
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return loss_rows, grad, ce_rows
