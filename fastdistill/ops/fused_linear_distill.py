"""Fused lm-head + distillation loss: the [N, V] logits of student and teacher never exist at once.

Per chunk of valid rows (rows whose label is ``ignore_index`` are dropped before any matmul):

    s   = X_c W_s^T (+ b_s)                         [C, Vs]  student logits of the chunk
    t   = X_t,c W_t^T (+ b_t)   (no grad)          [C, Vt]  dense teacher, or the top-k (values, indices) [C, k]
    rows, dlogits = row terms of  hard_weight * CE(s, labels) + soft_weight * D(teacher, student)
    dX_c = dlogits W_s ;  dW += dlogits^T X_c ;  db += sum_rows dlogits

so the op returns the loss together with the gradients of student hidden, weight and bias, and backward only scales
them by grad_output. Every chunk-local temporary is O(C x V); nothing O(N x V) is allocated.

Both terms of a dense teacher come from one call of the shared row kernel ``distill_loss_rows`` (Triton / C++ /
torch), which carries them explicitly (``soft_scale``, ``ce_scale``, ``ignore_index``, the common width
``v_common``): the hard term (cross-entropy over the student's full vocabulary at temperature 1) shares the student's
softmax statistics with the divergence where it can and one dlogits is written for both. When the vocabularies differ
by padding the divergence runs over the common prefix ``[:min(Vs, Vt)]`` (the extra columns excluded from its
softmaxes, never zero-padded) and CE over the student's full row, in the same kernel pass; without a soft term CE is
computed on the chunk logits directly. The top-k path computes the student's
logsumexp at T and at 1 in one pass (``_topk_chunk_torch`` / the Triton kernels in
``fastdistill.kernels.topk_distill``) and shares it between the CE and the sparse divergence.

Top-k teachers (``topk_values`` [N, k], ``topk_indices`` [N, k], distinct indices per row): the divergence is taken
between two distributions over k + 1 buckets, the k teacher tokens and one tail bucket "every other token":

    student:  p_s(idx_j) from the student's full softmax over Vs at temperature T; tail = 1 - sum_j p_s(idx_j)
    teacher:  renormalize  q_j = softmax_j(values / T) for logits, softmax_j(values) for log-probs at T; tail 0
              bucket       q_j = exp(values_j), tail = 1 - sum_j q_j (values are log-probs of the teacher at T)

``values`` are the teacher's logits, or its log-probs at the distillation temperature T (``log_softmax(z_t / T)``);
the op takes them as ``topk_tail`` (0 renormalize, 1 bucket) and ``topk_logits``.

With ``renormalize`` and forward KL this is the sparse KD of DistillKit (teacher renormalized over its top k, student
log-probs from the full softmax); ``bucket`` is the tail-bucket variant (TRL / DistillKit). Reverse KL against a
renormalized teacher is infinite (the student has mass where the teacher has none) and is rejected up front.
"""

from __future__ import annotations

import functools
import math

import torch

from fastdistill import _backend
from fastdistill.ops import distill_loss as _dl
from fastdistill.ops._autograd import is_exactly_one, reject_double_backward
from fastdistill.reference import DIVERGENCES, divergence_rows

DIVERGENCE_ID = _dl.DIVERGENCE_ID
REDUCTION_ID = _dl.REDUCTION_ID
TOPK_TAILS = ("renormalize", "bucket")
TOPK_VALUES = ("logprobs", "logits")

# budget for one [C, Vs + Vt] fp32 block of chunk logits; the chunk's live temporaries are a small multiple of it
_CPU_CHUNK_BYTES = 64 * 2**20
_CUDA_CHUNK_BYTES_MAX = 512 * 2**20


