"""The logit-distillation loss op: one row kernel contract, three backends, one torch.library custom op.

Row kernel contract (shared by the Triton launcher, the C++ op ``fastdistill::distill_loss_rows`` and the torch
fallback), for ``student`` [N, Vs] and ``teacher`` [N, Vt] (last dim contiguous, any row stride, same dtype) and a
common vocabulary width ``v_common`` = Vc <= min(Vs, Vt) (-1: min(Vs, Vt)), with both terms explicit:

    loss_rows[i] = loss_scale * D(softmax(teacher[i, :Vc] / T), softmax(student[i, :Vc] / T))    float32 [N]
    ce_rows[i]   = lse(student[i, :]) - student[i, labels[i]]               (when ce_scale != 0)  float32 [N]
    grad[i, :]   = grad_scale * (soft_scale * d loss_rows[i] / d student[i, :]
                                 + ce_scale * (softmax(student[i, :]) - onehot(labels[i])))  student dtype [N, Vs]

so a teacher narrower than the student (padding: Vt < Vs) needs no slicing and no second pass: the divergence spans
the common prefix, the cross-entropy the student's whole row (a label in [Vc, Vs) is fine), and the student's columns
[Vc, Vs) get the cross-entropy's gradient alone (0 without it). A wider teacher's columns past Vc are never read.

``divergence`` is an id of ``fastdistill.divergences`` (its beta = 0 / 1 conventions applied by every backend); rows
whose label equals ``ignore_index`` get loss 0, ce 0 and gradient 0; ``grad_scale`` is a float32 tensor of one element
(on the device, so batchmean's 1 / n_valid needs no host sync); ``soft_scale`` and ``ce_scale`` are the weights of
the two terms' gradients (any finite values, 0 included: ``soft_scale=0`` gives the CE gradient alone). The hard term
is at temperature 1 (raw logits, no T and no loss_scale); it needs ``labels`` (non-ignored ones in [0, V)); when
T == 1 the student's log-sum-exp is shared with the divergence (no extra exp), otherwise pass 1 keeps one more online
sum, exp(student - max). With ``ce_scale`` == 0 ``ce_rows`` is an empty tensor; when ``need_grad`` is False, ``grad``
is an empty tensor and no [N, V] memory is written. Every backend returns (loss_rows, grad, ce_rows).

Row sums (log-sum-exps, the loss, sum_k ps_k a_k) accumulate blockwise (C++: vector lanes per block of 2048 entries,
folded into double; Triton: per-lane accumulators across tiles, reduced pairwise at the end), so their fp32 error does
not grow with V (benchmarks/bench_precision.py).
"""

from __future__ import annotations

import math

import torch

from fastdistill import _backend
from fastdistill.divergences import DIVERGENCE_ID, REDUCTION_ID, canonical_divergence
from fastdistill.ops._autograd import is_exactly_one, reject_double_backward

__all__ = ["DIVERGENCE_ID", "REDUCTION_ID", "canonical_divergence", "distill_loss_rows", "resolve_backend"]


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend of the dense row kernel for tensors on ``device`` (see ``fastdistill._backend.choose_backend``)."""
    return _backend.choose_backend(device, cpp_op="distill_loss_rows", backend=backend)


def _rows_torch(*args):
    """Torch fallback of the row contract (fastdistill/ops/distill_loss_ref.py: blockwise, no extra [N, V] copies)."""
    from fastdistill.ops.distill_loss_ref import distill_loss_rows_torch

    return distill_loss_rows_torch(*args)


def check_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    soft_scale: float,
    ce_scale: float,
    v_common: int,
) -> int:
    """The row contract's checks (shared by the Triton launcher and the torch fallback; the C++ op makes the same
    ones); returns the common width Vc."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must be [N, Vs] and [N, Vt] with the same N, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if labels is not None and labels.shape != (student.shape[0],):
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected ({student.shape[0]},)")
    for name, value in (("soft_scale", soft_scale), ("ce_scale", ce_scale)):
        if not math.isfinite(value):
            raise ValueError(f"{name}={value} is not finite; expected a finite value")
    if ce_scale != 0 and labels is None:
        raise ValueError(f"ce_scale={ce_scale} needs labels (the cross-entropy targets), got labels=None")
    v_student, v_teacher = student.shape[1], teacher.shape[1]
    widest = min(v_student, v_teacher)
    if v_common == -1:
        return widest
    if not min(1, v_student) <= v_common <= widest:
        raise ValueError(
            f"v_common={v_common} is out of range; expected -1 (min of the widths) or a width in [1, min(Vs="
            f"{v_student}, Vt={v_teacher})]"
        )
    return v_common


