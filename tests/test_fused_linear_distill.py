"""fused_linear_distill_loss against the float64 reference with materialized logits (fastdistill/ops/
fused_linear_distill_ref.py): every divergence, dense and top-k teachers, both tail modes, weights, temperature,
ignore_index, Vs != Vt, Hs != Ht, biases, ragged N, reductions; gradients of hidden, weight and bias; the Triton
kernels under TRITON_INTERPRET=1; torch.compile and opcheck; clear errors."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, assert_within_torch_error, available_backends, generator

import fastdistill.functional as FD
from fastdistill import nn as fdnn
from fastdistill.ops import fused_linear_distill as _op
from fastdistill.ops.fused_linear_distill_ref import fused_linear_distill_loss_ref
from fastdistill.reference import DIVERGENCES

BACKENDS = available_backends(DEVICE, cpp_op="distill_loss_rows", cuda_op="distill_loss_rows")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problem(seed, N=41, Hs=24, Ht=40, Vs=401, Vt=389, k=9, dtype=torch.float64, bias=True, ignore_every=4):
    """Fresh random inputs from ``seed``: ragged N, Hs != Ht, a padding-style Vs != Vt, biases, some ignored rows."""
    g = generator(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)

    p = dict(
        xs=rnd(N, Hs),
        ws=rnd(Vs, Hs, scale=Hs**-0.5 * 2),
        bs=rnd(Vs, scale=0.5) if bias else None,
        xt=rnd(N, Ht),
        wt=rnd(Vt, Ht, scale=Ht**-0.5 * 2),
        bt=rnd(Vt, scale=0.5) if bias else None,
    )
    labels = torch.randint(0, Vs, (N,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    p["labels"] = labels.to(DEVICE)
    # top-k cache: log-probs of a teacher at the distillation temperature, and logits
    t_logits = (torch.randn(N, Vs, generator=g, dtype=torch.float64) * 2).to(DEVICE)
    p["t_logits"] = t_logits
    p["k"] = k
    return p


def _topk(p, T, kind):
    lp = torch.log_softmax(p["t_logits"] / T, dim=-1)
    vals, idx = lp.topk(p["k"], dim=-1)
    if kind == "logits":
        vals = p["t_logits"].gather(1, idx)
    return vals.to(p["xs"].dtype), idx


def _run(fn, p, teacher, **kw):
    xs = p["xs"].clone().requires_grad_()
    ws = p["ws"].clone().requires_grad_()
    bs = p["bs"].clone().requires_grad_() if p["bs"] is not None else None
    targs = teacher if isinstance(teacher, dict) else {}
    loss = fn(xs, ws, labels=p["labels"], student_bias=bs, **targs, **kw)
    gout = torch.full_like(loss, 1.37 if loss.dim() == 0 else 0.7)  # grad_output != 1
    (loss * gout).sum().backward()
    return [loss.detach(), xs.grad, ws.grad] + ([bs.grad] if bs is not None else [])


def _close(got, want, rtol=2e-5, atol=2e-6):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g is not None and torch.isfinite(g).all(), f"output {i}: {g}"
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol, msg=lambda m, i=i: f"output {i}: {m}")


OUTPUTS = ("loss", "grad student_hidden", "grad student_weight", "grad student_bias")


def _upcast(x):
    """float64 copy of a problem / teacher argument (tensors, tuples of tensors, dicts), indices untouched."""
    if isinstance(x, dict):
        return {k: _upcast(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_upcast(v) for v in x)
    return x.double() if torch.is_tensor(x) and x.is_floating_point() else x


def _check(p, teacher, *, backend, chunk_size, **kw):
    """The fused loss and its gradients on float32 inputs vs the float64 reference (materialized logits), within the
    suite's factor of the same reference run in float32 (plain torch's own error; conftest)."""
    assert p["xs"].dtype == torch.float32
    want = _run(fused_linear_distill_loss_ref, _upcast(p), _upcast(teacher), **kw)
    torch_fp32 = _run(fused_linear_distill_loss_ref, p, teacher, **kw)
    got = _run(FD.fused_linear_distill_loss, p, teacher, chunk_size=chunk_size, backend=backend, **kw)
    N, V = p["xs"].shape[0], p["ws"].shape[0]
    what = [f"{o} ({backend}, {kw})" for o in OUTPUTS][: len(got)]
    # the rounding-error floor counts the terms each output sums: the loss N * V (a scalar) or V (rows); the hidden
    # gradient V (dlogits @ W: a dot over the vocabulary per entry, where two equally accurate float32 results differ by
    # more than 2x in a few seeds of 100 at V = 70001); the weight and bias gradients N (over the rows)
    summands = (N * V if got[0].dim() == 0 else V, V, N, N)
    for i in range(len(got)):
        assert_within_torch_error(got[i], want[i], torch_fp32[i], summands=summands[i], what=what[i])
    return got


def _teacher(p, mode, T):
    if mode == "dense":
        return dict(teacher_hidden=p["xt"], teacher_weight=p["wt"], teacher_bias=p["bt"])
    tail = "bucket" if mode == "topk_bucket" else "renormalize"
    return dict(teacher_topk=_topk(p, T, "logprobs"), topk_tail=tail)


# the top-k step has Triton and torch versions only (cpp / cuda run its torch version, already covered)
CASES = [
    (d, m, b)
    for d in DIVERGENCES
    for m in ("dense", "topk_renorm", "topk_bucket")
    for b in BACKENDS
    if not (m == "topk_renorm" and d == "reverse_kl")  # infinite by definition; rejected (see test_bad_inputs)
    and (m == "dense" or b in ("torch", "triton"))
]


# make test-stress: every case but the dense ones in the Triton interpreter (the same row kernel as distill_loss,
# stressed there); the top-k kernels are Triton-only and stay in
def _case_marks(divergence, mode, backend):
    return [] if (mode == "dense" and backend == "triton") else [pytest.mark.stress]


@pytest.mark.parametrize(
    "divergence, mode, backend", [pytest.param(*c, id="-".join(c), marks=_case_marks(*c)) for c in CASES]
)
def test_matches_reference(divergence, mode, backend, seed):
    # ragged N; fewer rows for the Triton interpreter (every program is a Python loop there)
    N = 19 if (backend == "triton" and DEVICE.type == "cpu") else 41
    p = _problem(seed, N=N, dtype=torch.float32)
    T = 1.7
    kw = dict(divergence=divergence, beta=0.3, temperature=T, hard_weight=0.4, soft_weight=0.8)
    _check(p, _teacher(p, mode, T), backend=backend, chunk_size=8, **kw)


DENSE_CE_CASES = [(d, b) for d in ("forward_kl", "reverse_kl", "jsd") for b in BACKENDS if b != "cuda"]


@pytest.mark.parametrize("T", [1.0, 1.7], ids=["T1", "T1.7"])
@pytest.mark.parametrize("Vt", [401, 419, 389], ids=["Vt_eq_Vs", "Vt_gt_Vs", "Vt_lt_Vs"])
@pytest.mark.parametrize("divergence, backend", DENSE_CE_CASES, ids=["-".join(c) for c in DENSE_CE_CASES])
def test_dense_hard_term_fused_into_row_kernel(divergence, backend, Vt, T, monkeypatch, seed):
    """hard_weight > 0 with a dense teacher: CE goes through the row kernel's fused term (the separate CE pass must not
    run), also when the teacher is narrower (Vt < Vs: the row kernel's common width, CE over the student's full row),
    and matches the float64 reference."""
    import fastdistill.ops.fused_linear_distill as fld

    def no_separate_ce_pass(*args, **kwargs):
        raise AssertionError("the separate CE pass ran; expected the fused row-kernel term")

    monkeypatch.setattr(fld, "_ce_rows_and_grad", no_separate_ce_pass)
    N = 19 if (backend == "triton" and DEVICE.type == "cpu") else 41
    p = _problem(seed, N=N, Vs=401, Vt=Vt, dtype=torch.float32)
    kw = dict(divergence=divergence, beta=0.3, temperature=T, hard_weight=0.4, soft_weight=0.8)
    teacher = _teacher(p, "dense", T)
    _check(p, teacher, backend=backend, chunk_size=8, **kw)
    p, teacher = _upcast(p), _upcast(teacher)
    parts_kw = dict(kw, return_parts=True)
    args = (p["xs"], p["ws"])
    parts = FD.fused_linear_distill_loss(
        *args, labels=p["labels"], student_bias=p["bs"], **teacher, backend=backend, chunk_size=8, **parts_kw
    )
    ref_parts = fused_linear_distill_loss_ref(*args, labels=p["labels"], student_bias=p["bs"], **teacher, **parts_kw)
    for got_part, want_part in zip(parts, ref_parts):
        torch.testing.assert_close(got_part.double(), want_part.double(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    [
        dict(reduction="sum", temperature=1.0, hard_weight=1.0, soft_weight=0.0),
        dict(reduction="none", temperature=2.0, hard_weight=0.0, soft_weight=1.0),
        dict(reduction="batchmean", temperature=1.0, hard_weight=0.5, soft_weight=0.5, divergence="jsd", beta=0.0),
        dict(reduction="batchmean", temperature=0.5, hard_weight=0.0, soft_weight=1.0, scale_by_t2=False),
    ],
    ids=["sum-ce-only", "none-T2", "jsd-beta0", "T0.5-no-t2"],
)
@pytest.mark.parametrize("mode", ["dense", "topk_bucket"])
def test_reductions_weights_temperature(case, mode, backend, seed):
    if mode != "dense" and backend not in ("torch", "triton"):
        pytest.skip("the top-k step runs its torch version on this backend (covered by backend=torch)")
    p = _problem(seed, N=29, Vs=300, Vt=300, bias=False, ignore_every=3, dtype=torch.float32)
    _check(p, _teacher(p, mode, case["temperature"]), backend=backend, chunk_size=16, **case)


def test_topk_values_logits_renormalize_equals_logprobs(seed):
    p = _problem(seed, N=17)
    T = 2.0
    kw = dict(temperature=T, divergence="jsd", beta=0.5)
    a = FD.fused_linear_distill_loss(p["xs"], p["ws"], teacher_topk=_topk(p, T, "logits"), topk_values="logits", **kw)
    b = FD.fused_linear_distill_loss(p["xs"], p["ws"], teacher_topk=_topk(p, T, "logprobs"), **kw)
    torch.testing.assert_close(a, b)


def test_topk_full_vocabulary_equals_dense(seed):
    """k = V: both tail modes are the dense divergence (the tail is empty)."""
    p = _problem(seed, N=13, Vs=64, Vt=64, k=64, bias=False)
    T = 1.5
    wt = p["ws"] * 1.3
    dense_logits = torch.nn.functional.linear(p["xt"][:, : p["xs"].shape[1]], wt)
    lp = torch.log_softmax(dense_logits / T, -1)
    vals, idx = lp.topk(64, -1)
    for tail in ("renormalize", "bucket"):
        got = FD.fused_linear_distill_loss(
            p["xs"], p["ws"], teacher_topk=(vals, idx), topk_tail=tail, temperature=T, divergence="tvd"
        )
        want = FD.fused_linear_distill_loss(
            p["xs"], p["ws"], p["xt"][:, : p["xs"].shape[1]], wt, temperature=T, divergence="tvd"
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_vocab_padding_excluded_not_zero_padded(seed):
    """Extra teacher columns with huge logits change nothing: they are outside both softmaxes."""
    p = _problem(seed, N=11, Vs=200, Vt=200, bias=True)
    wt_pad = torch.cat([p["wt"], torch.zeros(56, p["wt"].shape[1], dtype=p["wt"].dtype)])
    bt_pad = torch.cat([p["bt"], torch.full((56,), 50.0, dtype=p["bt"].dtype)])
    a = FD.fused_linear_distill_loss(p["xs"], p["ws"], p["xt"], p["wt"], teacher_bias=p["bt"])
    b = FD.fused_linear_distill_loss(p["xs"], p["ws"], p["xt"], wt_pad, teacher_bias=bt_pad)
    torch.testing.assert_close(a, b)


def test_shapes_noncontiguous_labels_none_and_parts(seed):
    p = _problem(seed, N=24, bias=False)
    x = p["xs"].t().contiguous().t()  # non-contiguous [N, Hs] view
    assert not x.is_contiguous()
    kw = dict(hard_weight=0.3, soft_weight=0.7, return_parts=True)
    loss, ce, div = FD.fused_linear_distill_loss(x, p["ws"], p["xt"], p["wt"], p["labels"], chunk_size=5, **kw)
    rl, rce, rdiv = fused_linear_distill_loss_ref(p["xs"], p["ws"], p["xt"], p["wt"], p["labels"], **kw)
    for g, w in ((loss, rl), (ce, rce), (div, rdiv)):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-6)
    # [B, T, H] input, labels None
    xb = p["xs"].reshape(2, 12, -1)
    a = FD.fused_linear_distill_loss(xb, p["ws"], p["xt"].reshape(2, 12, -1), p["wt"], reduction="none")
    assert a.shape == (2, 12)
    b = fused_linear_distill_loss_ref(p["xs"], p["ws"], p["xt"], p["wt"], reduction="none")
    torch.testing.assert_close(a.reshape(-1).double(), b, rtol=2e-5, atol=2e-6)


def test_all_ignored_and_auto_chunk(seed):
    p = _problem(seed, N=9)
    labels = torch.full_like(p["labels"], -100)
    xs = p["xs"].clone().requires_grad_()
    ws = p["ws"].clone().requires_grad_()
    loss = FD.fused_linear_distill_loss(xs, ws, p["xt"], p["wt"], labels, hard_weight=1.0)
    loss.backward()
    assert loss.item() == 0.0 and xs.grad.abs().sum() == 0 and ws.grad.abs().sum() == 0
    c = _op.choose_chunk_size(4096, 32000, 32000, 512, torch.device("cpu"))
    assert c & (c - 1) == 0 and 16 <= c <= 4096


def test_float32_and_tied_embedding_module(seed):
    """float32 inputs against the float64 reference; an embedding used as the lm_head gets both gradients."""
    p = _problem(seed, N=32, Vs=300, Vt=300, bias=False, ignore_every=0)
    emb = torch.nn.Embedding(300, 24, dtype=torch.float32).to(DEVICE)
    tokens = torch.randint(0, 300, (32,), device=DEVICE)
    loss_fn = fdnn.FusedLinearDistillLoss(divergence="jsd", hard_weight=0.5, soft_weight=0.5, temperature=2.0)
    h = torch.tanh(emb(tokens))
    loss = loss_fn(h, emb.weight, p["xt"].float(), p["wt"].float(), p["labels"])
    loss.backward()
    emb64 = emb.weight.detach().double().requires_grad_()
    ref = fused_linear_distill_loss_ref(
        torch.tanh(emb64[tokens]),
        emb64,
        p["xt"],
        p["wt"],
        p["labels"],
        divergence="jsd",
        hard_weight=0.5,
        soft_weight=0.5,
        temperature=2.0,
    )
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb.weight.grad.double(), emb64.grad, rtol=1e-4, atol=1e-5)


def test_bf16_accum_fp32_no_worse_than_torch(seed):
    p = _problem(seed, N=64, Vs=256, Vt=256, bias=False, ignore_every=0)
    ref = _run(fused_linear_distill_loss_ref, p, _teacher(p, "dense", 1.0), hard_weight=0.5)
    lp = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in p.items()}
    torch_bf16 = _run(fused_linear_distill_loss_ref, lp, _teacher(lp, "dense", 1.0), hard_weight=0.5)
    ours = _run(
        FD.fused_linear_distill_loss, lp, _teacher(lp, "dense", 1.0), hard_weight=0.5, accum_fp32=True, chunk_size=16
    )
    assert_within_torch_error(ours[:1], ref[:1], torch_bf16[:1], summands=64 * 256, what=["loss"])
    assert_within_torch_error(ours[1:], ref[1:], torch_bf16[1:], what=list(OUTPUTS[1:3]))


def test_bad_inputs(seed):
    p = _problem(seed, N=8, Vs=100, Vt=100)
    xs, ws, xt, wt = p["xs"], p["ws"], p["xt"], p["wt"]
    f = FD.fused_linear_distill_loss
    with pytest.raises(ValueError, match="Vs=100 and Vt=400"):
        f(xs, ws, xt, torch.randn(400, xt.shape[1], dtype=xt.dtype, device=DEVICE))
    with pytest.raises(ValueError, match="teacher_weight requires grad"):
        f(xs, ws, xt, wt.clone().requires_grad_())
    with pytest.raises(ValueError, match="teacher_hidden requires grad"):
        f(xs, ws, xt.clone().requires_grad_(), wt)
    with pytest.raises(ValueError, match="student_weight has shape"):
        f(xs, ws[:, :5], xt, wt)
    with pytest.raises(ValueError, match="teacher_weight has shape"):
        f(xs, ws, xt, wt[:, :5])
    with pytest.raises(ValueError, match="teacher_hidden has shape"):
        f(xs, ws, xt[:5], wt)
    with pytest.raises(ValueError, match="not both"):
        f(xs, ws, xt, wt, teacher_topk=_topk(p, 1.0, "logprobs"))
    with pytest.raises(ValueError, match="needs a teacher"):
        f(xs, ws)
    with pytest.raises(ValueError, match="needs labels"):
        f(xs, ws, xt, wt, hard_weight=1.0)
    with pytest.raises(ValueError, match="labels lie in"):
        f(xs, ws, xt, wt, torch.full((8,), 100, device=DEVICE), hard_weight=1.0)
    with pytest.raises(ValueError, match="infinite"):
        f(xs, ws, teacher_topk=_topk(p, 1.0, "logprobs"), divergence="reverse_kl")
    with pytest.raises(ValueError, match="needs topk_values='logprobs'"):
        f(xs, ws, teacher_topk=_topk(p, 1.0, "logits"), topk_values="logits", topk_tail="bucket")
    vals, idx = _topk(p, 1.0, "logprobs")
    with pytest.raises(ValueError, match=r"expected \[0, Vs=100\)"):
        f(xs, ws, teacher_topk=(vals, idx + 100))
    with pytest.raises(ValueError, match="teacher_topk values"):
        f(xs, ws, teacher_topk=(vals[:, :3], idx))
    with pytest.raises(ValueError, match="divergence="):
        f(xs, ws, xt, wt, divergence="kl")
    with pytest.raises(ValueError, match="temperature="):
        f(xs, ws, xt, wt, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size="):
        f(xs, ws, xt, wt, chunk_size=0)
    with pytest.raises(ValueError, match="same dtype"):
        f(xs.float(), ws, xt, wt)


def _tiny_model(Vs=97, H=16):
    torch.manual_seed(0)
    body = torch.nn.Linear(H, H).to(DEVICE)
    head = torch.nn.Linear(H, Vs, bias=False).to(DEVICE)
    return body, head


@pytest.mark.parametrize("mode", ["dense", "topk"])
def test_torch_compile_fullgraph(mode):
    body, head = _tiny_model()
    xt = torch.randn(20, 24, device=DEVICE)
    wt = torch.randn(97, 24, device=DEVICE)
    vals, idx = torch.randn(20, 97, device=DEVICE).log_softmax(-1).topk(5, -1)
    x = torch.randn(20, 16, device=DEVICE)
    labels = torch.randint(0, 97, (20,), device=DEVICE)
    labels[3] = -100

    def step(x):
        h = torch.tanh(body(x))
        kw = dict(teacher_hidden=xt, teacher_weight=wt) if mode == "dense" else dict(teacher_topk=(vals, idx))
        return FD.fused_linear_distill_loss(h, head.weight, labels=labels, hard_weight=0.5, chunk_size=8, **kw)

    eager = step(x)
    eager.backward()
    g_eager = head.weight.grad.clone()
    head.weight.grad = None
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(head.weight.grad, g_eager)


def test_opcheck(seed):
    p = _problem(seed, N=12, Vs=50, Vt=50, k=4, dtype=torch.float32)
    base = dict(
        divergence=0,
        beta=0.5,
        temperature=1.5,
        hard_weight=0.5,
        soft_weight=1.0,
        ignore_index=-100,
        reduction=2,
        scale_by_t2=True,
        topk_tail=0,
        topk_logits=False,
        chunk_size=5,
        accum_fp32=False,
        need_grad_hidden=True,
        need_grad_weight=True,
        need_grad_bias=True,
        backend="torch",
    )
    xs = p["xs"].clone().requires_grad_()
    ws = p["ws"].clone().requires_grad_()
    bs = p["bs"].clone().requires_grad_()
    vals, idx = _topk(p, 1.5, "logprobs")
    dense = (xs, ws, bs, p["xt"], p["wt"], p["bt"], None, None, p["labels"])
    sparse = (xs, ws, bs, None, None, None, vals, idx, p["labels"])
    for args in (dense, sparse):
        torch.library.opcheck(_op.fused_linear_distill_op, args, base)


def test_benchmark_smoke(tmp_path):
    env = dict(os.environ, FASTDISTILL_BENCH_RESULTS=str(tmp_path))
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_fused_linear_distill.py"), "--preset", "smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fastdistill" in out.stdout


LARGE_V_CASES = [(m, b) for m in ("dense", "topk_bucket") for b in BACKENDS if b != "triton" or DEVICE.type == "cuda"]


@pytest.mark.stress
@pytest.mark.parametrize("mode, backend", LARGE_V_CASES, ids=["-".join(c) for c in LARGE_V_CASES])
def test_vocabulary_over_65536(mode, backend, seed):
    p = _problem(seed, N=5, Hs=8, Ht=8, Vs=70001, Vt=70001, k=6, bias=False, ignore_every=3, dtype=torch.float32)
    kw = dict(temperature=1.3, hard_weight=0.5, divergence="jsd")
    _check(p, _teacher(p, mode, 1.3), backend=backend, chunk_size=None, **kw)
