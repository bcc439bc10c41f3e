"""Flash-style attention-distribution distillation kernels (MiniLM KL(A_t || A_s) per query row, never [L, L]).

Three kernels over the same tiles; a program owns one (batch-head, row block):

    attention_distill_fwd_kernel  per query block, one pass over key tiles with online log-sum-exp for both models
                                  and a rescaled accumulator of sum_j exp(S_t - m_t) (S_t - S_s), so that
                                  KL = sum_j P_t (S_t - S_s) - lse_t + lse_s comes out of the single pass.
                                  Writes the row KL and both row LSEs (+inf on rows that do not count, so every
                                  recomputed probability of such a row is exp(-inf) = 0).
    attention_distill_dq_kernel   per query block over key tiles: dq = sum_j w (P_s - P_t) k_s   (w includes scale_s)
    attention_distill_dk_kernel   per key block over query tiles: dk = sum_i w (P_s - P_t) q_s

Tiles are loaded, then converted to fp32: dots use exact fp32 ("ieee") for fp32 inputs and TF32 for 16-bit inputs
(bf16 / fp16 values are exact in TF32, so products stay exact with fp32 accumulation, dS included).

Masks: ``MASK`` [B, L] (nonzero = keep) hides keys of both models and zeroes padded query rows; ``CAUSAL`` hides
keys j > i and skips the tiles above the diagonal.
"""

import triton
import triton.language as tl


@triton.jit
def _scores(b_q, b_k, scale, DOT_PRECISION: tl.constexpr):
    # [BLOCK_M, BLOCK_D] x [BLOCK_N, BLOCK_D] -> [BLOCK_M, BLOCK_N], fp32 accumulation
    return tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale


