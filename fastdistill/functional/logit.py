"""Logit distillation: divergences between teacher and student token distributions, fused forward + gradient."""

from __future__ import annotations

import torch

from fastdistill.divergences import DIVERGENCES, REDUCTIONS
from fastdistill.functional._autocast import autocast_dtype, float32_pair
from fastdistill.functional._checks import (
    check_choice,
    check_frozen,
    check_labels,
    check_range,
    check_same,
    check_temperature,
    check_tensor,
    check_vocab,
)
from fastdistill.ops import distill_loss as _op
from fastdistill.ops import kl_div as _kl_op


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
    backend: str | None = None,
) -> torch.Tensor:
    r"""Distillation loss between the token distributions of a student and a frozen teacher.

    With :math:`p_s = \mathrm{softmax}(z_s / T)` and :math:`p_t = \mathrm{softmax}(z_t / T)` per row:

    ======================  =========================================================================================
    ``forward_kl``           :math:`\mathrm{KL}(p_t \| p_s) = \sum_v p_t (\log p_t - \log p_s)` (Hinton KD)
    ``reverse_kl``           :math:`\mathrm{KL}(p_s \| p_t)` (MiniLLM, mode seeking)
    ``jsd``                  generalized JSD, :math:`m = (1-\beta) p_s + \beta p_t`,
                             :math:`\beta\,\mathrm{KL}(p_t\|m) + (1-\beta)\,\mathrm{KL}(p_s\|m)`; by the TRL / Liger
                             convention ``beta=0`` is *defined* as forward KL and ``beta=1`` as reverse KL (the
                             formula itself tends to 0 at both end points)
    ``tvd``                  total variation :math:`\tfrac12 \sum_v |p_s - p_t|`
    ``skew_forward_kl``      DistiLLM skew KL :math:`\mathrm{KL}(p_t \| \beta p_t + (1-\beta) p_s)` (alpha = beta)
    ``skew_reverse_kl``      DistiLLM skew reverse KL :math:`\mathrm{KL}(p_s \| \beta p_s + (1-\beta) p_t)`
    ======================  =========================================================================================

    The per-row divergence is multiplied by :math:`T^2` (Hinton et al., so gradient magnitudes do not shrink as T
    grows) unless ``scale_by_t2=False``. Terms with zero probability contribute 0, so ``-inf`` at the same vocabulary
    entries of both models (a masked vocabulary) gives a finite loss. NaN in the logits gives NaN, as in torch.

    The gradient w.r.t. ``student_logits`` is computed inside the forward kernel (one pass for the loss and gradient,
    nothing of size [N, V] kept but the gradient itself); backward only scales it by ``grad_output``. The teacher gets
    no gradient. Math is in float32 whatever the input dtype, and the loss is float32. Under ``torch.autocast`` it
    behaves as torch's own losses (which autocast runs in float32): logits of two different dtypes are both cast to
    float32 first; a same-dtype pair is read as it is (the kernels convert on load, which is the same thing). Double
    backward (differentiating the gradient, e.g. after ``torch.autograd.grad(..., create_graph=True)``) is not
    supported and raises an error; use ``fastdistill.reference.distill_loss`` (plain autograd) for higher orders.

    Args:
        student_logits: student logits, float32 / bfloat16 / float16.
        teacher_logits: teacher logits, same shape, dtype and device; must not require grad. The vocabulary sizes may
            differ by padding (at most max(128, 2%) entries, e.g. 32000 vs 32064; the rule of every fastdistill loss):
            the divergence then runs over the common prefix, the extra entries excluded from both softmaxes (a
            student's extra entries get gradient 0).
        labels: optional token labels (any integer dtype); rows whose label is ``ignore_index`` are excluded.
        divergence: one of ``forward_kl``, ``reverse_kl``, ``jsd``, ``tvd``, ``skew_forward_kl``, ``skew_reverse_kl``.
        beta: JSD weight / skew alpha, in [0, 1].
        temperature: softmax temperature T > 0 applied to both models (any real number: Python, numpy or a
            one-element tensor; it gets no gradient).
        ignore_index: label value of rows to skip.
        reduction: ``batchmean`` (sum over valid rows / number of valid rows in the whole input; 0 when none are
            valid), ``sum``, or ``none`` (per row, shape ``[...]``, 0 for ignored rows).
        scale_by_t2: multiply the loss by T^2.
        backend: force ``triton`` / ``cpp`` / ``torch`` for this call (default: ``FASTDISTILL_BACKEND`` or
            the best available for the device).

    Shape:
        student_logits, teacher_logits: ``[..., V]``; labels: ``[...]`` (or flat); output: ``[]`` or ``[...]``.

    Example::

        >>> import torch, fastdistill.functional as FD
        >>> s = torch.randn(8, 100, requires_grad=True); t = torch.randn(8, 100)
        >>> loss = FD.distill_loss(s, t, divergence="jsd", beta=0.5, temperature=2.0)
        >>> loss.backward()
    """
    check_tensor("student_logits", student_logits)
    check_tensor("teacher_logits", teacher_logits)
    student_logits, teacher_logits = float32_pair(student_logits, teacher_logits)  # autocast: see _autocast.py
    check_same("student_logits", student_logits, "teacher_logits", teacher_logits, shape=False)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} but teacher_logits has shape "
            f"{tuple(teacher_logits.shape)}; expected the same shape (the vocabulary dimension may differ by padding)"
        )
    check_frozen("teacher_logits", teacher_logits)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("reduction", reduction, REDUCTIONS)
    beta = check_range("beta", beta, 0.0, 1.0)
    temperature = check_temperature(temperature)
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0); expected V >= 1")
    # a padding mismatch is accepted: the row kernels take both widths and run the divergence over the common prefix
    # (no sliced copies); the student's extra entries get gradient 0
    check_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    labels = check_labels("labels", labels, student_logits.shape[:-1], student_logits.device)
    div_id = _op.DIVERGENCE_ID[divergence]
    resolved = _op.resolve_backend(student_logits.device, backend)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, _ = _op.distill_loss_op(
        student_logits,
        teacher_logits,
        labels,
        div_id,
        float(beta),
        float(temperature),
        int(ignore_index),
        bool(scale_by_t2),
        _op.REDUCTION_ID[reduction],
        need_grad,
        resolved,
    )
    if reduction == "none":
        loss = loss.reshape(student_logits.shape[:-1])
    return loss


def kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    log_target: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Fused drop-in for :func:`torch.nn.functional.kl_div` (same arguments, same results, same gradients).

    ``input`` holds log-probabilities, ``target`` probabilities (or log-probabilities with ``log_target=True``);
    the pointwise loss is :math:`t (\log t - x)` (:math:`e^{t}(t - x)` for ``log_target``), 0 where t = 0.
    One deliberate difference: a ``log_target`` entry of ``-inf`` (probability 0) contributes 0 here, where torch's
    fused paths return NaN (``0 * -inf``); everywhere else values and gradients agree.
    Reductions: ``mean`` (over all elements), ``batchmean`` (sum / ``input.size(0)``), ``sum``, ``none``.

    Under ``torch.autocast`` it runs in float32 (both inputs cast first), as torch runs ``kl_div`` there.

    For ``mean`` / ``batchmean`` / ``sum`` the loss and the gradient w.r.t. ``input`` come from one fused pass and
    backward only scales the saved gradient. ``reduction="none"`` (whose output is itself [N, V]) and a ``target``
    that requires grad run the plain torch implementation, so semantics stay identical.

    Shape: input and target ``[*]``, same shape; output ``[]`` or ``[*]``.

    Example::

        >>> import torch, fastdistill.functional as FD
        >>> x = torch.randn(4, 10).log_softmax(-1).requires_grad_(); t = torch.randn(4, 10).softmax(-1)
        >>> FD.kl_div(x, t, reduction="batchmean").backward()
    """
    check_tensor("input", input, min_dim=0)
    check_tensor("target", target, min_dim=0)
    autocast = autocast_dtype(input.device) is not None
    if autocast:  # torch runs kl_div in float32 under autocast (see _autocast.py)
        input, target = input.float(), target.float()
    check_same("input", input, "target", target)
    check_choice("reduction", reduction, _kl_op.REDUCTIONS)
    return _kl_op.kl_div(input, target, reduction, bool(log_target), backend)
