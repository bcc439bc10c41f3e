"""Fake (meta) implementations of the compiled extension's row ops, so FakeTensor, ``torch.library.opcheck`` and
``torch.compile`` can trace ``fastdistill::distill_loss_rows`` and ``fastdistill::kl_div_rows``.

The ops are defined in C++ (csrc/fastdistill.cpp), so a fake can only be registered once ``fastdistill._C`` has loaded:
``fastdistill._backend.load_extension`` imports this module right after a successful import. Shapes follow the row
kernel contracts in ``fastdistill/ops/distill_loss.py`` and ``fastdistill/ops/kl_div.py``.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("fastdistill::distill_loss_rows")
def _distill_loss_rows_fake(
    student,
    teacher,
    labels,
    grad_scale,
    divergence,
    beta,
    temperature,
    ignore_index,
    loss_scale,
    need_grad,
    ce_scale=0.0,
    soft_scale=1.0,
    v_common=-1,
):
    rows = student.new_empty((student.shape[0],), dtype=torch.float32)
    grad = student.new_empty(student.shape) if need_grad else student.new_empty((0,))
    ce_rows = student.new_empty((student.shape[0],) if ce_scale != 0 else (0,), dtype=torch.float32)
    return rows, grad, ce_rows


@torch.library.register_fake("fastdistill::kl_div_rows")
def _kl_div_rows_fake(input, target, grad_scale, log_target, need_grad):
    rows = input.new_empty((input.shape[0],), dtype=torch.float32)
    grad = input.new_empty(input.shape) if need_grad else input.new_empty((0,))
    return rows, grad


@torch.library.register_fake("fastdistill::topk_targets_rows")
def _topk_targets_rows_fake(logits, k, temperatures):
    n, nt = logits.shape[0], len(temperatures)
    return (
        logits.new_empty((n, k), dtype=torch.long),
        logits.new_empty((n, k)),
        logits.new_empty((n, nt)),
        logits.new_empty((n, nt)),
    )