@triton.jit
def _keep(o_m, o_n, L, MASK, stride_mb, stride_ml, i_b, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N] boolean: key o_n is visible from query o_m."""
    m_keep = (o_n[None, :] < L) & (o_m[:, None] >= 0)
    if HAS_MASK:
        b_mk = tl.load(MASK + i_b * stride_mb + o_n * stride_ml, mask=o_n < L, other=0)
        m_keep = m_keep & (b_mk[None, :] != 0)
    if CAUSAL:
        m_keep = m_keep & (o_n[None, :] <= o_m[:, None])
    return m_keep


@triton.jit
def attention_distill_fwd_kernel(
    SQ,
    SK,
    TQ,
    TK,
    MASK,
    ROWS,
    LSE_S,
    LSE_T,
    stride_sqb,
    stride_sqh,
    stride_sql,
    stride_sqd,
    stride_skb,
    stride_skh,
    stride_skl,
    stride_skd,
    stride_tqb,
    stride_tqh,
    stride_tql,
    stride_tqd,
    stride_tkb,
    stride_tkh,
    stride_tkl,
    stride_tkd,
    stride_mb,
    stride_ml,
    H,
    L,
    DS,
    DT,
    scale_s,
    scale_t,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    i_m = tl.program_id(0)
    # int64: batch-head offsets (i_bh * stride) pass 2^31 for long sequences x many heads
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ds, o_dt = tl.arange(0, BLOCK_DS), tl.arange(0, BLOCK_DT)
    m_m = o_m < L
    p_sq = SQ + i_b * stride_sqb + i_h * stride_sqh + o_m[:, None] * stride_sql + o_ds[None, :] * stride_sqd
    p_tq = TQ + i_b * stride_tqb + i_h * stride_tqh + o_m[:, None] * stride_tql + o_dt[None, :] * stride_tqd
    b_sq = tl.load(p_sq, mask=m_m[:, None] & (o_ds[None, :] < DS), other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_DS]
    b_tq = tl.load(p_tq, mask=m_m[:, None] & (o_dt[None, :] < DT), other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_DT]

    b_ms = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_ls = tl.zeros([BLOCK_M], tl.float32)
    b_mt = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_lt = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M], tl.float32)  # sum_j exp(S_t - m_t) (S_t - S_s), rescaled with m_t
    hi = L
    if CAUSAL:
        hi = tl.minimum(L, (i_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < L
        p_sk = SK + i_b * stride_skb + i_h * stride_skh + o_n[:, None] * stride_skl + o_ds[None, :] * stride_skd
        p_tk = TK + i_b * stride_tkb + i_h * stride_tkh + o_n[:, None] * stride_tkl + o_dt[None, :] * stride_tkd
        b_sk = tl.load(p_sk, mask=m_n[:, None] & (o_ds[None, :] < DS), other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_DS]
        b_tk = tl.load(p_tk, mask=m_n[:, None] & (o_dt[None, :] < DT), other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_DT]
        m_keep = _keep(o_m, o_n, L, MASK, stride_mb, stride_ml, i_b, HAS_MASK, CAUSAL)
        b_ss = _scores(b_sq, b_sk, scale_s, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        b_st = _scores(b_tq, b_tk, scale_t, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        b_diff = tl.where(m_keep, b_st - b_ss, 0.0)  # taken before masking: -inf - -inf would be NaN
        b_ss = tl.where(m_keep, b_ss, float("-inf"))
        b_st = tl.where(m_keep, b_st, float("-inf"))
        # online log-sum-exp; a row with no visible key so far keeps m = -inf, so shift by 0 there instead
        b_ms_new = tl.maximum(b_ms, tl.max(b_ss, 1))
        b_ms_safe = tl.where(b_ms_new == float("-inf"), 0.0, b_ms_new)
        b_ls = b_ls * tl.exp(b_ms - b_ms_safe) + tl.sum(tl.exp(b_ss - b_ms_safe[:, None]), 1)
        b_ms = b_ms_new
        b_mt_new = tl.maximum(b_mt, tl.max(b_st, 1))
        b_mt_safe = tl.where(b_mt_new == float("-inf"), 0.0, b_mt_new)
        b_alpha = tl.exp(b_mt - b_mt_safe)
        b_pt = tl.exp(b_st - b_mt_safe[:, None])  # [BLOCK_M, BLOCK_N], 0 on hidden keys
        b_lt = b_lt * b_alpha + tl.sum(b_pt, 1)
        b_acc = b_acc * b_alpha + tl.sum(b_pt * b_diff, 1)
        b_mt = b_mt_new

    m_row = m_m & (b_lt > 0)
    if HAS_MASK:
        b_mq = tl.load(MASK + i_b * stride_mb + o_m * stride_ml, mask=m_m, other=0)
        m_row = m_row & (b_mq != 0)
    b_lt_safe = tl.where(m_row, b_lt, 1.0)
    b_ls_safe = tl.where(m_row, b_ls, 1.0)
    b_lse_s = tl.where(m_row, b_ms, 0.0) + tl.log(b_ls_safe)
    b_lse_t = tl.where(m_row, b_mt, 0.0) + tl.log(b_lt_safe)
    b_kl = tl.where(m_row, b_acc / b_lt_safe - b_lse_t + b_lse_s, 0.0)
    o_row = i_bh * L + o_m
    tl.store(ROWS + o_row, b_kl, mask=m_m)
    tl.store(LSE_S + o_row, tl.where(m_row, b_lse_s, float("inf")), mask=m_m)
    tl.store(LSE_T + o_row, tl.where(m_row, b_lse_t, float("inf")), mask=m_m)


@triton.jit
def _d_scores(b_sq, b_sk, b_tq, b_tk, b_lse_s, b_lse_t, b_w, m_keep, scale_s, scale_t, DOT_PRECISION: tl.constexpr):
    """w (P_s - P_t) on one tile, [BLOCK_M, BLOCK_N] fp32 (0 on hidden keys and on rows that do not count)."""
    b_ss = tl.where(m_keep, _scores(b_sq, b_sk, scale_s, DOT_PRECISION), float("-inf"))
    b_st = tl.where(m_keep, _scores(b_tq, b_tk, scale_t, DOT_PRECISION), float("-inf"))
    b_ps = tl.exp(b_ss - b_lse_s[:, None])
    b_pt = tl.exp(b_st - b_lse_t[:, None])
    return (b_ps - b_pt) * b_w[:, None]


@triton.jit
def attention_distill_dq_kernel(
    SQ,
    SK,
    TQ,
    TK,
    MASK,
    LSE_S,
    LSE_T,
    W,
    DQ,
    stride_sqb,
    stride_sqh,
    stride_sql,
    stride_sqd,
    stride_skb,
    stride_skh,
    stride_skl,
    stride_skd,
    stride_tqb,
    stride_tqh,
    stride_tql,
    stride_tqd,
    stride_tkb,
    stride_tkh,
    stride_tkl,
    stride_tkd,
    stride_mb,
    stride_ml,
    H,
    L,
    DS,
    DT,
    scale_s,
    scale_t,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)  # int64: see the forward kernel
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ds, o_dt = tl.arange(0, BLOCK_DS), tl.arange(0, BLOCK_DT)
    m_m = o_m < L
    p_sq = SQ + i_b * stride_sqb + i_h * stride_sqh + o_m[:, None] * stride_sql + o_ds[None, :] * stride_sqd
    p_tq = TQ + i_b * stride_tqb + i_h * stride_tqh + o_m[:, None] * stride_tql + o_dt[None, :] * stride_tqd
    b_sq = tl.load(p_sq, mask=m_m[:, None] & (o_ds[None, :] < DS), other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_DS]
    b_tq = tl.load(p_tq, mask=m_m[:, None] & (o_dt[None, :] < DT), other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_DT]
    o_row = i_bh * L + o_m
    b_lse_s = tl.load(LSE_S + o_row, mask=m_m, other=float("inf"))
    b_lse_t = tl.load(LSE_T + o_row, mask=m_m, other=float("inf"))
    b_w = tl.load(W + o_row, mask=m_m, other=0.0)
    b_dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    hi = L
    if CAUSAL:
        hi = tl.minimum(L, (i_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < L
        p_sk = SK + i_b * stride_skb + i_h * stride_skh + o_n[:, None] * stride_skl + o_ds[None, :] * stride_skd
        p_tk = TK + i_b * stride_tkb + i_h * stride_tkh + o_n[:, None] * stride_tkl + o_dt[None, :] * stride_tkd
        b_sk = tl.load(p_sk, mask=m_n[:, None] & (o_ds[None, :] < DS), other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_DS]
        b_tk = tl.load(p_tk, mask=m_n[:, None] & (o_dt[None, :] < DT), other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_DT]
        m_keep = _keep(o_m, o_n, L, MASK, stride_mb, stride_ml, i_b, HAS_MASK, CAUSAL)
        b_ds = _d_scores(b_sq, b_sk, b_tq, b_tk, b_lse_s, b_lse_t, b_w, m_keep, scale_s, scale_t, DOT_PRECISION)
        b_dq += tl.dot(b_ds, b_sk, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_DS]
    p_dq = DQ + i_bh * L * DS + o_m[:, None] * DS + o_ds[None, :]
    tl.store(p_dq, b_dq, mask=m_m[:, None] & (o_ds[None, :] < DS))


@triton.jit
def attention_distill_dk_kernel(
    SQ,
    SK,
    TQ,
    TK,
    MASK,
    LSE_S,
    LSE_T,
    W,
    DK,
    stride_sqb,
    stride_sqh,
    stride_sql,
    stride_sqd,
    stride_skb,
    stride_skh,
    stride_skl,
    stride_skd,
    stride_tqb,
    stride_tqh,
    stride_tql,
    stride_tqd,
    stride_tkb,
    stride_tkh,
    stride_tkl,
    stride_tkd,
    stride_mb,
    stride_ml,
    H,
    L,
    DS,
    DT,
    scale_s,
    scale_t,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)  # int64: see the forward kernel
    i_b, i_h = i_bh // H, i_bh % H
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ds, o_dt = tl.arange(0, BLOCK_DS), tl.arange(0, BLOCK_DT)
    m_n = o_n < L
    p_sk = SK + i_b * stride_skb + i_h * stride_skh + o_n[:, None] * stride_skl + o_ds[None, :] * stride_skd
    p_tk = TK + i_b * stride_tkb + i_h * stride_tkh + o_n[:, None] * stride_tkl + o_dt[None, :] * stride_tkd
    b_sk = tl.load(p_sk, mask=m_n[:, None] & (o_ds[None, :] < DS), other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_DS]
    b_tk = tl.load(p_tk, mask=m_n[:, None] & (o_dt[None, :] < DT), other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_DT]
    b_dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    lo = 0
    if CAUSAL:  # queries before this key block see none of its keys
        lo = (i_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for m0 in range(lo, L, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < L
        p_sq = SQ + i_b * stride_sqb + i_h * stride_sqh + o_m[:, None] * stride_sql + o_ds[None, :] * stride_sqd
        p_tq = TQ + i_b * stride_tqb + i_h * stride_tqh + o_m[:, None] * stride_tql + o_dt[None, :] * stride_tqd
        b_sq = tl.load(p_sq, mask=m_m[:, None] & (o_ds[None, :] < DS), other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_DS]
        b_tq = tl.load(p_tq, mask=m_m[:, None] & (o_dt[None, :] < DT), other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_DT]
        o_row = i_bh * L + o_m
        b_lse_s = tl.load(LSE_S + o_row, mask=m_m, other=float("inf"))
        b_lse_t = tl.load(LSE_T + o_row, mask=m_m, other=float("inf"))
        b_w = tl.load(W + o_row, mask=m_m, other=0.0)
        m_keep = _keep(o_m, o_n, L, MASK, stride_mb, stride_ml, i_b, HAS_MASK, CAUSAL)
        b_ds = _d_scores(b_sq, b_sk, b_tq, b_tk, b_lse_s, b_lse_t, b_w, m_keep, scale_s, scale_t, DOT_PRECISION)
        b_dk += tl.dot(tl.trans(b_ds), b_sq, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_DS]
    p_dk = DK + i_bh * L * DS + o_n[:, None] * DS + o_ds[None, :]
    tl.store(p_dk, b_dk, mask=m_n[:, None] & (o_ds[None, :] < DS))