def choose_chunk_size(n_rows: int, v_student: int, v_teacher: int, hidden: int, device: torch.device) -> int:
    """Rows per chunk from N, V, H and free memory (a power of two, at least 16, at most ``n_rows``).

    The chunk's logits block (student + teacher, fp32 math) is kept near 64 MiB on CPU (256 rows at V = 32000: the
    per-chunk dW update re-reads the [V, H] accumulator, so fewer, larger chunks are faster; 4x larger gained nothing
    in a 1-thread measurement) and at most 1/16 of free memory (capped at 512 MiB) on CUDA; rows are also kept at
    least as many as ``hidden / 8`` so the matmuls per chunk stay large enough to run near the device's matmul rate.
    """
    row_bytes = 4 * (v_student + v_teacher)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 16, _CUDA_CHUNK_BYTES_MAX)
    else:
        budget = _CPU_CHUNK_BYTES
    rows = max(budget // max(row_bytes, 1), hidden // 8, 16)
    rows = 1 << (int(rows).bit_length() - 1)  # floor to a power of two
    return int(max(1, min(rows, max(n_rows, 1))))


def resolve_backend(device: torch.device, sparse: bool, backend: str | None = None) -> str:
    """The backend of the chunk terms: the dense row kernel (Triton / C++ / torch) or, for a top-k teacher, the top-k
    kernels (Triton / torch; an explicit ``cpp`` runs their torch version, the step having no C++ kernel)."""
    if sparse:
        return _backend.choose_backend(device, cpp_op=None, backend=backend, cpp_runs_torch=True)
    return _backend.choose_backend(device, cpp_op="distill_loss_rows", backend=backend)


# ---------------------------------------------------------------------------------------------------------------------
# Per-chunk row terms (torch). Each returns (ce_rows or None, soft_rows or None, dlogits fp32 [C, Vs]) where dlogits is
# already multiplied by the weights and the batch normalisation.
# ---------------------------------------------------------------------------------------------------------------------


def _max_and_log_sum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max m [C, 1] and log sum exp(x - m) [C]: log softmax(x) = (x - m) - log_sum, kept apart so it never rounds
    to the ulp of the logsumexp m + log_sum (16x float32's unit roundoff at logits near 20)."""
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # an all -inf row: -inf log-probs, like log_softmax
    return m, torch.log(torch.exp(x - m).sum(-1))


def _ce_rows_and_grad(s32: torch.Tensor, labels: torch.Tensor, scale: float):
    """CE rows and ``scale * (softmax(s) - onehot(labels))`` from the chunk's logits."""
    m, log_sum = _max_and_log_sum(s32)
    ce = (m.squeeze(1) - s32.gather(1, labels[:, None]).squeeze(1)) + log_sum
    grad = torch.exp((s32 - m) - log_sum[:, None]).mul_(scale)
    grad.scatter_add_(1, labels[:, None], torch.full_like(labels[:, None], -scale, dtype=grad.dtype))
    return ce, grad


def teacher_topk_logprobs(values: torch.Tensor, tail: int, temperature: float, logits: bool) -> torch.Tensor:
    """Teacher bucket log-probs [C, k + 1] (k tokens, then the tail) in fp32, or fp64 for fp64 ``values`` (the top-k
    step passes them so: the bucket tail 1 - sum_j q_j cancels, by 1e-4 relative in fp32 when the top k hold 99.9% of
    the mass); ``values`` are logits (tempered here) or log-probs already at temperature T."""
    v = values.to(torch.promote_types(values.dtype, torch.float32))
    if tail == 0:  # renormalize over the top k
        lq = torch.log_softmax(v / temperature if logits else v, dim=-1)
        lq_tail = torch.full_like(lq[:, :1], -math.inf)
    else:  # bucket: values are log-probs at temperature T; the tail holds the rest of the mass
        lq = v
        rest = -torch.expm1(torch.logsumexp(v, dim=-1, keepdim=True))  # 1 - sum_j q_j
        lq_tail = torch.where(rest > 0, torch.log(rest.clamp_min(1e-300)), torch.full_like(rest, -math.inf))
    return torch.cat([lq, lq_tail], dim=-1)


def bucket_divergence_and_grad(ls: torch.Tensor, lq: torch.Tensor, divergence: int, beta: float):
    """Divergence rows D(q, p_s) over k + 1 buckets and g = dD / d log p_s(bucket), both [C, k + 1] -> [C], [C, k + 1].

    g is in closed form (torch.func / autograd are not usable inside a custom op under torch.compile). Multiples of
    p_s added to g do not change the chained gradient (sum_j p_j d log p_j / ds = 0), so such terms are dropped.
    """
    name = DIVERGENCES[divergence]
    rows = divergence_rows(ls, lq, name, beta, 1.0)  # normalized log-probs: its log_softmax is the identity
    p, q = ls.exp(), lq.exp()
    zero = torch.zeros_like(ls)
    keep = p > 0
    both = keep | (q > 0)
    l_, lq_ = torch.where(both, ls, zero), torch.where(both, lq, zero)  # no -inf - -inf below
    if name == "forward_kl":
        g = -q
    elif name == "reverse_kl":
        g = p * (l_ - lq_)
    elif name == "tvd":
        g = 0.5 * torch.sign(p - q) * p
    elif name == "jsd":
        lm = torch.logaddexp(l_ + math.log1p(-beta), lq_ + math.log(beta))
        g = (1 - beta) * p * (l_ - lm)
    elif name == "skew_forward_kl":  # m = beta q + (1 - beta) p
        if beta == 1.0:
            g = zero
        else:
            lm = l_ if beta == 0.0 else torch.logaddexp(lq_ + math.log(beta), l_ + math.log1p(-beta))
            g = -(1 - beta) * q * torch.exp(l_ - lm)
    else:  # skew_reverse_kl: m = beta p + (1 - beta) q
        lm = (
            l_
            if beta == 1.0
            else (lq_ if beta == 0.0 else torch.logaddexp(l_ + math.log(beta), lq_ + math.log1p(-beta)))
        )
        g = p * (l_ - lm - beta * torch.exp(l_ - lm))
    if name != "forward_kl":
        g = torch.where(keep, g, zero)
    return rows, g


def bucket_terms(
    ls: torch.Tensor, values: torch.Tensor, tail: int, temperature: float, logits: bool, divergence: int, beta: float
):
    """The [C, k + 1] bucket step shared by the torch and Triton top-k chunks, from the student's bucket log-probs
    ``ls`` (k tokens, then the tail) and the teacher's ``values``.

    Returns (rows [C], tail_coef [C], k_coef [C, k]), float32, with the chunk's dlogits (before the soft scale)

        d rows / d z_v = p_v * tail_coef       (v outside the top k)      = p_v (a - G),  a = g_tail / p_tail
        d rows / d z_j = k_coef[j]             (v = idx_j)                 = g_j - G p_j,  G = sum_i g_i

    for z = logits / T. These coefficients cancel: G is near a (e.g. TVD with most mass on one side: a - G is the
    small mass on the other), so an error of one float32 rounding in G or in sum_i p_i = 1 is a large relative error
    of the gradient (measured: 2-15x plain torch's error on the dlogits). This step is O(k) per row, so it runs in
    float64 and renormalises both bucket distributions there first (sum_i p_i = 1 exactly, as torch's log_softmax
    backward would make it); the O(V) passes stay float32.
    """
    ls64 = torch.log_softmax(ls.double(), dim=-1)
    lq64 = teacher_topk_logprobs(values.double(), tail, temperature, logits)
    rows, g = bucket_divergence_and_grad(ls64, lq64, divergence, beta)
    p = ls64.exp()
    G = g.sum(-1)
    a = torch.where(g[:, -1] != 0, g[:, -1] / p[:, -1].clamp_min(1e-300), torch.zeros_like(G))
    tail_coef = a - G
    k_coef = g[:, :-1] - G[:, None] * p[:, :-1]
    return rows.float(), tail_coef.float(), k_coef.float()


def _topk_chunk_torch(
    s32,
    values,
    indices,
    labels,
    divergence,
    beta,
    temperature,
    tail,
    topk_logits,
    soft_scale,
    loss_scale,
    hard_scale,
    need_soft,
    need_hard,
):
    """Top-k chunk in torch. The student's softmax at T is computed once and turned into dlogits in place; at T = 1
    the cross-entropy term shares it (its logsumexp and its probabilities), so the chunk sees ~3 passes over [C, Vs].

    Precision: every student log-prob is (z - max) - log(sum), never z - logsumexp (which rounds to the ulp of the
    logsumexp: 16x float32's unit roundoff at logits near 20, an error common to all buckets that the closed-form
    gradient's p (a - G) no longer cancels), and the bucket normaliser is the sum of its parts (tail + top k), so the
    k + 1 bucket probabilities sum to 1 up to one rounding.
    """
    s32 = s32.float()
    T = temperature
    if not need_soft:
        if not need_hard:
            return None, None, None
        ce_rows, dlogits = _ce_rows_and_grad(s32, labels, hard_scale)
        return ce_rows, None, dlogits
    zT = s32 / T if T != 1.0 else s32
    m = zT.amax(dim=-1, keepdim=True)  # [C, 1]
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # an all -inf row: NaN-free here, like log_softmax
    p = torch.exp(zT - m)  # [C, Vs] exp(z - max); the softmax at T after the scaling below; then dlogits in place
    del zT
    e_k = p.gather(1, indices)  # [C, k]
    p.scatter_(1, indices, 0.0)  # exact tail mass: a sum over the other tokens, not 1 - sum(p_k)
    e_tail = p.sum(-1)
    p.scatter_(1, indices, e_k)
    log_sum = torch.log(e_tail + e_k.sum(-1))  # [C] the normaliser as the sum of the buckets
    inv_sum = torch.exp(-log_sum)
    p.mul_(inv_sum[:, None])
    p_k = e_k.mul_(inv_sum[:, None])
    ls_k = (s32.gather(1, indices) / T - m) - log_sum[:, None]
    ls_tail = torch.where(e_tail > 0, torch.log(e_tail.clamp_min(1e-38)) - log_sum, torch.full_like(e_tail, -math.inf))
    ls = torch.cat([ls_k, ls_tail[:, None]], dim=-1)
    shared = T == 1.0
    ce_rows = None
    if need_hard:  # lse(s) - s[label] = (max - s[label]) + log(sum), at T = 1 the softmax's own
        m1, log_sum1 = (m, log_sum) if shared else _max_and_log_sum(s32)
        ce_rows = (m1.squeeze(1) - s32.gather(1, labels[:, None]).squeeze(1)) + log_sum1
    rows, tail_coef, k_coef = bucket_terms(ls, values, tail, T, topk_logits, divergence, beta)
    soft_rows = rows * loss_scale
    coef = soft_scale * loss_scale / T
    # d/ds_v = coef (p_v tail_coef [v not in top k] + k_coef_j [v = idx_j]) (+ hard_scale (p_v - [v = label]) at T = 1)
    row_coef = coef * tail_coef
    k_val = coef * k_coef
    if need_hard and shared:
        row_coef = row_coef + hard_scale
        k_val = k_val + hard_scale * p_k
    dlogits = p.mul_(row_coef[:, None])
    dlogits.scatter_(1, indices, k_val)
    if need_hard:
        if not shared:
            dlogits.add_(torch.exp((s32 - m1) - log_sum1[:, None]).mul_(hard_scale))
        dlogits.scatter_add_(1, labels[:, None], torch.full_like(labels[:, None], -hard_scale, dtype=dlogits.dtype))
    return ce_rows, soft_rows, dlogits


def _topk_chunk_triton(
    s,
    values,
    indices,
    labels,
    divergence,
    beta,
    temperature,
    tail,
    topk_logits,
    soft_scale,
    loss_scale,
    hard_scale,
    need_soft,
    need_hard,
):
    """Top-k chunk with the Triton kernels: pass 1 (softmax stats at T and 1, exact tail mass), the small bucket
    divergence in torch, pass 2 (dlogits over the vocabulary)."""
    from fastdistill.ops.fused_linear_distill_triton import topk_grad, topk_stats

    T = temperature
    max_t, log_sum_t, max_1, log_sum_1, log_tail = topk_stats(s, indices, T, need_hard)
    C, k = indices.shape
    soft_rows = ce_rows = None
    if need_soft:
        ls_k = (s.gather(1, indices).float() / T - max_t[:, None]) - log_sum_t[:, None]
        ls = torch.cat([ls_k, log_tail[:, None]], dim=-1)
        rows, tail_coef, k_coef = bucket_terms(ls, values, tail, T, topk_logits, divergence, beta)
        soft_rows = rows * loss_scale
        coef = soft_scale * loss_scale / T
        tail_coef, k_coef = tail_coef * coef, k_coef * coef
    else:
        tail_coef = torch.zeros(C, device=s.device, dtype=torch.float32)
        k_coef = torch.zeros(C, k, device=s.device, dtype=torch.float32)
    if need_hard:
        ce_rows = (max_1 - s.gather(1, labels[:, None]).squeeze(1).float()) + log_sum_1
    stats = (max_t, log_sum_t, max_1, log_sum_1)
    dlogits = topk_grad(s, indices, k_coef, tail_coef, stats, labels, T, hard_scale, need_soft, need_hard)
    return ce_rows, soft_rows, dlogits


def _dense_chunk(
    s,
    t,
    labels,
    divergence,
    beta,
    temperature,
    ignore_index,
    soft_scale,
    loss_scale,
    hard_scale,
    need_soft,
    need_hard,
    need_grad,
    backend,
):
    """Dense teacher chunk: both terms from one row-kernel call (explicit soft and CE scales, and the common width
    min(Vs, Vt): a teacher narrower than the student needs no slicing and no second pass); no teacher (hard term only)
    is CE on the chunk logits."""
    if not need_soft:
        if not need_hard:
            return None, None, None
        ce_rows, dlogits = _ce_rows_and_grad(s.float(), labels, hard_scale)
        return ce_rows, None, dlogits if need_grad else None
    one = torch.ones(1, dtype=torch.float32, device=s.device)
    soft_rows, dlogits, ce_rows = _dl.distill_loss_rows(
        s,
        t,
        labels,
        one,
        divergence,
        beta,
        temperature,
        ignore_index,
        loss_scale,
        need_grad,
        backend,
        soft_scale=soft_scale,
        ce_scale=hard_scale if need_hard else 0.0,
        v_common=min(s.shape[1], t.shape[1]),
    )
    return (ce_rows if need_hard else None), soft_rows, (dlogits if need_grad else None)


# ---------------------------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------------------------


def _take_rows(x: torch.Tensor | None, rows: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """The chunk's rows of ``x``: a gather of the valid rows (ignored ones compacted away) or a plain slice."""
    if x is None:
        return None
    return x.index_select(0, rows) if rows is not None else x[start:stop]


def fused_linear_distill_forward(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    topk_values: torch.Tensor | None,
    topk_indices: torch.Tensor | None,
    labels: torch.Tensor | None,
    divergence: int,
    beta: float,
    temperature: float,
    hard_weight: float,
    soft_weight: float,
    ignore_index: int,
    reduction: int,
    scale_by_t2: bool,
    topk_tail: int,
    topk_logits: bool,
    chunk_size: int,
    accum_fp32: bool,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    backend: str,
    compute_dtype: torch.dtype | None = None,
):
    """Chunked forward; returns (loss, ce, soft, grad_hidden, grad_weight, grad_bias). See the module docstring.

    ``student_hidden`` [N, Hs], ``labels`` [N] or None; ``chunk_size`` <= 0 picks it automatically. ``ce`` and
    ``soft`` are the unweighted terms with the same reduction as ``loss``. ``backend`` is already resolved
    (``resolve_backend``). ``compute_dtype`` (the autocast dtype, or None): the dtype of every matmul, student and
    teacher, and of the logits the row kernels read (their math is float32 whatever it is); the gradients are returned
    in the dtypes of the inputs they belong to.
    """
    with torch.autocast(student_hidden.device.type, enabled=False):  # the dtypes below are explicit
        return _forward(
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            topk_values,
            topk_indices,
            labels,
            divergence,
            beta,
            temperature,
            hard_weight,
            soft_weight,
            ignore_index,
            reduction,
            scale_by_t2,
            topk_tail,
            topk_logits,
            chunk_size,
            accum_fp32,
            need_grad_hidden,
            need_grad_weight,
            need_grad_bias,
            backend,
            compute_dtype,
        )


def _forward(
    X,
    W,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    topk_values,
    topk_indices,
    labels,
    divergence,
    beta,
    temperature,
    hard_weight,
    soft_weight,
    ignore_index,
    reduction,
    scale_by_t2,
    topk_tail,
    topk_logits,
    chunk_size,
    accum_fp32,
    need_grad_hidden,
    need_grad_weight,
    need_grad_bias,
    backend,
    compute_dtype,
):
    N, Hs = X.shape
    Vs = W.shape[0]
    device = X.device
    dtype = compute_dtype or X.dtype  # matmuls and chunk logits
    divergence = _dl.canonical_divergence(divergence, beta)
    need_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    need_soft = soft_weight != 0.0 and (teacher_weight is not None or topk_values is not None)
    need_hard = hard_weight != 0.0 and labels is not None
    sparse = topk_values is not None

    if labels is not None:
        valid_idx = (labels != ignore_index).nonzero().squeeze(1)  # compact: ignored rows cost no matmul
        n_valid = int(valid_idx.numel())
    else:
        valid_idx = None
        n_valid = N
    norm = 1.0 / max(n_valid, 1) if reduction == REDUCTION_ID["batchmean"] else 1.0
    loss_scale = temperature * temperature if scale_by_t2 else 1.0
    soft_scale, hard_scale = soft_weight * norm, hard_weight * norm

    acc_dtype = torch.float32 if accum_fp32 else W.dtype
    # the weights in the compute dtype, cast once (as autocast caches its casts of parameters)
    W_mm = W.to(dtype)
    b_mm = student_bias.to(dtype) if student_bias is not None else None
    if teacher_weight is not None:
        teacher_weight = teacher_weight.to(dtype)
        teacher_bias = teacher_bias.to(dtype) if teacher_bias is not None else None
    grad_hidden = torch.zeros_like(X) if need_grad_hidden else X.new_empty(0)
    grad_weight = torch.zeros(W.shape, dtype=acc_dtype, device=device) if need_grad_weight else W.new_empty(0)
    grad_bias = (
        torch.zeros(Vs, dtype=torch.float32, device=device) if need_grad_bias else W.new_empty(0, dtype=torch.float32)
    )
    per_row = reduction == REDUCTION_ID["none"]
    ce_out = torch.zeros(N if per_row else (), dtype=torch.float32, device=device)
    soft_out = torch.zeros(N if per_row else (), dtype=torch.float32, device=device)

    if chunk_size <= 0:
        # a top-k chunk keeps about two [C, Vs] fp32 blocks (softmax -> dlogits, the logits), like a dense one
        Vt = teacher_weight.shape[0] if teacher_weight is not None else (Vs if sparse else 0)
        chunk_size = choose_chunk_size(n_valid, Vs, Vt, Hs, device)
    # the chunk terms: chosen once, from the teacher's form and the resolved backend
    if sparse:
        topk = _topk_chunk_triton if backend == "triton" else _topk_chunk_torch
        chunk_terms = functools.partial(
            topk,
            divergence=divergence,
            beta=beta,
            temperature=temperature,
            tail=topk_tail,
            topk_logits=topk_logits,
            soft_scale=soft_scale,
            loss_scale=loss_scale,
            hard_scale=hard_scale,
            need_soft=need_soft,
            need_hard=need_hard,
        )
    else:
        chunk_terms = functools.partial(
            _dense_chunk,
            divergence=divergence,
            beta=beta,
            temperature=temperature,
            ignore_index=ignore_index,
            soft_scale=soft_scale,
            loss_scale=loss_scale,
            hard_scale=hard_scale,
            need_soft=need_soft,
            need_hard=need_hard,
            need_grad=need_grad,
            backend=backend,
        )

    for start in range(0, n_valid, chunk_size):
        stop = min(start + chunk_size, n_valid)
        rows = valid_idx[start:stop] if valid_idx is not None else None
        take = functools.partial(_take_rows, rows=rows, start=start, stop=stop)
        X_c = take(X).to(dtype)
        lab_c = take(labels)
        s = torch.nn.functional.linear(X_c, W_mm, b_mm)  # [C, Vs]
        if sparse:
            ce_rows, soft_rows, dlogits = chunk_terms(s, take(topk_values), take(topk_indices), lab_c)
        else:
            t = None
            if need_soft:
                with torch.no_grad():
                    t = torch.nn.functional.linear(take(teacher_hidden).to(dtype), teacher_weight, teacher_bias)
            ce_rows, soft_rows, dlogits = chunk_terms(s, t, lab_c)
            del t
        del s
        for out, part in ((ce_out, ce_rows), (soft_out, soft_rows)):
            if part is None:
                continue
            if per_row:
                if rows is not None:
                    out.index_copy_(0, rows, part.float())
                else:
                    out[start:stop] = part
            else:
                out.add_(part.float().sum())
        if not need_grad or dlogits is None:
            continue
        d = dlogits.to(dtype)
        if need_grad_hidden:
            dX_c = (d @ W_mm).to(X.dtype)  # [C, Hs]
            if rows is not None:
                grad_hidden.index_copy_(0, rows, dX_c)
            else:
                grad_hidden[start:stop] = dX_c
        if need_grad_weight:
            if acc_dtype == dtype:
                grad_weight.addmm_(d.t(), X_c)
            else:  # accumulated in a wider dtype (accum_fp32, or a float32 weight under autocast)
                grad_weight.addmm_(d.t().to(acc_dtype), X_c.to(acc_dtype))
        if need_grad_bias:
            grad_bias.add_(dlogits.float().sum(0))
        del dlogits, d

    if not per_row:
        ce_out.mul_(norm)
        soft_out.mul_(norm)
    loss = hard_weight * ce_out + soft_weight * soft_out
    return loss, ce_out, soft_out, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("fastdistill::fused_linear_distill", mutates_args=())
def fused_linear_distill_op(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    topk_values: torch.Tensor | None,
    topk_indices: torch.Tensor | None,
    labels: torch.Tensor | None,
    divergence: int,
    beta: float,
    temperature: float,
    hard_weight: float,
    soft_weight: float,
    ignore_index: int,
    reduction: int,
    scale_by_t2: bool,
    topk_tail: int,
    topk_logits: bool,
    chunk_size: int,
    accum_fp32: bool,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    backend: str,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, soft, grad_hidden, grad_weight, grad_bias); inputs already validated by the functional API."""
    return fused_linear_distill_forward(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        topk_values,
        topk_indices,
        labels,
        divergence,
        beta,
        temperature,
        hard_weight,
        soft_weight,
        ignore_index,
        reduction,
        scale_by_t2,
        topk_tail,
        topk_logits,
        chunk_size,
        accum_fp32,
        need_grad_hidden,
        need_grad_weight,
        need_grad_bias,
        backend,
        compute_dtype,
    )


@fused_linear_distill_op.register_fake
def _(
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    topk_values,
    topk_indices,
    labels,
    divergence,
    beta,
    temperature,
    hard_weight,
    soft_weight,
    ignore_index,
    reduction,
    scale_by_t2,
    topk_tail,
    topk_logits,
    chunk_size,
    accum_fp32,
    need_grad_hidden,
    need_grad_weight,
    need_grad_bias,
    backend,
    compute_dtype=None,
):
    N = student_hidden.shape[0]
    shape = (N,) if reduction == REDUCTION_ID["none"] else ()
    loss = student_hidden.new_empty(shape, dtype=torch.float32)
    ce = student_hidden.new_empty(shape, dtype=torch.float32)
    soft = student_hidden.new_empty(shape, dtype=torch.float32)
    gx = torch.empty_like(student_hidden) if need_grad_hidden else student_hidden.new_empty(0)
    acc = torch.float32 if accum_fp32 else student_weight.dtype
    gw = student_weight.new_empty(student_weight.shape, dtype=acc) if need_grad_weight else student_weight.new_empty(0)
    gb = student_weight.new_empty((student_weight.shape[0] if need_grad_bias else 0,), dtype=torch.float32)
    return loss, ce, soft, gx, gw, gb


def _setup_context(ctx, inputs, output):
    # only the loss output is differentiated (ce / soft are returned detached, the gradients are not differentiable):
    # without this, autograd would materialize zero tensors of the student's hidden and weight sizes in backward
    ctx.set_materialize_grads(False)
    ctx.reduction = inputs[15]
    ctx.weight_dtype = inputs[1].dtype
    ctx.bias_dtype = inputs[2].dtype if inputs[2] is not None else None
    ctx.save_for_backward(output[3], output[4], output[5])


def _scale(grad: torch.Tensor, grad_loss: torch.Tensor, reduction: int) -> torch.Tensor:
    if grad.numel() == 0:
        return grad
    if reduction == REDUCTION_ID["none"]:
        # the gradients were accumulated for loss.sum(); a per-row grad_output can only be applied when it is uniform
        scale = grad_loss.reshape(-1)[:1] if grad_loss.numel() else grad_loss.new_ones(1)
        eager = not torch.compiler.is_compiling() and type(grad_loss) is torch.Tensor
        if eager and grad_loss.numel() and not torch.all(grad_loss == scale):
            raise RuntimeError(
                "fused_linear_distill_loss(reduction='none') supports backward only through a uniform weighting of "
                "the rows (e.g. loss.sum() or loss.mean()); use reduction='sum' / 'batchmean' for weighted rows"
            )
        return grad * scale.to(grad.dtype).reshape(())
    if is_exactly_one(grad_loss):  # the common loss.backward(): hand over the precomputed gradient
        return grad
    return grad * grad_loss.to(grad.dtype)


def _backward(ctx, grad_loss, _g_ce, _g_soft, _g_x, _g_w, _g_b):
    reject_double_backward("fused_linear_distill_loss", grad_loss)
    gx, gw, gb = ctx.saved_tensors
    gx = _scale(gx, grad_loss, ctx.reduction) if gx.numel() else None
    gw = _scale(gw, grad_loss, ctx.reduction).to(ctx.weight_dtype) if gw.numel() else None
    gb = _scale(gb, grad_loss, ctx.reduction).to(ctx.bias_dtype) if gb.numel() and ctx.bias_dtype else None
    return (gx, gw, gb) + (None,) * 23


fused_linear_distill_op.register_autograd(_backward, setup_context=_setup_context)
