"""Launchers of the Triton attention-distillation kernels (contract in ``fastdistill.ops.attention_distill``)."""

from __future__ import annotations

import torch
import triton

from fastdistill import _backend


def launch_config(d_max: int, dtype: torch.dtype) -> dict[str, int]:
    """Tiles and launch options of the three kernels (forward, dq, dk) for inputs of ``dtype`` (as the kernels read
    them: fp64 is converted to fp32 first) whose larger head size is ``d_max``: ``BLOCK_M``, ``BLOCK_N``,
    ``num_warps`` and, where the Triton default does not fit, ``num_stages``. ``benchmarks/triton_aot.py`` compiles
    what this returns (it captures the real launches) for sm_80 and sm_90 and fails on any register spill.

    - Interpreter: every tile op runs in numpy; small tiles keep tests quick and still cross tile edges at L ~ 70.
    - 16-bit inputs (TF32 dots on tensor cores): 64 x 64 tiles for head sizes <= 64; 64 x 32 above, where four
      [BLOCK, D] operand tiles plus two score tiles must fit shared memory; 8 warps (with 4 the dk kernel spilled on
      sm_90: 88 B for fp16 at head size 64, 72 B at head size 128).
    - fp32 inputs (exact fp32 "ieee" dots: FMA, no tensor cores; TF32 would break the fp32 accuracy contract):
      32 x 32 tiles (32 x 16 for head sizes over 64), 8 warps, no software pipelining (``num_stages=1``). An FMA dot
      keeps whole operand rows per thread in registers and the pipeliner adds prefetched tiles; every larger or
      pipelined configuration tried spilled on sm_80 or sm_90 (bytes of stack per thread, head size 64 unless said):
      64 x 64 / 4 warps pipelined (the former tiles) 0.9-12.9 KB in all three kernels; the same unpipelined 0.7-7.8
      KB; 32 x 32 / 4 warps pipelined: dk 4.7 KB; 32 x 32 / 4 warps unpipelined: 8-24 B; 64 x 32 / 8 warps
      unpipelined: 8 B; 32 x 32 / 8 warps at head size 128: dk 16 B (2 stages: 3.4-4.2 KB). The price: a quarter of
      the 16-bit tiles' work per program and no copy / compute overlap; its effect on speed is unmeasured (no GPU).
    """
    if _backend.triton_interpret():
        return {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4}
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32 if d_max <= 64 else 16, "num_warps": 8, "num_stages": 1}
    return {"BLOCK_M": 64, "BLOCK_N": 64 if d_max <= 64 else 32, "num_warps": 8}


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
    config = launch_config(max(Ds, Dt), sq.dtype)
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
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
        BLOCK_DS=block_ds,
        BLOCK_DT=block_dt,
        **config,
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
