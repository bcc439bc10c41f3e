"""Intermediate-representation distillation: attention distributions and relations (MiniLM / MiniLMv2), affinity
maps and hints ("Text is Text, No Matter What"), all without materializing [L, L] maps where the loss allows it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fastdistill.divergences import REDUCTIONS
from fastdistill.functional._autocast import autocast_dtype, float32_pair, no_autocast
from fastdistill.functional._checks import check_choice, check_frozen, check_tensor
from fastdistill.ops import affinity as _aff
from fastdistill.ops import attention_distill as _att

HINT_KINDS = ("mse", "cosine")


def _check_mask(name: str, mask: torch.Tensor | None, shape: tuple, device: torch.device, what: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"{name} has dtype {mask.dtype}; expected bool or an integer dtype (1 = keep, 0 = padding)")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected {tuple(shape)} ({what})")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the features are on {device}; expected the same device")


def _resolve_scale(scale, ds: int, dt: int) -> tuple[float, float]:
    if scale is None:
        return ds**-0.5, dt**-0.5
    pair = tuple(scale) if isinstance(scale, (tuple, list)) else (scale, scale)
    if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in pair):
        raise ValueError(
            f"scale={scale!r} is invalid; expected None (1/sqrt(head size) of each model), a finite number > 0, "
            "or a (student_scale, teacher_scale) pair of them"
        )
    return float(pair[0]), float(pair[1])


def _relation_split(name: str, x: torch.Tensor, relation_heads: int) -> torch.Tensor:
    B, H, L, D = x.shape
    if (H * D) % relation_heads:
        raise ValueError(
            f"{name} has {H} heads of size {D} ({H * D} features), which do not split into relation_heads="
            f"{relation_heads} equal relation heads; expected H * D divisible by relation_heads"
        )
    # MiniLMv2: concatenate the heads, [B, L, H*D], and re-split into R relation heads of H*D/R features
    return x.transpose(1, 2).reshape(B, L, relation_heads, H * D // relation_heads).transpose(1, 2)


def attention_distill_loss(
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
    backend: str | None = None,
) -> torch.Tensor:
    r"""Attention-distribution (MiniLM) and self-attention-relation (MiniLMv2) distillation, never forming [L, L].

    Per head h and query row i, with :math:`A = \mathrm{softmax}(q k^\top \cdot \text{scale} + \text{mask})`:

    .. math:: \ell_{h,i} = \mathrm{KL}(A^t_{h,i} \| A^s_{h,i}) = \sum_j A^t_{h,ij} (\log A^t_{h,ij} - \log A^s_{h,ij})

    ``batchmean`` averages over heads and valid rows of the whole batch (MiniLM's :math:`\frac{1}{A_h |x|}\sum`).

    Relation transfer (MiniLMv2): with ``relation_heads=R`` each model's heads are concatenated ([B, L, H*D]) and
    re-split into R relation heads of H*D/R features, so the two models may have different head counts; the same call
    computes the QQ, KK and VV relations (pass the same tensor as q and k: e.g. ``attention_distill_loss(s_v, s_v,
    t_v, t_v, relation_heads=R)``). The scale then defaults to 1/sqrt(relation-head size) of each model.

    The fused paths run flash-style tiles with an online log-sum-exp for both models (Triton on CUDA, blocks of query
    rows in torch on CPU): extra memory O(B H L) (Triton) / O(block x L) (torch). The gradient w.r.t. the student's
    q and k recomputes the tiles (dS = scale (P_s - P_t) w); for ``sum`` / ``batchmean`` it is computed in the
    forward pass and backward only scales it. The teacher gets no gradient. Math in fp32 (fp64 for fp64 inputs on
    the torch path).

    Masks: ``attention_mask`` [B, L] (1 = keep, the Hugging Face convention) hides padded keys of both models and
    removes padded query rows; ``causal=True`` also hides keys after the query. A row with no visible key counts 0.

    Args:
        student_q, student_k: student queries / keys, float32 / bfloat16 / float16 / float64.
        teacher_q, teacher_k: teacher queries / keys (same B, L, dtype and device; may differ in H and D with
            ``relation_heads``, in D otherwise); must not require grad.
        attention_mask: optional [B, L] bool / integer mask, 1 = real token.
        causal: add the causal mask (decoder attention).
        scale: softmax scale; None = 1/sqrt(head size) of each model; a number for both; or (student, teacher).
        relation_heads: R for MiniLMv2 relation transfer; None = per-head attention transfer (needs equal H).
        reduction: ``batchmean`` (sum / (H * number of valid rows)), ``sum``, or ``none`` ([B, H, L] per-row KL).
        backend: force ``triton`` / ``torch`` (default: ``FASTDISTILL_BACKEND`` or the best for the device).

    Shape:
        q, k: ``[B, H, L, D]`` (teacher ``[B, H_t, L, D_t]``); output ``[]`` or ``[B, H (or R), L]``.

    Example::

        >>> import torch, fastdistill.functional as FD
        >>> sq, sk = torch.randn(2, 4, 128, 32, requires_grad=True), torch.randn(2, 4, 128, 32, requires_grad=True)
        >>> tq, tk = torch.randn(2, 12, 128, 64), torch.randn(2, 12, 128, 64)
        >>> loss = FD.attention_distill_loss(sq, sk, tq, tk, relation_heads=8, causal=True)
        >>> loss.backward()
    """
    names = ("student_q", "student_k", "teacher_q", "teacher_k")
    tensors = (student_q, student_k, teacher_q, teacher_k)
    if len({x.dtype for x in tensors if isinstance(x, torch.Tensor)}) > 1 and autocast_dtype(student_q.device):
        # autocast: mixed dtypes are cast to float32, as torch does for its losses (see functional/_autocast.py)
        student_q, student_k, teacher_q, teacher_k = (x.float() for x in tensors)
        tensors = (student_q, student_k, teacher_q, teacher_k)
    for name, x in zip(names, tensors):
        check_tensor(name, x, min_dim=4)
        if x.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected 4 dimensions [B, H, L, D]")
    for name, x in zip(names[1:], tensors[1:]):
        if x.device != student_q.device or x.dtype != student_q.dtype:
            raise ValueError(
                f"{name} is {x.dtype} on {x.device} but student_q is {student_q.dtype} on {student_q.device}; "
                "expected the same dtype and device"
            )
    for a, b in ((0, 1), (2, 3)):
        if tensors[a].shape != tensors[b].shape:
            raise ValueError(
                f"{names[a]} has shape {tuple(tensors[a].shape)} but {names[b]} has shape "
                f"{tuple(tensors[b].shape)}; expected the same shape"
            )
    B, Hs, L, Ds = student_q.shape
    _, Ht, Lt, Dt = teacher_q.shape
    if teacher_q.shape[0] != B or Lt != L:
        raise ValueError(
            f"teacher_q has shape {tuple(teacher_q.shape)} but student_q has {tuple(student_q.shape)}; expected the "
            "same batch size B and sequence length L"
        )
    if min(B, L, Ds, Dt, Hs, Ht) == 0:
        raise ValueError(f"empty input: student_q {tuple(student_q.shape)}, teacher_q {tuple(teacher_q.shape)}")
    check_frozen("teacher_q", teacher_q)
    check_frozen("teacher_k", teacher_k)
    check_choice("reduction", reduction, REDUCTIONS)
    _check_mask("attention_mask", attention_mask, (B, L), student_q.device, "[B, L], 1 = keep")
    if relation_heads is not None:
        if not isinstance(relation_heads, int) or isinstance(relation_heads, bool) or relation_heads < 1:
            raise ValueError(f"relation_heads={relation_heads!r} is invalid; expected None or an integer >= 1")
        same_s = student_k is student_q  # one tensor as q and k (QQ / KK / VV relations): split it once
        student_q = _relation_split("student_q", student_q, relation_heads)
        student_k = student_q if same_s else _relation_split("student_k", student_k, relation_heads)
        same_t = teacher_k is teacher_q
        teacher_q = _relation_split("teacher_q", teacher_q, relation_heads)
        teacher_k = teacher_q if same_t else _relation_split("teacher_k", teacher_k, relation_heads)
        Ds, Dt = student_q.shape[-1], teacher_q.shape[-1]
    elif Hs != Ht:
        raise ValueError(
            f"student has {Hs} heads but teacher has {Ht}; per-head attention transfer needs equal head counts "
            "(pass relation_heads=R for MiniLMv2 relation transfer across head counts)"
        )
    ss, st = _resolve_scale(scale, Ds, Dt)
    resolved = _att.resolve_backend(student_q.device, backend)
    need_grad = torch.is_grad_enabled() and (student_q.requires_grad or student_k.requires_grad)
    with no_autocast(student_q.device):  # the op computes in its own dtype (see functional/_autocast.py)
        loss, _, _ = _att.attention_distill_op(
            student_q,
            student_k,
            teacher_q,
            teacher_k,
            attention_mask,
            bool(causal),
            ss,
            st,
            _att.REDUCTION_ID[reduction],
            need_grad,
            resolved,
        )
    return loss


def affinity_distill_loss(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    method: str = "auto",
) -> torch.Tensor:
    r"""Affinity distillation ("Text is Text, No Matter What"): match the position-by-position cosine similarity maps.

    With :math:`N` the features with L2-normalized rows, :math:`A = N N^\top` ([B, L, L]) and

    .. math:: \ell = \frac{1}{B} \sum_b \frac{\| A^s_b - A^t_b \|_F^2}{L^2}

    computed exactly without the [L, L] maps: through
    :math:`\|N_s^\top N_s\|^2 - 2\|N_s^\top N_t\|^2 + \|N_t^\top N_t\|^2` (O(L d^2), ``method="gram"``) when
    L > d, else in blocks of rows (O(L^2 d) work, O(rows x L) memory, ``method="tiled"``); ``auto`` picks. The two
    widths may differ (the maps are both [L, L]). Gradient w.r.t. the student only. Math in fp32 (fp64 inputs: fp64).
    The gram form subtracts terms of size ~L^2, so its absolute error is ~eps L^2 / L^2 = eps of the loss scale.

    Args:
        student_feat: [B, L, d_s] student features.
        teacher_feat: [B, L, d_t] teacher features (same B, L, dtype, device); must not require grad.
        mask: optional [B, L] (1 = keep): padded positions leave both maps, L becomes the number of kept positions of
            each example, and examples with none are left out of the mean.
        method: ``auto``, ``gram`` or ``tiled``.

    Shape: features ``[B, L, d]``; output ``[]``.

    Example::

        >>> import torch, fastdistill.functional as FD
        >>> s = torch.randn(4, 512, 64, requires_grad=True); t = torch.randn(4, 512, 256)
        >>> FD.affinity_distill_loss(s, t).backward()
    """
    check_tensor("student_feat", student_feat, min_dim=3)
    check_tensor("teacher_feat", teacher_feat, min_dim=3)
    student_feat, teacher_feat = float32_pair(student_feat, teacher_feat)  # autocast policy: functional/_autocast.py
    for name, x in (("student_feat", student_feat), ("teacher_feat", teacher_feat)):
        if x.dim() != 3:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected 3 dimensions [B, L, d]")
    if student_feat.shape[:2] != teacher_feat.shape[:2]:
        raise ValueError(
            f"student_feat has shape {tuple(student_feat.shape)} but teacher_feat has {tuple(teacher_feat.shape)}; "
            "expected the same [B, L] (the feature widths may differ)"
        )
    if student_feat.device != teacher_feat.device or student_feat.dtype != teacher_feat.dtype:
        raise ValueError(
            f"student_feat is {student_feat.dtype} on {student_feat.device} but teacher_feat is {teacher_feat.dtype} "
            f"on {teacher_feat.device}; expected the same dtype and device"
        )
    check_frozen("teacher_feat", teacher_feat)
    check_choice("method", method, _aff.METHODS)
    B, L, ds = student_feat.shape
    _check_mask("mask", mask, (B, L), student_feat.device, "[B, L], 1 = keep")
    with no_autocast(student_feat.device):  # a loss: its own dtypes (see functional/_autocast.py)
        return _affinity(student_feat, teacher_feat, mask, method)


def _affinity(student_feat, teacher_feat, mask, method):
    B, L, ds = student_feat.shape
    cdt = _att.compute_dtype(student_feat.dtype)
    ns = torch.nn.functional.normalize(student_feat.to(cdt), dim=-1)
    nt = torch.nn.functional.normalize(teacher_feat.to(cdt), dim=-1)
    if mask is not None:
        keep = mask.bool()
        ns, nt = ns * keep[..., None], nt * keep[..., None]
        n = keep.sum(-1).to(cdt)
    else:
        n = torch.full((B,), float(L), dtype=cdt, device=student_feat.device)
    chosen = _aff.choose_method(L, ds, teacher_feat.shape[-1], method)
    if chosen == "gram":
        per = _aff.affinity_sq_gram(ns, nt)
    else:
        need_grad = torch.is_grad_enabled() and ns.requires_grad
        per, _ = _aff.affinity_tiled_op(ns, nt.contiguous(), need_grad)
    per = per / n.clamp(min=1) ** 2
    return per.sum() / (n > 0).sum().clamp(min=1)


def _project(student_feat: torch.Tensor, projection) -> torch.Tensor:
    if projection is None:
        return student_feat
    if isinstance(projection, torch.Tensor):
        if projection.dim() != 2 or projection.shape[1] != student_feat.shape[-1]:
            raise ValueError(
                f"projection has shape {tuple(projection.shape)}; expected a [d_teacher, "
                f"{student_feat.shape[-1]}] weight (applied as student_feat @ projection.T)"
            )
        return torch.nn.functional.linear(student_feat, projection)
    if callable(projection):
        return projection(student_feat)
    raise TypeError(f"projection must be None, a weight tensor or a callable (e.g. nn.Linear), got {type(projection)}")


def hint_loss(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    *,
    projection: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    kind: str = "mse",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Hint loss (FitNets; the character-localised hint of "Text is Text, No Matter What") between features.

    The student features are first mapped to the teacher width by ``projection`` (a [d_t, d_s] weight, or any
    callable such as an ``nn.Linear``; trained with the student), then

    ==========  ===========================================================================
    ``mse``      mean over kept positions and features of :math:`(P(f_s) - f_t)^2`
    ``cosine``   mean over kept positions of :math:`1 - \cos(P(f_s), f_t)`
    ==========  ===========================================================================

    Args:
        student_feat: [..., d_s] student features.
        teacher_feat: [..., d_t] teacher features (same leading shape); must not require grad.
        projection: None (widths must match), a weight tensor, or a callable.
        kind: ``mse`` or ``cosine``.
        mask: optional [...] (the leading shape) 1 = keep; 0 when nothing is kept.

    Example::

        >>> import torch, fastdistill.functional as FD
        >>> proj = torch.nn.Linear(64, 256, bias=False)
        >>> s = torch.randn(4, 32, 64, requires_grad=True); t = torch.randn(4, 32, 256)
        >>> FD.hint_loss(s, t, projection=proj, kind="cosine").backward()
    """
    check_tensor("student_feat", student_feat)
    check_tensor("teacher_feat", teacher_feat)
    check_choice("kind", kind, HINT_KINDS)
    check_frozen("teacher_feat", teacher_feat)
    if student_feat.shape[:-1] != teacher_feat.shape[:-1]:
        raise ValueError(
            f"student_feat has shape {tuple(student_feat.shape)} but teacher_feat has {tuple(teacher_feat.shape)}; "
            "expected the same leading shape (only the feature width may differ, with a projection)"
        )
    _check_mask("mask", mask, tuple(student_feat.shape[:-1]), student_feat.device, "the features' leading shape")
    s = _project(student_feat, projection)
    if s.shape != teacher_feat.shape:
        raise ValueError(
            f"the (projected) student features have shape {tuple(s.shape)} but teacher_feat has "
            f"{tuple(teacher_feat.shape)}; pass projection= mapping width {student_feat.shape[-1]} to "
            f"{teacher_feat.shape[-1]}"
        )
    if autocast_dtype(s.device) is not None:  # a loss: float32 under autocast, as torch's mse_loss / cosine loss
        s = s.float()
    t = teacher_feat.to(s.dtype)
    if kind == "mse":
        per = (s - t).square().mean(-1)
    else:
        per = 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)
    if mask is None:
        return per.mean()
    keep = mask.bool()
    return (per * keep).sum() / keep.sum().clamp(min=1)


