"""Focused tests of the C++ CPU kernels in csrc/ (``fastdistill::distill_loss_rows`` and ``fastdistill::kl_div_rows``).

Every result is compared with fastdistill.reference in float64. The AVX2 and the baseline variants of the kernels are
both covered (``FASTDISTILL_CPU_CAPABILITY=default`` forces the baseline one). Build first:
``MAX_JOBS=2 python setup.py build_ext --inplace``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_within_torch_error

import fastdistill.functional as FD
from fastdistill import _backend
from fastdistill import reference as ref

pytestmark = [
    pytest.mark.cpu_only,
    pytest.mark.skipif(
        not _backend.has_cpp_op("distill_loss_rows"),
        reason="fastdistill._C is not built (MAX_JOBS=2 python setup.py build_ext --inplace)",
    ),
]

DIVERGENCES = ref.DIVERGENCES
IGNORE = -100


@pytest.fixture(params=["native", "default"], ids=["native", "baseline"])
def capability(request, monkeypatch):
    """Runs a test on the CPU's best kernel variant and on the baseline one."""
    if request.param == "default":
        monkeypatch.setenv("FASTDISTILL_CPU_CAPABILITY", "default")
    else:
        monkeypatch.delenv("FASTDISTILL_CPU_CAPABILITY", raising=False)
    return request.param


def rows_op(
    student,
    teacher,
    labels=None,
    grad_scale=1.0,
    divergence=0,
    beta=0.5,
    temperature=1.0,
    loss_scale=1.0,
    need_grad=True,
    ignore_index=IGNORE,
):
    scale = torch.tensor([grad_scale], dtype=torch.float32)
    rows, grad, ce = torch.ops.fastdistill.distill_loss_rows(
        student, teacher, labels, scale, divergence, beta, temperature, ignore_index, loss_scale, need_grad
    )
    assert ce.numel() == 0  # ce_weight defaults to 0: no CE term
    return rows, grad


def reference_rows(
    student,
    teacher,
    labels=None,
    grad_scale=1.0,
    divergence=0,
    beta=0.5,
    temperature=1.0,
    loss_scale=1.0,
    ignore_index=IGNORE,
):
    """(loss rows, grad_scale * d sum(rows) / d student) of the float64 reference."""
    name = DIVERGENCES[divergence]
    if name == "jsd" and beta in (0.0, 1.0):
        name = "forward_kl" if beta == 0.0 else "reverse_kl"
    s = student.detach().double().requires_grad_()
    rows = ref.divergence_rows(s, teacher.double(), name, beta, temperature) * loss_scale
    if labels is not None:
        rows = torch.where(labels != ignore_index, rows, torch.zeros_like(rows))
    if not rows.requires_grad:  # e.g. skew forward KL at beta = 1: the loss does not depend on the student
        return rows.detach(), torch.zeros_like(s)
    (grad,) = torch.autograd.grad(rows.sum() * grad_scale, s)
    return rows.detach(), grad


def logits(*shape, scale=3.0, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def assert_rows_close(rows, grad, ref_rows, ref_grad, *, rtol=1e-5, grad_rtol=2e-5):
    """Loss rows to ~1e-5 relative; the gradient to grad_rtol relative to its largest entry (its entries are ~1/V)."""
    torch.testing.assert_close(rows.double(), ref_rows, rtol=rtol, atol=1e-6)
    atol = grad_rtol * ref_grad.abs().max().item() + 1e-7
    torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_rtol, atol=atol)


@pytest.mark.parametrize("with_labels", [False, True], ids=["no_labels", "labels"])
@pytest.mark.parametrize("temperature", [1.0, 2.5], ids=["T1", "T2.5"])
@pytest.mark.parametrize("divergence", range(len(DIVERGENCES)), ids=list(DIVERGENCES))
def test_rows_match_reference(capability, divergence, temperature, with_labels):
    torch.manual_seed(100 * divergence + int(10 * temperature) + with_labels)
    N, V = 41, 1271  # ragged: neither a multiple of the vector width
    s, t = logits(N, V), logits(N, V)
    labels = None
    if with_labels:
        labels = torch.randint(0, V, (N,))
        labels[::3] = IGNORE
    beta = 0.3 if DIVERGENCES[divergence] in ("skew_forward_kl", "skew_reverse_kl") else 0.6
    kw = dict(divergence=divergence, beta=beta, temperature=temperature, loss_scale=temperature**2, grad_scale=0.37)
    rows, grad = rows_op(s, t, labels, **kw)
    ref_rows, ref_grad = reference_rows(s, t, labels, **kw)
    # TVD's gradient is a sign: entries where ps ~= pt can flip between float32 and float64
    assert_rows_close(rows, grad, ref_rows, ref_grad, grad_rtol=1e-4 if DIVERGENCES[divergence] == "tvd" else 2e-5)
    assert rows.dtype == torch.float32 and grad.dtype == s.dtype and grad.shape == s.shape
    if labels is not None:
        assert torch.all(rows[labels == IGNORE] == 0) and torch.all(grad[labels == IGNORE] == 0)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.1, 0.9])
