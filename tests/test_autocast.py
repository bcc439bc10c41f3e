"""Every public loss under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with float32 inputs and parameters (what HF
Trainer / Accelerate / TRL run with ``bf16=True``): it runs, its loss is float32, each gradient has its input's dtype,
and the result is as close to the float64 answer as torch's own autocast computation of the same loss (STYLE.md: at
most 2x torch's low-precision error). The policy is fastdistill/functional/_autocast.py."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import available_backends

import fastdistill.functional as FD
from fastdistill import reference as R
from fastdistill.ops.fused_linear_distill_ref import fused_linear_distill_loss_ref

BF16_FACTOR = 2.0  # STYLE.md: no worse than 2x torch's own low-precision error
CPU = torch.device("cpu")
DENSE_BACKENDS = available_backends(CPU, cpp_op="distill_loss_rows")


def _gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def _value_and_grads(fn, inputs: list[torch.Tensor], autocast: bool):
    """fn(*leaves) under autocast or not, and the gradients of the leaves that require grad (grad_output 1.3)."""
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    if autocast:
        with _autocast():
            out = fn(*leaves)
    else:
        out = fn(*leaves)
    (out.sum() * 1.3).backward()
    return out.detach(), [x.grad for x in leaves if x.requires_grad]


def _check_like_torch(ours_fn, torch_fn, inputs: list[torch.Tensor]):
    """ours under autocast vs torch's own computation under autocast, both against float64 without autocast."""
    loss, grads = _value_and_grads(ours_fn, inputs, autocast=True)
    assert loss.dtype == torch.float32, f"loss dtype {loss.dtype} under autocast; expected float32 (as torch's losses)"
    for g, x in zip(grads, [x for x in inputs if x.requires_grad]):
        assert g is not None and g.dtype == x.dtype, f"gradient dtype {getattr(g, 'dtype', None)}; expected {x.dtype}"
        assert torch.isfinite(g).all()
    t_loss, t_grads = _value_and_grads(torch_fn, inputs, autocast=True)
    ref_loss, ref_grads = _value_and_grads(torch_fn, [x.double() for x in inputs], autocast=False)
    pairs = [("loss", loss, t_loss, ref_loss)] + [
        (f"grad {i}", g, tg, rg) for i, (g, tg, rg) in enumerate(zip(grads, t_grads, ref_grads))
    ]
    for name, got, torch_got, ref in pairs:
        ours, theirs = _rel(got, ref), _rel(torch_got, ref)
        assert ours <= BF16_FACTOR * theirs + 1e-6, (
            f"{name}: relative error {ours:.3e} under autocast > {BF16_FACTOR} x torch's own {theirs:.3e}"
        )


