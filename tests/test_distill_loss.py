"""fastdistill.functional.distill_loss / kl_div on every available backend against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, available_backends

import fastdistill.functional as FD
from fastdistill import nn as fdnn
from fastdistill import reference as R
from fastdistill.ops import distill_loss as op

BACKENDS = available_backends(DEVICE, cpp_op="distill_loss_rows", cuda_op="distill_loss_rows")
KL_BACKENDS = available_backends(DEVICE, cpp_op="kl_div_rows")
INTERPRETED = DEVICE.type == "cpu"  # Triton runs in its (slow) interpreter: keep its shapes small


def _backends_for(divergence: str) -> list[str]:
    return [b for b in BACKENDS if b != "cuda" or divergence == "forward_kl"]


def _inputs(shape, *, dtype=torch.float32, seed=None, scale=3.0, ignore_frac=0.25, device=DEVICE):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g).to(device)
    if ignore_frac:
        labels[torch.rand(shape[:-1], generator=g).to(device) < ignore_frac] = -100
    return s, t, labels


def _reference(s, t, labels, **kw):
    """float64 reference loss and gradient w.r.t. the student logits."""
    s64 = s.detach().double().requires_grad_(True)
    loss = R.distill_loss(s64, t.detach().double(), labels, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), s64.grad


def _ours(s, t, labels, backend, grad_output=None, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = FD.distill_loss(s, t, labels, backend=backend, **kw)
    if grad_output is None:
        (loss.sum() if loss.dim() else loss).backward()
    else:
        loss.backward(grad_output)
    return loss.detach(), s.grad


def _close(a, b, *, atol=2e-6, rtol=2e-5, msg=""):
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), atol=atol, rtol=rtol, msg=msg)


# --------------------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
@pytest.mark.parametrize("reduction", R.REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.5], ids=["T1", "T2.5"])
def test_matches_reference(backend, divergence, reduction, temperature):
    if backend == "cuda" and divergence != "forward_kl":
        pytest.skip("the CUDA C++ kernel implements forward KL only")
    s, t, labels = _inputs((3, 17, 131))  # ragged: 51 rows, V not a power of two
    kw = dict(divergence=divergence, reduction=reduction, temperature=temperature, beta=0.3)
    ref_loss, ref_grad = _reference(s, t, labels, **kw)
    loss, grad = _ours(s, t, labels, backend, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    _close(loss, ref_loss, msg=f"loss {backend} {divergence}")
    _close(grad, ref_grad, msg=f"grad {backend} {divergence}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape",
    [(41, 401, 1271), (3, 50257), (2, 70001)],
    ids=["41x401x1271", "3x50257", "2x70001(V>65536)"],
)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_ragged_and_large_vocab(backend, shape, divergence):
    if backend == "cuda" and divergence != "forward_kl":
        pytest.skip("the CUDA C++ kernel implements forward KL only")
    if INTERPRETED and backend == "triton" and shape[0] == 41:
        shape = (2, 9, 1271)  # the interpreter runs every program in numpy: same ragged V, fewer rows
    s, t, labels = _inputs(shape)
    ref_loss, ref_grad = _reference(s, t, labels, divergence=divergence)
    loss, grad = _ours(s, t, labels, backend, divergence=divergence)
    _close(loss, ref_loss)
    _close(grad, ref_grad, atol=3e-7)  # fp32 sums over up to 70k entries


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_none_and_flat_labels(backend):
    s, t, labels = _inputs((4, 5, 97))
    ref_loss, ref_grad = _reference(s, t, None)
    loss, grad = _ours(s, t, None, backend)
    _close(loss, ref_loss)
    _close(grad, ref_grad)
    # labels may be given flat, [N], for [B, T, V] logits
    loss_flat, _ = _ours(s, t, labels.reshape(-1), backend)
    loss_shaped, _ = _ours(s, t, labels, backend)
    _close(loss_flat, loss_shaped, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_end_points_are_the_kls(backend):
    s, t, labels = _inputs((6, 77))
    for beta, kl in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        if backend == "cuda" and kl != "forward_kl":
            continue
        a, ga = _ours(s, t, labels, backend, divergence="jsd", beta=beta)
        b, gb = _ours(s, t, labels, backend, divergence=kl)
        _close(a, b, atol=0, rtol=0)
        _close(ga, gb, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_temperature_factor_can_be_turned_off(backend, divergence):
    if backend == "cuda" and divergence != "forward_kl":
        pytest.skip("forward KL only")
    s, t, labels = _inputs((5, 64))
    on, g_on = _ours(s, t, labels, backend, divergence=divergence, temperature=3.0)
    off, g_off = _ours(s, t, labels, backend, divergence=divergence, temperature=3.0, scale_by_t2=False)
    _close(on, off * 9.0)
    _close(g_on, g_off * 9.0)
    ref, ref_g = _reference(s, t, labels, divergence=divergence, temperature=3.0, scale_by_t2=False)
    _close(off, ref)
    _close(g_off, ref_g)


# ---------------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", R.REDUCTIONS)
def test_all_rows_ignored_gives_zero_not_nan(backend, reduction):
    s, t, _ = _inputs((4, 33))
    labels = torch.full((4,), -100, device=DEVICE)
    loss, grad = _ours(s, t, labels, backend, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row_and_custom_ignore_index(backend):
    s, t, _ = _inputs((1, 50))
    labels = torch.tensor([7], device=DEVICE)
    ref_loss, ref_grad = _reference(s, t, labels, ignore_index=7)
    loss, grad = _ours(s, t, labels, backend, ignore_index=7)
    assert float(loss) == 0.0 and float(ref_loss) == 0.0
    _close(grad, ref_grad)
    loss, grad = _ours(s, t, labels, backend, ignore_index=-1)
    ref_loss, ref_grad = _reference(s, t, labels, ignore_index=-1)
    assert float(loss) > 0
    _close(loss, ref_loss)
    _close(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_huge_logits_are_stable(backend, divergence):
    if backend == "cuda" and divergence != "forward_kl":
        pytest.skip("forward KL only")
    s, t, labels = _inputs((6, 40), scale=1.0)
    s, t = s.sign() * 1e4 * s.abs().clamp(max=1), t.sign() * 1e4 * t.abs().clamp(max=1)
    ref_loss, ref_grad = _reference(s, t, labels, divergence=divergence)
    loss, grad = _ours(s, t, labels, backend, divergence=divergence)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    _close(loss, ref_loss, atol=1e-3, rtol=1e-5)
    _close(grad, ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_masked_vocabulary_is_finite(backend, divergence):
    if backend == "cuda" and divergence != "forward_kl":
        pytest.skip("forward KL only")
    s, t, labels = _inputs((5, 90))
    mask = torch.rand(90, device=DEVICE) < 0.3
    s = s.masked_fill(mask, float("-inf"))
    t = t.masked_fill(mask, float("-inf"))
    ref_loss, ref_grad = _reference(s, t, labels, divergence=divergence)
    loss, grad = _ours(s, t, labels, backend, divergence=divergence)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (loss, grad)
    assert torch.equal(grad[..., mask], torch.zeros_like(grad[..., mask]))
    _close(loss, ref_loss)
    _close(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_gives_nan_like_torch(backend):
    s, t, _ = _inputs((3, 20), ignore_frac=0)
    s[1, 4] = float("nan")
    loss = FD.distill_loss(s, t, backend=backend, reduction="none")
    ref = R.distill_loss(s, t, reduction="none")
    assert torch.isnan(ref[1]) and torch.isnan(loss[1])
    assert torch.isfinite(loss[0]) and torch.isfinite(loss[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", R.REDUCTIONS)
def test_grad_output_not_one(backend, reduction):
    s, t, labels = _inputs((3, 7, 55))
    go = torch.tensor(0.37, device=DEVICE) if reduction != "none" else torch.rand(3, 7, device=DEVICE)
    s64 = s.detach().double().requires_grad_(True)
    R.distill_loss(s64, t.double(), labels, reduction=reduction).backward(go.double())
    loss, grad = _ours(s, t, labels, backend, grad_output=go, reduction=reduction)
    _close(grad, s64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    s, t, labels = _inputs((2, 12, 2 * 67))
    s_nc, t_nc = s[..., ::2], t.transpose(0, 1).contiguous().transpose(0, 1)[..., 1::2]  # strided last dim
    s_rows, t_rows = s[:, ::3, :], t[:, ::3, :]  # row-strided, last dim contiguous
    assert not s_nc.is_contiguous() and not s_rows.is_contiguous()
    for a, b, lab in ((s_nc, t_nc, labels), (s_rows, t_rows, labels[:, ::3])):
        ref_loss, ref_grad = _reference(a, b, lab)
        loss, grad = _ours(a, b, lab, backend)
        _close(loss, ref_loss)
        _close(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_low_precision_within_torch_error(backend, dtype, divergence):
    if backend == "cuda" and divergence != "forward_kl":
        pytest.skip("forward KL only")
    s, t, labels = _inputs((8, 300), dtype=dtype, scale=2.0)
    ref_loss, ref_grad = _reference(s, t, labels, divergence=divergence)  # exact maths on the rounded inputs
    s_lp = s.detach().clone().requires_grad_(True)  # plain torch in the low-precision dtype: the bound's yardstick
    torch_loss = R.distill_loss(s_lp, t, labels, divergence=divergence)
    torch_loss.backward()
    loss, grad = _ours(s, t, labels, backend, divergence=divergence)
    assert grad.dtype == dtype
    loss_err, torch_loss_err = (loss.double() - ref_loss).abs(), (torch_loss.double() - ref_loss).abs()
    grad_err = (grad.double() - ref_grad).abs().max()
    torch_grad_err = (s_lp.grad.double() - ref_grad).abs().max()
    assert loss_err <= 2 * torch_loss_err + 1e-5, (loss_err, torch_loss_err)
    assert grad_err <= 2 * torch_grad_err + 1e-6, (grad_err, torch_grad_err)


# ----------------------------------------------------------------------------------------- autograd and memory
@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_the_gradient_and_backward_reuses_it(backend):
    s, t, labels = _inputs((16, 257))
    s.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss, grad = op.distill_loss_op(
            s, t, labels, 0, 0.5, 1.0, -100, True, op.REDUCTION_ID["batchmean"], True, backend
        )
    big = [x for x in saved if x.numel() >= s.numel()]
    assert sum(x.numel() for x in big) == s.numel(), [tuple(x.shape) for x in saved]
    loss.backward()
    # grad_output == 1: backward hands the precomputed gradient over without a multiply (same storage)
    assert s.grad.data_ptr() == grad.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_work_without_grad(backend):
    s, t, labels = _inputs((6, 40))
    loss_nograd, grad = op.distill_loss_op(s, t, labels, 0, 0.5, 1.0, -100, True, 2, False, backend)
    assert grad.numel() == 0
    with torch.no_grad():
        loss = FD.distill_loss(s.requires_grad_(True), t, labels, backend=backend)
    _close(loss, loss_nograd, atol=0, rtol=0)
    _close(loss, _reference(s, t, labels)[0])


def test_teacher_gets_no_gradient_and_must_not_require_grad():
    s, t, labels = _inputs((4, 30))
    t.requires_grad_(True)
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        FD.distill_loss(s, t, labels)
    loss = FD.distill_loss(s.requires_grad_(True), t.detach(), labels)
    loss.backward()
    assert t.grad is None


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(divergence="kl"), "divergence='kl' is not supported"),
        (dict(reduction="mean"), "reduction='mean' is not supported"),
        (dict(beta=1.5), r"beta=1.5 is out of range"),
        (dict(temperature=0.0), "temperature=0.0 is invalid"),
        (dict(temperature=float("nan")), "temperature=nan is invalid"),
        (dict(backend="tpu"), "backend='tpu' is not a backend"),
    ],
)
def test_bad_options(kwargs, match):
    s, t, labels = _inputs((2, 10))
    with pytest.raises(ValueError, match=match):
        FD.distill_loss(s, t, labels, **kwargs)


def test_mismatched_inputs_name_both():
    s, t, labels = _inputs((4, 30))
    with pytest.raises(ValueError, match=r"student_logits has shape \(4, 30\) but teacher_logits has shape \(4, 31\)"):
        FD.distill_loss(s, torch.randn(4, 31, device=DEVICE))
    with pytest.raises(ValueError, match="student_logits has dtype torch.float32 but teacher_logits has dtype"):
        FD.distill_loss(s, t.double())
    with pytest.raises(ValueError, match="student_logits is on .* but teacher_logits is on meta"):
        FD.distill_loss(s, torch.empty(4, 30, device="meta"))
    with pytest.raises(ValueError, match=r"labels has shape \(5,\); expected \(4,\)"):
        FD.distill_loss(s, t, labels[:3].repeat(2)[:5])
    with pytest.raises(ValueError, match="labels has dtype torch.float32; expected an integer dtype"):
        FD.distill_loss(s, t, labels.float())
    with pytest.raises(ValueError, match="student_logits has dtype torch.int64"):
        FD.distill_loss(labels.unsqueeze(-1).repeat(1, 3), labels.unsqueeze(-1).repeat(1, 3))


def test_bad_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTDISTILL_BACKEND", "fastest")
    s, t, labels = _inputs((2, 10))
    with pytest.raises(ValueError, match="FASTDISTILL_BACKEND='fastest' is not a backend"):
        FD.distill_loss(s, t, labels)


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("FASTDISTILL_BACKEND", "torch")
    assert op.resolve_backend(DEVICE) == "torch"


# --------------------------------------------------------------------------------------- compile and opcheck
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    s, t, labels = _inputs((5, 37))
    for reduction in (0, 2):
        args = (s.clone().requires_grad_(True), t, labels, 2, 0.3, 2.0, -100, True, reduction, True, backend)
        torch.library.opcheck(op.distill_loss_op, args)


@pytest.mark.cpu_only
def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(16, 50), torch.nn.Linear(16, 50)
    x = torch.randn(2, 9, 16)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100

    def step(x, labels):
        with torch.no_grad():
            t_logits = teacher(x)
        return FD.distill_loss(student(x), t_logits, labels, divergence="jsd", temperature=2.0)

    eager = step(x, labels)
    eager.backward()
    ref_grad = student.weight.grad.clone()
    student.weight.grad = None
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, labels)
    compiled.backward()
    _close(compiled, eager, atol=1e-6, rtol=1e-6)
    _close(student.weight.grad, ref_grad, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------ modules
def test_distill_loss_module_matches_functional():
    s, t, labels = _inputs((3, 4, 21))
    mod = fdnn.DistillLoss(divergence="skew_reverse_kl", beta=0.1, temperature=1.5, reduction="sum")
    assert "skew_reverse_kl" in repr(mod)
    _close(
        mod(s, t, labels),
        FD.distill_loss(s, t, labels, divergence="skew_reverse_kl", beta=0.1, temperature=1.5, reduction="sum"),
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize("backend", KL_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "batchmean", "sum", "mean"])
@pytest.mark.parametrize("log_target", [False, True], ids=["prob_target", "log_target"])
def test_kl_div_module_is_a_drop_in(backend, reduction, log_target):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x64 = torch.randn(6, 5, 83, generator=g, dtype=torch.float64).log_softmax(-1)
    tgt = torch.randn(6, 5, 83, generator=g, dtype=torch.float64).log_softmax(-1)
    tgt[0, 0, :5] = float("-inf")  # zero-probability targets contribute 0
    if not log_target:
        tgt = tgt.exp()
    ref_in = x64.clone().requires_grad_(True)
    # torch gives NaN for a -inf log-target (0 * -inf); fastdistill gives 0, i.e. torch's result on the probabilities
    ref = torch.nn.KLDivLoss(reduction=reduction)(ref_in, tgt.exp() if log_target else tgt)
    (ref.sum() if ref.dim() else ref).backward()
    x = x64.float().to(DEVICE).requires_grad_(True)
    ours = FD.kl_div(x, tgt.float().to(DEVICE), reduction=reduction, log_target=log_target, backend=backend)
    assert ours.dtype == torch.float32
    (ours.sum() if ours.dim() else ours).backward()
    _close(ours, ref)
    _close(x.grad, ref_in.grad)
    mod = fdnn.KLDivLoss(reduction=reduction, log_target=log_target)
    _close(mod(x.detach(), tgt.float().to(DEVICE)), ref)


def test_kl_div_target_with_grad_matches_torch():
    x = torch.randn(4, 10).log_softmax(-1).requires_grad_(True)
    t = torch.randn(4, 10).softmax(-1).requires_grad_(True)
    FD.kl_div(x, t, reduction="batchmean").backward()
    gx, gt = x.grad.clone(), t.grad.clone()
    x.grad = t.grad = None
    F.kl_div(x, t, reduction="batchmean").backward()
    _close(gx, x.grad, atol=0, rtol=0)
    _close(gt, t.grad, atol=0, rtol=0)


def test_kl_div_errors():
    with pytest.raises(ValueError, match="reduction='avg' is not supported"):
        FD.kl_div(torch.randn(2, 3), torch.rand(2, 3), reduction="avg")
    with pytest.raises(ValueError, match=r"input has shape \(2, 3\) but target has shape \(2, 4\)"):
        FD.kl_div(torch.randn(2, 3), torch.rand(2, 4))


def test_reference_matches_torch_kl_div():
    """The reference's forward KL is torch's KLDivLoss on log-softmaxed logits (sanity of the yardstick)."""
    s, t, _ = _inputs((7, 19), dtype=torch.float64)
    ours = R.distill_loss(s, t, temperature=2.0, reduction="batchmean")
    theirs = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction="batchmean", log_target=True) * 4
    _close(ours, theirs, atol=1e-12, rtol=1e-12)
    assert math.isfinite(float(ours))
