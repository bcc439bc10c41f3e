"""Fused lm-head + distillation loss: hidden states and lm_head weights in, a scalar loss out, no [N, V] logits kept."""

from __future__ import annotations

import torch

from fastdistill.divergences import DIVERGENCES, REDUCTIONS
from fastdistill.functional._autocast import autocast_dtype
from fastdistill.functional._checks import (
    INDEX_DTYPES,
    check_choice,
    check_device,
    check_frozen,
    check_label_values,
    check_labels,
    check_range,
    check_real,
    check_same,
    check_temperature,
    check_tensor,
    check_topk_indices,
    check_vocab,
)
from fastdistill.ops import distill_loss as _dl
from fastdistill.ops import fused_linear_distill as _op


def _check_matrix(name: str, w, rows_name: str, cols: int | None, cols_name: str) -> None:
    check_tensor(name, w, min_dim=2)
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [{rows_name}, {cols_name}], got shape {tuple(w.shape)}")
    if cols is not None and w.shape[1] != cols:
        raise ValueError(
            f"{name} has shape {tuple(w.shape)}; expected [{rows_name}, {cols}] to match the hidden size {cols_name}"
        )


def _check_bias(name: str, b, rows: int, like: torch.Tensor) -> None:
    if b is None:
        return
    check_tensor(name, b)
    if b.shape != (rows,):
        raise ValueError(f"{name} has shape {tuple(b.shape)}; expected ({rows},) (one entry per vocabulary row)")
    if b.device != like.device or b.dtype != like.dtype:
        raise ValueError(f"{name} is {b.dtype} on {b.device}; expected {like.dtype} on {like.device} like the weight")