def glimpse_hint_loss(
    student_attn: torch.Tensor,
    student_feat: torch.Tensor,
    teacher_attn: torch.Tensor,
    teacher_feat: torch.Tensor,
    *,
    projection: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    kind: str = "mse",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Attention-weighted glimpse hint ("Text is Text, No Matter What"): the character-localised glimpses
    :math:`g_t = \sum_i \alpha_{t,i} F_i` of both models, compared by :func:`hint_loss`.

    Args:
        student_attn: [B, T, L] student attention weights of each decoding step t over the L encoder positions.
        student_feat: [B, L, d_s] student encoder features.
        teacher_attn: [B, T, L] teacher attention weights (must not require grad).
        teacher_feat: [B, L, d_t] teacher encoder features (must not require grad).
        projection, kind: as in :func:`hint_loss` (applied to the student glimpses).
        mask: optional [B, T] (1 = real decoding step).

    Example::

        >>> import torch, fastdistill.functional as FD
        >>> sa = torch.randn(2, 25, 64).softmax(-1).requires_grad_(); sf = torch.randn(2, 64, 256, requires_grad=True)
        >>> ta = torch.randn(2, 25, 64).softmax(-1); tf = torch.randn(2, 64, 256)
        >>> FD.glimpse_hint_loss(sa, sf, ta, tf).backward()
    """
    for name, x in (
        ("student_attn", student_attn),
        ("student_feat", student_feat),
        ("teacher_attn", teacher_attn),
        ("teacher_feat", teacher_feat),
    ):
        check_tensor(name, x, min_dim=3)
        if x.dim() != 3:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected 3 dimensions")
    check_frozen("teacher_attn", teacher_attn)
    check_frozen("teacher_feat", teacher_feat)
    for attn_name, attn, feat_name, feat in (
        ("student_attn", student_attn, "student_feat", student_feat),
        ("teacher_attn", teacher_attn, "teacher_feat", teacher_feat),
    ):
        if attn.shape[0] != feat.shape[0] or attn.shape[2] != feat.shape[1]:
            raise ValueError(
                f"{attn_name} has shape {tuple(attn.shape)} and {feat_name} {tuple(feat.shape)}; expected [B, T, L] "
                "and [B, L, d] with the same B and L"
            )
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(
            f"student_attn has shape {tuple(student_attn.shape)} but teacher_attn has {tuple(teacher_attn.shape)}; "
            "expected the same [B, T, L]"
        )
    g_s = torch.bmm(student_attn, student_feat.to(student_attn.dtype))  # [B, T, d_s]
    g_t = torch.bmm(teacher_attn, teacher_feat.to(teacher_attn.dtype))  # [B, T, d_t]
    return hint_loss(g_s, g_t.to(g_s.dtype), projection=projection, kind=kind, mask=mask)
