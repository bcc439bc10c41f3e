"""Triton row kernel of the logit-distillation loss (contract: ``fastdistill/ops/distill_loss.py``).

One program per row. With ``z = student / T`` and ``y = teacher / T`` (scaled in fp32 after loading), the kernel
walks the vocabulary in tiles of BLOCK_V and never materializes anything of size [N, V] but the gradient:

* forward / reverse KL: 2 passes. Pass 1 keeps the online max m and sum-exp S of both rows and the running,
  rescaled sum of the KL's first term, e.g. KL(pt || ps) = sum exp(y - my) (y - z) / Sy - (my - mz) - log Sy + log Sz;
  pass 2 writes the gradient (skipped when NEED_GRAD is False).
* JSD / TVD / skew KLs: 3 passes. Pass 1 gives both log-sum-exps; pass 2 the per-element loss terms, the loss and
  c = sum_j ps_j a_j, where a_j = dD / dps_j; pass 3 writes the gradient.

For any divergence D(ps) of the student probabilities, dD / dz_j = ps_j (a_j - sum_k ps_k a_k):

    forward KL      dD / dz = ps - pt
    reverse KL      a = log ps - log pt                      (constants in a cancel)
    JSD(beta)       a = (1 - beta) (log ps - log m),            m = (1 - beta) ps + beta pt
    TVD             a = sign(ps - pt) / 2
    skew forward    a = -(1 - beta) pt / m,                     m = beta pt + (1 - beta) ps
    skew reverse    a = log ps - log m - beta ps / m,           m = beta ps + (1 - beta) pt

The student gradient is grad_scale * soft_scale * loss_scale / T * dD / dz. Terms with zero probability contribute 0
(in value and gradient), so a vocabulary masked with -inf in both rows gives a finite loss and zero gradient there;
the guards test ``p == 0`` rather than ``p > 0`` so that NaN inputs still propagate to a NaN loss.

Fused cross-entropy (HAS_CE, ``ce_rows_ptr`` given): ce = lse(s) - s[label] on the raw logits, and the passes that
write the gradient add ce_coef (softmax(s) - onehot(label)) with ce_coef = grad_scale * ce_scale. At T == 1 over the
full row (CE_SHARED) softmax(s) is ps, whose max and sum-exp pass 1 already has; otherwise pass 1 also keeps the online
max and sum-exp of the raw row (no extra pass).

Common width (HAS_TAIL: VC < V, a teacher narrower than the student): the divergence's passes span the columns
[0, VC) of both rows; the student's columns [VC, V) enter the CE's online sum at the end of pass 1 and get the CE's
gradient alone (0 without it) after the last gradient pass.
"""

import triton
import triton.language as tl

from fastdistill.divergences import DIVERGENCE_ID, TWO_PASS_IDS

# Divergence ids: from the one table (fastdistill/divergences.py), like the C++ kernels' generated header.
FORWARD_KL = tl.constexpr(DIVERGENCE_ID["forward_kl"])
REVERSE_KL = tl.constexpr(DIVERGENCE_ID["reverse_kl"])
JSD = tl.constexpr(DIVERGENCE_ID["jsd"])
TVD = tl.constexpr(DIVERGENCE_ID["tvd"])
SKEW_FORWARD_KL = tl.constexpr(DIVERGENCE_ID["skew_forward_kl"])
SKEW_REVERSE_KL = tl.constexpr(DIVERGENCE_ID["skew_reverse_kl"])


@triton.jit
def _safe_max(b_m):
    """The running max with -inf replaced by 0: a row (or tile) that is all -inf so far then gives exp(-inf - 0) = 0
    instead of exp(-inf - -inf) = NaN."""
    return tl.where(b_m == float("-inf"), 0.0, b_m)


@triton.jit
def _log_mix(b_la, b_lb, log_wa, log_wb):
    """log(wa * exp(la) + wb * exp(lb)) elementwise as a stable logaddexp; exact (la or lb) when a weight is 0, so the
    skew KLs at beta = 0 / 1 match the reference even where one model has -inf."""
    b_x = b_la + log_wa
    b_y = b_lb + log_wb
    b_hi = tl.maximum(b_x, b_y)
    b_lm = b_hi + tl.log(1.0 + tl.exp(-tl.abs(b_x - b_y)))
    b_lm = tl.where(log_wb == float("-inf"), b_la, b_lm)
    return tl.where(log_wa == float("-inf"), b_lb, b_lm)


