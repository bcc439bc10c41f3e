"""The one divergence table and the one reduction table (fastdistill/divergences.py): every layer reads them (the C++
header is generated from them and checked here), their beta = 0 / 1 conventions hold on every backend, and every
backend decision goes through fastdistill._backend.choose_backend (an unknown backend is an error naming the argument
on every public path)."""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import available_backends

import fastdistill.functional as FD
from fastdistill import divergences as D
from fastdistill import reference as R

BACKENDS = available_backends(torch.device("cpu"), cpp_op="distill_loss_rows")


def test_cpp_header_is_generated_from_the_table():
    with open(D.HEADER_PATH) as f:
        assert f.read() == D.cpp_header(), "csrc/divergences.h is stale: run `python -m fastdistill.divergences`"


def test_every_layer_uses_the_table():
    from fastdistill.kernels import distill_loss as K

    from fastdistill.ops import attention_distill, distill_loss, fused_linear_distill, kl_div
    from fastdistill.train import config

    assert D.DIVERGENCES == tuple(D.DIVERGENCE_ID) == R.DIVERGENCES == config.DIVERGENCES
    assert distill_loss.DIVERGENCE_ID is D.DIVERGENCE_ID and fused_linear_distill.DIVERGENCE_ID is D.DIVERGENCE_ID
    for mod in (distill_loss, fused_linear_distill, attention_distill, kl_div):
        assert getattr(mod, "REDUCTION_ID", D.REDUCTION_ID) is D.REDUCTION_ID, mod.__name__
    assert set(kl_div.REDUCTIONS) <= set(D.REDUCTION_ID)
    constexprs = {
        "forward_kl": K.FORWARD_KL,
        "reverse_kl": K.REVERSE_KL,
        "jsd": K.JSD,
        "tvd": K.TVD,
        "skew_forward_kl": K.SKEW_FORWARD_KL,
        "skew_reverse_kl": K.SKEW_REVERSE_KL,
    }
    assert {name: int(getattr(c, "value", c)) for name, c in constexprs.items()} == D.DIVERGENCE_ID


def test_conventions_at_beta_end_points_match_the_formulas():
    """The table's beta = 0 / 1 entries are what the formulas give (or, for JSD, the TRL / Liger definition)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 50, generator=g, dtype=torch.float64), torch.randn(6, 50, generator=g, dtype=torch.float64)
    for d in D.DIVERGENCE_TABLE:
        for beta, target in ((0.0, d.at_beta0), (1.0, d.at_beta1)):
            got = R.divergence_rows(s, t, d.name, beta)
            want = torch.zeros(6, dtype=torch.float64) if target == "zero" else R.divergence_rows(s, t, target, 0.5)
            torch.testing.assert_close(got, want, msg=lambda m, d=d, b=beta: f"{d.name} at beta={b}: {m}")
            if d.name != "jsd" and target != "zero":  # the formula itself, near the end point, agrees
                near = R.divergence_rows(s, t, d.name, 1e-7 if beta == 0.0 else 1 - 1e-7)
                torch.testing.assert_close(near, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", D.DIVERGENCES)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_every_backend_applies_the_conventions(name, beta, backend, request):
    g = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    s = torch.randn(5, 37, generator=g, requires_grad=True)
    t = torch.randn(5, 37, generator=g)
    loss = FD.distill_loss(s, t, divergence=name, beta=beta, backend=backend)
    loss.backward()
    entry = D.DIVERGENCE_TABLE[D.DIVERGENCE_ID[name]]
    if (entry.at_beta0 if beta == 0.0 else entry.at_beta1) == "zero":
        assert loss.item() == 0.0 and torch.count_nonzero(s.grad).item() == 0, f"{name} at beta={beta} is not 0"
        return
    target = D.DIVERGENCES[D.canonical_divergence(name, beta)]
    s64 = s.detach().double().requires_grad_()
    want = R.distill_loss(s64, t.double(), divergence=target, beta=beta)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=2e-5, atol=1e-6)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="fastdistill._C is not built")
def test_cpp_rejects_an_unknown_id_with_the_table_names():
    s = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="divergence=6 is not a divergence id; expected one of 0 forward_kl, 1"):
        torch.ops.fastdistill.distill_loss_rows(s, s, None, torch.ones(1), 6, 0.5, 1.0, -100, 1.0, False)


def test_unknown_backend_is_an_error_on_every_path():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 11, generator=g), torch.randn(4, 11, generator=g)
    x, w = torch.randn(4, 6, generator=g), torch.randn(11, 6, generator=g)
    labels = torch.randint(0, 11, (4,), generator=g)
    vals, idx = torch.log_softmax(t, -1).topk(3, dim=-1)
    q = torch.randn(1, 2, 8, 4, generator=g)
    calls = {
        "distill_loss": lambda: FD.distill_loss(s, t, backend="tpu"),
        "kl_div": lambda: FD.kl_div(s.log_softmax(-1), t.softmax(-1), reduction="batchmean", backend="tpu"),
        "fused dense": lambda: FD.fused_linear_distill_loss(x, w, x, w, labels, backend="tpu"),
        "fused top-k": lambda: FD.fused_linear_distill_loss(
            x, w, labels=labels, teacher_topk=(vals, idx), backend="tpu"
        ),
        "fused hard only": lambda: FD.fused_linear_distill_loss(
            x, w, labels=labels, hard_weight=1.0, soft_weight=0.0, backend="tpu"
        ),
        "attention": lambda: FD.attention_distill_loss(q, q, q, q, backend="tpu"),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="backend='tpu' is not a backend; expected one of"):
            call()
            pytest.fail(f"{name} accepted backend='tpu'")


def test_topk_terms_choose_their_backend_through_choose_backend(monkeypatch):
    """The top-k chunk terms have no C++ kernel: auto on CPU is torch; an explicit cpp runs their torch version."""
    from fastdistill import _backend
    from fastdistill.ops import fused_linear_distill as F

    seen = []
    real = _backend.choose_backend
    monkeypatch.setattr(_backend, "choose_backend", lambda *a, **k: seen.append(k) or real(*a, **k))
    cpu = torch.device("cpu")
    assert F.resolve_backend(cpu, sparse=True, backend=None) in ("torch", "triton")
    assert F.resolve_backend(cpu, sparse=True, backend="cpp") == "torch"
    assert F.resolve_backend(cpu, sparse=True, backend="torch") == "torch"
    assert len(seen) == 3 and all(k["cpp_op"] is None and k["cpp_runs_torch"] for k in seen)
