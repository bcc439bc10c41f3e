"""Triton row kernel of the fused ``kl_div`` (contract: ``fastdistill/ops/kl_div.py``).

One program per row, one pass over it: the pointwise loss t (log t - x) (t = exp(target) with ``log_target``) is
summed into the row's loss and the gradient -grad_scale * t, which does not depend on the input, is written in the
same pass. A term is 0 where t == 0, as the contract says: this equals ``torch.nn.functional.kl_div`` for finite
inputs and also gives 0 (where torch gives NaN from 0 * -inf) for a -inf log-target or a -inf input at a zero target.
"""

import triton
import triton.language as tl


@triton.heuristics({"NEED_GRAD": lambda args: args["grad_ptr"] is not None})
@triton.jit
def kl_div_rows_kernel(
    input_ptr,
    target_ptr,
    grad_scale_ptr,
    loss_ptr,
    grad_ptr,
    stride_x,
    stride_t,
    stride_g,
    V,
    LOG_TARGET: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    # int64 row index: row * stride reaches N * V, which can pass 2^31 for token x vocabulary shaped inputs
    i_n = tl.program_id(0).to(tl.int64)
    p_x = input_ptr + i_n * stride_x
    p_t = target_ptr + i_n * stride_t
    o_v = tl.arange(0, BLOCK_V)
    if NEED_GRAD:
        p_g = grad_ptr + i_n * stride_g
        b_coef = -tl.load(grad_scale_ptr).to(tl.float32)

    b_loss = 0.0
    for v0 in range(0, V, BLOCK_V):
        m_v = v0 + o_v < V
        b_x = tl.load(p_x + v0 + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BLOCK_V]
        b_tg = tl.load(p_t + v0 + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BLOCK_V]
        if LOG_TARGET:
            b_t = tl.exp(b_tg)
            b_lt = b_tg
        else:
            b_t = b_tg
            b_lt = tl.log(b_t)
        # 0 where t == 0 (whatever x is, so a masked vocabulary with x = -inf adds 0); NaN stays NaN (NaN == 0 is false)
        b_l = tl.where(b_t == 0, 0.0, b_t * (b_lt - b_x))  # [BLOCK_V]
        b_loss += tl.sum(tl.where(m_v, b_l, 0.0), axis=0)
        if NEED_GRAD:
            tl.store(p_g + v0 + o_v, (b_coef * b_t).to(grad_ptr.dtype.element_ty), mask=m_v)
    tl.store(loss_ptr + i_n, b_loss)
