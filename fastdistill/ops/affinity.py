"""Affinity distillation op: ||N_s N_s^T - N_t N_t^T||_F^2 per example without forming [L, L] maps.

Inputs are the row-normalized (and masked: padded rows zeroed) features N_s [B, L, ds], N_t [B, L, dt]. Two exact
ways to get the per-example sum of squares:

    gram   ||N_s^T N_s||_F^2 - 2 ||N_s^T N_t||_F^2 + ||N_t^T N_t||_F^2   (the trace identity; [d, d] matrices only,
           O(L d^2) work, differentiated by autograd). Cheaper when L > d.
    tiled  blocks of rows: D = N_s[rows] N_s^T - N_t[rows] N_t^T ([B, rows, L]); the sum of D^2 and the gradient
           4 D N_s are accumulated in the same pass (O(L^2 d) work, O(rows x L) memory), backward only scales.
           Cheaper when L <= d; exact without the cancellation of the gram form when the two maps nearly agree.
"""

from __future__ import annotations

import torch

METHODS = ("auto", "gram", "tiled")
TILE_ELEMENTS = 1 << 21  # elements of one [B, rows, L] block


def choose_method(L: int, ds: int, dt: int, method: str = "auto") -> str:
    if method != "auto":
        return method
    return "gram" if L > max(ds, dt) else "tiled"


def affinity_sq_gram(ns: torch.Tensor, nt: torch.Tensor) -> torch.Tensor:
    """Per-example ||A_s - A_t||_F^2 through the trace identity, [B] (autograd-differentiable)."""
    g_ss = ns.transpose(1, 2) @ ns  # [B, ds, ds]
    g_st = ns.transpose(1, 2) @ nt  # [B, ds, dt]
    g_tt = nt.transpose(1, 2) @ nt  # [B, dt, dt]
    return g_ss.square().sum((1, 2)) - 2 * g_st.square().sum((1, 2)) + g_tt.square().sum((1, 2))


@torch.library.custom_op("fastdistill::affinity_tiled", mutates_args=())
def affinity_tiled_op(ns: torch.Tensor, nt: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example ||A_s - A_t||_F^2 [B], its gradient w.r.t. ns [B, L, ds] or an empty tensor)."""
    B, L, _ = ns.shape
    per = torch.zeros(B, dtype=ns.dtype, device=ns.device)
    grad = torch.zeros_like(ns) if need_grad else ns.new_empty(0)
    rows = max(1, min(L, TILE_ELEMENTS // max(B * L, 1)))
    for i0 in range(0, L, rows):
        i1 = min(L, i0 + rows)
        diff = torch.bmm(ns[:, i0:i1], ns.transpose(1, 2))  # [B, rows, L]
        diff.sub_(torch.bmm(nt[:, i0:i1], nt.transpose(1, 2)))
        per += diff.square().sum((1, 2))
        if need_grad:
            # d/dN_s sum (A_s - A_t)^2 = 4 (A_s - A_t) N_s (A symmetric: row and column uses of each N_s row)
            grad[:, i0:i1] = torch.bmm(diff, ns).mul_(4.0)
        del diff
    return per, grad


@affinity_tiled_op.register_fake
def _(ns, nt, need_grad):
    return ns.new_empty(ns.shape[0]), (torch.empty_like(ns) if need_grad else ns.new_empty(0))


def _setup(ctx, inputs, output):
    ctx.need_grad = inputs[2]
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_per, _grad_grad):
    if not ctx.need_grad:
        raise RuntimeError("affinity_tiled was run with need_grad=False; its gradient was not computed")
    (grad,) = ctx.saved_tensors
    return grad * grad_per[:, None, None].to(grad.dtype), None, None


affinity_tiled_op.register_autograd(_backward, setup_context=_setup)
