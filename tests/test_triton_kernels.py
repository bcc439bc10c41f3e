"""Focused tests of the Triton kernels (distill_loss rows, kl_div rows) against the float64 reference.

On a machine without CUDA they run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest), so shapes are
small but ragged and several vocabulary tiles per row are always exercised. Outputs are poisoned with NaN so that an
element the kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close, available_backends

import fastdistill.functional as FD
from fastdistill import reference as R
from fastdistill.ops import distill_loss as op

pytestmark = [
    pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="Triton cannot run on this device here"),
    # the interpreter evaluates masked-off lanes too (e.g. -inf - -inf before a tl.where): numpy warns, the GPU not
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

DIV_ID = {name: i for i, name in enumerate(R.DIVERGENCES)}
BETA = 0.3


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """torch.empty returns NaN-filled floating tensors, so unwritten kernel outputs cannot pass as zeros."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", poisoned)


def _rand(shape, *, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def _labels(shape, V, *, ignore_frac=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return labels.to(DEVICE)


def _reference(s, t, labels, **kw):
    """float64 reference loss and its gradient w.r.t. the student logits."""
    s64 = s.detach().double().requires_grad_(True)
    loss = R.distill_loss(s64, t.detach().double(), labels, **kw)
    if not loss.requires_grad:  # e.g. skew forward KL at beta = 1 does not depend on the student
        return loss, torch.zeros_like(s64)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), s64.grad


def _triton(s, t, labels, grad_output=None, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = FD.distill_loss(s, t, labels, backend="triton", **kw)
    if grad_output is None:
        (loss.sum() if loss.dim() else loss).backward()
    else:
        loss.backward(grad_output)
    return loss.detach(), s.grad


def _close(a, b, *, atol=2e-6, rtol=2e-5, msg=None):
    assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True, msg=msg)  # keeps torch's report, prefixed by msg


def _rows_reference(s, t, divergence, temperature=1.0, loss_scale=1.0, grad_scale=1.0):
    """float64 per-row loss and d loss_rows[i] / d student[i] * grad_scale (the row contract, no labels)."""
    s64 = s.detach().double().requires_grad_(True)
    rows = R.divergence_rows(s64, t.detach().double(), divergence, BETA, temperature) * loss_scale
    rows.sum().backward()
    return rows.detach(), s64.grad * grad_scale


# ------------------------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
@pytest.mark.parametrize("reduction", R.REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.5], ids=["T1", "T2.5"])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no_labels"])
def test_matches_reference(divergence, reduction, temperature, with_labels):
    # small ragged shape for the full grid; the interpreter's 1024-wide tiles give 2 ragged tiles per row
    shape = (4, 1271)
    s, t = _rand(shape, seed=2), _rand(shape, seed=3)
    labels = _labels(shape[:-1], shape[-1]) if with_labels else None
    kw = dict(divergence=divergence, reduction=reduction, temperature=temperature, beta=BETA)
    ref_loss, ref_grad = _reference(s, t, labels, **kw)
    loss, grad = _triton(s, t, labels, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    _close(loss, ref_loss, msg=f"loss {divergence}")
    _close(grad, ref_grad, msg=f"grad {divergence}")


@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_ragged_many_rows(divergence):
    # [41, 401]: V below one tile, a ragged tail, a third of the rows ignored
    s, t = _rand((41, 401), seed=4), _rand((41, 401), seed=5)
    labels = _labels((41,), 401)
    kw = dict(divergence=divergence, temperature=2.0, beta=BETA)
    ref_loss, ref_grad = _reference(s, t, labels, **kw)
    loss, grad = _triton(s, t, labels, **kw)
    _close(loss, ref_loss)
    _close(grad, ref_grad)


@pytest.mark.parametrize("divergence", R.DIVERGENCES)
@pytest.mark.parametrize("block_v,V", [(16, 301), (128, 1271)], ids=["tile16", "tile128"])
def test_many_small_tiles(divergence, block_v, V):
    """The online softmax over many tiles (maxima that move between tiles) through the launcher."""
    from fastdistill.ops.distill_loss_triton import distill_loss_rows_triton

    s, t = _rand((2, V), seed=6), _rand((2, V), seed=7)
    s[:, 2 * V // 3 :] += 4.0  # the running max changes late in the row
    rows, grad, _ = distill_loss_rows_triton(
        s,
        t,
        None,
        torch.ones(1, device=DEVICE),
        op.canonical_divergence(DIV_ID[divergence], BETA),
        BETA,
        1.5,
        -100,
        1.5**2,
        True,
        block_v=block_v,
    )
    ref_rows, ref_grad = _rows_reference(s, t, divergence, temperature=1.5, loss_scale=1.5**2)
    _close(rows, ref_rows)
    _close(grad, ref_grad)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_vocabulary_over_65536(divergence, monkeypatch):
    # the GPU's 4096-wide tiles keep the interpreter fast on 70001 columns (18 tiles, the last one ragged)
    monkeypatch.setattr("fastdistill.ops.distill_loss_triton._INTERPRET_MAX_BLOCK_V", 4096)
    s, t = _rand((2, 70001), seed=8), _rand((2, 70001), seed=9)
    ref_loss, ref_grad = _reference(s, t, None, divergence=divergence, beta=BETA)
    loss, grad = _triton(s, t, None, divergence=divergence, beta=BETA)
    _close(loss, ref_loss)
    _close(grad, ref_grad, atol=1e-7)


@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_grad_scale_and_loss_scale_in_the_kernel(divergence):
    """grad = grad_scale * d loss_rows / d student, with loss_scale and the 1 / T chain factor, read from a tensor."""
    from fastdistill.ops.distill_loss_triton import distill_loss_rows_triton

    s, t = _rand((5, 300), seed=10), _rand((5, 300), seed=11)
    grad_scale = torch.full((1,), 0.37, device=DEVICE)
    rows, grad, _ = distill_loss_rows_triton(
        s, t, None, grad_scale, op.canonical_divergence(DIV_ID[divergence], BETA), BETA, 2.0, -100, 4.0, True
    )
    ref_rows, ref_grad = _rows_reference(s, t, divergence, temperature=2.0, loss_scale=4.0, grad_scale=0.37)
    _close(rows, ref_rows)
    _close(grad, ref_grad)


@pytest.mark.parametrize("reduction", R.REDUCTIONS)
def test_grad_output_not_one(reduction):
    s, t = _rand((3, 7, 155), seed=12), _rand((3, 7, 155), seed=13)
    labels = _labels((3, 7), 155)
    go = torch.tensor(1.7, device=DEVICE) if reduction != "none" else _rand((3, 7), scale=1.0, seed=14)
    s64 = s.double().requires_grad_(True)
    R.distill_loss(s64, t.double(), labels, divergence="jsd", reduction=reduction).backward(go.double())
    _, grad = _triton(s, t, labels, grad_output=go, divergence="jsd", reduction=reduction)
    _close(grad, s64.grad)


# ---------------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["T1", "T2"])
def test_masked_vocabulary(divergence, temperature):
    s, t = _rand((6, 333), seed=15), _rand((6, 333), seed=16)
    g = torch.Generator().manual_seed(17)
    mask = (torch.rand((6, 333), generator=g) < 0.4).to(DEVICE)  # different entries per row, same in both models
    mask[:, 300:] = True  # plus a fully masked run at the end of the row
    s, t = s.masked_fill(mask, float("-inf")), t.masked_fill(mask, float("-inf"))
    labels = _labels((6,), 333)
    kw = dict(divergence=divergence, temperature=temperature, beta=BETA, reduction="none")
    ref_loss, ref_grad = _reference(s, t, labels, **kw)
    loss, grad = _triton(s, t, labels, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.equal(grad[mask], torch.zeros_like(grad[mask]))
    _close(loss, ref_loss)
    _close(grad, ref_grad)


@pytest.mark.parametrize("divergence", ["skew_forward_kl", "skew_reverse_kl"])
def test_skew_end_points_with_masked_vocabulary(divergence):
    """beta = 0 / 1 for the skew KLs (a mixture weight of 0) with -inf entries stays finite, as in the reference."""
    s, t = _rand((3, 200), seed=18), _rand((3, 200), seed=19)
    mask = torch.zeros(3, 200, dtype=torch.bool, device=DEVICE)
    mask[:, :20] = True
    s, t = s.masked_fill(mask, float("-inf")), t.masked_fill(mask, float("-inf"))
    for beta in (0.0, 1.0):
        kw = dict(divergence=divergence, beta=beta, reduction="none")
        ref_loss, ref_grad = _reference(s, t, None, **kw)
        loss, grad = _triton(s, t, None, **kw)
        _close(loss, ref_loss, msg=f"beta={beta}")
        _close(grad, ref_grad, msg=f"beta={beta}")


@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_nan_and_all_inf_rows_like_the_reference(divergence):
    s, t = _rand((5, 77), seed=20), _rand((5, 77), seed=21)
    t[1] = float("-inf")  # teacher row entirely -inf: log_softmax gives NaN in the reference
    s[2] = float("-inf")  # student row entirely -inf
    s[3, 5] = float("nan")
    t[4, 70] = float("nan")
    ref = R.distill_loss(s.double(), t.double(), divergence=divergence, beta=BETA, reduction="none")
    loss = FD.distill_loss(s, t, divergence=divergence, beta=BETA, reduction="none", backend="triton")
    assert torch.equal(torch.isnan(loss).cpu(), torch.isnan(ref).cpu()), (loss, ref)
    _close(loss[0], ref[0])


@pytest.mark.parametrize("reduction", R.REDUCTIONS)
@pytest.mark.parametrize("divergence", ["forward_kl", "tvd"])
def test_all_rows_ignored(reduction, divergence):
    s, t = _rand((4, 300), seed=22), _rand((4, 300), seed=23)
    labels = torch.full((4,), -100, device=DEVICE)
    loss, grad = _triton(s, t, labels, reduction=reduction, divergence=divergence)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))  # written, not left as the NaN poison


@pytest.mark.parametrize("divergence", ["reverse_kl", "skew_forward_kl"])
def test_need_grad_false(divergence):
    from fastdistill.ops.distill_loss_triton import distill_loss_rows_triton

    s, t = _rand((6, 500), seed=24), _rand((6, 500), seed=25)
    labels = _labels((6,), 500)
    rows, grad, _ = distill_loss_rows_triton(
        s, t, labels, torch.ones(1, device=DEVICE), DIV_ID[divergence], BETA, 1.0, -100, 1.0, False
    )
    assert grad.numel() == 0
    with torch.no_grad():
        loss = FD.distill_loss(s.requires_grad_(True), t, labels, divergence=divergence, beta=BETA, backend="triton")
    ref_loss, _ = _reference(s, t, labels, divergence=divergence, beta=BETA)
    _close(loss, ref_loss)
    _close(rows.sum() / (labels != -100).sum(), ref_loss)


@pytest.mark.parametrize("divergence", ["forward_kl", "skew_reverse_kl"])
def test_row_strided_inputs(divergence):
    # row strides that differ between the models and from V, with an unaligned start: the kernel gets the views as-is
    s = _rand((7, 300 + 37), seed=26)[:, 3:303]
    t = _rand((7, 2 * 300), seed=27)[:, 300:]
    assert s.stride() == (337, 1) and t.stride() == (600, 1)
    labels = _labels((7,), 300)
    ref_loss, ref_grad = _reference(s, t, labels, divergence=divergence, beta=BETA)
    loss, grad = _triton(s, t, labels, divergence=divergence, beta=BETA)
    _close(loss, ref_loss)
    _close(grad, ref_grad)
    # a [B, T, V] view with strided tokens (reshaped to rows by a copy in the op) and a strided last dim
    s3, t3 = _rand((2, 10, 130), seed=28)[:, ::2], _rand((2, 5, 260), seed=29)[..., ::2]
    ref_loss, ref_grad = _reference(s3, t3, None, divergence=divergence, beta=BETA, reduction="none")
    loss, grad = _triton(s3, t3, None, divergence=divergence, beta=BETA, reduction="none")
    _close(loss, ref_loss)
    _close(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_low_precision_within_torch_error(dtype, divergence):
    s, t = _rand((6, 300), dtype=dtype, scale=2.0, seed=30), _rand((6, 300), dtype=dtype, scale=2.0, seed=31)
    labels = _labels((6,), 300)
    kw = dict(divergence=divergence, beta=BETA, temperature=1.5)
    ref_loss, ref_grad = _reference(s, t, labels, **kw)  # exact maths on the rounded inputs
    s_lp = s.clone().requires_grad_(True)  # plain torch in the low-precision dtype: the yardstick
    torch_loss = R.distill_loss(s_lp, t, labels, **kw)
    torch_loss.backward()
    loss, grad = _triton(s, t, labels, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    loss_err, torch_loss_err = (loss.double() - ref_loss).abs(), (torch_loss.double() - ref_loss).abs()
    grad_err = (grad.double() - ref_grad).abs().max()
    torch_grad_err = (s_lp.grad.double() - ref_grad).abs().max()
    assert loss_err <= 2 * torch_loss_err + 1e-5, (loss_err, torch_loss_err)
    assert grad_err <= 2 * torch_grad_err + 1e-6, (grad_err, torch_grad_err)


def test_launch_config_for_the_gpu():
    from fastdistill.divergences import DIVERGENCE_ID
    from fastdistill.ops.distill_loss_triton import launch_config

    gpu = torch.device("cuda")
    assert launch_config(128256, gpu) == (4096, 16)  # Llama-3 vocabulary: 16-byte bf16 loads per thread
    # the two-pass row kernels (forward / reverse KL) run 8 warps: forward KL spilled at 16 on sm_80
    for name in ("forward_kl", "reverse_kl"):
        assert launch_config(128256, gpu, divergence=DIVERGENCE_ID[name]) == (4096, 8), name
    assert launch_config(128256, gpu, divergence=DIVERGENCE_ID["jsd"]) == (4096, 16)
    assert launch_config(128256, gpu, divergence=DIVERGENCE_ID["jsd"], has_tail=True) == (4096, 8)  # Vt < Vs
    assert launch_config(401, gpu) == (512, 4)
    assert launch_config(70001, torch.device("cpu")) == (1024, 4)
    assert launch_config(401, torch.device("cpu"), block_v=64) == (64, 4)


# ------------------------------------------------------------------------------------------------------- kl_div
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("log_target", [False, True], ids=["prob_target", "log_target"])
def test_kl_div_matches_torch(reduction, log_target):
    x64 = _rand((9, 1500), scale=1.0, seed=32).double().log_softmax(-1)
    tgt = _rand((9, 1500), scale=1.0, seed=33).double().log_softmax(-1)
    tgt[0, :7] = float("-inf")  # zero-probability targets contribute 0 (torch: NaN for a -inf log-target)
    tgt[3, 100:200] = float("-inf")
    x64_ref = x64.clone().requires_grad_(True)
    ref = F.kl_div(x64_ref, tgt.exp(), reduction=reduction)
    ref.backward()
    x = x64.float().requires_grad_(True)
    ours = FD.kl_div(
        x, (tgt if log_target else tgt.exp()).float(), reduction=reduction, log_target=log_target, backend="triton"
    )
    ours.backward()
    _close(ours, ref)
    _close(x.grad, x64_ref.grad)


@pytest.mark.parametrize("log_target", [False, True], ids=["prob_target", "log_target"])
def test_kl_div_rows_kernel(log_target):
    """Row strides, grad_scale from a tensor, need_grad=False, -inf input at a zero target, NaN stays NaN."""
    from fastdistill.ops.kl_div_triton import kl_div_rows_triton

    x = _rand((5, 311), scale=1.0, seed=34)[:, 11:]  # a row-strided view
    x.copy_(x.log_softmax(-1))
    p = _rand((5, 300), scale=1.0, seed=35).softmax(-1)
    p[1, :50] = 0.0
    x[1, :10] = float("-inf")  # masked vocabulary: -inf input where the target is 0 adds 0
    x[4, 7] = float("nan")
    target = p.log() if log_target else p
    grad_scale = torch.full((1,), 0.25, device=DEVICE)
    rows, grad = kl_div_rows_triton(x, target, grad_scale, log_target, True)
    ref = torch.where(p == 0, 0.0, p.double() * (p.double().log() - x.double())).sum(-1)
    _close(rows, ref)
    _close(grad, -0.25 * p)
    assert torch.isnan(rows[4]) and torch.isfinite(rows[:4]).all()
    rows_only, no_grad = kl_div_rows_triton(x, target, grad_scale, log_target, False)
    assert no_grad.numel() == 0
    _close(rows_only, rows, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kl_div_low_precision(dtype):
    x = _rand((4, 5, 333), scale=1.0, seed=36).log_softmax(-1).to(dtype)
    t = _rand((4, 5, 333), scale=1.0, seed=37).softmax(-1).to(dtype)
    x_ref = x.double().requires_grad_(True)
    ref = F.kl_div(x_ref, t.double(), reduction="batchmean")
    ref.backward()
    x_lp = x.clone().requires_grad_(True)
    F.kl_div(x_lp, t, reduction="batchmean").backward()
    ours_in = x.clone().requires_grad_(True)
    ours = FD.kl_div(ours_in, t, reduction="batchmean", backend="triton")
    ours.backward()
    assert ours.dtype == dtype and ours_in.grad.dtype == dtype
    # the loss comes back in the input dtype: allow one rounding of it on top of the usual bound
    torch_loss = F.kl_div(x, t, reduction="batchmean")
    err, torch_err = abs(float(ours.detach()) - float(ref.detach())), abs(float(torch_loss) - float(ref.detach()))
    assert err <= 2 * torch_err + torch.finfo(dtype).eps * abs(float(ref.detach())), (err, torch_err)
    assert (ours_in.grad.double() - x_ref.grad).abs().max() <= 2 * (x_lp.grad.double() - x_ref.grad).abs().max() + 1e-7


# ------------------------------------------------------------------------------------------- fused cross-entropy term
def _ce_reference(s, t, labels, divergence, temperature, loss_scale, grad_scale, ce_weight, ignore_index=-100):
    """float64 (divergence rows, ce rows, grad_scale * d (sum rows + ce_weight * sum ce) / d student) of the row
    contract with the fused CE term (CE at T = 1 on the raw logits; ignored rows 0 in both)."""
    s64 = s.detach().double().requires_grad_(True)
    valid = labels != ignore_index
    rows = R.divergence_rows(s64, t.detach().double(), divergence, BETA, temperature) * loss_scale
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    ce = F.cross_entropy(s64, torch.where(valid, labels, 0), reduction="none")
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    ((rows.sum() + ce_weight * ce.sum()) * grad_scale).backward()
    return rows.detach(), ce.detach(), s64.grad


@pytest.mark.parametrize("divergence", R.DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["T1", "T2"])
def test_fused_ce_term_matches_reference(divergence, temperature):
    """ce_weight > 0: ce_rows and the gradient of both terms, against float64; ignored rows are 0 in all outputs."""
    from fastdistill.ops.distill_loss_triton import distill_loss_rows_triton

    N, V = 9, 301
    s, t = _rand((N, V), seed=40), _rand((N, V), seed=41)
    s[:, 2 * V // 3 :] += 4.0  # the running max moves late in the row
    labels = _labels((N,), V, seed=42)
    labels[0] = -100
    grad_scale, ce_weight = 0.37, 1.7
    rows, grad, ce = distill_loss_rows_triton(
        s,
        t,
        labels,
        torch.full((1,), grad_scale, device=DEVICE),
        op.canonical_divergence(DIV_ID[divergence], BETA),
        BETA,
        temperature,
        -100,
        temperature**2,
        True,
        ce_weight,
        block_v=64,
    )
    ref_rows, ref_ce, ref_grad = _ce_reference(
        s, t, labels, divergence, temperature, temperature**2, grad_scale, ce_weight
    )
    _close(rows, ref_rows)
    _close(ce, ref_ce)
    _close(grad, ref_grad)
    assert (grad[labels.cpu() == -100] == 0).all() and (ce[labels.cpu() == -100] == 0).all()
    # without a gradient: the same loss rows and ce rows
    rows2, grad2, ce2 = distill_loss_rows_triton(
        s,
        t,
        labels,
        torch.ones(1, device=DEVICE),
        op.canonical_divergence(DIV_ID[divergence], BETA),
        BETA,
        temperature,
        -100,
        temperature**2,
        False,
        ce_weight,
    )
    assert grad2.numel() == 0
    _close(rows2, ref_rows)
    _close(ce2, ref_ce)


def test_fused_ce_weight_zero_returns_empty_ce():
    from fastdistill.ops.distill_loss_triton import distill_loss_rows_triton

    s, t = _rand((3, 50), seed=43), _rand((3, 50), seed=44)
    rows, grad, ce = distill_loss_rows_triton(s, t, None, torch.ones(1, device=DEVICE), 0, 0.0, 1.0, -100, 1.0, True)
    assert ce.numel() == 0 and rows.shape == (3,) and grad.shape == (3, 50)
    with pytest.raises(ValueError, match="needs labels"):
        distill_loss_rows_triton(s, t, None, torch.ones(1, device=DEVICE), 0, 0.0, 1.0, -100, 1.0, True, 0.5)


@pytest.mark.parametrize("backend", ["torch"])
@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["T1", "T2"])
def test_fused_ce_term_torch_fallback(backend, temperature):
    """The torch fallback of the row contract with the CE term, against the same float64 reference."""
    s, t = _rand((7, 211), seed=45), _rand((7, 211), seed=46)
    labels = _labels((7,), 211, seed=47)
    labels[1] = -100
    rows, grad, ce = op.distill_loss_rows(
        s,
        t,
        labels,
        torch.full((1,), 0.5, device=DEVICE),
        DIV_ID["jsd"],
        BETA,
        temperature,
        -100,
        1.0,
        True,
        backend,
        ce_scale=2.0,
    )
    ref_rows, ref_ce, ref_grad = _ce_reference(s, t, labels, "jsd", temperature, 1.0, 0.5, 2.0)
    _close(rows, ref_rows)
    _close(ce, ref_ce)
    _close(grad, ref_grad)
