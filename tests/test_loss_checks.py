"""One set of input rules for every loss (fastdistill/functional/_checks.py): vocabulary padding, real-number
options, integer labels, top-k indices, double backward. Each rule is exercised on distill_loss and on
fused_linear_distill_loss, which must agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICE, assert_close, generator

import fastdistill.functional as FD
from fastdistill import reference as R


def _logits(seed, N=6, Vs=1000, Vt=1000):
    g = generator(seed)
    s = (torch.randn(N, Vs, generator=g) * 2).to(DEVICE)
    t = (torch.randn(N, Vt, generator=g) * 2).to(DEVICE)
    labels = torch.randint(0, min(Vs, Vt), (N,), generator=g).to(DEVICE)
    labels[0] = -100
    return s, t, labels


def _linear(seed, N=6, H=8, Vs=1000, Vt=1000):
    g = generator(seed)
    xs, xt = torch.randn(N, H, generator=g).to(DEVICE), torch.randn(N, H, generator=g).to(DEVICE)
    ws, wt = torch.randn(Vs, H, generator=g).to(DEVICE), torch.randn(Vt, H, generator=g).to(DEVICE)
    labels = torch.randint(0, min(Vs, Vt), (N,), generator=g).to(DEVICE)
    labels[0] = -100
    return xs, ws, xt, wt, labels


# ------------------------------------------------------------------------------------------ vocabulary padding
@pytest.mark.parametrize(
    "Vs, Vt", [(1000, 1100), (1100, 1000), (32000, 32064)], ids=["Vt+100", "Vs+100", "32000v32064"]
)
def test_padding_mismatch_accepted_by_both_losses_over_the_common_prefix(Vs, Vt, seed):
    s, t, labels = _logits(seed, N=3, Vs=Vs, Vt=Vt)
    Vc = min(Vs, Vt)
    s = s.requires_grad_(True)
    loss = FD.distill_loss(s, t, labels, divergence="jsd")
    loss.backward()
    ref = R.distill_loss(s.detach()[:, :Vc].double(), t[:, :Vc].double(), labels, divergence="jsd")
    assert_close(loss, ref, rtol=1e-5, atol=1e-6, msg="distill_loss over the common prefix")
    assert torch.equal(s.grad[:, Vc:], torch.zeros_like(s.grad[:, Vc:])), "student's padding entries get gradient 0"
    xs, ws, xt, wt, labels = _linear(seed, N=3, Vs=Vs, Vt=Vt)
    fused = FD.fused_linear_distill_loss(xs, ws, xt, wt, labels, divergence="jsd")
    plain = FD.distill_loss(xs @ ws.t(), xt @ wt.t(), labels, divergence="jsd")
    assert_close(fused, plain, rtol=1e-5, atol=1e-6, msg="fused vs logits, same padding rule")


@pytest.mark.parametrize("Vs, Vt", [(1000, 1200), (1200, 1000), (32000, 50257)])
def test_larger_mismatch_rejected_by_both_losses(Vs, Vt, seed):
    s, t, labels = _logits(seed, N=2, Vs=Vs, Vt=Vt)
    with pytest.raises(ValueError, match=rf"Vs={Vs} and Vt={Vt} .*only padding mismatches"):
        FD.distill_loss(s, t, labels)
    xs, ws, xt, wt, labels = _linear(seed, N=2, Vs=Vs, Vt=Vt)
    with pytest.raises(ValueError, match=rf"Vs={Vs} and Vt={Vt} .*only padding mismatches"):
        FD.fused_linear_distill_loss(xs, ws, xt, wt, labels)


# ------------------------------------------------------------------------------------------ real-number options
REALS = [
    2,
    2.0,
    np.float32(2.0),
    np.float64(2.0),
    np.int64(2),
    torch.tensor(2.0),
    torch.tensor([2.0], dtype=torch.float64),
]


@pytest.mark.parametrize(
    "temperature", REALS, ids=["int", "float", "np.float32", "np.float64", "np.int64", "0d", "1el"]
)
def test_temperature_any_real_number(temperature, seed):
    s, t, labels = _logits(seed, Vs=50, Vt=50)
    want = FD.distill_loss(s, t, labels, temperature=2.0, beta=0.25, divergence="jsd")
    got = FD.distill_loss(s, t, labels, temperature=temperature, beta=np.float32(0.25), divergence="jsd")
    assert_close(got, want, rtol=0, atol=0, msg=f"temperature={temperature!r}")
    xs, ws, xt, wt, labels = _linear(seed, Vs=50, Vt=50)
    want = FD.fused_linear_distill_loss(xs, ws, xt, wt, labels, temperature=2.0, hard_weight=0.5)
    got = FD.fused_linear_distill_loss(
        xs, ws, xt, wt, labels, temperature=temperature, hard_weight=np.float32(0.5), soft_weight=torch.tensor(1.0)
    )
    assert_close(got, want, rtol=0, atol=0, msg=f"fused temperature={temperature!r}")


@pytest.mark.parametrize(
    "temperature, match",
    [
        (True, "temperature=True .* expected a real number"),
        ("2", "temperature='2' .* expected a real number"),
        (torch.tensor([1.0, 2.0]), r"temperature is a tensor of shape \(2,\)"),
        (torch.tensor(2.0, requires_grad=True), "temperature requires grad"),
        (0.0, r"temperature=0.0 is out of range; expected a finite number > 0"),
        (np.float32("nan"), "temperature=nan is invalid"),
    ],
    ids=["bool", "str", "2el", "requires_grad", "zero", "nan"],
)
def test_temperature_rejected_the_same_way(temperature, match, seed):
    s, t, labels = _logits(seed, Vs=50, Vt=50)
    with pytest.raises(ValueError, match=match):
        FD.distill_loss(s, t, labels, temperature=temperature)
    xs, ws, xt, wt, labels = _linear(seed, Vs=50, Vt=50)
    with pytest.raises(ValueError, match=match):
        FD.fused_linear_distill_loss(xs, ws, xt, wt, labels, temperature=temperature)


# ------------------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_small_integer_labels_same_in_every_loss(dtype, seed):
    s, t, labels = _logits(seed, Vs=100, Vt=100)
    labels = labels.clamp(min=0)
    labels[1] = 7  # used as ignore_index below: representable in every dtype
    want = FD.distill_loss(s, t, labels, ignore_index=7)
    assert_close(FD.distill_loss(s, t, labels.to(dtype), ignore_index=7), want, rtol=0, atol=0, msg=str(dtype))
    xs, ws, xt, wt, labels = _linear(seed, Vs=100, Vt=100)
    labels = labels.clamp(min=0)
    labels[1] = 7
    kw = dict(hard_weight=0.5, ignore_index=7)
    want = FD.fused_linear_distill_loss(xs, ws, xt, wt, labels, **kw)
    got = FD.fused_linear_distill_loss(xs, ws, xt, wt, labels.to(dtype), **kw)
    assert_close(got, want, rtol=0, atol=0, msg=f"fused {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_labels_rejected_the_same_way(dtype, seed):
    s, t, labels = _logits(seed, Vs=50, Vt=50)
    match = f"labels has dtype {dtype}; expected an integer dtype"
    with pytest.raises(ValueError, match=match):
        FD.distill_loss(s, t, labels.to(dtype))
    xs, ws, xt, wt, labels = _linear(seed, Vs=50, Vt=50)
    with pytest.raises(ValueError, match=match):
        FD.fused_linear_distill_loss(xs, ws, xt, wt, labels.to(dtype))


# -------------------------------------------------------------------------------------------------- top-k indices
def test_duplicate_topk_indices_rejected(seed):
    xs, ws, _, _, labels = _linear(seed, Vs=50, Vt=50)
    vals, idx = torch.randn(6, 50, generator=generator(seed + 1)).to(DEVICE).log_softmax(-1).topk(4, -1)
    FD.fused_linear_distill_loss(xs, ws, teacher_topk=(vals, idx))  # distinct: fine
    dup = idx.clone()
    dup[3, 2] = dup[3, 0]
    with pytest.raises(ValueError, match=r"teacher_topk indices repeat a token within a row \(row 3"):
        FD.fused_linear_distill_loss(xs, ws, teacher_topk=(vals, dup))
    out = idx.clone()
    out[0, 0] = -1
    with pytest.raises(ValueError, match=r"teacher_topk indices lie in \[-1, .*expected \[0, Vs=50\)"):
        FD.fused_linear_distill_loss(xs, ws, teacher_topk=(vals, out))


# ------------------------------------------------------------------------------------------------ double backward
def test_double_backward_says_it_is_not_supported(seed):
    s, t, labels = _logits(seed, Vs=40, Vt=40)
    s.requires_grad_(True)
    (g,) = torch.autograd.grad(FD.distill_loss(s, t, labels), s, create_graph=True)
    (g_plain,) = torch.autograd.grad(FD.distill_loss(s, t, labels), s)
    assert_close(g, g_plain, rtol=0, atol=0, msg="first-order gradient under create_graph=True")
    with pytest.raises(RuntimeError, match="distill_loss does not support double backward"):
        g.pow(2).sum().backward()
    xs, ws, xt, wt, labels = _linear(seed, Vs=40, Vt=40)
    xs.requires_grad_(True)
    (gx,) = torch.autograd.grad(FD.fused_linear_distill_loss(xs, ws, xt, wt, labels), xs, create_graph=True)
    with pytest.raises(RuntimeError, match="fused_linear_distill_loss does not support double backward"):
        gx.pow(2).sum().backward()