@pytest.mark.parametrize("backend", DENSE_BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_distill_loss_under_autocast(divergence, backend, request):
    """Logits from an autocast linear layer (bf16) against a float32 teacher: both are read in float32."""
    g = _gen(request)
    x = torch.randn(24, 32, generator=g)
    w = (torch.randn(301, 32, generator=g) * 0.3).requires_grad_()
    teacher = torch.randn(24, 301, generator=g) * 2

    def ours(w_):
        return FD.distill_loss(F.linear(x, w_), teacher, divergence=divergence, temperature=2.0, backend=backend)

    def theirs(w_):  # log_softmax runs in float32 under autocast
        s = F.linear(x.to(w_.dtype), w_)
        return R.distill_loss(s, teacher.to(w_.dtype), divergence=divergence, temperature=2.0)

    _check_like_torch(ours, theirs, [w])


def test_kl_div_under_autocast(request):
    g = _gen(request)
    x = torch.randn(16, 40, generator=g)
    w = (torch.randn(77, 40, generator=g) * 0.2).requires_grad_()
    target = torch.randn(16, 77, generator=g).softmax(-1)

    def ours(w_):
        return FD.kl_div(F.linear(x.to(w_.dtype), w_).log_softmax(-1), target.to(w_.dtype), reduction="batchmean")

    def theirs(w_):
        return F.kl_div(F.linear(x.to(w_.dtype), w_).log_softmax(-1), target.to(w_.dtype), reduction="batchmean")

    _check_like_torch(ours, theirs, [w])


def _fused_problem(g, N=37, Hs=24, Ht=40, V=257, k=8):
    xs = torch.randn(N, Hs, generator=g).requires_grad_()
    ws = (torch.randn(V, Hs, generator=g) * Hs**-0.5 * 2).requires_grad_()
    xt = torch.randn(N, Ht, generator=g)
    wt = torch.randn(V, Ht, generator=g) * Ht**-0.5 * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    lp = torch.log_softmax(torch.randn(N, V, generator=g) * 2, -1)
    values, indices = lp.topk(k, dim=-1)
    return xs, ws, xt, wt, labels, values, indices


@pytest.mark.parametrize("mode", ["dense", "topk"])
@pytest.mark.parametrize("backend", DENSE_BACKENDS)
def test_fused_linear_distill_loss_under_autocast(mode, backend, request):
    """The issue's crash ("student has dtype BFloat16 but teacher has dtype Float"): float32 hidden states and weights
    under CPU autocast. Matmuls run in bf16 for student and teacher, the row math in float32."""
    xs, ws, xt, wt, labels, values, indices = _fused_problem(_gen(request))
    kw = dict(divergence="jsd", beta=0.3, temperature=1.5, hard_weight=0.4, soft_weight=0.6)
    if mode == "dense":

        def ours(x_, w_):
            return FD.fused_linear_distill_loss(
                x_, w_, xt.to(x_.dtype), wt.to(x_.dtype), labels, chunk_size=16, backend=backend, **kw
            )

        def theirs(x_, w_):
            return fused_linear_distill_loss_ref(x_, w_, xt.to(x_.dtype), wt.to(x_.dtype), labels, **kw)
    else:

        def ours(x_, w_):
            return FD.fused_linear_distill_loss(
                x_,
                w_,
                labels=labels,
                teacher_topk=(values.to(x_.dtype), indices),
                topk_tail="bucket",
                chunk_size=16,
                backend=backend,
                **kw,
            )

        def theirs(x_, w_):
            return fused_linear_distill_loss_ref(
                x_, w_, labels=labels, teacher_topk=(values.to(x_.dtype), indices), topk_tail="bucket", **kw
            )

    _check_like_torch(ours, theirs, [xs, ws])


def test_fused_linear_mixed_dtypes_under_autocast(request):
    """Under autocast a bf16 hidden state (from the autocast model body) with a float32 lm_head is accepted, as
    F.linear accepts it; outside autocast the same call is an error naming both arguments."""
    xs, ws, xt, wt, labels, _, _ = _fused_problem(_gen(request))
    xb = xs.detach().bfloat16().requires_grad_()
    with _autocast():
        loss = FD.fused_linear_distill_loss(xb, ws, xt.bfloat16(), wt, labels, hard_weight=0.5)
    loss.backward()
    assert loss.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16 and ws.grad.dtype == torch.float32
    with pytest.raises(
        ValueError, match="student_weight has dtype torch.float32 but student_hidden has dtype torch.bfloat16"
    ):
        FD.fused_linear_distill_loss(xb, ws, xt.bfloat16(), wt, labels)


def test_intermediate_losses_under_autocast(request):
    g = _gen(request)
    B, H, L, D = 2, 2, 16, 8
    sq = torch.randn(B, H, L, D, generator=g).requires_grad_()
    sk = torch.randn(B, H, L, D, generator=g).requires_grad_()
    tq, tk = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    proj = torch.nn.Linear(D, 12, bias=False)
    feats_s = torch.randn(B, L, D, generator=g).requires_grad_()
    feats_t = torch.randn(B, L, 12, generator=g)
    attn_s = torch.randn(B, 5, L, generator=g).softmax(-1)
    with _autocast():
        # attention distill with bf16 student q/k (from autocast projections) and float32 teacher q/k
        lin = torch.nn.Linear(D, D)
        losses = {
            "attention": FD.attention_distill_loss(lin(sq), lin(sk), tq, tk, causal=True),
            "affinity": FD.affinity_distill_loss(proj(feats_s), feats_t),
            "hint": FD.hint_loss(feats_s, feats_t, projection=proj),
            "glimpse": FD.glimpse_hint_loss(attn_s, feats_s, attn_s, feats_t, projection=proj),
        }
    for name, loss in losses.items():
        assert loss.dtype == torch.float32, f"{name}: loss dtype {loss.dtype} under autocast; expected float32"
        assert torch.isfinite(loss), name
    sum(losses.values()).backward()
    for x in (sq, sk, feats_s):
        assert x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    # hint loss: float32 math under autocast, as F.mse_loss (the projection still runs in bf16)
    with _autocast():
        ours = FD.hint_loss(feats_s, feats_t, projection=proj)
        theirs = F.mse_loss(proj(feats_s), feats_t)
    torch.testing.assert_close(ours, theirs)
