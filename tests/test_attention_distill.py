"""attention_distill_loss (MiniLM attention / MiniLMv2 relation transfer) against the materialized float64 reference:
every option and gradient, ragged L, padding and causal masks, H / D mismatch with relation heads, the tiled torch
path and the Triton kernels (under TRITON_INTERPRET=1 without a GPU), custom-op checks, clear errors."""

import pytest
import torch

import fastdistill.functional as FD
from fastdistill import nn as fdnn
from fastdistill.ops import attention_distill as _op
from fastdistill.ops.attention_distill_ref import attention_distill_loss_ref
from tests.conftest import DEVICE, available_backends

BACKENDS = available_backends()


def _inputs(B, Hs, L, Ds, Ht, Dt, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5).to(device=device, dtype=dtype)

    return r(B, Hs, L, Ds), r(B, Hs, L, Ds), r(B, Ht, L, Dt), r(B, Ht, L, Dt)


def _padding(B, L, device=DEVICE):
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    mask[0, : L // 5] = 0  # left padding
    if B > 1:
        mask[1, L - L // 3 :] = 0  # right padding
    return mask


def _check(sq, sk, tq, tk, backend, atol, grad_scale=1.7, **kw):
    """Loss and student gradients (with grad_output != 1) against the float64 reference."""
    sq_ = sq.detach().clone().requires_grad_()
    sk_ = sk.detach().clone().requires_grad_()
    loss = FD.attention_distill_loss(sq_, sk_, tq, tk, backend=backend, **kw)
    rq = sq.detach().double().requires_grad_()
    rk = sk.detach().double().requires_grad_()
    ref = attention_distill_loss_ref(rq, rk, tq.double(), tk.double(), **kw)
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=atol)
    go = torch.rand_like(ref) + 0.5 if ref.dim() else torch.tensor(grad_scale, dtype=torch.float64)
    (loss * go.to(loss.dtype)).sum().backward()
    (ref * go).sum().backward()
    torch.testing.assert_close(sq_.grad.double(), rq.grad, atol=atol, rtol=atol)
    torch.testing.assert_close(sk_.grad.double(), rk.grad, atol=atol, rtol=atol)
    return loss


CASES = [("batchmean", c, m) for c in (False, True) for m in (False, True)] + [
    ("sum", True, True),
    ("none", True, True),
    ("none", False, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "reduction,causal,masked",
    CASES,
    ids=[f"{r}-{'causal' if c else 'full'}-{'pad' if m else 'nomask'}" for r, c, m in CASES],
)
def test_matches_reference(backend, reduction, causal, masked):
    # ragged: L = 37 crosses tile edges of the interpreter's 32 x 16 tiles; D 8 / 20 pad to 16 / 32
    B, H, L = 2, 3, 37
    sq, sk, tq, tk = _inputs(B, H, L, 8, H, 20)
    mask = _padding(B, L) if masked else None
    _check(sq, sk, tq, tk, backend, 2e-5, attention_mask=mask, causal=causal, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relation_heads_h_and_d_mismatch(backend):
    """MiniLMv2: student 2 heads x 12, teacher 3 heads x 16, 4 relation heads (6 and 12 features)."""
    sq, sk, tq, tk = _inputs(2, 2, 29, 12, 3, 16, seed=1)
    mask = _padding(2, 29)
    _check(sq, sk, tq, tk, backend, 2e-5, attention_mask=mask, causal=True, relation_heads=4)
    _check(sq, sk, tq, tk, backend, 2e-5, relation_heads=2, scale=(0.3, 0.2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_relation_same_tensor(backend):
    """VV relation: the same tensor as q and k on both sides; the gradient of both uses adds up."""
    sv, _, tv, _ = _inputs(2, 4, 23, 8, 2, 24, seed=2)
    s = sv.clone().requires_grad_()
    loss = FD.attention_distill_loss(s, s, tv, tv, relation_heads=4, backend=backend)
    r = sv.double().requires_grad_()
    ref = attention_distill_loss_ref(r, r, tv.double(), tv.double(), relation_heads=4)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s.grad.double(), r.grad, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_and_example(backend):
    """An example with every token padded contributes 0 and does not count in batchmean's denominator."""
    sq, sk, tq, tk = _inputs(3, 2, 19, 16, 2, 16, seed=3)
    mask = _padding(3, 19)
    mask[2] = 0
    loss = _check(sq, sk, tq, tk, backend, 2e-5, attention_mask=mask, reduction="none")
    assert torch.all(loss[2] == 0) and torch.all(loss[0, :, :3] == 0)
    _check(sq, sk, tq, tk, backend, 2e-5, attention_mask=mask, causal=True)
    mask.zero_()
    loss = FD.attention_distill_loss(sq.requires_grad_(), sk, tq, tk, attention_mask=mask, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(sq.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L", [1, 16, 70], ids=lambda v: f"L{v}")
def test_lengths(backend, L):
    sq, sk, tq, tk = _inputs(1, 2, L, 32, 2, 16, seed=L)
    _check(sq, sk, tq, tk, backend, 2e-5, causal=True)
    _check(sq, sk, tq, tk, backend, 2e-5, attention_mask=_padding(1, L) if L > 1 else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    """[B, L, H, D] projections viewed as [B, H, L, D] (what the capture hooks hand out)."""
    B, L, H = 2, 21, 2
    g = torch.Generator().manual_seed(4)
    sq, sk, tq, tk = (torch.randn(B, L, H, d, generator=g).to(DEVICE).transpose(1, 2) for d in (8, 8, 12, 12))
    assert not sq.is_contiguous()
    _check(sq, sk, tq, tk, backend, 2e-5, causal=True)


def test_torch_path_many_blocks(monkeypatch):
    """A tiny block budget forces many query blocks and head blocks; float64 inputs give float64-exact results."""
    monkeypatch.setattr(_op, "TORCH_BLOCK_ELEMENTS", 700)
    sq, sk, tq, tk = _inputs(2, 3, 45, 8, 3, 12, dtype=torch.float64, seed=5)
    for causal in (False, True):
        _check(sq, sk, tq, tk, "torch", 1e-10, attention_mask=_padding(2, 45), causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_no_worse_than_torch(backend, dtype):
    """Low-precision inputs: error at most 2x that of plain torch computing the maps in the same dtype."""
    sq, sk, tq, tk = _inputs(2, 2, 33, 16, 2, 16, dtype=dtype, seed=6)
    ref = attention_distill_loss_ref(sq.double(), sk.double(), tq.double(), tk.double(), causal=True)
    torch_lp = attention_distill_loss_ref(sq, sk, tq, tk, causal=True).double()
    got = FD.attention_distill_loss(sq, sk, tq, tk, causal=True, backend=backend).double()
    assert (got - ref).abs() <= 2 * (torch_lp - ref).abs() + 1e-3 * ref.abs()
    s = sq.clone().requires_grad_()
    FD.attention_distill_loss(s, sk, tq, tk, causal=True, backend=backend).backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()


def test_no_grad_forward_and_module():
    sq, sk, tq, tk = _inputs(2, 2, 17, 8, 2, 8, seed=7)
    with torch.no_grad():
        a = FD.attention_distill_loss(sq.requires_grad_(), sk, tq, tk, causal=True)
    module = fdnn.AttentionDistillLoss(causal=True)
    b = module(sq, sk, tq, tk)
    torch.testing.assert_close(a, b.detach())
    assert "causal=True" in repr(module)


def test_opcheck_and_compile():
    sq, sk, tq, tk = _inputs(2, 2, 11, 8, 2, 12, seed=8)
    sq.requires_grad_()
    sk.requires_grad_()
    mask = _padding(2, 11)
    for red in (0, 2):
        torch.library.opcheck(
            _op.attention_distill_op,
            (sq, sk, tq, tk, mask, True, 0.3, 0.25, red, True, "torch"),
        )

    def f(a, b):
        return FD.attention_distill_loss(a, b, tq, tk, attention_mask=mask, causal=True, backend="torch")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(sq, sk), f(sq, sk))
    compiled(sq, sk).backward()
    assert sq.grad is not None and torch.isfinite(sq.grad).all()


def test_bad_inputs():
    sq, sk, tq, tk = _inputs(2, 2, 9, 8, 3, 8)
    with pytest.raises(ValueError, match="student has 2 heads but teacher has 3"):
        FD.attention_distill_loss(sq, sk, tq, tk)
    with pytest.raises(ValueError, match="relation_heads=5"):
        FD.attention_distill_loss(sq, sk, tq, tk, relation_heads=5)
    with pytest.raises(ValueError, match="relation_heads=0 is invalid"):
        FD.attention_distill_loss(sq, sk, tq, tk, relation_heads=0)
    with pytest.raises(ValueError, match="at least 4 dimension"):
        FD.attention_distill_loss(sq[0], sk[0], tq[0], tk[0])
    with pytest.raises(ValueError, match="student_k has shape"):
        FD.attention_distill_loss(sq, sk[..., :4], tq, tk, relation_heads=1)
    with pytest.raises(ValueError, match="same batch size B and sequence length L"):
        FD.attention_distill_loss(sq, sk, tq[:, :, :5], tk[:, :, :5], relation_heads=1)
    with pytest.raises(ValueError, match="teacher_q requires grad"):
        FD.attention_distill_loss(sq, sk, tq.requires_grad_(), tk, relation_heads=1)
    tq.requires_grad_(False)
    with pytest.raises(ValueError, match="teacher_k is torch.float64"):
        FD.attention_distill_loss(sq, sk, tq, tk.double(), relation_heads=1)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 8\); expected \(2, 9\)"):
        FD.attention_distill_loss(sq, sk, tq, tk, relation_heads=1, attention_mask=torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has dtype torch.float32"):
        FD.attention_distill_loss(sq, sk, tq, tk, relation_heads=1, attention_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="scale=-1.0 is invalid"):
        FD.attention_distill_loss(sq, sk, tq, tk, relation_heads=1, scale=-1.0)
    with pytest.raises(ValueError, match="reduction='mean' is not supported"):
        FD.attention_distill_loss(sq, sk, tq, tk, relation_heads=1, reduction="mean")
    with pytest.raises(RuntimeError, match="backend 'cpp' was requested"):
        FD.attention_distill_loss(sq, sk, tq, tk, relation_heads=1, backend="cpp")
    with pytest.raises(ValueError, match="dtype torch.int64"):
        FD.attention_distill_loss(sq.long(), sk.long(), tq.long(), tk.long())