@triton.jit
def _load_tiles(p_s, p_t, v0, o_v, V, inv_temperature, EVICT: tl.constexpr):
    """The student and teacher tiles at columns v0 + o_v, in fp32 and divided by T; -inf past the row's end, so they
    add nothing to a sum-exp. Returns (mask, z, y)."""
    m_v = v0 + o_v < V
    b_z = tl.load(p_s + v0 + o_v, mask=m_v, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)  # [BLOCK_V]
    b_y = tl.load(p_t + v0 + o_v, mask=m_v, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)  # [BLOCK_V]
    return m_v, b_z * inv_temperature, b_y * inv_temperature


@triton.jit
def _element_terms(b_ls, b_lt, beta, log_beta, log_1m_beta, DIVERGENCE: tl.constexpr):
    """Per-element loss term d_j (D = sum_j d_j) and gradient weight a_j = dD / dps_j for the 3-pass divergences,
    from log ps and log pt.

    Returns (ps, d, a), each [BLOCK_V]; a is only meaningful where ps > 0 (callers multiply it by ps and guard).
    """
    b_ps = tl.exp(b_ls)
    b_pt = tl.exp(b_lt)
    if DIVERGENCE == JSD:
        b_lm = _log_mix(b_ls, b_lt, log_1m_beta, log_beta)
        b_dt = tl.where(b_pt == 0, 0.0, b_pt * (b_lt - b_lm))
        b_ds = tl.where(b_ps == 0, 0.0, b_ps * (b_ls - b_lm))
        b_d = beta * b_dt + (1.0 - beta) * b_ds
        b_a = (1.0 - beta) * (b_ls - b_lm)
    elif DIVERGENCE == TVD:
        b_diff = b_ps - b_pt
        b_d = 0.5 * tl.abs(b_diff)
        # sign(diff) / 2 with torch's abs subgradient 0 at diff == 0; diff * 0 keeps a NaN diff NaN
        b_a = tl.where(b_diff > 0, 0.5, tl.where(b_diff < 0, -0.5, b_diff * 0.0))
    elif DIVERGENCE == SKEW_FORWARD_KL:
        b_lm = _log_mix(b_lt, b_ls, log_beta, log_1m_beta)
        b_d = tl.where(b_pt == 0, 0.0, b_pt * (b_lt - b_lm))
        b_a = -(1.0 - beta) * tl.exp(b_lt - b_lm)  # pt / m without dividing two possibly tiny numbers
    else:  # SKEW_REVERSE_KL
        b_lm = _log_mix(b_ls, b_lt, log_beta, log_1m_beta)
        b_d = tl.where(b_ps == 0, 0.0, b_ps * (b_ls - b_lm))
        b_a = b_ls - b_lm - beta * tl.exp(b_ls - b_lm)
        # beta = 1 (the table's "zero"): m = ps, a is the constant -1, whose gradient ps (a - sum ps a) is exactly 0
        # only if written as 0 (sum ps rounds)
        b_a = tl.where(log_1m_beta == float("-inf"), 0.0, b_a)
    return b_ps, b_d, b_a


@triton.jit
def _add_ce_grad(b_g, b_x, b_mc, log_sc, o_col, label, ce_coef):
    """b_g + ce_coef (softmax - onehot(label)) for the tile of logits b_x (raw, or scaled by 1 / T == 1) at columns
    o_col; b_mc / log_sc: the max and log sum-exp of those logits over the row."""
    b_p = tl.exp((b_x - b_mc) - log_sc)  # [BLOCK_V]
    return b_g + ce_coef * (b_p - tl.where(o_col == label, 1.0, 0.0))