@pytest.mark.parametrize("divergence", [2, 4, 5], ids=["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_beta_end_points(divergence, beta):
    """JSD at beta 0 / 1 is forward / reverse KL (also when called directly); the skew KLs at their end points."""
    torch.manual_seed(7)
    s, t = logits(9, 333), logits(9, 333)
    rows, grad = rows_op(s, t, divergence=divergence, beta=beta, grad_scale=2.0)
    ref_rows, ref_grad = reference_rows(s, t, divergence=divergence, beta=beta, grad_scale=2.0)
    torch.testing.assert_close(rows.double(), ref_rows, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=2e-5 * ref_grad.abs().max().item() + 1e-7)


@pytest.mark.parametrize(
    "shape", [(3, 50257), (2, 70001), (5, 1), (4, 7)], ids=["gpt2_vocab", "V_over_65536", "V1", "V_below_width"]
)
@pytest.mark.parametrize("divergence", [0, 1, 2], ids=["forward_kl", "reverse_kl", "jsd"])
def test_vocab_sizes(capability, shape, divergence):
    torch.manual_seed(shape[1])
    s, t = logits(*shape), logits(*shape)
    rows, grad = rows_op(s, t, divergence=divergence, temperature=1.5)
    ref_rows, ref_grad = reference_rows(s, t, divergence=divergence, temperature=1.5)
    assert_rows_close(rows, grad, ref_rows, ref_grad)


@pytest.mark.parametrize("divergence", range(len(DIVERGENCES)), ids=list(DIVERGENCES))
def test_masked_vocabulary(capability, divergence):
    """-inf at the same entries of both rows: finite loss equal to the loss over the other entries, zero gradient
    at the masked entries."""
    torch.manual_seed(3 + divergence)
    N, V = 6, 515
    s, t = logits(N, V), logits(N, V)
    masked = torch.rand(V) < 0.3
    masked[:9] = True  # a fully masked first vector chunk too
    s[:, masked] = float("-inf")
    t[:, masked] = float("-inf")
    rows, grad = rows_op(s, t, divergence=divergence, beta=0.4, temperature=2.0)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    assert torch.all(grad[:, masked] == 0)
    keep = ~masked
    ref_rows, ref_grad = reference_rows(s[:, keep], t[:, keep], divergence=divergence, beta=0.4, temperature=2.0)
    assert_rows_close(rows, grad[:, keep], ref_rows, ref_grad, grad_rtol=1e-4)


@pytest.mark.parametrize("divergence", range(len(DIVERGENCES)), ids=list(DIVERGENCES))
def test_huge_logits(capability, divergence):
    """Logits of +-1e4 (many ties at the max): log p is computed as (x - max) - log(sum), so float32 keeps the
    gradient to ~1e-6 relative (x - lse would lose ~1e-4; this also guards against -ffast-math reassociating it)."""
    torch.manual_seed(21 + divergence)
    s, t = logits(6, 40, scale=1.0), logits(6, 40, scale=1.0)
    s, t = s.sign() * 1e4 * s.abs().clamp(max=1), t.sign() * 1e4 * t.abs().clamp(max=1)
    rows, grad = rows_op(s, t, divergence=divergence, beta=0.5)
    ref_rows, ref_grad = reference_rows(s, t, divergence=divergence, beta=0.5)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(rows.double(), ref_rows, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6 * ref_grad.abs().max().item())


def test_nan_row_gives_nan_and_leaves_other_rows(capability):
    torch.manual_seed(0)
    s, t = logits(4, 300), logits(4, 300)
    s[1, 17] = float("nan")
    t[2, 299] = float("nan")
    s[3, 5] = float("inf")
    for divergence in range(len(DIVERGENCES)):
        rows, grad = rows_op(s, t, divergence=divergence)
        assert torch.isnan(rows[1:]).all(), DIVERGENCES[divergence]
        assert torch.isnan(grad[1:]).all(), DIVERGENCES[divergence]
        ref_rows, ref_grad = reference_rows(s[:1], t[:1], divergence=divergence)
        assert_rows_close(rows[:1], grad[:1], ref_rows, ref_grad, grad_rtol=1e-4)


def test_all_rows_ignored(capability):
    s, t = logits(5, 100), logits(5, 100)
    labels = torch.full((5,), IGNORE)
    rows, grad = rows_op(s, t, labels)
    assert torch.all(rows == 0) and torch.all(grad == 0)
    s.requires_grad_()
    loss = FD.distill_loss(s, t, labels, reduction="batchmean", backend="cpp")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(s.grad == 0)


def test_need_grad_false_returns_empty_grad(capability):
    torch.manual_seed(1)
    s, t = logits(7, 211), logits(7, 211)
    for divergence in range(len(DIVERGENCES)):
        rows_ng, grad_ng = rows_op(s, t, divergence=divergence, need_grad=False)
        rows, _ = rows_op(s, t, divergence=divergence, need_grad=True)
        assert grad_ng.numel() == 0
        # forward KL with a gradient keeps its exps (a blocked pass 1): the same value up to float32 rounding
        torch.testing.assert_close(rows_ng, rows, rtol=2e-6, atol=1e-6)


def test_row_strided_inputs(capability):
    """Rows with a row stride != V (a slice of a wider tensor), teacher and student with different strides."""
    torch.manual_seed(2)
    N, V = 13, 301
    s = logits(N, V + 37)[:, 5 : 5 + V]
    t = logits(2 * N, V + 3)[::2, :V]
    assert s.stride() != (V, 1) and t.stride() != s.stride()
    for divergence in (0, 1, 3):
        rows, grad = rows_op(s, t, divergence=divergence, grad_scale=0.5)
        rows_c, grad_c = rows_op(s.contiguous(), t.contiguous(), divergence=divergence, grad_scale=0.5)
        torch.testing.assert_close(rows, rows_c, rtol=0, atol=0)
        torch.testing.assert_close(grad, grad_c, rtol=0, atol=0)
        assert grad.is_contiguous()
        assert_rows_close(rows, grad, *reference_rows(s, t, divergence=divergence, grad_scale=0.5), grad_rtol=1e-4)


def test_float64_inputs_use_double_math(capability):
    torch.manual_seed(4)
    s, t = logits(5, 257, dtype=torch.float64), logits(5, 257, dtype=torch.float64)
    for divergence in range(len(DIVERGENCES)):
        rows, grad = rows_op(s, t, divergence=divergence, beta=0.3, temperature=1.7, grad_scale=0.25)
        ref_rows, ref_grad = reference_rows(s, t, divergence=divergence, beta=0.3, temperature=1.7, grad_scale=0.25)
        assert grad.dtype == torch.float64
        torch.testing.assert_close(rows.double(), ref_rows, rtol=1e-6, atol=1e-7)  # rows are float32 by contract
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence", range(len(DIVERGENCES)), ids=list(DIVERGENCES))
def test_low_precision(capability, dtype, divergence):
    """bf16 / fp16 inputs: fp32 maths, so the loss is as exact as for fp32 inputs, and the gradient is no worse than
    2x torch's own error when it runs the reference in that dtype."""
    torch.manual_seed(5 + divergence)
    N, V = 11, 1031
    s, t = logits(N, V, scale=2.0, dtype=dtype), logits(N, V, scale=2.0, dtype=dtype)
    kw = dict(divergence=divergence, beta=0.4, temperature=1.5, grad_scale=3.0)
    rows, grad = rows_op(s, t, **kw)
    assert grad.dtype == dtype
    ref_rows, ref_grad = reference_rows(s, t, **kw)  # float64 of the same (rounded) inputs
    torch.testing.assert_close(rows.double(), ref_rows, rtol=1e-5, atol=1e-6)
    # torch in the low dtype (its float32 upcast would not be a low-precision baseline)
    s_low = s.detach().clone().requires_grad_()
    name = DIVERGENCES[divergence]
    (torch_grad,) = torch.autograd.grad(ref.divergence_rows(s_low, t, name, 0.4, 1.5).sum() * 3.0, s_low)
    torch_err = (torch_grad.double() - ref_grad).abs().max().item()
    our_err = (grad.double() - ref_grad).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-6, (our_err, torch_err)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_public_api(divergence, reduction):
    """fastdistill.functional.distill_loss(..., backend="cpp") against the float64 reference, [B, L, V] input."""
    torch.manual_seed(len(divergence) + len(reduction))
    B, L, V = 3, 7, 509
    s, t = logits(B, L, V), logits(B, L, V)
    labels = torch.randint(0, V, (B, L))
    labels[0, :4] = IGNORE
    kw = dict(divergence=divergence, beta=0.3, temperature=2.0, reduction=reduction)
    s_cpp = s.clone().requires_grad_()
    loss = FD.distill_loss(s_cpp, t, labels, backend="cpp", **kw)
    s64 = s.double().requires_grad_()
    loss_ref = ref.distill_loss(s64, t.double(), labels, **kw)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(loss_ref) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    (loss * weight.to(loss.dtype)).sum().backward()
    (loss_ref * weight).sum().backward()
    atol = 1e-4 * s64.grad.abs().max().item()
    torch.testing.assert_close(s_cpp.grad.double(), s64.grad, rtol=1e-4, atol=atol)


def test_public_api_no_grad_and_eval():
    torch.manual_seed(9)
    s, t = logits(4, 100), logits(4, 100)
    with torch.no_grad():
        loss = FD.distill_loss(s.requires_grad_(), t, backend="cpp")
    torch.testing.assert_close(loss.double(), ref.distill_loss(s.double(), t.double()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("log_target", [False, True], ids=["prob_target", "log_target"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_kl_div(capability, log_target, dtype):
    torch.manual_seed(11 + log_target)
    N, V = 37, 1029
    x = torch.randn(N, V, dtype=torch.float64).log_softmax(-1).to(dtype)
    target = torch.randn(N, V, dtype=torch.float64).mul(2).log_softmax(-1)
    target[:, :5] = float("-inf")  # zero probabilities: contribute 0
    target = (target if log_target else target.exp()).to(dtype)
    x_cpp = x.clone().requires_grad_()
    loss = FD.kl_div(x_cpp, target, reduction="batchmean", log_target=log_target, backend="cpp")
    loss.backward()
    x64 = x.double().requires_grad_()
    t64 = target.double()
    pointwise = torch.where(
        (t64.exp() if log_target else t64) > 0, F.kl_div(x64, t64, reduction="none", log_target=log_target), 0.0
    )
    loss_ref = pointwise.sum() / N
    loss_ref.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss.double(), loss_ref, **tol)
    grad_tol = dict(rtol=2e-6, atol=1e-9) if dtype != torch.bfloat16 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(x_cpp.grad.double(), x64.grad, **grad_tol)


def test_kl_div_rows_direct(capability):
    torch.manual_seed(12)
    x = torch.randn(9, 70001).log_softmax(-1)[:, :70000]  # row-strided, V > 65536
    target = torch.randn(9, 70000).softmax(-1)
    scale = torch.tensor([0.5])
    rows, grad = torch.ops.fastdistill.kl_div_rows(x, target, scale, False, True)
    ref_rows = F.kl_div(x.double(), target.double(), reduction="none").sum(-1)
    torch.testing.assert_close(rows.double(), ref_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, -0.5 * target, rtol=1e-6, atol=0)
    rows_ng, grad_ng = torch.ops.fastdistill.kl_div_rows(x, target, scale, False, False)
    assert grad_ng.numel() == 0
    torch.testing.assert_close(rows_ng, rows, rtol=0, atol=0)


def test_empty_batch():
    rows, grad = rows_op(torch.randn(0, 50), torch.randn(0, 50))
    assert rows.shape == (0,) and grad.shape == (0, 50)


@pytest.mark.parametrize(
    "case, match",
    [
        ("int_dtype", "student has dtype Int"),
        ("three_dims", "student must be 2-D"),
        ("last_dim_strided", "student must have a contiguous last dimension"),
        ("teacher_last_dim_strided", "teacher must have a contiguous last dimension"),
        ("rows_mismatch", "student has 4 rows but teacher has 5; expected the same number of rows"),
        ("v_common_too_wide", r"v_common=11 is out of range; expected -1 \(min of the widths\) or a width in \[1, min"),
        ("dtype_mismatch", "student has dtype Float but teacher has dtype Double"),
        ("labels_length", "labels has 3 elements; expected 4"),
        ("labels_float", "labels has dtype Float"),
        ("grad_scale_two", "grad_scale must have exactly one element"),
        ("divergence_7", "divergence=7 is not a divergence id"),
        ("temperature_0", "temperature=0 is out of range"),
        ("beta_1.5", "beta=1.5 is out of range"),
    ],
)
def test_bad_input_names_the_argument(case, match):
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    labels, scale = None, torch.ones(1)
    div, beta, temp = 0, 0.5, 1.0
    if case == "int_dtype":
        s, t = s.int(), t.int()
    elif case == "three_dims":
        s, t = s[None], t[None]
    elif case == "last_dim_strided":
        s = torch.randn(4, 20)[:, ::2]
    elif case == "teacher_last_dim_strided":
        t = torch.randn(4, 20)[:, ::2]
    elif case == "rows_mismatch":
        t = torch.randn(5, 10)
    elif case == "dtype_mismatch":
        t = t.double()
    elif case == "labels_length":
        labels = torch.zeros(3, dtype=torch.long)
    elif case == "labels_float":
        labels = torch.zeros(4)
    elif case == "grad_scale_two":
        scale = torch.ones(2)
    elif case == "divergence_7":
        div = 7
    elif case == "temperature_0":
        temp = 0.0
    elif case == "beta_1.5":
        beta = 1.5
    v_common = 11 if case == "v_common_too_wide" else -1
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastdistill.distill_loss_rows(
            s, t, labels, scale, div, beta, temp, IGNORE, 1.0, True, 0.0, 1.0, v_common
        )


def test_kl_div_bad_input_names_the_argument():
    with pytest.raises(RuntimeError, match="target has shape"):
        torch.ops.fastdistill.kl_div_rows(torch.randn(3, 4), torch.randn(3, 5), torch.ones(1), False, True)
    with pytest.raises(RuntimeError, match="input must be 2-D"):
        torch.ops.fastdistill.kl_div_rows(torch.randn(12), torch.randn(12), torch.ones(1), False, True)


def test_opcheck_row_ops():
    """Schema, fake (meta) impls and dispatcher registration agree (fakes: fastdistill/ops/_extension_fakes.py)."""
    torch.manual_seed(13)
    s, t = logits(5, 67), logits(5, 67)
    labels = torch.tensor([1, IGNORE, 3, 4, 5])
    scale = torch.tensor([0.5])
    torch.library.opcheck(
        torch.ops.fastdistill.distill_loss_rows.default, (s, t, labels, scale, 2, 0.5, 2.0, IGNORE, 4.0, True)
    )
    torch.library.opcheck(
        torch.ops.fastdistill.distill_loss_rows.default, (s, t, None, scale, 0, 0.0, 1.0, IGNORE, 1.0, False)
    )
    # a narrower teacher with the fused CE: the common width (v_common) of the row contract
    torch.library.opcheck(
        torch.ops.fastdistill.distill_loss_rows.default,
        (s, t[:, :60], labels, scale, 0, 0.0, 1.0, IGNORE, 1.0, True, 0.5, 1.0, 60),
    )
    target = torch.randn(5, 67).softmax(-1)
    torch.library.opcheck(torch.ops.fastdistill.kl_div_rows.default, (s.log_softmax(-1), target, scale, False, True))
    torch.library.opcheck(torch.ops.fastdistill.topk_targets_rows.default, (s, 4, [1.0, 2.0]))


def test_threads_give_identical_results():
    """Rows are independent: the result does not depend on the number of threads."""
    torch.manual_seed(14)
    s, t = logits(64, 777), logits(64, 777)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rows_op(s, t, divergence=2)
        torch.set_num_threads(2)
        two = rows_op(s, t, divergence=2)
    finally:
        torch.set_num_threads(prev)
    torch.testing.assert_close(one, two, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- fused cross-entropy term
def reference_ce_rows(student, teacher, labels, grad_scale, divergence, beta, temperature, loss_scale, ce_weight):
    """float64 (divergence rows, ce rows, grad_scale * d (sum rows + ce_weight * sum ce) / d student); CE at T = 1."""
    name = DIVERGENCES[divergence]
    s = student.detach().double().requires_grad_()
    valid = labels != IGNORE
    rows = ref.divergence_rows(s, teacher.double(), name, beta, temperature) * loss_scale
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    ce = F.cross_entropy(s, torch.where(valid, labels, 0), reduction="none")
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    (grad,) = torch.autograd.grad((rows.sum() + ce_weight * ce.sum()) * grad_scale, s)
    return rows.detach(), ce.detach(), grad


@pytest.mark.parametrize("need_grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["T1", "T2"])
@pytest.mark.parametrize("divergence", range(len(DIVERGENCES)), ids=list(DIVERGENCES))
def test_fused_ce_term_matches_reference(capability, divergence, temperature, need_grad):
    """ce_weight > 0: CE rows and the gradient of both terms (the cached forward-KL kernel at T = 1, the generic
    row with the raw student's extra online sum at T != 1), ignored rows 0 everywhere; V > the cached block (2048)."""
    torch.manual_seed(200 + 10 * divergence + int(temperature) + need_grad)
    N, V = 13, 4099
    s, t = logits(N, V), logits(N, V)
    s[:, 3000:] += 4.0  # the running max moves late in the row
    labels = torch.randint(0, V, (N,))
    labels[::4] = IGNORE
    labels[1] = V - 1
    beta = 0.3 if DIVERGENCES[divergence] in ("skew_forward_kl", "skew_reverse_kl") else 0.6
    scale = torch.tensor([0.37])
    rows, grad, ce = torch.ops.fastdistill.distill_loss_rows(
        s, t, labels, scale, divergence, beta, temperature, IGNORE, temperature**2, need_grad, 1.7
    )
    ref_rows, ref_ce, ref_grad = reference_ce_rows(
        s, t, labels, 0.37, divergence, beta, temperature, temperature**2, 1.7
    )
    torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-5, atol=1e-5)
    if need_grad:
        grad_rtol = 1e-4 if DIVERGENCES[divergence] == "tvd" else 2e-5
        assert_rows_close(rows, grad, ref_rows, ref_grad, grad_rtol=grad_rtol)
        assert (grad[labels == IGNORE] == 0).all()
    else:
        assert grad.numel() == 0
        torch.testing.assert_close(rows.double(), ref_rows, rtol=1e-5, atol=1e-6)
    assert (ce[labels == IGNORE] == 0).all() and (rows[labels == IGNORE] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "f64"])
def test_fused_ce_term_dtypes(capability, dtype):
    torch.manual_seed(7)
    s, t = logits(6, 333, dtype=dtype), logits(6, 333, dtype=dtype)
    labels = torch.tensor([3, IGNORE, 0, 332, 100, 5])
    rows, grad, ce = torch.ops.fastdistill.distill_loss_rows(
        s, t, labels, torch.ones(1), 0, 0.0, 1.0, IGNORE, 1.0, True, 0.5
    )
    ref_rows, ref_ce, ref_grad = reference_ce_rows(s, t, labels, 1.0, 0, 0.0, 1.0, 1.0, 0.5)
    tol = (
        dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    )  # ce and loss rows are float32
    assert grad.dtype == dtype
    torch.testing.assert_close(ce.double(), ref_ce, **tol)
    torch.testing.assert_close(rows.double(), ref_rows, **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)


def test_fused_ce_bad_input_names_the_argument():
    s, t = logits(3, 10), logits(3, 10)
    with pytest.raises(RuntimeError, match="needs labels"):
        torch.ops.fastdistill.distill_loss_rows(s, t, None, torch.ones(1), 0, 0.0, 1.0, IGNORE, 1.0, True, 1.0)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.fastdistill.distill_loss_rows(
            s, t, torch.tensor([0, 10, 1]), torch.ones(1), 0, 0.0, 1.0, IGNORE, 1.0, True, 1.0
        )
    with pytest.raises(RuntimeError, match="ce_scale=nan is not finite"):
        torch.ops.fastdistill.distill_loss_rows(
            s, t, torch.tensor([0, 1, 1]), torch.ones(1), 0, 0.0, 1.0, IGNORE, 1.0, True, float("nan")
        )


def test_opcheck_row_op_with_ce():
    torch.manual_seed(14)
    s, t = logits(5, 67), logits(5, 67)
    labels = torch.tensor([1, IGNORE, 3, 4, 66])
    torch.library.opcheck(
        torch.ops.fastdistill.distill_loss_rows.default,
        (s, t, labels, torch.tensor([0.5]), 2, 0.5, 2.0, IGNORE, 4.0, True, 1.5),
    )


# ---------------------------------------------------------------------------------------------------------------
# topk_targets_rows: a teacher's top-k targets (fastdistill/train/targets.py, topk_from_hidden)
# ---------------------------------------------------------------------------------------------------------------
def _topk_targets_torch(z: torch.Tensor, k: int, temps):
    """The record by plain torch ops in z's dtype: topk, then log-sum-exps over the whole row and over the others."""
    top, idx = torch.topk(z, k, dim=-1)
    idx, order = idx.sort(dim=-1)
    top = top.gather(1, order)
    lse, log_tail = [], []
    for t in temps:
        lse.append(torch.logsumexp(z / t, dim=-1))
        log_tail.append(torch.logsumexp((z / t).scatter(1, idx, -float("inf")), dim=-1) - lse[-1])
    return idx, top, torch.stack(lse, -1), torch.stack(log_tail, -1)


@pytest.mark.parametrize(
    "n,vocab,k,scale",
    [(7, 1000, 5, 3.0), (5, 49152, 64, 3.0), (3, 70001, 128, 8.0), (4, 131, 7, 30.0), (3, 33, 1, 1.0), (2, 9, 9, 1.0)],
    ids=["v1000", "v49152-k64", "v70001-k128", "v131-wide", "k1", "k=V"],
)
def test_topk_targets_rows_match_float64(capability, seed, n, vocab, k, scale):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g) * scale
    temps = [1.0, 0.5, 2.0]
    idx, top, lse, log_tail = torch.ops.fastdistill.topk_targets_rows(z, k, temps)
    ref_idx, ref_top, ref_lse, ref_tail = _topk_targets_torch(z.double(), k, temps)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(top, z.gather(1, ref_idx))
    t_idx, _, t_lse, t_tail = _topk_targets_torch(z, k, temps)
    assert torch.equal(t_idx, ref_idx)
    # V summands per log-sum-exp; the tail of k = V is empty (-inf on both sides)
    assert_within_torch_error(lse, ref_lse, t_lse, summands=vocab, what="lse")
    if k < vocab:
        assert_within_torch_error(log_tail, ref_tail, t_tail, summands=vocab, what="log_tail")
    else:
        assert torch.equal(log_tail, torch.full_like(log_tail, -float("inf")))


def test_topk_targets_rows_ties_masked_and_bad_rows(capability):
    z = torch.zeros(4, 100)
    z[1, 50:] = -float("inf")  # a masked vocabulary
    z[2, 5] = float("nan")
    z[3, 3] = float("inf")
    idx, top, lse, log_tail = torch.ops.fastdistill.topk_targets_rows(z, 3, [1.0])
    # ties keep the lowest indices; the equal entries left out are tail entries
    assert idx[:2].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert_close(lse[:2, 0], torch.tensor([100.0, 50.0]).log(), msg="lse with ties")
    assert_close(log_tail[:2, 0], torch.tensor([97 / 100, 47 / 50]).log(), msg="log_tail with ties")
    # a NaN or +inf row: NaN lse and tail, the other rows untouched
    assert lse[2:].isnan().all() and log_tail[2:].isnan().all()


def test_topk_targets_rows_bad_input_names_the_argument():
    op = torch.ops.fastdistill.topk_targets_rows
    with pytest.raises(RuntimeError, match=r"k=0: expected 1 <= k <= V=10"):
        op(torch.zeros(2, 10), 0, [1.0])
    with pytest.raises(RuntimeError, match=r"logits has dtype Double; expected Float"):
        op(torch.zeros(2, 10, dtype=torch.float64), 1, [1.0])
    with pytest.raises(RuntimeError, match=r"temperatures has 0; expected every temperature > 0"):
        op(torch.zeros(2, 10), 1, [0.0])
