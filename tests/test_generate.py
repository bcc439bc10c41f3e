"""The generation stage: sampling semantics in-process on a tiny random Llama (greedy = transformers' greedy, log-probs
and top-k against a float64 forward, seeds, batch invariance, stop strings), then the command: 2-rank ZeRO-3 under the
real ``deepspeed`` launcher against the unsharded teacher, SIGKILL mid-run and resume, and the input errors."""

from __future__ import annotations

import json
import os
import zlib

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("pyarrow")
transformers = pytest.importorskip("transformers")

from _launch import REPO, check, launch, launched  # noqa: E402

from fastdistill.generate import (  # noqa: E402
    Codec,
    PromptError,
    SamplingConfig,
    build_prompts,
    check_template,
    continuation_logprobs,
    load_generations,
    read_records,
    sample,
)
from fastdistill.train.data import ByteTokenizer  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "generate_tiny.yaml")


def seed_of(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    """The tiny Llama of configs/generate_tiny.yaml with fixed random weights, saved as a folder."""
    import yaml

    cfg = dict(yaml.safe_load(open(CONFIG))["teacher"]["config"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    )
    folder = str(tmp_path_factory.mktemp("gen_teacher"))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def model(teacher_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gen_prompts") / "prompts.jsonl")
    with open(path, "w") as f:
        for i in range(7):
            f.write(json.dumps({"question": f"what is {i} plus {i * 3 + 1}?", "id": f"q{i}"}) + "\n")
    return path


CODEC = Codec(ByteTokenizer())
PROMPTS = [list(b"Q: one?\nA:"), list(b"Q: a longer question?\nA:"), list(b"hi")]


def test_greedy_matches_transformers_generate(model):
    out = sample(model, CODEC, PROMPTS, [0, 1, 2], SamplingConfig(temperature=0, max_new_tokens=10), eos_token_ids=[])
    for p, group in zip(PROMPTS, out):
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert group[0].token_ids == ref[0, len(p) :].tolist()
        assert group[0].finish_reason == "length"


def test_logprobs_and_topk_against_float64_forward(model, request):
    cfg = SamplingConfig(num_samples=3, temperature=1.0, top_p=0.9, max_new_tokens=8, top_k_record=5)
    cfg.seed = seed_of(request)
    out = sample(model, CODEC, PROMPTS, [0, 1, 2], cfg, eos_token_ids=[])
    ref_model = transformers.AutoModelForCausalLM.from_config(model.config).double().eval()
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    f32_err = 0.0
    for p, group in zip(PROMPTS, out):
        for s in group:
            ids = torch.tensor([p + s.token_ids])
            with torch.no_grad():
                ref = torch.log_softmax(ref_model(ids).logits[0], -1)[len(p) - 1 : -1]  # [T, V] float64
                f32 = torch.log_softmax(model(ids).logits[0].double(), -1)[len(p) - 1 : -1]
            f32_err = max(f32_err, (f32 - ref).abs().max().item())
            got = torch.tensor(s.logprobs, dtype=torch.float64)
            want = ref.gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
            tol = 4 * max(f32_err, 1e-6)  # the same fp32 model, batched with a cache: a few times torch's own error
            torch.testing.assert_close(got, want, atol=tol, rtol=0)
            assert torch.equal(torch.tensor(s.topk_ids), ref.topk(5, dim=-1).indices)
            torch.testing.assert_close(
                torch.tensor(s.topk_logprobs, dtype=torch.float64), ref.topk(5, dim=-1).values, atol=tol, rtol=0
            )


def test_sampling_is_a_function_of_seed_prompt_and_index(model, request):
    seed = seed_of(request)
    cfg = SamplingConfig(num_samples=4, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=seed)
    a = sample(model, CODEC, PROMPTS, [0, 1, 2], cfg, eos_token_ids=[])
    b = sample(model, CODEC, PROMPTS, [0, 1, 2], cfg, eos_token_ids=[])
    alone = sample(model, CODEC, PROMPTS[1:2], [1], cfg, eos_token_ids=[])  # another batch, another width
    other = sample(model, CODEC, PROMPTS, [0, 1, 2], SamplingConfig(**{**cfg.__dict__, "seed": seed + 1}), [])
    ids = lambda out: [[s.token_ids for s in g] for g in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(alone)[0] == ids(a)[1]
    assert ids(other) != ids(a)
    assert len({tuple(t) for t in ids(a)[0]}) > 1, "4 samples at temperature 1 should not all be equal"


def test_stop_strings_and_eos(model):
    greedy = sample(model, CODEC, PROMPTS[:1], [0], SamplingConfig(temperature=0, max_new_tokens=10), eos_token_ids=[])
    ids = greedy[0][0].token_ids
    stop = CODEC.decode(ids[3:5])
    cut = sample(
        model, CODEC, PROMPTS[:1], [0], SamplingConfig(temperature=0, max_new_tokens=10, stop=[stop]), eos_token_ids=[]
    )[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == CODEC.decode(ids)[: CODEC.decode(ids).find(stop)]
    ended = sample(model, CODEC, PROMPTS[:1], [0], SamplingConfig(temperature=0, max_new_tokens=10), [ids[2]])[0][0]
    assert ended.finish_reason == "eos" and ended.token_ids == ids[:3] and ended.text == CODEC.decode(ids[:2])


def test_continuation_logprobs_single_and_multi_token(model):
    contexts = PROMPTS
    conts = [[65], [66, 67, 68], [69, 70]]
    got = continuation_logprobs(model, contexts, conts, batch_size=4)
    single = continuation_logprobs(model, contexts, [[65], [66]])
    for i, ctx in enumerate(contexts):
        for j, cont in enumerate(conts):
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
            want = sum(lp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
            assert got[i, j].item() == pytest.approx(want, abs=1e-4)
        assert single[i, 0].item() == pytest.approx(got[i, 0].item(), abs=1e-4)


def test_continuation_logprobs_shares_the_prefix(model):
    """Rows that start alike (one prompt, N chains) run their common prefix once: the same log-probs as whole rows."""
    head = list(b"Q: what is the sentiment here?\nA:")
    contexts = [head + list(t) for t in (b" good", b" it is bad.", b" meh", b"!")]
    ref_model = transformers.AutoModelForCausalLM.from_config(model.config).double().eval()
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    widths = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        for conts in ([[65], [66]], [[65], [66, 67, 68]]):
            widths.clear()
            shared = continuation_logprobs(model, contexts, conts, batch_size=8)
            longest = max(map(len, contexts)) + (0 if len(conts[1]) == 1 else max(map(len, conts)))  # one pass each
            # one forward of the prefix (the head, less what the shortest row needs for its scored positions), then
            # one of the rows' own tokens
            assert 8 <= widths[0] <= len(head) and len(widths) == 2 and sum(widths) == longest, widths
            widths.clear()
            whole = continuation_logprobs(model, contexts, conts, batch_size=8, share_prefix=False)
            assert min(widths) > len(head)
            with torch.no_grad():
                want = continuation_logprobs(ref_model, contexts, conts, batch_size=8, share_prefix=False)
            f32_err = (whole - want).abs().max().item()
            torch.testing.assert_close(shared, want, atol=4 * max(f32_err, 1e-6), rtol=0)
    finally:
        hook.remove()


def test_nucleus_equals_the_full_sort(request):
    from fastdistill.generate.core import _nucleus

    g = torch.Generator().manual_seed(seed_of(request))
    logits = torch.randn(64, 300, generator=g) * torch.linspace(0.05, 8.0, 64)[:, None]  # flat to peaked rows
    probs = torch.softmax(logits, -1)
    for top_p in (0.05, 0.5, 0.9, 0.99):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        want = torch.zeros_like(probs).scatter_(-1, order, sorted_p * (sorted_p.cumsum(-1) - sorted_p < top_p))
        for k in (1, 4, 32, 300):
            got = _nucleus(probs, top_p, k)
            assert torch.equal(got, want), f"top_p={top_p} k={k}"
    narrow = _nucleus(probs, 0.5, 4)  # both paths were taken: some rows' nucleus fits in 4 tokens, some do not
    fits = probs.topk(4, -1).values.sum(-1) >= 0.5
    assert bool(fits.any()) and bool((~fits).any()) and torch.equal(narrow, _nucleus(probs, 0.5, 300))


def test_template_and_file_errors(tmp_path):
    with pytest.raises(PromptError, match=r"lacks the placeholder\(s\) \{sentence\}"):
        check_template("Rate this: {text}", ["sentence"], "task.template")
    with pytest.raises(PromptError, match="positional placeholder"):
        check_template("Rate {}", [], "task.template")
    with pytest.raises(PromptError, match="not a valid format string"):
        check_template("Rate {text", [], "task.template")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PromptError, match="holds no records"):
        read_records(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(PromptError, match=r"bad.jsonl:2: not valid JSON"):
        read_records(str(bad))
    with pytest.raises(PromptError, match="extension '.xml'"):
        (tmp_path / "x.xml").write_text("<a/>")
        read_records(str(tmp_path / "x.xml"))
    with pytest.raises(PromptError, match=r"no field\(s\) \['question'\]"):
        build_prompts([{"text": "a"}], "Q: {question}", CODEC)


def launch_generate(out: str, teacher: str, prompts: str, *overrides: str, nproc: int | None = None, env=None):
    """``fastdistill.generate`` on the tiny config: ``nproc`` ranks under the launcher, or one plain process."""
    args = ["--config", CONFIG, f"run.output_dir={out}", f"teacher.model={teacher}", "teacher.config=null"]
    args += [f"prompts.source={prompts}", "logging.progress_bar=false", *overrides]
    return launch("fastdistill.generate", args, nproc, env)


def reference_rows(model, prompt_file: str, temperature: float) -> list[list[list[int]]]:
    """What the unsharded teacher samples in-process for the prompts of ``configs/generate_tiny.yaml``."""
    import yaml

    cfg = yaml.safe_load(open(CONFIG))
    prompts = build_prompts(read_records(prompt_file), cfg["prompts"]["template"], CODEC)
    sampling = SamplingConfig(**{**cfg["sampling"], "temperature": temperature, "seed": cfg["run"]["seed"]})
    eos = [model.config.eos_token_id]
    out = sample(model, CODEC, [CODEC.encode(p.text) for p in prompts], [p.id for p in prompts], sampling, eos)
    return [[s.token_ids for s in g] for g in out]


@launched
def test_zero3_two_ranks_generate_what_the_unsharded_teacher_does(model, teacher_dir, prompt_file, tmp_path):
    out = str(tmp_path / "zero3")
    check(launch_generate(out, teacher_dir, prompt_file, "sampling.temperature=0", nproc=2))
    rows = load_generations(out)
    assert [r["prompt_id"] for r in rows] == list(range(7))
    assert [r["token_ids"] for r in rows] == reference_rows(model, prompt_file, 0.0)
    assert all(len(r["topk_ids"][0]) == len(r["token_ids"][0]) for r in rows)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["world_size"] == 2 and summary["generated_now"] == 7


@launched
def test_sigkill_then_resume_generates_only_the_rest(model, teacher_dir, prompt_file, tmp_path):
    out = str(tmp_path / "killed")
    killed = launch_generate(out, teacher_dir, prompt_file, env={"FASTDISTILL_FAULT_KILL_AFTER_BATCHES": "2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    parts = sorted(os.listdir(os.path.join(out, "parts")))
    assert parts == ["part-000000000-000000001-2.parquet", "part-000000002-000000003-2.parquet"]
    assert not os.path.exists(os.path.join(out, "generations.parquet"))
    check(launch_generate(out, teacher_dir, prompt_file))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["generated_now"] == 3  # the 4 finished prompts were not generated again
    rows = load_generations(out)
    assert [r["token_ids"] for r in rows] == reference_rows(model, prompt_file, 0.8)
    assert [r["key"] for r in rows] == [str(i) for i in range(7)]
    # the same folder with other sampling settings: refused (checked in-process, no launch needed)
    from fastdistill.generate.config import read_yaml, validate
    from fastdistill.generate.run import ResumeError, _check_resume

    raw = read_yaml(CONFIG, [f"teacher.model={teacher_dir}", "teacher.config=null", f"prompts.source={prompt_file}"])
    _check_resume(out, validate({**raw, "run": {**raw["run"], "output_dir": out}}))  # same settings: accepted
    raw["sampling"]["temperature"] = 0.5
    with pytest.raises(ResumeError, match=r"different \['sampling'\]"):
        _check_resume(out, validate(raw))