def distill_loss_rows(
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
    backend: str,
    ce_scale: float = 0.0,
    soft_scale: float = 1.0,
    v_common: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the row kernel on an already-resolved ``backend`` (see the module docstring for the contract).

    Returns (loss_rows, grad, ce_rows); ``ce_rows`` is empty when ``ce_scale`` is 0.
    """
    divergence = canonical_divergence(divergence, beta)
    args = (
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
        float(ce_scale),
        float(soft_scale),
        int(v_common),
    )
    if backend == "triton":
        from fastdistill.ops.distill_loss_triton import distill_loss_rows_triton

        return distill_loss_rows_triton(*args)
    if backend == "cpp":
        return torch.ops.fastdistill.distill_loss_rows(*args)
    return _rows_torch(*args)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with a unit last-dim stride (a view when possible)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("fastdistill::distill_loss", mutates_args=())
def distill_loss_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    divergence: int,
    beta: float,
    temperature: float,
    ignore_index: int,
    scale_by_t2: bool,
    reduction: int,
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: returns (loss, grad of loss w.r.t. student) with the reduction already applied to the grad.

    ``student`` [..., Vs] and ``teacher`` [..., Vt] may differ in width (padding, already validated by the functional
    layer): the divergence then spans the common prefix [:min(Vs, Vt)] and the student's extra columns get gradient 0.
    loss: [] for sum / batchmean, [N] for none; grad: [N, Vs] in the student dtype (d loss / d student for sum and
    batchmean, d loss_rows[i] / d student[i] per row for none), or an empty tensor when ``need_grad`` is False.
    """
    s, t = _as_rows(student), _as_rows(teacher)
    lab = labels.reshape(-1) if labels is not None else None
    if lab is not None:
        n_valid = (lab != ignore_index).sum()
    else:
        n_valid = torch.tensor(s.shape[0], device=s.device)
    if reduction == REDUCTION_ID["batchmean"]:
        grad_scale = 1.0 / n_valid.clamp(min=1).to(torch.float32)
    else:
        grad_scale = torch.ones((), dtype=torch.float32, device=s.device)
    grad_scale = grad_scale.reshape(1)
    loss_scale = temperature * temperature if scale_by_t2 else 1.0
    v_common = min(s.shape[1], t.shape[1])
    rows, grad, _ = distill_loss_rows(
        s,
        t,
        lab,
        grad_scale,
        divergence,
        beta,
        temperature,
        ignore_index,
        loss_scale,
        need_grad,
        backend,
        v_common=v_common,
    )
    if reduction == REDUCTION_ID["none"]:
        loss = rows
    elif reduction == REDUCTION_ID["sum"]:
        loss = rows.sum()
    else:
        loss = rows.sum() * grad_scale[0]
    return loss, grad


@distill_loss_op.register_fake
def _(
    student, teacher, labels, divergence, beta, temperature, ignore_index, scale_by_t2, reduction, need_grad, backend
):
    n = student.numel() // student.shape[-1]
    loss = student.new_empty((n,) if reduction == REDUCTION_ID["none"] else (), dtype=torch.float32)
    grad = student.new_empty((n, student.shape[-1]) if need_grad else (0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    # the second output (the precomputed gradient) never gets a gradient itself: without this, autograd would
    # materialize a zero [N, V] tensor for it in backward
    ctx.set_materialize_grads(False)
    student, reduction = inputs[0], inputs[8]
    ctx.reduction = reduction
    ctx.student_shape = student.shape
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_grad):
    reject_double_backward("distill_loss", grad_loss)
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and len(ctx.student_shape) and ctx.student_shape.numel() != 0:
        raise RuntimeError("distill_loss was run with need_grad=False; its student gradient was not computed")
    if ctx.reduction == REDUCTION_ID["none"]:
        grad = grad * grad_loss.reshape(-1, 1).to(grad.dtype)
    elif not is_exactly_one(grad_loss):
        # the multiply is skipped in eager mode when grad_output is exactly 1 (the common case: loss.backward())
        grad = grad * grad_loss.to(grad.dtype)
    return grad.reshape(ctx.student_shape), None, None, None, None, None, None, None, None, None, None


distill_loss_op.register_autograd(_backward, setup_context=_setup_context)
