"""Triton launchers of the sparse top-k term of the fused linear distillation loss (kernels in
``fastdistill.kernels.topk_distill``)."""

from __future__ import annotations

import torch
import triton

from fastdistill.kernels.topk_distill import topk_grad_kernel, topk_stats_kernel

# the [BLOCK_V, BLOCK_K] membership test bounds the tile; the interpreter gets small tiles (multi-tile paths exercised)
_MAX_TILE = 16384
_INTERPRET_MAX_BLOCK_V = 256


def _blocks(V: int, K: int, device: torch.device) -> tuple[int, int, int]:
    block_k = triton.next_power_of_2(max(K, 1))
    cap = _INTERPRET_MAX_BLOCK_V if device.type == "cpu" else 2048
    block_v = max(16, min(triton.next_power_of_2(V), cap, _MAX_TILE // block_k))
    num_warps = 8 if block_v * block_k >= 8192 else 4
    return block_v, block_k, num_warps


def topk_stats(s: torch.Tensor, indices: torch.Tensor, temperature: float, need_ce: bool):
    """Per row, float32 [C]: (max_t, log_sum_t, max_1, log_sum_1, log_tail) with log softmax(s / T) = (s / T - max_t)
    - log_sum_t, the same at T = 1 for the cross-entropy (each [1] when ``need_ce`` is False), and the log of the
    student's mass outside the top k at T."""
    assert s.stride(-1) == 1 and indices.stride(-1) == 1
    C, V = s.shape
    K = indices.shape[1]
    max_t, log_sum_t, log_tail = (torch.empty(C, device=s.device, dtype=torch.float32) for _ in range(3))
    max_1, log_sum_1 = (torch.zeros(C if need_ce else 1, device=s.device, dtype=torch.float32) for _ in range(2))
    if C == 0:
        return max_t, log_sum_t, max_1, log_sum_1, log_tail
    block_v, block_k, num_warps = _blocks(V, K, s.device)
    topk_stats_kernel[(C,)](
        s,
        indices,
        max_t,
        log_sum_t,
        max_1,
        log_sum_1,
        log_tail,
        s.stride(0),
        indices.stride(0),
        V,
        K,
        1.0 / temperature,
        HAS_CE=need_ce,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return max_t, log_sum_t, max_1, log_sum_1, log_tail


def topk_grad(s, indices, k_coef, tail_coef, stats, labels, temperature, hard_scale, need_soft, need_ce):
    """d loss / d logits [C, V] float32 of the top-k soft term (pre-scaled ``k_coef`` [C, k] at the top-k tokens,
    ``tail_coef`` [C] times p_v elsewhere) plus the CE term; ``stats`` are ``topk_stats``'s first four outputs."""
    C, V = s.shape
    K = indices.shape[1]
    out = torch.empty(C, V, device=s.device, dtype=torch.float32)
    if C == 0:
        return out
    k_coef = k_coef.float().contiguous()
    max_t, log_sum_t, max_1, log_sum_1 = stats
    label = labels if (need_ce and labels is not None) else indices[:, 0]
    block_v, block_k, num_warps = _blocks(V, K, s.device)
    topk_grad_kernel[(C,)](
        s,
        indices,
        k_coef,
        tail_coef.float().contiguous(),
        max_t,
        log_sum_t,
        max_1,
        log_sum_1,
        label.contiguous(),
        out,
        s.stride(0),
        indices.stride(0),
        k_coef.stride(0),
        out.stride(0),
        V,
        K,
        1.0 / temperature,
        float(hard_scale),
        HAS_SOFT=need_soft,
        HAS_CE=need_ce,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out
