"""The logit-distillation loss op: one row kernel contract, three backends, one torch.library custom op.

Row kernel contract (shared by the Triton launcher, the C++/CUDA op ``fastdistill::distill_loss_rows`` and the torch
fallback), for ``student`` and ``teacher`` of shape [N, V] (last dim contiguous, any row stride, same dtype):

    loss_rows[i] = loss_scale * D(softmax(teacher[i] / T), softmax(student[i] / T))     float32 [N]
    grad[i, :]   = grad_scale * d loss_rows[i] / d student[i, :]                       student dtype [N, V]

rows whose label equals ``ignore_index`` get loss 0 and gradient 0; ``grad_scale`` is a float32 tensor of one element
(on the device, so batchmean's 1 / n_valid needs no host sync); when ``need_grad`` is False, ``grad`` is an empty
tensor and no [N, V] memory is written.

Optional hard (cross-entropy) term, fused into the same passes over the row: with ``ce_weight`` > 0 (``labels``
required; a non-ignored label must lie in [0, V)) the kernel also returns

    ce_rows[i] = lse(student[i]) - student[i, labels[i]]                                 float32 [N]
    grad[i, :] += grad_scale * ce_weight * (softmax(student[i]) - onehot(labels[i]))

at temperature 1 (raw logits, no T and no loss_scale); ignored rows get ce 0. When T == 1 the student's log-sum-exp
is shared with the divergence (no extra exp); otherwise pass 1 keeps one more online sum, exp(student - max). With
``ce_weight`` == 0 nothing changes and ``ce_rows`` is an empty tensor. Every backend returns (loss_rows, grad, ce_rows).
"""

from __future__ import annotations

import torch

from fastdistill import _backend
from fastdistill.ops._autograd import is_exactly_one, reject_double_backward
from fastdistill.reference import DIVERGENCES, REDUCTIONS

DIVERGENCE_ID = {name: i for i, name in enumerate(DIVERGENCES)}
REDUCTION_ID = {name: i for i, name in enumerate(REDUCTIONS)}
CUDA_DIVERGENCES = (DIVERGENCE_ID["forward_kl"],)  # divergences the CUDA C++ kernel implements


def canonical_divergence(divergence: int, beta: float) -> int:
    """Generalized JSD at beta = 0 / 1 is forward / reverse KL (TRL / Liger convention); kernels see the KL id."""
    if divergence == DIVERGENCE_ID["jsd"] and beta == 0.0:
        return DIVERGENCE_ID["forward_kl"]
    if divergence == DIVERGENCE_ID["jsd"] and beta == 1.0:
        return DIVERGENCE_ID["reverse_kl"]
    return divergence


def resolve_backend(device: torch.device, divergence: int, backend: str | None = None, with_ce: bool = False) -> str:
    # the CUDA C++ kernel has no fused CE term (it rejects ce_weight != 0): route those calls elsewhere
    cuda_op = "distill_loss_rows" if divergence in CUDA_DIVERGENCES and not with_ce else None
    return _backend.choose_backend(device, cpp_op="distill_loss_rows", cuda_op=cuda_op, backend=backend)


def _rows_torch(*args):
    """Torch fallback of the row contract (fastdistill/ops/distill_loss_ref.py: blockwise, no extra [N, V] copies)."""
    from fastdistill.ops.distill_loss_ref import distill_loss_rows_torch

    return distill_loss_rows_torch(*args)


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
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the row kernel on an already-resolved ``backend`` (see the module docstring for the contract).

    Returns (loss_rows, grad, ce_rows); ``ce_rows`` is empty when ``ce_weight`` is 0.
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
        float(ce_weight),
    )
    if backend == "triton":
        from fastdistill.ops.distill_loss_triton import distill_loss_rows_triton

        return distill_loss_rows_triton(*args)
    if backend in ("cpp", "cuda"):
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

    loss: [] for sum / batchmean, [N] for none; grad: [N, V] in the student dtype (d loss / d student for sum and
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
    rows, grad, _ = distill_loss_rows(
        s, t, lab, grad_scale, divergence, beta, temperature, ignore_index, loss_scale, need_grad, backend
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
