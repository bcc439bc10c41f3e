"""Launchers of the Triton attention-distillation kernels (contract in ``fastdistill.ops.attention_distill``)."""

from __future__ import annotations

import torch
import triton

from fastdistill import _backend


def _blocks(d_max: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). The interpreter runs every tile in numpy: small blocks keep tests quick and
    still cross tile edges at L ~ 70; on the GPU 64 x 64 tiles (64 x 32 for head sizes over 64, where four
    [BLOCK, D] operand tiles plus two score tiles must fit shared memory), the latter with 8 warps: with 4 the dk
    kernel spills registers at head size 128 (benchmarks/triton_aot.py, sm_90)."""
    if _backend.triton_interpret():
        return 32, 16, 4
    return (64, 64, 4) if d_max <= 64 else (64, 32, 8)


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())  # type: ignore[return-value]


def attention_distill_triton(sq, sk, tq, tk, attention_mask, causal, ss, st, row_weight, need_rows=True):
    from fastdistill.kernels import attention_distill as K

    out_dtype_q, out_dtype_k = sq.dtype, sk.dtype
    if sq.dtype == torch.float64:  # the kernels work in fp32; fp64 inputs are converted once
        sq, sk, tq, tk = (x.float() for x in (sq, sk, tq, tk))
    B, H, L, Ds = sq.shape
    Dt = tq.shape[-1]
    BH = B * H
    dev = sq.device
    rows = torch.empty(BH, L, dtype=torch.float32, device=dev)
    lse_s = torch.empty(BH, L, dtype=torch.float32, device=dev)
    lse_t = torch.empty(BH, L, dtype=torch.float32, device=dev)
    has_mask = attention_mask is not None
    mask = attention_mask.to(torch.int8) if has_mask else rows  # dummy pointer when there is no mask
    stride_m = tuple(mask.stride()) if has_mask else (0, 0)
    block_m, block_n, num_warps = _blocks(max(Ds, Dt))
    block_ds = max(16, triton.next_power_of_2(Ds))
    block_dt = max(16, triton.next_power_of_2(Dt))
    # fp32 inputs: exact fp32 dots (no TF32 rounding); 16-bit inputs are exact in TF32 (see the kernel module)
    precision = "ieee" if sq.dtype == torch.float32 else "tf32"
    common = (
        *_strides(sq),
        *_strides(sk),
        *_strides(tq),
        *_strides(tk),
        *stride_m,
        H,
        L,
        Ds,
        Dt,
        float(ss),
        float(st),
    )
    meta = dict(
        HAS_MASK=has_mask,
        CAUSAL=bool(causal),
        DOT_PRECISION=precision,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_DS=block_ds,
        BLOCK_DT=block_dt,
        num_warps=num_warps,
    )
    grid_m = (triton.cdiv(L, block_m), BH)
    K.attention_distill_fwd_kernel[grid_m](sq, sk, tq, tk, mask, rows, lse_s, lse_t, *common, **meta)
    if row_weight is None:
        return rows.view(B, H, L), sq.new_empty(0, dtype=out_dtype_q), sk.new_empty(0, dtype=out_dtype_k)
    w = (row_weight.to(torch.float32) * ss).reshape(BH, L).contiguous()
    dq = torch.empty(BH, L, Ds, dtype=torch.float32, device=dev)
    dk = torch.empty(BH, L, Ds, dtype=torch.float32, device=dev)
    K.attention_distill_dq_kernel[grid_m](sq, sk, tq, tk, mask, lse_s, lse_t, w, dq, *common, **meta)
    grid_n = (triton.cdiv(L, block_n), BH)
    K.attention_distill_dk_kernel[grid_n](sq, sk, tq, tk, mask, lse_s, lse_t, w, dk, *common, **meta)
    return rows.view(B, H, L), dq.view(B, H, L, Ds).to(out_dtype_q), dk.view(B, H, L, Ds).to(out_dtype_k)
