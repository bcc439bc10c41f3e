"""fastdistill.functional.distill_loss / kl_div on every available backend against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close, assert_within_torch_error, available_backends, generator

import fastdistill.functional as FD
from fastdistill import nn as fdnn
from fastdistill import reference as R
from fastdistill.ops import distill_loss as op

BACKENDS = available_backends(DEVICE, cpp_op="distill_loss_rows", cuda_op="distill_loss_rows")
KL_BACKENDS = available_backends(DEVICE, cpp_op="kl_div_rows")
INTERPRETED = DEVICE.type == "cpu"  # Triton runs in its (slow) interpreter: keep its shapes small


def _backends_for(divergence: str) -> list[str]:
    return [b for b in BACKENDS if b != "cuda" or divergence == "forward_kl"]


def _inputs(shape, seed, *, dtype=torch.float32, scale=3.0, ignore_frac=0.25, device=DEVICE):
    """Student / teacher logits N(0, scale^2) and labels (``ignore_frac`` of them ignored), drawn from ``seed``."""
    g = generator(seed)
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


def _torch(s, t, labels, grad_output=None, **kw):
    """Plain eager torch in the inputs' dtype (the reference formula with autograd): the accuracy yardstick."""
    s = s.detach().clone().requires_grad_(True)
    loss = R.distill_loss(s, t.detach(), labels, **kw)
    if grad_output is None:
        (loss.sum() if loss.dim() else loss).backward()
    else:
        loss.backward(grad_output)
    return loss.detach(), s.grad