def fused_linear_distill_loss(
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
    chunk_size: int | None = None,
    return_parts: bool = False,
    topk_tail: str = "renormalize",
    topk_values: str = "logprobs",
    scale_by_t2: bool = True,
    accum_fp32: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Distillation loss from hidden states and lm_head weights, without materializing the logits.

    .. math::

        \mathcal{L} = w_{hard}\, \mathrm{CE}(z_s, y) + w_{soft}\, T^2 D\big(\mathrm{softmax}(z_t / T),
        \mathrm{softmax}(z_s / T)\big), \qquad z_s = X_s W_s^\top + b_s,\; z_t = X_t W_t^\top + b_t

    with ``D`` any divergence of :func:`fastdistill.functional.distill_loss` (``forward_kl``, ``reverse_kl``, ``jsd``,
    ``tvd``, ``skew_forward_kl``, ``skew_reverse_kl``; ``beta`` as there). The rows are processed in chunks: per
    chunk the student (and dense teacher) logits are computed, the loss rows and ``dlogits`` come from the fused row
    kernel, and ``dX = dlogits W_s``, ``dW += dlogits^T X``, ``db += sum dlogits`` are accumulated right away, so
    backward does no matmul and only O(chunk x V) memory is used. Rows whose label is ``ignore_index`` are dropped
    before any matmul. CE is over the student's full vocabulary at temperature 1, from the same chunk logits.

    Vocabulary padding: when ``Vs != Vt`` differ by at most max(128, 2%) (e.g. 151936 vs 152064; the same rule as
    :func:`fastdistill.functional.distill_loss`), the divergence runs over the common prefix ``[:min(Vs, Vt)]``, the
    extra columns excluded from *both* softmaxes (never zero-padded); a larger mismatch is an error.

    Sparse teachers: ``teacher_topk=(values, indices)`` replaces the dense teacher. The divergence is taken over k + 1
    buckets (the k teacher tokens and a tail "every other token"); the student side uses its full softmax over Vs
    (bucket j = p_s(idx_j), tail = the student's mass outside the top k). ``topk_tail`` picks the teacher's tail:

    - ``"renormalize"``: teacher probabilities renormalized over the k entries, tail 0 (with forward KL: the
      DistillKit sparse KD loss). Reverse KL is infinite here (the student has mass off the teacher's support) and
      is rejected.
    - ``"bucket"``: the teacher's tail holds 1 - sum(exp(values)) and is matched against the student's tail mass
      (the TRL / DistillKit tail bucket); needs log-probs.

    ``topk_values`` says what ``values`` hold: ``"logprobs"`` (default), the teacher's log-probs *at the distillation
    temperature*, ``log_softmax(z_t / T).topk(k)`` (cache them at the T you train with), or ``"logits"``, raw teacher
    logits (divided by T here; ``"renormalize"`` only, since the tail mass is unknown from logits). Indices (any
    integer dtype) must be distinct within a row and lie in [0, Vs); both are checked (one sort of the [N, k]
    indices; skipped under torch.compile).

    Args:
        student_hidden: final student hidden states, float32 / bfloat16 / float16, ``[N, Hs]`` or ``[B, T, Hs]``.
        student_weight: student lm_head weight ``[Vs, Hs]`` (tied embeddings work: pass the embedding matrix).
        teacher_hidden: teacher hidden states ``[N, Ht]`` / ``[B, T, Ht]`` (Ht may differ from Hs); must not require
            grad.
        teacher_weight: teacher lm_head ``[Vt, Ht]``; must not require grad. Teacher logits are cast to the student
            dtype.
        labels: token labels ``[N]`` / ``[B, T]`` (any integer dtype); needed for ``hard_weight != 0``; rows equal
            to ``ignore_index`` are excluded from both terms and from the normalisation.
        teacher_topk: ``(values, indices)``, both ``[N, k]`` / ``[B, T, k]``, instead of teacher_hidden/weight.
        student_bias / teacher_bias: optional lm_head biases ``[Vs]`` / ``[Vt]``.
        divergence, beta, temperature: as in :func:`fastdistill.functional.distill_loss`.
        hard_weight, soft_weight: weights of the CE and the divergence term.
        ignore_index: label value of rows to skip.
        reduction: ``batchmean`` (sum over valid rows / number of valid rows of the whole batch), ``sum``, or
            ``none`` (per row, 0 for ignored rows; backward only through a uniform weighting such as ``.sum()``).
        chunk_size: rows per chunk (default: chosen from N, V, H and free memory).
        return_parts: also return the unweighted ``(ce, divergence)`` terms, detached, for logging.
        topk_tail, topk_values: see above.
        scale_by_t2: multiply the divergence by T^2 (Hinton).
        accum_fp32: accumulate the weight gradient in float32 across chunks for low-precision weights (costs a
            float32 [Vs, Hs] buffer; by default it accumulates in the weight dtype).
        backend: ``triton`` / ``cpp`` / ``torch`` for the chunk terms (default: ``FASTDISTILL_BACKEND`` or the best
            available); the top-k terms have no C++ kernel, so ``cpp`` runs their torch version.

    Autocast: under ``torch.autocast(device_type, dtype)`` enabled for the inputs' device, every matmul (student and
    teacher logits, and the gradient matmuls dX = dlogits W, dW = dlogits^T X) runs in the autocast dtype, as
    ``F.linear`` would, whatever the dtypes of the hidden states and weights (they may then differ); the row kernels
    read those logits and do their math in float32 (as autocast runs torch's own losses); the loss is float32 and
    each gradient comes back in its input's dtype (the weight's is accumulated in float32 for a float32 weight).
    Outside autocast, every matmul runs in ``student_hidden``'s dtype.

    Shape:
        output ``[]`` (``[N]`` or ``[B, T]`` for ``none``); with ``return_parts`` a tuple ``(loss, ce, divergence)``.

    Example::

        >>> import torch, fastdistill.functional as FD
        >>> xs = torch.randn(64, 32, requires_grad=True); ws = torch.randn(500, 32, requires_grad=True)
        >>> xt = torch.randn(64, 48); wt = torch.randn(500, 48)
        >>> y = torch.randint(0, 500, (64,))
        >>> loss = FD.fused_linear_distill_loss(xs, ws, xt, wt, y, hard_weight=0.5, soft_weight=0.5, temperature=2.0)
        >>> loss.backward()
    """
    check_tensor("student_hidden", student_hidden, min_dim=2)
    lead_shape = student_hidden.shape[:-1]
    Hs = student_hidden.shape[-1]
    _check_matrix("student_weight", student_weight, "Vs", Hs, "Hs")
    compute_dtype = autocast_dtype(student_hidden.device)  # under autocast the matmuls cast, as F.linear's do
    if compute_dtype is None:
        check_same("student_weight", student_weight, "student_hidden", student_hidden, shape=False)
    else:  # autocast casts both operands of each matmul: only the device must agree
        check_device("student_weight", student_weight, student_hidden.device, "student_hidden")
    Vs = student_weight.shape[0]
    if Vs == 0:
        raise ValueError("student_weight has an empty vocabulary dimension (Vs = 0); expected Vs >= 1")
    _check_bias("student_bias", student_bias, Vs, student_weight)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("topk_tail", topk_tail, _op.TOPK_TAILS)
    check_choice("topk_values", topk_values, _op.TOPK_VALUES)
    beta = check_range("beta", beta, 0.0, 1.0)
    temperature = check_temperature(temperature)
    hard_weight = check_real("hard_weight", hard_weight)
    soft_weight = check_real("soft_weight", soft_weight)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} is invalid; expected None or a positive int")
    N = lead_shape.numel()
    device = student_hidden.device

    dense = teacher_hidden is not None or teacher_weight is not None
    if dense and teacher_topk is not None:
        raise ValueError("pass either teacher_hidden/teacher_weight (dense teacher) or teacher_topk, not both")
    if dense and (teacher_hidden is None or teacher_weight is None):
        missing = "teacher_weight" if teacher_weight is None else "teacher_hidden"
        raise ValueError(f"{missing} is None; a dense teacher needs both teacher_hidden and teacher_weight")
    if soft_weight != 0 and not dense and teacher_topk is None:
        raise ValueError(
            f"soft_weight={soft_weight} needs a teacher: pass teacher_hidden and teacher_weight, or teacher_topk"
        )
    values = indices = None
    if dense:
        check_tensor("teacher_hidden", teacher_hidden, min_dim=2)
        check_frozen("teacher_hidden", teacher_hidden)
        check_frozen("teacher_weight", teacher_weight)
        check_frozen("teacher_bias", teacher_bias)
        if teacher_hidden.shape[:-1].numel() != N or (
            teacher_hidden.dim() == student_hidden.dim() and teacher_hidden.shape[:-1] != lead_shape
        ):
            raise ValueError(
                f"teacher_hidden has shape {tuple(teacher_hidden.shape)}; expected {tuple(lead_shape)} + (Ht,) (one "
                "row per student row)"
            )
        _check_matrix("teacher_weight", teacher_weight, "Vt", teacher_hidden.shape[-1], "Ht")
        check_device("teacher_hidden", teacher_hidden, device, "student_hidden")
        if compute_dtype is None:
            check_same("teacher_weight", teacher_weight, "teacher_hidden", teacher_hidden, shape=False)
        else:
            check_device("teacher_weight", teacher_weight, device, "student_hidden")
        check_vocab(Vs, teacher_weight.shape[0])
        _check_bias("teacher_bias", teacher_bias, teacher_weight.shape[0], teacher_weight)
        teacher_hidden = teacher_hidden.reshape(N, teacher_hidden.shape[-1])
    elif teacher_topk is not None:
        if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
            raise TypeError(f"teacher_topk must be a (values, indices) pair, got {type(teacher_topk).__name__}")
        values, indices = teacher_topk
        check_tensor("teacher_topk values", values)
        check_tensor("teacher_topk indices", indices, dtypes=INDEX_DTYPES)
        check_frozen("teacher_topk values", values)
        if values.shape != indices.shape or values.shape[:-1].numel() != N or values.shape[-1] < 1:
            raise ValueError(
                f"teacher_topk values {tuple(values.shape)} and indices {tuple(indices.shape)}; expected both "
                f"{tuple(lead_shape)} + (k,) with k >= 1"
            )
        check_device("teacher_topk values", values, device, "student_hidden")
        check_device("teacher_topk indices", indices, device, "student_hidden")
        if topk_tail == "bucket" and topk_values == "logits":
            raise ValueError(
                "topk_tail='bucket' needs topk_values='logprobs' (the teacher's log-probs at temperature T): the tail "
                "mass 1 - sum(p) is unknown from top-k logits. Use topk_tail='renormalize' for logits"
            )
        canon = _dl.canonical_divergence(_dl.DIVERGENCE_ID[divergence], beta)
        if topk_tail == "renormalize" and soft_weight != 0 and canon == _dl.DIVERGENCE_ID["reverse_kl"]:
            raise ValueError(
                f"divergence={divergence!r} (beta={beta}) against a renormalized top-k teacher is infinite (the "
                "student has mass outside the teacher's top k); use topk_tail='bucket'"
            )
        values = values.reshape(N, values.shape[-1])
        indices = indices.reshape(N, indices.shape[-1]).long()
        check_topk_indices("teacher_topk indices", indices, Vs)
    labels = check_labels("labels", labels, lead_shape, device, "the hidden states' leading shape")
    if labels is None and hard_weight != 0:
        raise ValueError(f"hard_weight={hard_weight} needs labels; pass labels or set hard_weight=0")
    if labels is not None and hard_weight != 0:
        check_label_values("labels", labels, ignore_index, Vs, "Vs")

    grad_on = torch.is_grad_enabled()
    need_x = grad_on and student_hidden.requires_grad
    need_w = grad_on and student_weight.requires_grad
    need_b = grad_on and student_bias is not None and student_bias.requires_grad
    x = student_hidden.reshape(N, Hs)
    resolved = _op.resolve_backend(device, teacher_topk is not None, backend)
    loss, ce, soft, _, _, _ = _op.fused_linear_distill_op(
        x,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        values,
        indices,
        labels,
        _dl.DIVERGENCE_ID[divergence],
        float(beta),
        float(temperature),
        float(hard_weight),
        float(soft_weight),
        int(ignore_index),
        _dl.REDUCTION_ID[reduction],
        bool(scale_by_t2),
        _op.TOPK_TAILS.index(topk_tail),
        topk_values == "logits",
        int(chunk_size or 0),
        bool(accum_fp32),
        need_x,
        need_w,
        need_b,
        resolved,
        compute_dtype,
    )
    if reduction == "none":
        loss, ce, soft = (t.reshape(lead_shape) for t in (loss, ce, soft))
    if return_parts:
        return loss, ce.detach(), soft.detach()
    return loss
