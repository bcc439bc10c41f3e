"""fastdistill.textrec: rendering, the recognizer's exposed tensors, the four distillation terms, the CLI end to end."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from fastdistill.textrec import data as D

try:
    D.check_available()
    HAVE_DATA = True
except D.FontPackageError as e:  # pragma: no cover - depends on the machine
    HAVE_DATA, WHY = False, str(e)
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="fonts / word list not unpacked: run `make data-text`")

from fastdistill.textrec import losses as L  # noqa: E402
from fastdistill.textrec.model import IGNORE, Recognizer, RecognizerConfig, encode_targets  # noqa: E402

TINY = dict(channels=[4, 4, 6, 8], d_model=8, d_key=4, d_hidden=8, d_embed=4, max_len=6)


def _seed(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


def _model(seed: int, **kw) -> Recognizer:
    torch.manual_seed(seed)
    return Recognizer(RecognizerConfig(**{**TINY, **kw}))


WORDS = ["cat", "Dog42", "a", "HELLO"]


def test_outputs_have_documented_shapes_and_follow_the_input(request):
    seed = _seed(request)
    m = _model(seed).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 32, 128, generator=g) * 2 - 1
    y = encode_targets(WORDS, m.config)
    out = m(x, y)
    B, T, L_, V = 4, TINY["max_len"] + 1, 32, len(D.CHARSET) + 1
    assert out.logits.shape == (B, T, V)
    assert out.attn.shape == (B, T, L_)
    assert out.glimpses.shape == (B, T, TINY["d_model"])
    assert out.features.shape == (B, L_, TINY["d_model"])
    assert out.queries.shape == (B, 1, T, TINY["d_key"])
    assert out.keys.shape == (B, 1, L_, TINY["d_key"])
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(B, T))
    # the glimpse is the attention-weighted sum of the encoder features (what glimpse_hint_loss recomputes)
    torch.testing.assert_close(out.glimpses, out.attn @ out.features, rtol=1e-5, atol=1e-6)
    # alpha_t is softmax(q_t k^T / sqrt(d_k)) of the exposed queries and keys (what attention_distill_loss reads)
    ref = (out.queries @ out.keys.transpose(-1, -2) / TINY["d_key"] ** 0.5).softmax(-1)[:, 0]
    torch.testing.assert_close(out.attn, ref, rtol=1e-5, atol=1e-6)
    x2 = x.clone()
    x2[1] = torch.rand(1, 32, 128, generator=g) * 2 - 1
    out2 = m(x2, y)
    for name in ("glimpses", "attn", "queries", "keys", "features", "logits"):
        a, b = getattr(out, name), getattr(out2, name)
        assert not torch.allclose(a[1], b[1]), f"{name} did not change when image 1 changed"
        torch.testing.assert_close(a[0], b[0], msg=lambda m: f"{name} of image 0 changed: {m}")


def test_targets_encode_and_reject_bad_words():
    cfg = RecognizerConfig(**TINY)
    y = encode_targets(["ab", "Z9"], cfg)
    assert y[0, :3].tolist() == [D.CHARSET.index("a") + 1, D.CHARSET.index("b") + 1, 0]
    assert (y[:, 3:] == IGNORE).all()
    with pytest.raises(ValueError, match="max_len=6"):
        encode_targets(["abcdefgh"], cfg)
    with pytest.raises(ValueError, match="outside the model's charset"):
        encode_targets(["a-b"], cfg)
    with pytest.raises(ValueError, match="max_len=40"):
        RecognizerConfig(**{**TINY, "max_len": 40})


def _pair(seed):
    student = _model(seed).train()
    teacher = _model(seed + 1, d_model=12, d_key=6).eval()  # a wider teacher: the hint needs its projection
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 32, 128, generator=g) * 2 - 1
    y = encode_targets(WORDS, student.config)
    return student, teacher, x, y


@pytest.mark.parametrize("term", ["logits", "hint", "attention", "affinity"])
def test_each_term_reaches_the_student_and_not_the_teacher(request, term):
    student, teacher, x, y = _pair(_seed(request))
    weights = {t: 0.0 for t in L.TERMS} | {term: 1.0}
    cfg = L.LossConfig(**weights)
    proj = torch.nn.ModuleDict({"0": torch.nn.Linear(8, 12, bias=False), "1": torch.nn.Linear(8, 12, bias=False)})
    dom = torch.tensor([0, 1, 0, 1])
    teachers = {0: teacher, 1: _model(7, d_model=12, d_key=6).eval()}
    for t in teachers.values():
        t.requires_grad_(True)  # even a teacher whose parameters could take gradient gets none (no_grad forward)
    out = student(x, y)
    total, terms = L.objective(out, y, dom, x, teachers, proj, cfg)
    assert set(terms) == {term} and total.item() > 0
    total.backward()
    for t in teachers.values():
        assert all(p.grad is None for p in t.parameters()), f"{term}: a teacher parameter got a gradient"
    grads = {n: p.grad for n, p in student.named_parameters()}
    reached = [n for n, gr in grads.items() if gr is not None and gr.abs().sum() > 0]
    assert any(n.startswith("cnn.") for n in reached), f"{term}: no gradient reached the encoder ({reached})"
    if term == "attention":
        assert grads["w_q.weight"].abs().sum() > 0 and grads["w_k.weight"].abs().sum() > 0
    if term == "hint":
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    if term == "logits":
        assert grads["out.weight"].abs().sum() > 0


def test_terms_match_float64_references(request):
    student, teacher, x, y = _pair(_seed(request))
    s, t = student.double()(x.double(), y), None
    with torch.no_grad():
        t = teacher.double()(x.double(), y)
    valid = y != IGNORE
    vm = valid.double()
    # attention: KL(alpha_teacher || alpha_student) per valid step, through the padded queries / keys
    ref = (t.attn * (t.attn.log() - s.attn.log())).sum(-1)
    got = L.attention_term(s, t, vm)
    torch.testing.assert_close(got, (ref * vm).sum() / vm.sum())
    # affinity: the [T, T] cosine maps of the glimpses over the valid steps, squared Frobenius / n^2, mean over B
    per = []
    for b in range(4):
        gs = torch.nn.functional.normalize(s.glimpses[b][valid[b]], dim=-1)
        gt = torch.nn.functional.normalize(t.glimpses[b][valid[b]], dim=-1)
        per.append(((gs @ gs.T - gt @ gt.T) ** 2).sum() / valid[b].sum() ** 2)
    cfg = L.LossConfig(temperature=2.0)
    proj = torch.nn.Linear(8, 12, bias=False).double()
    terms = L.distill_terms(s, t, y, cfg, proj)
    torch.testing.assert_close(terms["affinity"], torch.stack(per).mean())
    hint_ref = ((proj(s.glimpses) - t.glimpses) ** 2).mean(-1)[valid].mean()
    torch.testing.assert_close(terms["hint"], hint_ref)
    T = 2.0
    ps, pt = (s.logits / T).log_softmax(-1), (t.logits / T).log_softmax(-1)
    kl = (pt.exp() * (pt - ps)).sum(-1)[valid].mean() * T * T
    torch.testing.assert_close(terms["logits"], kl.to(terms["logits"].dtype), rtol=1e-5, atol=1e-6)


def _ctc_reference(log_probs: torch.Tensor, target: list[int]) -> torch.Tensor:
    """-log p(target | x) by the CTC forward recursion over the blank-extended label (float64, one sequence)."""
    ext = [0]
    for c in target:
        ext += [c, 0]
    S, neg = len(ext), torch.tensor(float("-inf"), dtype=torch.float64)
    alpha = [log_probs[0, 0], log_probs[0, ext[1]]] + [neg] * (S - 2)
    for t in range(1, log_probs.shape[0]):
        new = []
        for s in range(S):
            terms = [alpha[s]] + ([alpha[s - 1]] if s >= 1 else [])
            if s >= 2 and ext[s] != 0 and ext[s] != ext[s - 2]:
                terms.append(alpha[s - 2])
            new.append(torch.logsumexp(torch.stack(terms), 0) + log_probs[t, ext[s]])
        alpha = new
    return -torch.logsumexp(torch.stack(alpha[-2:]), 0)


def test_ctc_term_matches_the_forward_recursion_and_trains_the_encoder(request):
    m = _model(_seed(request)).double().train()
    g = torch.Generator().manual_seed(_seed(request))
    x = (torch.rand(4, 1, 32, 128, generator=g) * 2 - 1).double()
    y = encode_targets(WORDS, m.config)
    out = m(x, y)
    assert out.ctc_logits.shape == (4, 32, len(D.CHARSET) + 1)
    got = L.ctc_loss(out, y)
    lp = out.ctc_logits.log_softmax(-1)
    ref = sum(_ctc_reference(lp[b], [c for c in y[b].tolist() if c > 0]) for b in range(4)) / sum(map(len, WORDS))
    torch.testing.assert_close(got, ref)
    got.backward()
    assert m.cnn[0].weight.grad.abs().sum() > 0 and m.ctc.weight.grad.abs().sum() > 0
    assert m.w_q.weight.grad is None, "the CTC term reached the attention decoder"
    with pytest.raises(ValueError, match="no CTC head"):
        L.ctc_loss(_model(0, ctc_head=False)(x.float(), y), y)


def test_position_terms_enter_queries_and_keys(request):
    """With position_attention the exposed queries / keys carry the step / position terms the map is made of."""
    seed = _seed(request)
    x = torch.rand(2, 1, 32, 128, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    y = encode_targets(WORDS[:2], RecognizerConfig(**TINY))
    with_pos, plain = _model(seed), _model(seed, position_attention=False)
    assert {"q_pos", "k_pos"} <= {n for n, _ in with_pos.named_parameters()}
    assert not {"q_pos", "k_pos"} & {n for n, _ in plain.named_parameters()}
    out = with_pos.eval()(x, y)
    torch.testing.assert_close(out.keys[:, 0] - with_pos.w_k(out.features), with_pos.k_pos.expand(2, -1, -1))
    ref = (out.queries @ out.keys.transpose(-1, -2) / TINY["d_key"] ** 0.5).softmax(-1)[:, 0]
    torch.testing.assert_close(out.attn, ref, rtol=1e-5, atol=1e-6)


def test_ctc_weight_needs_a_ctc_head(tmp_path):
    from fastdistill.textrec.config import ConfigError, load_config

    cfg = os.path.join(os.path.dirname(__file__), "..", "configs", "textrec_demo.yaml")
    base = [f"run.output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"teacher\.ctc: got 0\.5 but the teacher model has ctc_head: false"):
        load_config(cfg, [*base, "model.ctc_head=false", "distill.ctc=0"])
    with pytest.raises(ConfigError, match=r"distill\.ctc: got 0\.5 but the student model"):
        load_config(cfg, [*base, "student_model={ctc_head: false}"])
    with pytest.raises(ConfigError, match=r"teacher\.ctc: got -1"):
        load_config(cfg, [*base, "teacher.ctc=-1"])
    assert load_config(cfg, [*base, "model.ctc_head=false", "teacher.ctc=0", "distill.ctc=0"])["teacher"]["ctc"] == 0


def test_loss_config_rejects_bad_weights():
    with pytest.raises(ValueError, match="distill.hint=-1"):
        L.LossConfig(hint=-1)
    with pytest.raises(ValueError, match="temperature"):
        L.LossConfig(temperature=0)
    assert not L.LossConfig(logits=0, hint=0, attention=0, affinity=0).needs_teacher


@needs_data
@pytest.mark.parametrize("domain", D.DOMAINS)
def test_rendering_is_deterministic_per_seed(domain):
    a = [D.render(3, domain, "train", i, 8) for i in range(4)]
    b = [D.render(3, domain, "train", i, 8) for i in range(4)]
    assert [w for _, w in a] == [w for _, w in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b))
    c = [D.render(4, domain, "train", i, 8) for i in range(4)]
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, c))
    for im, w in a:
        assert im.size == (D.WIDTH, D.HEIGHT) and im.mode == "L" and 1 <= len(w) <= 8 and set(w) <= set(D.CHARSET)
        assert np.asarray(im).std() > 1, "a blank image"


def _digest(domains) -> str:
    return hashlib.sha256(
        b"".join(np.asarray(D.render(3, d, "train", i, 8)[0]).tobytes() for d in domains for i in range(4))
    ).hexdigest()


@needs_data
def test_rendering_is_the_same_in_a_fresh_process():
    """No state carried between samples or processes: a new interpreter renders the very same pixels."""
    code = f"from fastdistill.textrec import data as D; import tests.test_textrec as T; print(T._digest({D.DOMAINS!r}))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert fresh.stdout.strip().splitlines()[-1] == _digest(D.DOMAINS)


@needs_data
def test_held_out_fonts_and_words_are_disjoint():
    for dom in D.DOMAINS:
        train, test = D.fonts(dom, "train"), D.fonts(dom, "test")
        assert train and test and not {f.path for f in train} & {f.path for f in test}
    train_words, test_words = D.word_list(10)
    assert len(test_words) > 1000 and not set(train_words) & set(test_words)


def test_missing_font_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_search_roots", lambda: [str(tmp_path)])
    D.word_list.cache_clear()
    try:
        with pytest.raises(D.FontPackageError, match=r"'wamerican' is missing.*make data-text"):
            D.check_available()
        words = tmp_path / D.WORDS_PATH
        words.parent.mkdir(parents=True)
        words.write_text("\n".join(f"w{i}" for i in range(200)))
        D.word_list.cache_clear()
        with pytest.raises(D.FontPackageError, match=r"'fonts-bwht' is missing.*make data-text"):
            D.check_available(("handwriting",))
        with pytest.raises(D.FontPackageError, match=r"'fonts-dejavu-core' is missing"):
            D.render(0, "printed", "train", 0)
    finally:
        D.word_list.cache_clear()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from fastdistill.textrec import train

    path = str(tmp_path / "checkpoint.pt")
    train._save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes part of the file, then the process "dies"
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train._save_checkpoint(path, {"step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path)["step"] == 1


def _cli(capsys, *args) -> tuple[int, str, str]:
    """``fastdistill text-recognition ...`` through the command's entry point, in this process (no interpreter start-up
    per stage: the suite's time budget); one stage below also runs as a real subprocess."""
    from fastdistill.cli import main

    code = main(["text-recognition", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


TINY_OVERRIDES = [
    "model.channels=[4,4,6,8]",
    "model.d_model=8",
    "model.d_key=4",
    "model.d_hidden=8",
    "model.d_embed=4",
    "data.max_len=6",
    "data.train_size=16",
    "data.test_size=6",
    "run.log_every=1",
    "run.checkpoint_every=1",
    "run.threads=1",
    "teacher.steps=2",
    "teacher.batch_size=4",
    "distill.steps=2",
    "distill.batch_size=4",
]


@needs_data
def test_cli_end_to_end_and_resume(tmp_path, capsys):
    cfg = os.path.join(os.path.dirname(__file__), "..", "configs", "textrec_demo.yaml")
    base = ["--config", cfg, f"run.output_dir={tmp_path}", *TINY_OVERRIDES]
    threads = torch.get_num_threads()
    try:
        for dom in D.DOMAINS:
            code, out, err = _cli(capsys, "train-teacher", "--domain", dom, *base)
            assert code == 0, err[-3000:]
            assert os.path.isfile(tmp_path / f"teacher_{dom}" / "model" / "weights.pt")
        code, out, err = _cli(capsys, "distill", *base)
        assert code == 0, err[-3000:]
        assert all(f"{t}=" in out for t in ("ce", "logits", "hint", "attention", "affinity")), out
        # resume: the same student to 3 steps continues from its step-2 checkpoint
        code, out, err = _cli(capsys, "distill", *base, "distill.steps=3")
        assert code == 0, err[-3000:]
        assert "resuming" in out and "step 3/3" in out and "step 1/3" not in out
        assert torch.load(tmp_path / "student" / "checkpoint.pt", weights_only=False)["step"] == 3
        # bad input: a clear error naming the key; a checkpoint of another architecture is refused
        code, out, err = _cli(capsys, "distill", *base, "distill.hint=-1")
        assert code == 2 and "distill.hint" in err
        code, out, err = _cli(capsys, "train-teacher", "--domain", "printed", *base, "model.d_model=16")
        assert code == 2 and "checkpoint.pt" in err and "expected the same" in err
    finally:
        torch.set_num_threads(threads)
    # evaluate through the installed command line (the subcommand is registered in fastdistill.cli)
    cmd = [sys.executable, "-m", "fastdistill.cli", "text-recognition", "evaluate", *base]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(res) == {"teacher_printed", "teacher_handwriting", "student"}
    for row in res.values():
        for dom in D.DOMAINS:
            assert row[dom]["n"] == 6 and 0 <= row[dom]["word_acc"] <= 100 and row[dom]["cer"] >= 0
    from PIL import Image

    from fastdistill import textrec

    model = textrec.load(str(tmp_path / "student"))
    words = textrec.recognize(model, [D.render(0, "printed", "test", 0, 6)[0], Image.new("RGB", (60, 20), "white")])
    assert len(words) == 2 and all(isinstance(w, str) for w in words)


def test_score_and_edit_distance():
    from fastdistill.textrec.train import edit_distance, score

    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    s = score(["cat", "dg", "Bird"], ["cat", "dog", "bird"])
    assert s["word_acc"] == pytest.approx(100 / 3) and s["cer"] == pytest.approx(100 * 2 / 10)
