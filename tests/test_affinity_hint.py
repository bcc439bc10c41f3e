"""affinity_distill_loss (gram identity and tiled paths), hint_loss and glimpse_hint_loss against materialized float64
references, with their gradients, masks, width mismatch, module forms and clear errors."""

import pytest
import torch

import fastdistill.functional as FD
from fastdistill import nn as fdnn
from fastdistill.ops import affinity as _aff
from fastdistill.ops.attention_distill_ref import affinity_distill_loss_ref
from tests.conftest import DEVICE

pytestmark = pytest.mark.cpu_only


def _feat(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("method", ["auto", "gram", "tiled"])
@pytest.mark.parametrize("shape", [(3, 41, 12, 20), (2, 9, 24, 40)], ids=["L>d", "L<d"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_affinity_matches_reference(method, shape, masked, monkeypatch):
    monkeypatch.setattr(_aff, "TILE_ELEMENTS", 300)  # several row blocks on the tiled path
    B, L, ds, dt = shape
    s, t = _feat(B, L, ds, seed=1), _feat(B, L, dt, seed=2)
    mask = None
    if masked:
        mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
        mask[0, L // 2 :] = False
        mask[-1] = False  # an example with no position left: out of the mean
    s_ = s.clone().requires_grad_()
    loss = FD.affinity_distill_loss(s_, t, mask=mask, method=method)
    r = s.double().requires_grad_()
    ref = affinity_distill_loss_ref(r, t.double(), mask)
    torch.testing.assert_close(loss.double(), ref, atol=2e-6, rtol=1e-5)
    (loss * 1.3).backward()
    (ref * 1.3).backward()
    torch.testing.assert_close(s_.grad.double(), r.grad, atol=2e-6, rtol=1e-5)


def test_affinity_float64_exact_and_auto_choice():
    assert _aff.choose_method(100, 64, 32) == "gram" and _aff.choose_method(64, 64, 32) == "tiled"
    s, t = _feat(2, 50, 8, dtype=torch.float64, seed=3), _feat(2, 50, 16, dtype=torch.float64, seed=4)
    for method in ("gram", "tiled"):
        torch.testing.assert_close(
            FD.affinity_distill_loss(s, t, method=method), affinity_distill_loss_ref(s, t), atol=1e-12, rtol=1e-12
        )


def test_affinity_opcheck():
    ns = torch.nn.functional.normalize(_feat(2, 7, 5, seed=5), dim=-1).requires_grad_()
    nt = torch.nn.functional.normalize(_feat(2, 7, 9, seed=6), dim=-1)
    torch.library.opcheck(_aff.affinity_tiled_op, (ns, nt, True))


def _hint_ref(s, t, kind, mask):
    s, t = s.double(), t.double()
    per = (s - t).square().mean(-1) if kind == "mse" else 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)
    if mask is None:
        return per.mean()
    return (per * mask).sum() / mask.sum()


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("proj", ["none", "weight", "module"])
def test_hint_loss(kind, proj):
    s, t = _feat(3, 11, 16, seed=7), _feat(3, 11, 24 if proj != "none" else 16, seed=8)
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(0)) > 0.3
    if proj == "none":
        projection, apply = None, (lambda x: x)
    elif proj == "weight":
        w = _feat(24, 16, seed=9).requires_grad_()
        projection, apply = w, (lambda x: x @ w.double().T)
    else:
        lin = torch.nn.Linear(16, 24).to(DEVICE)
        projection, apply = lin, (lambda x: x @ lin.weight.double().T + lin.bias.double())
    for m in (None, mask):
        s_ = s.clone().requires_grad_()
        loss = FD.hint_loss(s_, t, projection=projection, kind=kind, mask=m)
        r = s.double().requires_grad_()
        ref = _hint_ref(apply(r), t, kind, m)
        torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(s_.grad.double(), r.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_glimpse_hint(kind):
    B, T, L = 2, 5, 13
    sa = _feat(B, T, L, seed=10).softmax(-1).requires_grad_()
    sf = _feat(B, L, 16, seed=11).requires_grad_()
    ta, tf = _feat(B, T, L, seed=12).softmax(-1), _feat(B, L, 16, seed=13)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    loss = FD.glimpse_hint_loss(sa, sf, ta, tf, kind=kind, mask=mask)
    ref = _hint_ref(sa.double() @ sf.double(), ta.double() @ tf.double(), kind, mask)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert sa.grad.abs().sum() > 0 and sf.grad.abs().sum() > 0


def test_modules():
    s, t = _feat(2, 9, 16, seed=14).requires_grad_(), _feat(2, 9, 32, seed=15)
    hint = fdnn.HintLoss(16, 32, kind="cosine")
    assert hint.projection is not None and hint.projection.weight.shape == (32, 16)
    hint(s, t).backward()
    assert hint.projection.weight.grad is not None
    torch.testing.assert_close(fdnn.AffinityDistillLoss()(s, t), FD.affinity_distill_loss(s, t))
    assert fdnn.HintLoss(16, 16).projection is None
    ga = fdnn.GlimpseHintLoss()
    a = _feat(2, 4, 9, seed=16).softmax(-1)
    torch.testing.assert_close(ga(a, t, a, t), torch.zeros(()))


def test_bad_inputs():
    s, t = _feat(2, 9, 16), _feat(2, 9, 32)
    with pytest.raises(ValueError, match="expected the same \\[B, L\\]"):
        FD.affinity_distill_loss(s, t[:, :5])
    with pytest.raises(ValueError, match="teacher_feat requires grad"):
        FD.affinity_distill_loss(s, t.clone().requires_grad_())
    with pytest.raises(ValueError, match="method='exact' is not supported"):
        FD.affinity_distill_loss(s, t, method="exact")
    with pytest.raises(ValueError, match=r"mask has shape \(2, 8\)"):
        FD.affinity_distill_loss(s, t, mask=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected 3 dimensions"):
        FD.affinity_distill_loss(s[..., None], t[..., None])
    with pytest.raises(ValueError, match="pass projection= mapping width 16 to 32"):
        FD.hint_loss(s, t)
    with pytest.raises(ValueError, match="kind='l1' is not supported"):
        FD.hint_loss(s, t, kind="l1")
    with pytest.raises(ValueError, match=r"projection has shape \(32, 8\)"):
        FD.hint_loss(s, t, projection=torch.randn(32, 8))
    with pytest.raises(ValueError, match="student_attn has shape"):
        FD.glimpse_hint_loss(_feat(2, 4, 9), s, _feat(2, 5, 9), t)
    with pytest.raises(ValueError, match="a projection needs student_dim and teacher_dim"):
        fdnn.HintLoss(projection=True)