def _check(s, t, labels, backend, grad_output=None, **kw):
    """``backend``'s loss and gradient vs the float64 reference, within the suite's factor of plain torch's error in
    the same dtype on the same inputs (conftest.assert_within_torch_error)."""
    go64 = grad_output.double() if grad_output is not None else None
    s64 = s.detach().double().requires_grad_(True)
    ref_loss = R.distill_loss(s64, t.detach().double(), labels, **kw)
    if go64 is None:
        (ref_loss.sum() if ref_loss.dim() else ref_loss).backward()
    else:
        ref_loss.backward(go64)
    torch_loss, torch_grad = _torch(s, t, labels, grad_output, **kw)
    loss, grad = _ours(s, t, labels, backend, grad_output, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape, (loss.dtype, loss.shape, ref_loss.shape)
    assert grad.dtype == s.dtype and grad.shape == s.shape, (grad.dtype, grad.shape, s.shape)
    V = s.shape[-1]
    where = f"{backend} {kw}"
    assert_within_torch_error(loss, ref_loss, torch_loss, summands=V if loss.dim() else s.numel(), what=f"loss {where}")
    assert_within_torch_error(grad, s64.grad, torch_grad, summands=V, what=f"grad {where}")
    return loss, grad


def _close(a, b, *, atol=2e-6, rtol=2e-5, msg=None):
    assert_close(a, b, atol=atol, rtol=rtol, msg=msg)


# --------------------------------------------------------------------------------------------------- correctness
def _stress_if(cond: bool) -> list:
    return [pytest.mark.stress] if cond else []


# make test-stress repeats the batchmean cases over many seeds (the reductions only rescale the same rows); in the
# Triton interpreter only at T = 2.5 (T = 1 is the same kernel path without the scaling)
MATCH_CASES = [
    pytest.param(
        b, d, r, T, id=f"T{T:g}-{r}-{d}-{b}", marks=_stress_if(r == "batchmean" and (T != 1.0 or b != "triton"))
    )
    for T in (1.0, 2.5)
    for r in R.REDUCTIONS
    for d in R.DIVERGENCES
    for b in BACKENDS
]


@pytest.mark.parametrize("backend, divergence, reduction, temperature", MATCH_CASES)
def test_matches_reference(backend, divergence, reduction, temperature, seed):
    if backend == "cuda" and divergence != "forward_kl":
        pytest.skip("the CUDA C++ kernel implements forward KL only")
    s, t, labels = _inputs((3, 17, 131), seed)  # ragged: 51 rows, V not a power of two
    _check(s, t, labels, backend, divergence=divergence, reduction=reduction, temperature=temperature, beta=0.3)


# ragged rows and V; vocabularies of GPT-2 and one over 65536 (int32 / 16-bit index limits). In the Triton
# interpreter (numpy, one program at a time) the big vocabularies run forward KL and JSD only, and make test-stress
# leaves them out (minutes per seed).
LARGE_CASES = [
    pytest.param(
        b, shape, d, id=f"{d}-{sid}-{b}", marks=_stress_if(sid != "5x401x1271" and not (INTERPRETED and b == "triton"))
    )
    for d in R.DIVERGENCES
    for shape, sid in (((5, 401, 1271), "5x401x1271"), ((3, 50257), "3x50257"), ((2, 70001), "2x70001(V>65536)"))
    for b in BACKENDS
    if not (INTERPRETED and b == "triton" and d not in ("forward_kl", "jsd"))
]


@pytest.mark.parametrize("backend, shape, divergence", LARGE_CASES)
def test_ragged_and_large_vocab(backend, shape, divergence, seed):
    if backend == "cuda" and divergence != "forward_kl":
        pytest.skip("the CUDA C++ kernel implements forward KL only")
    if INTERPRETED and backend == "triton" and shape[-1] == 1271:
        shape = (2, 9, 1271)  # the interpreter runs every program in numpy: same ragged V, fewer rows
    s, t, labels = _inputs(shape, seed)
    _check(s, t, labels, backend, divergence=divergence, beta=0.3)


# ------------------------------------------------------------------------------------- common vocabulary width
def _rows_reference(s, t, labels, Vc, div, T, ce_scale, soft_scale, grad_scale, loss_scale):
    """The row contract with autograd in the inputs' dtype: the divergence over [:Vc], CE over the student's full row,
    ignored rows 0. Returns (loss_rows, grad, ce_rows)."""
    s = s.detach().clone().requires_grad_(True)
    valid = labels != -100
    rows = R.divergence_rows(s[:, :Vc], t[:, :Vc], div, 0.3, T) * loss_scale
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    ce = F.cross_entropy(s, torch.where(valid, labels, 0), reduction="none") * valid
    (grad_scale * (soft_scale * rows.sum() + ce_scale * ce.sum())).backward()
    return rows.detach(), s.grad, ce.detach()


# a teacher narrower than the student (Vt < Vs, padding): every backend's row kernel takes both widths and the common
# width Vc; the divergence spans [:Vc], CE the full row (labels landing in [Vc, Vs) included), one pass. make
# test-stress repeats it on every backend (the Triton interpreter's 2-pass and 3-pass paths: forward KL and JSD).
COMMON_WIDTH_CASES = [
    pytest.param(
        b, d, ce, id=f"{d}-{'ce' if ce else 'soft'}-{b}", marks=_stress_if(b != "triton" or d in ("forward_kl", "jsd"))
    )
    for d in R.DIVERGENCES
    for ce in (0.0, 0.7)
    for b in BACKENDS
    if b != "cuda"
]


@pytest.mark.parametrize("backend, divergence, ce_scale", COMMON_WIDTH_CASES)
def test_row_kernel_common_width(backend, divergence, ce_scale, seed):
    # several Triton tiles in both parts of the row, a ragged tail; enough rows that torch's error (the yardstick) is
    # not one lucky draw (at 9 rows the ratio of two equally accurate gradients reached 2.2 in 1 seed of 30)
    N, Vs, Vt = 48, 1031, 1000
    T = 1.0 if ce_scale else 1.7  # T = 1 with CE: the student statistics cannot be shared with CE over [:Vc]
    g = generator(seed)
    s = (torch.randn(N, Vs, generator=g, dtype=torch.float64) * 3).float().to(DEVICE)
    t = (torch.randn(N, Vt + 5, generator=g, dtype=torch.float64) * 3).float().to(DEVICE)[:, :Vt]  # row stride > Vt
    labels = torch.randint(0, Vs, (N,), generator=g).to(DEVICE)
    labels[0], labels[1], labels[2] = -100, Vs - 1, Vt + 7  # an ignored row; labels in the student-only columns
    Vc = Vt - 3  # any common width up to min(Vs, Vt): the teacher's columns past it are not read
    grad_scale, soft_scale, loss_scale = 0.37, 0.8, T * T
    did = op.DIVERGENCE_ID[divergence]
    args = (s, t, labels, torch.full((1,), grad_scale, device=DEVICE), did, 0.3, T, -100, loss_scale, True, backend)
    rows, grad, ce = op.distill_loss_rows(*args, ce_scale=ce_scale, soft_scale=soft_scale, v_common=Vc)
    ref = _rows_reference(
        s.double(), t.double(), labels, Vc, divergence, T, ce_scale, soft_scale, grad_scale, loss_scale
    )
    eager = _rows_reference(s, t, labels, Vc, divergence, T, ce_scale, soft_scale, grad_scale, loss_scale)
    where = f"{backend} {divergence} ce_scale={ce_scale}"
    assert_within_torch_error(rows, ref[0], eager[0], summands=Vc, what=f"loss rows {where}")
    assert_within_torch_error(grad, ref[1], eager[1], what=f"grad {where}")
    if ce_scale:
        assert_within_torch_error(ce, ref[2], eager[2], summands=Vs, what=f"ce rows {where}")
    else:
        assert ce.numel() == 0
        assert torch.equal(grad[:, Vc:], torch.zeros_like(grad[:, Vc:])), f"{where}: columns past Vc get gradient 0"
    assert torch.equal(grad[0], torch.zeros_like(grad[0])), f"{where}: an ignored row gets gradient 0"
    # the same with the teacher's columns past Vc poisoned: never read
    t_poison = t.clone()
    t_poison[:, Vc:] = float("nan")
    rows_p, grad_p, _ = op.distill_loss_rows(
        s, t_poison, *args[2:], ce_scale=ce_scale, soft_scale=soft_scale, v_common=Vc
    )
    assert torch.equal(rows_p, rows) and torch.equal(grad_p, grad), f"{where}: read the teacher past v_common"


PADDING_CASES = [
    pytest.param(b, d, r, id=f"{d}-{r}-{b}", marks=_stress_if(r == "batchmean" and (b != "triton" or d == "jsd")))
    for d in R.DIVERGENCES
    for r in R.REDUCTIONS
    for b in BACKENDS
    if b != "cuda" and (r == "batchmean" or d in ("forward_kl", "tvd"))
]


@pytest.mark.parametrize("backend, divergence, reduction", PADDING_CASES)
def test_padding_mismatch_matches_reference(backend, divergence, reduction, seed):
    """distill_loss with Vt < Vs (and once Vt > Vs): the row kernel's common width, no sliced copies; the student's
    extra entries get gradient 0."""
    s, _, labels = _inputs((3, 16, 211), seed)
    t = _inputs((3, 16, 200), seed + 1)[1]
    kw = dict(divergence=divergence, reduction=reduction, temperature=1.5, beta=0.3)
    go = torch.full((3, 16), 0.6, device=DEVICE) if reduction == "none" else None
    ref = _reference(s[..., :200], t, labels, **kw)
    eager = _torch(s[..., :200], t, labels, go, **kw)
    loss, grad = _ours(s, t, labels, backend, go, **kw)
    if go is not None:
        ref = (ref[0], ref[1] * 0.6)
    assert_within_torch_error(loss, ref[0], eager[0], summands=200 if loss.dim() else 48 * 200, what=f"loss {kw}")
    assert_within_torch_error(grad[..., :200], ref[1], eager[1], what=f"grad {kw}")
    assert torch.equal(grad[..., 200:], torch.zeros_like(grad[..., 200:]))
    if divergence == "jsd" and reduction == "batchmean":  # a wider teacher: its extra columns are not read
        t_wide = torch.cat([t, torch.full_like(t[..., :11], float("nan"))], dim=-1)
        loss_w, grad_w = _ours(s[..., :200], t_wide, labels, backend, **kw)
        assert_within_torch_error(loss_w, ref[0], eager[0], summands=48 * 200, what="loss, Vt > Vs")
        assert_within_torch_error(grad_w, ref[1], eager[1], what="grad, Vt > Vs")


def test_row_kernel_common_width_checked(seed):
    s, t, labels = _inputs((4, 30), seed)
    for backend in BACKENDS:
        if backend == "cuda":
            continue
        with pytest.raises((ValueError, RuntimeError), match=r"v_common=31 is out of range.*min\(Vs=30, Vt=29\)"):
            op.distill_loss_rows(s, t[:, :29], None, torch.ones(1), 0, 0.0, 1.0, -100, 1.0, True, backend, v_common=31)
        with pytest.raises((ValueError, RuntimeError), match=r"4 rows but teacher has 3|same N"):
            op.distill_loss_rows(s, t[:3], None, torch.ones(1), 0, 0.0, 1.0, -100, 1.0, True, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_none_and_flat_labels(backend, seed):
    s, t, labels = _inputs((4, 5, 97), seed)
    _check(s, t, None, backend)
    # labels may be given flat, [N], for [B, T, V] logits
    loss_flat, _ = _ours(s, t, labels.reshape(-1), backend)
    loss_shaped, _ = _ours(s, t, labels, backend)
    _close(loss_flat, loss_shaped, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_end_points_are_the_kls(backend, seed):
    s, t, labels = _inputs((6, 77), seed)
    for beta, kl in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        if backend == "cuda" and kl != "forward_kl":
            continue
        a, ga = _ours(s, t, labels, backend, divergence="jsd", beta=beta)
        b, gb = _ours(s, t, labels, backend, divergence=kl)
        _close(a, b, atol=0, rtol=0, msg=f"jsd beta={beta} vs {kl}")
        _close(ga, gb, atol=0, rtol=0, msg=f"grad jsd beta={beta} vs {kl}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_temperature_factor_can_be_turned_off(backend, divergence, seed):
    if backend == "cuda" and divergence != "forward_kl":
        pytest.skip("forward KL only")
    s, t, labels = _inputs((5, 64), seed)
    on, _ = _check(s, t, labels, backend, divergence=divergence, temperature=3.0)
    off, _ = _check(s, t, labels, backend, divergence=divergence, temperature=3.0, scale_by_t2=False)
    assert_close(on, off * 9.0, rtol=1e-5, atol=0, msg="loss with vs without the T^2 factor")


# ---------------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", R.REDUCTIONS)
def test_all_rows_ignored_gives_zero_not_nan(backend, reduction, seed):
    s, t, _ = _inputs((4, 33), seed)
    labels = torch.full((4,), -100, device=DEVICE)
    loss, grad = _ours(s, t, labels, backend, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss)), loss
    assert torch.equal(grad, torch.zeros_like(grad)), grad.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row_and_custom_ignore_index(backend, seed):
    s, t, _ = _inputs((1, 50), seed)
    labels = torch.tensor([7], device=DEVICE)
    loss, grad = _ours(s, t, labels, backend, ignore_index=7)
    assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad)), (loss, grad.abs().max())
    loss, _ = _check(s, t, labels, backend, ignore_index=-1)
    assert float(loss) > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_huge_logits_are_stable(backend, divergence, seed):
    if backend == "cuda" and divergence != "forward_kl":
        pytest.skip("forward KL only")
    s, t, labels = _inputs((6, 40), seed, scale=1.0)
    s, t = s.sign() * 1e4 * s.abs().clamp(max=1), t.sign() * 1e4 * t.abs().clamp(max=1)
    loss, grad = _check(s, t, labels, backend, divergence=divergence)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_masked_vocabulary_is_finite(backend, divergence, seed):
    if backend == "cuda" and divergence != "forward_kl":
        pytest.skip("forward KL only")
    s, t, labels = _inputs((5, 90), seed)
    mask = torch.rand(90, generator=generator(seed + 1)).to(DEVICE) < 0.3
    s = s.masked_fill(mask, float("-inf"))
    t = t.masked_fill(mask, float("-inf"))
    loss, grad = _check(s, t, labels, backend, divergence=divergence)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (loss, grad)
    assert torch.equal(grad[..., mask], torch.zeros_like(grad[..., mask]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_gives_nan_like_torch(backend, seed):
    s, t, _ = _inputs((3, 20), seed, ignore_frac=0)
    s[1, 4] = float("nan")
    loss = FD.distill_loss(s, t, backend=backend, reduction="none")
    ref = R.distill_loss(s, t, reduction="none")
    assert torch.isnan(ref[1]) and torch.isnan(loss[1]), (ref, loss)
    assert torch.isfinite(loss[0]) and torch.isfinite(loss[2]), loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", R.REDUCTIONS)
def test_grad_output_not_one(backend, reduction, seed):
    s, t, labels = _inputs((3, 7, 55), seed)
    go = torch.tensor(0.37) if reduction != "none" else torch.rand(3, 7, generator=generator(seed + 1))
    _check(s, t, labels, backend, grad_output=go.to(DEVICE), reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, seed):
    s, t, labels = _inputs((2, 12, 2 * 67), seed)
    s_nc, t_nc = s[..., ::2], t.transpose(0, 1).contiguous().transpose(0, 1)[..., 1::2]  # strided last dim
    s_rows, t_rows = s[:, ::3, :], t[:, ::3, :]  # row-strided, last dim contiguous
    assert not s_nc.is_contiguous() and not s_rows.is_contiguous()
    for a, b, lab in ((s_nc, t_nc, labels), (s_rows, t_rows, labels[:, ::3])):
        _check(a, b, lab, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_low_precision_within_torch_error(backend, dtype, divergence, seed):
    """The same rule as float32: no worse than the suite's factor x plain torch's own error in that dtype (torch
    computes in bf16 / fp16 here, fastdistill in float32 and rounds the gradient once)."""
    if backend == "cuda" and divergence != "forward_kl":
        pytest.skip("forward KL only")
    s, t, labels = _inputs((8, 300), seed, dtype=dtype, scale=2.0)
    _check(s, t, labels, backend, divergence=divergence)


# ----------------------------------------------------------------------------------------- autograd and memory
@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_the_gradient_and_backward_reuses_it(backend, seed):
    s, t, labels = _inputs((16, 257), seed)
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
def test_no_gradient_work_without_grad(backend, seed):
    s, t, labels = _inputs((6, 40), seed)
    loss_nograd, grad = op.distill_loss_op(s, t, labels, 0, 0.5, 1.0, -100, True, 2, False, backend)
    assert grad.numel() == 0
    with torch.no_grad():
        loss = FD.distill_loss(s.requires_grad_(True), t, labels, backend=backend)
    _close(loss, loss_nograd, atol=0, rtol=0)
    _close(loss, _reference(s, t, labels)[0])


def test_teacher_gets_no_gradient_and_must_not_require_grad(seed):
    s, t, labels = _inputs((4, 30), seed)
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
        (dict(temperature=0.0), "temperature=0.0 is out of range"),
        (dict(temperature=float("nan")), "temperature=nan is invalid"),
        (dict(backend="tpu"), "backend='tpu' is not a backend"),
    ],
)
def test_bad_options(kwargs, match, seed):
    s, t, labels = _inputs((2, 10), seed)
    with pytest.raises(ValueError, match=match):
        FD.distill_loss(s, t, labels, **kwargs)


def test_mismatched_inputs_name_both(seed):
    s, t, labels = _inputs((4, 30), seed)
    with pytest.raises(ValueError, match=r"student_logits has shape \(4, 30\) but teacher_logits has shape \(5, 30\)"):
        FD.distill_loss(s, torch.randn(5, 30, device=DEVICE))
    with pytest.raises(ValueError, match=r"Vs=30 and Vt=400 \(by 370\); only padding mismatches"):
        FD.distill_loss(s, torch.randn(4, 400, device=DEVICE))
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


def test_bad_backend_environment_variable(monkeypatch, seed):
    monkeypatch.setenv("FASTDISTILL_BACKEND", "fastest")
    s, t, labels = _inputs((2, 10), seed)
    with pytest.raises(ValueError, match="FASTDISTILL_BACKEND='fastest' is not a backend"):
        FD.distill_loss(s, t, labels)


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("FASTDISTILL_BACKEND", "torch")
    assert op.resolve_backend(DEVICE) == "torch"


# --------------------------------------------------------------------------------------- compile and opcheck
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, seed):
    s, t, labels = _inputs((5, 37), seed)
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
def test_distill_loss_module_matches_functional(seed):
    s, t, labels = _inputs((3, 4, 21), seed)
    mod = fdnn.DistillLoss(divergence="skew_reverse_kl", beta=0.1, temperature=1.5, reduction="sum")
    assert "skew_reverse_kl" in repr(mod)
    _close(
        mod(s, t, labels),
        FD.distill_loss(s, t, labels, divergence="skew_reverse_kl", beta=0.1, temperature=1.5, reduction="sum"),
        atol=0,
        rtol=0,
    )


@pytest.mark.stress
@pytest.mark.parametrize("backend", KL_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "batchmean", "sum", "mean"])
@pytest.mark.parametrize("log_target", [False, True], ids=["prob_target", "log_target"])
def test_kl_div_module_is_a_drop_in(backend, reduction, log_target, seed):
    g = generator(seed)
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
    torch_in = x64.float().requires_grad_(True)  # plain torch in float32: the yardstick
    theirs = torch.nn.KLDivLoss(reduction=reduction)(torch_in, (tgt.exp() if log_target else tgt).float())
    (theirs.sum() if theirs.dim() else theirs).backward()
    n = 1 if reduction == "none" else x64.numel()
    assert_within_torch_error(ours, ref, theirs, summands=n, what=f"kl_div {backend} {reduction}")
    assert_within_torch_error(x.grad, ref_in.grad, torch_in.grad, what=f"kl_div grad {backend} {reduction}")
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


def test_reference_matches_torch_kl_div(seed):
    """The reference's forward KL is torch's KLDivLoss on log-softmaxed logits (sanity of the yardstick)."""
    s, t, _ = _inputs((7, 19), seed, dtype=torch.float64)
    ours = R.distill_loss(s, t, temperature=2.0, reduction="batchmean")
    theirs = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction="batchmean", log_target=True) * 4
    _close(ours, theirs, atol=1e-12, rtol=1e-12)
    assert math.isfinite(float(ours))