@triton.heuristics(
    {
        "HAS_LABELS": lambda args: args["labels_ptr"] is not None,
        "NEED_GRAD": lambda args: args["grad_ptr"] is not None,
        "TWO_PASS": lambda args: args["DIVERGENCE"] in TWO_PASS_IDS,
        "HAS_CE": lambda args: args["ce_rows_ptr"] is not None,
        "HAS_TAIL": lambda args: args["VC"] < args["V"],
        "CE_SHARED": lambda args: args["inv_temperature"] == 1.0 and args["VC"] == args["V"],
    }
)
@triton.jit
def distill_loss_rows_kernel(
    student_ptr,
    teacher_ptr,
    labels_ptr,
    grad_scale_ptr,
    loss_ptr,
    grad_ptr,
    ce_rows_ptr,
    stride_s,
    stride_t,
    stride_g,
    V,
    VC,
    inv_temperature,
    beta,
    log_beta,
    log_1m_beta,
    loss_scale,
    ignore_index,
    soft_scale,
    ce_scale,
    DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    TWO_PASS: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    CE_SHARED: tl.constexpr,
):
    # int64 row index: row * stride reaches N * V, which passes 2^31 for e.g. 8192 tokens x 128256 vocabulary
    i_n = tl.program_id(0).to(tl.int64)
    p_s = student_ptr + i_n * stride_s
    p_t = teacher_ptr + i_n * stride_t
    if NEED_GRAD:
        p_g = grad_ptr + i_n * stride_g
    o_v = tl.arange(0, BLOCK_V)

    valid = True
    label = -1
    if HAS_LABELS:
        label = tl.load(labels_ptr + i_n)
        valid = label != ignore_index
    if valid:
        # ---- pass 1 (head to tail): online max / sum-exp of both rows (+ the KL's first term for the 2-pass ones)
        b_mz = float("-inf")
        b_my = float("-inf")
        b_sz = 0.0
        b_sy = 0.0
        b_acc = 0.0  # forward KL: sum exp(y - my) (y - z); reverse KL: sum exp(z - mz) (z - y)
        b_mr = float("-inf")  # CE at T != 1: online max / sum-exp of the raw student row
        b_sr = 0.0
        for v0 in range(0, VC, BLOCK_V):
            m_v, b_z, b_y = _load_tiles(p_s, p_t, v0, o_v, VC, inv_temperature, "")
            if HAS_CE and not CE_SHARED:
                b_r = tl.load(p_s + v0 + o_v, mask=m_v, other=float("-inf")).to(tl.float32)  # [BLOCK_V]
                b_mr_new = tl.maximum(b_mr, tl.max(b_r, axis=0))
                b_sr = b_sr * tl.exp(b_mr - _safe_max(b_mr_new)) + tl.sum(tl.exp(b_r - _safe_max(b_mr_new)), axis=0)
                b_mr = b_mr_new
            b_mz_new = tl.maximum(b_mz, tl.max(b_z, axis=0))
            b_my_new = tl.maximum(b_my, tl.max(b_y, axis=0))
            b_alpha_z = tl.exp(b_mz - _safe_max(b_mz_new))
            b_alpha_y = tl.exp(b_my - _safe_max(b_my_new))
            b_ez = tl.exp(b_z - _safe_max(b_mz_new))  # [BLOCK_V]
            b_ey = tl.exp(b_y - _safe_max(b_my_new))  # [BLOCK_V]
            b_sz = b_sz * b_alpha_z + tl.sum(b_ez, axis=0)
            b_sy = b_sy * b_alpha_y + tl.sum(b_ey, axis=0)
            if DIVERGENCE == FORWARD_KL:
                b_acc = b_acc * b_alpha_y + tl.sum(tl.where(b_ey == 0, 0.0, b_ey * (b_y - b_z)), axis=0)
            elif DIVERGENCE == REVERSE_KL:
                b_acc = b_acc * b_alpha_z + tl.sum(tl.where(b_ez == 0, 0.0, b_ez * (b_z - b_y)), axis=0)
            b_mz = b_mz_new
            b_my = b_my_new
        if HAS_CE and HAS_TAIL:
            # the student's CE-only columns [VC, V): into the raw row's online max / sum-exp
            for v0 in range(VC, V, BLOCK_V):
                b_r = tl.load(p_s + v0 + o_v, mask=v0 + o_v < V, other=float("-inf")).to(tl.float32)  # [BLOCK_V]
                b_mr_new = tl.maximum(b_mr, tl.max(b_r, axis=0))
                b_sr = b_sr * tl.exp(b_mr - _safe_max(b_mr_new)) + tl.sum(tl.exp(b_r - _safe_max(b_mr_new)), axis=0)
                b_mr = b_mr_new
        # log p = (x - m) - log S, never x - (m + log S): m + log S would round to the ulp of m (1e-3 at logits of
        # 1e4), while x - m is exact near the max. A row that is all -inf gives NaN here, like log_softmax.
        log_sz = tl.log(b_sz)
        log_sy = tl.log(b_sy)
        # The passes alternate direction so that each starts on the tiles the previous one read last, which are the
        # likeliest to still be in L2 (a bf16 row pair of a 128k vocabulary is 0.5 MB, too much to keep whole).
        n_tiles = tl.cdiv(VC, BLOCK_V)
        b_mc = b_mz  # the CE's max and log sum-exp: the student's own at T == 1
        log_sc = log_sz
        ce_coef = 0.0
        if HAS_CE:
            if not CE_SHARED:
                b_mc = b_mr
                log_sc = tl.log(b_sr)
            b_zl = tl.load(p_s + label).to(tl.float32)
            tl.store(ce_rows_ptr + i_n, -((b_zl - b_mc) - log_sc))
            if NEED_GRAD:
                ce_coef = tl.load(grad_scale_ptr).to(tl.float32) * ce_scale

        if TWO_PASS:
            if DIVERGENCE == FORWARD_KL:
                b_loss = b_acc / b_sy - (b_my - b_mz) - log_sy + log_sz
            else:
                b_loss = b_acc / b_sz - (b_mz - b_my) - log_sz + log_sy
            tl.store(loss_ptr + i_n, loss_scale * b_loss)
            if NEED_GRAD:
                # ---- pass 2 (tail to head): grad = coef (ps - pt) (forward), coef ps (log ps - log pt - D) (reverse)
                b_coef = tl.load(grad_scale_ptr).to(tl.float32) * soft_scale * loss_scale * inv_temperature
                for i_v in range(0, n_tiles):
                    v0 = (n_tiles - 1 - i_v) * BLOCK_V
                    m_v, b_z, b_y = _load_tiles(p_s, p_t, v0, o_v, VC, inv_temperature, "evict_first")
                    b_ls = (b_z - b_mz) - log_sz  # [BLOCK_V] log ps
                    b_lt = (b_y - b_my) - log_sy  # [BLOCK_V] log pt
                    b_ps = tl.exp(b_ls)
                    if DIVERGENCE == FORWARD_KL:
                        b_g = b_ps - tl.exp(b_lt)
                    else:
                        b_g = tl.where(b_ps == 0, 0.0, b_ps * (b_ls - b_lt - b_loss))
                    b_g = b_coef * b_g
                    if HAS_CE:
                        if CE_SHARED:
                            b_g += ce_coef * (b_ps - tl.where(v0 + o_v == label, 1.0, 0.0))
                        else:
                            b_r = tl.load(p_s + v0 + o_v, mask=m_v, other=float("-inf")).to(tl.float32)
                            b_g = _add_ce_grad(b_g, b_r, b_mc, log_sc, v0 + o_v, label, ce_coef)
                    # the gradient is not read again here: stream it past L2
                    tl.store(
                        p_g + v0 + o_v,
                        b_g.to(grad_ptr.dtype.element_ty),
                        mask=m_v,
                        eviction_policy="evict_first",
                    )
        else:
            # ---- pass 2 (tail to head): the loss and c = sum_j ps_j a_j
            # TVD: a is +1/2, -1/2 or 0, so c = (P+ - P-) / 2 with P+- the student mass where ps > pt / ps < pt, and
            # a - c is formed from the masses on the other sides (a = 1/2: (2 P- + P0) / 2P, a = -1/2: -(2 P+ + P0) /
            # 2P, a = 0: (P- - P+) / 2P): never the difference of two numbers near 1/2 (a dominant token)
            b_loss = 0.0
            b_c = 0.0
            b_pos = 0.0
            b_neg = 0.0
            b_zero = 0.0
            for i_v in range(0, n_tiles):
                v0 = (n_tiles - 1 - i_v) * BLOCK_V
                m_v, b_z, b_y = _load_tiles(p_s, p_t, v0, o_v, VC, inv_temperature, "")
                b_ps, b_d, b_a = _element_terms(
                    (b_z - b_mz) - log_sz, (b_y - b_my) - log_sy, beta, log_beta, log_1m_beta, DIVERGENCE
                )
                b_loss += tl.sum(tl.where(m_v, b_d, 0.0), axis=0)
                if NEED_GRAD:
                    if DIVERGENCE == TVD:
                        b_pos += tl.sum(tl.where(b_a > 0, b_ps, 0.0), axis=0)
                        b_neg += tl.sum(tl.where(b_a < 0, b_ps, 0.0), axis=0)
                        # a is 0 or NaN here: ps + a keeps a NaN teacher row NaN
                        b_zero += tl.sum(tl.where((b_a > 0) | (b_a < 0), 0.0, b_ps + b_a), axis=0)
                    else:
                        b_c += tl.sum(tl.where(b_ps == 0, 0.0, b_ps * b_a), axis=0)
            tl.store(loss_ptr + i_n, loss_scale * b_loss)
            if NEED_GRAD:
                # ---- pass 3 (head to tail): grad = coef * ps (a - c)
                b_coef = tl.load(grad_scale_ptr).to(tl.float32) * soft_scale * loss_scale * inv_temperature
                inv_two_p = 0.5 / (b_pos + b_neg + b_zero)
                for v0 in range(0, VC, BLOCK_V):
                    m_v, b_z, b_y = _load_tiles(p_s, p_t, v0, o_v, VC, inv_temperature, "evict_first")
                    b_ps, b_d, b_a = _element_terms(
                        (b_z - b_mz) - log_sz, (b_y - b_my) - log_sy, beta, log_beta, log_1m_beta, DIVERGENCE
                    )
                    if DIVERGENCE == TVD:
                        b_am = tl.where(
                            b_a > 0,
                            (2.0 * b_neg + b_zero) * inv_two_p,
                            tl.where(b_a < 0, -(2.0 * b_pos + b_zero) * inv_two_p, (b_neg - b_pos) * inv_two_p),
                        )
                    else:
                        b_am = b_a - b_c
                    b_g = b_coef * tl.where(b_ps == 0, 0.0, b_ps * b_am)
                    if HAS_CE:
                        if CE_SHARED:
                            b_g += ce_coef * (b_ps - tl.where(v0 + o_v == label, 1.0, 0.0))
                        else:
                            b_r = tl.load(p_s + v0 + o_v, mask=m_v, other=float("-inf")).to(tl.float32)
                            b_g = _add_ce_grad(b_g, b_r, b_mc, log_sc, v0 + o_v, label, ce_coef)
                    tl.store(
                        p_g + v0 + o_v,
                        b_g.to(grad_ptr.dtype.element_ty),
                        mask=m_v,
                        eviction_policy="evict_first",
                    )
        if NEED_GRAD and HAS_TAIL:
            # ---- the student's columns [VC, V): the CE's gradient alone, or 0
            for v0 in range(VC, V, BLOCK_V):
                m_v = v0 + o_v < V
                b_g = tl.zeros([BLOCK_V], dtype=tl.float32)
                if HAS_CE:
                    b_r = tl.load(p_s + v0 + o_v, mask=m_v, other=float("-inf")).to(tl.float32)  # [BLOCK_V]
                    b_g = _add_ce_grad(b_g, b_r, b_mc, log_sc, v0 + o_v, label, ce_coef)
                tl.store(p_g + v0 + o_v, b_g.to(grad_ptr.dtype.element_ty), mask=m_v, eviction_policy="evict_first")
    else:
        # ignored row: loss 0 and gradient 0, without reading the logits
        tl.store(loss_ptr + i_n, 0.0)
        if HAS_CE:
            tl.store(ce_rows_ptr + i_n, 0.0)
        if NEED_GRAD:
            for v0 in range(0, V, BLOCK_V):
                m_v = v0 + o_v < V
                tl.store(p_g + v0 + o_v, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=m_v)
