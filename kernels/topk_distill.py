"""Triton kernels of the sparse top-k distillation term (one program per row of a chunk of student logits).

``topk_stats_kernel``: one pass over the vocabulary computing the student's softmax statistics at temperature T and
at T = 1 (for the cross-entropy term, sharing the same loads), each as a max m and log sum exp(x - m) kept apart, and
the exact log of the student's mass outside the teacher's top k (a sum over the non-top-k tokens, not
1 - sum(top k), so a tiny tail keeps its relative precision).

``topk_grad_kernel``: writes d loss / d logits for one row:

    soft:  p_v tail_coef [v not in top k] + k_coef_j [v = idx_j]     (both already scaled by the caller)
    hard:  hard_scale (softmax(s)_v - [v = label])

Log-probabilities are formed as (x - m) - log_sum, never x - (m + log_sum): the logsumexp rounds to its own ulp (16x
float32's unit roundoff for logits near 20), an error common to the whole row that the gradient does not cancel.
"""

import triton
import triton.language as tl


@triton.jit
def _in_topk(o_v, b_idx):
    # [BLOCK_V, BLOCK_K] comparison -> [BLOCK_V] membership (indices are distinct within a row)
    return tl.max((o_v[:, None] == b_idx[None, :]).to(tl.int32), axis=1) > 0


@triton.jit
def _merge(b_m, b_d, b_z):
    """Per-lane online softmax update; lanes that only saw -inf keep (m, d) = (-inf, 0) without NaN."""
    b_m_new = tl.maximum(b_m, b_z)
    safe = b_m_new != float("-inf")
    b_d = tl.where(safe, b_d * tl.exp(b_m - tl.where(safe, b_m_new, 0.0)), 0.0)
    b_d += tl.where(safe, tl.exp(b_z - tl.where(safe, b_m_new, 0.0)), 0.0)
    return b_m_new, b_d


@triton.jit
def _reduce_max_log_sum(b_m, b_d):
    """Per-lane (max, sum) -> the row's max m (0 for an all -inf row) and log sum exp(x - m)."""
    m = tl.max(b_m, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    d = tl.sum(tl.where(b_m == float("-inf"), 0.0, b_d * tl.exp(b_m - m_safe)), axis=0)
    return m_safe, tl.log(d)


@triton.jit
def topk_stats_kernel(
    p_s,  # [C, V] student logits (unit column stride)
    p_idx,  # [C, K] int64 top-k indices
    p_max_t,  # [C] float32 out: max(s / T)
    p_log_sum_t,  # [C] float32 out: log sum exp(s / T - max)
    p_max_1,  # [C] float32 out: max(s)        (HAS_CE)
    p_log_sum_1,  # [C] float32 out: log sum exp(s - max)        (HAS_CE)
    p_log_tail,  # [C] float32 out: log sum_{v not in top k} softmax(s / T)_v
    stride_s,
    stride_idx,
    V,
    K,
    inv_t,
    HAS_CE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # int64 row offsets: C * V passes 2**31 for a 16k-row chunk of a 128k vocabulary
    i_row = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K)
    b_idx = tl.load(p_idx + i_row * stride_idx + o_k, mask=o_k < K, other=-1)  # [BLOCK_K]
    b_m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    b_d = tl.zeros([BLOCK_V], tl.float32)
    b_mt = tl.full([BLOCK_V], float("-inf"), tl.float32)  # tail: same online scheme over non-top-k lanes
    b_dt = tl.zeros([BLOCK_V], tl.float32)
    b_m1 = tl.full([BLOCK_V], float("-inf"), tl.float32)
    b_d1 = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_s = tl.load(p_s + i_row * stride_s + o_v, mask=m_v, other=float("-inf")).to(tl.float32)  # [BLOCK_V]
        b_z = b_s * inv_t
        b_m, b_d = _merge(b_m, b_d, b_z)
        b_in = _in_topk(o_v, b_idx)
        b_mt, b_dt = _merge(b_mt, b_dt, tl.where(b_in, float("-inf"), b_z))
        if HAS_CE:
            b_m1, b_d1 = _merge(b_m1, b_d1, b_s)
    m_t, log_sum_t = _reduce_max_log_sum(b_m, b_d)
    m_tail, log_sum_tail = _reduce_max_log_sum(b_mt, b_dt)
    tl.store(p_max_t + i_row, m_t)
    tl.store(p_log_sum_t + i_row, log_sum_t)
    tl.store(p_log_tail + i_row, (m_tail - m_t) + (log_sum_tail - log_sum_t))  # both maxima exact: no ulp of an lse
    if HAS_CE:
        m_1, log_sum_1 = _reduce_max_log_sum(b_m1, b_d1)
        tl.store(p_max_1 + i_row, m_1)
        tl.store(p_log_sum_1 + i_row, log_sum_1)


@triton.jit
def topk_grad_kernel(
    p_s,  # [C, V] student logits
    p_idx,  # [C, K] int64
    p_k_coef,  # [C, K] float32 scaled d D / d z at the top-k tokens
    p_tail_coef,  # [C] float32 scaled d D / d z_v / p_v for every other token
    p_max_t,  # [C] topk_stats_kernel's outputs
    p_log_sum_t,  # [C]
    p_max_1,  # [C] (HAS_CE)
    p_log_sum_1,  # [C] (HAS_CE)
    p_label,  # [C] int64 (HAS_CE)
    p_out,  # [C, V] float32 out
    stride_s,
    stride_idx,
    stride_g,
    stride_out,
    V,
    K,
    inv_t,
    hard_scale,
    HAS_SOFT: tl.constexpr,
    HAS_CE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)  # int64: see topk_stats_kernel
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    b_idx = tl.load(p_idx + i_row * stride_idx + o_k, mask=m_k, other=-1)  # [BLOCK_K]
    b_g = tl.load(p_k_coef + i_row * stride_g + o_k, mask=m_k, other=0.0)  # [BLOCK_K]
    tail_coef = tl.load(p_tail_coef + i_row)
    m_t = tl.load(p_max_t + i_row)
    log_sum_t = tl.load(p_log_sum_t + i_row)
    m_1 = 0.0
    log_sum_1 = 0.0
    label = -1
    if HAS_CE:
        m_1 = tl.load(p_max_1 + i_row)
        log_sum_1 = tl.load(p_log_sum_1 + i_row)
        label = tl.load(p_label + i_row)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_s = tl.load(p_s + i_row * stride_s + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BLOCK_V]
        b_grad = tl.zeros([BLOCK_V], tl.float32)
        if HAS_SOFT:
            b_p = tl.exp((b_s * inv_t - m_t) - log_sum_t)
            b_match = o_v[:, None] == b_idx[None, :]  # [BLOCK_V, BLOCK_K]
            b_in = tl.max(b_match.to(tl.int32), axis=1) > 0
            b_gsel = tl.sum(tl.where(b_match, b_g[None, :], 0.0), axis=1)
            b_grad += tl.where(b_in, b_gsel, b_p * tail_coef)
        if HAS_CE:
            b_grad += hard_scale * (tl.exp((b_s - m_1) - log_sum_1) - (o_v == label).to(tl.float32))
        tl.store(p_out + i_row * stride_out + o_v, b_grad, mask=m_v)
