"""Prompt / completion data (``data.format: prompt_completion``): reading JSONL / Parquet / Arrow rows and chat
``messages``, labels on the completion only, the sampler's batches, config errors that name the key, the on-policy
stage taking its prompts from the examples, ``fraction: 0`` on this source equal to the plain off-policy trainer, and
the off- vs on-policy comparison script's smoke preset."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fastdistill.train import data as D
from fastdistill.train.config import ConfigError, validate
from fastdistill.train.data import IGNORE_INDEX

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny_llama_zero3.yaml")
RECORDS = [
    {"prompt": "Q: one?", "completion": " A: 1."},
    {"prompt": "Question two, longer?", "completion": " two"},
    {"prompt": "3", "completion": " a completion that is too long to fit and is cut"},
    {"prompt": "Q: four?", "completion": " 4"},
    {"prompt": "Q: five?", "completion": " five."},
]


def write(records: list[dict], path: str) -> str:
    if path.endswith(".jsonl"):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    else:
        import pyarrow as pa

        table = pa.Table.from_pylist(records)
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            pq.write_table(table, path)
        else:
            with pa.ipc.new_file(path, table.schema) as w:
                w.write_table(table)
    return path


def check_rows(ex: D.Examples, pairs: list[tuple[list[int], list[int]]]) -> None:
    """Each row is prompt + completion then padding; labels: the completion's tokens from position len(prompt) - 1,
    ignore_index on the prompt, the last real position and the padding."""
    seq_len = ex.input_ids.shape[1]
    for i, (p, c) in enumerate(pairs):
        c = c[: seq_len - len(p)]
        n = len(p) + len(c)
        assert ex.input_ids[i, :n].tolist() == p + c and int(ex.lengths[i]) == n
        want = [IGNORE_INDEX] * seq_len
        want[len(p) - 1 : n - 1] = c
        assert ex.labels[i].tolist() == want, i


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".arrow"])
def test_examples_from_files_label_the_completion_only(tmp_path, suffix):
    path = write(RECORDS, str(tmp_path / f"data{suffix}"))
    tok = D.ByteTokenizer()
    ex = D.load_examples(path, tok, 24)
    assert len(ex) == len(RECORDS)
    check_rows(ex, [(tok.encode(r["prompt"]), tok.encode(r["completion"])) for r in RECORDS])
    assert int(ex.lengths[2]) == 24  # the long completion was cut to the sequence budget
    assert (ex.labels != IGNORE_INDEX).sum(-1).tolist() == [6, 3, 23, 2, 6]  # rows 1 and 2 cut to 24 tokens


class ChatBytes(D.ByteTokenizer):
    """Bytes with a chat template (``<role>content|`` turns) and an end-of-sequence id, like an instruct tokenizer."""

    chat_template = "<role>content|"
    eos_token_id = 4

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        text = "".join(f"<{m['role']}>{m['content']}|" for m in messages) + (
            "<assistant>" if add_generation_prompt else ""
        )
        return {"input_ids": list(text.encode())}


def test_chat_messages_with_and_without_a_chat_template(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi?"}]
    rec = {"messages": [*msgs, {"role": "assistant", "content": "hello"}]}
    path = write([rec], str(tmp_path / "chat.jsonl"))
    ex = D.load_examples(path, ChatBytes(), 64)
    check_rows(ex, [(list(b"<system>be brief|<user>hi?|<assistant>"), list(b"hello|"))])
    # no template: role lines, and the completion ends with the tokenizer's end-of-sequence token when it has one
    ex = D.load_examples(path, D.ByteTokenizer(), 64)
    check_rows(ex, [(list(b"system: be brief\nuser: hi?\nassistant: "), list(b"hello"))])
    rec2 = {"prompt": "p", "completion": "c"}
    ex = D.load_examples(write([rec2], str(tmp_path / "eos.jsonl")), ChatBytes(), 8)
    check_rows(ex, [(list(b"p"), [ord("c"), 4])])


def test_builtin_pydoc_qa_is_offline_and_deterministic():
    a, b = D.pydoc_qa(), D.pydoc_qa()
    assert a == b and len(a) > 500
    for r in a[:50]:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and len(r["messages"][1]["content"]) >= 40


def test_sampler_cuts_batches_to_their_longest_row_and_pads_missing_rows(tmp_path):
    ex = D.load_examples(write(RECORDS, str(tmp_path / "d.jsonl")), D.ByteTokenizer(), 32)
    sampler = D.Sampler(ex, 3, 0, 1, 0, shuffle=False)
    ids, labels = sampler.batch(0)
    assert ids.shape == labels.shape == (3, int(ex.lengths[:3].max()))
    ids, labels = sampler.batch(1)  # rows 3, 4 and one padding row
    assert ids.shape == (3, int(ex.lengths[3:].max()))
    assert (labels[2] == IGNORE_INDEX).all() and (labels[:2] != IGNORE_INDEX).any(-1).all()
    assert torch.equal(labels[:2], ex.labels[3:5, : ids.shape[1]])


@pytest.mark.parametrize(
    "records, seq_len, match",
    [
        ([{"prompt": "a"}], 16, r"row 0 has no string field\(s\) \['completion'\] \(fields: \['prompt'\]\)"),
        ([RECORDS[0], {"prompt": "  ", "completion": "x"}], 16, r"row 1: 'prompt' is empty"),
        ([{"prompt": "a", "completion": ""}], 16, r"row 0: 'completion' is empty"),
        ([{"prompt": "a" * 16, "completion": "b"}], 16, r"data\.seq_len: .* row 0 has a prompt of 16 tokens; expected"),
        ([{"messages": [{"role": "user", "content": "x"}]}], 16, r"row 0 'messages': expected a list of >= 2"),
        ([["not", "a", "mapping"]], 16, r"row 0 is list; expected a mapping"),
        ([], 16, r"holds no examples"),
    ],
    ids=[
        "missing-field",
        "empty-prompt",
        "empty-completion",
        "prompt-too-long",
        "messages-no-assistant",
        "not-a-row",
        "empty-file",
    ],  # fmt: skip
)
def test_bad_rows_are_errors_naming_the_key_and_row(tmp_path, records, seq_len, match):
    path = write(records, str(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError, match=match):
        D.load_examples(path, D.ByteTokenizer(), seq_len)


def tiny_cfg(tmp_path, **data) -> dict:
    import yaml

    cfg = yaml.safe_load(open(TINY))
    cfg["run"]["output_dir"] = str(tmp_path / "run")
    cfg["data"].update({"format": "prompt_completion", "source": write(RECORDS, str(tmp_path / "d.jsonl")), **data})
    return cfg


def test_config_resolves_and_rejects_with_the_key_named(tmp_path):
    out = validate({**tiny_cfg(tmp_path), "onpolicy": {"fraction": 1.0}})
    assert out["onpolicy"]["prompt"] == "dataset" and out["onpolicy"]["prompt_tokens"] is None
    assert validate({**tiny_cfg(tmp_path, source="pydoc_qa")})["data"]["source"] == "pydoc_qa"
    cases = [
        ({"data": {"format": "chat"}}, r"data\.format: got 'chat'; expected one of \['packed', 'prompt_completion'\]"),
        ({"data": {"source": "pydoc_topics"}}, r"data\.source: got 'pydoc_topics' with data\.format"),
        ({"data": {"source": str(tmp_path / "no.jsonl")}}, r"data\.source: got .*no\.jsonl.*expected 'pydoc_qa' or an"),
        ({"onpolicy": {"prompt": "packed"}}, r"onpolicy\.prompt: got 'packed' with data\.format 'prompt_completion'"),
        ({"onpolicy": {"prompt_tokens": 4}}, r"onpolicy\.prompt_tokens: got 4; expected null with onpolicy\.prompt"),
        ({"teacher": {"cache": str(tmp_path)}}, r"data\.format: 'prompt_completion' is not supported with teacher"),
        ({"schedule": {"max_seconds": 0}}, r"schedule\.max_seconds: got 0; expected null or a number > 0"),
    ]  # fmt: skip
    for change, match in cases:
        cfg = tiny_cfg(tmp_path)
        for section, values in change.items():
            if section == "teacher":
                cfg["teacher"] = values
                cfg["student"] = {"config": dict(tiny_cfg(tmp_path)["teacher"]["config"])}
            else:
                cfg[section] = {**(cfg.get(section) or {}), **values}
        with pytest.raises(ConfigError, match=match):
            validate(cfg)
    packed = tiny_cfg(tmp_path)
    packed["data"] = {"source": "pydoc_topics", "tokenizer": "bytes", "seq_len": 32}
    with pytest.raises(ConfigError, match=r"onpolicy\.prompt: got 'dataset' with data\.format 'packed'"):
        validate({**packed, "onpolicy": {"prompt": "dataset"}})


def test_onpolicy_stage_takes_the_examples_prompts(tmp_path, request):
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastdistill.train import onpolicy

    cfg = validate({**tiny_cfg(tmp_path), "onpolicy": {"fraction": 1.0, "max_new_tokens": 5}})
    ex = D.load_examples(cfg["data"]["source"], D.ByteTokenizer(), cfg["data"]["seq_len"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg["teacher"]["config"])).eval()
    stage = onpolicy.OnPolicy(cfg, D.Sampler(ex, 2, 0, 1, 0, shuffle=False), model, model, D.ByteTokenizer(), 0, 1)
    for k, rows in ((0, [0, 1]), (1, [2, 3])):
        ids, labels = stage.batch(k)
        assert stage.last_kind == "student"
        for i, r in enumerate(rows):
            n = int((ex.labels[r] != IGNORE_INDEX).int().argmax()) + 1  # the example's prompt length
            assert ids[i, :n].tolist() == ex.input_ids[r, :n].tolist()  # its own prompt, not the dataset completion
            assert (labels[i, : n - 1] == IGNORE_INDEX).all()
            valid = labels[i] != IGNORE_INDEX
            assert 1 <= int(valid.sum()) <= 5 and int(valid.int().argmax()) == n - 1
            assert torch.equal(labels[i, valid], ids[i, n : n + int(valid.sum())])


# ---------------------------------------------------------------------------------------------------------------
# launched: the trainer and the comparison script (single processes, tiny models)
# ---------------------------------------------------------------------------------------------------------------
def run_env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", DS_BUILD_OPS="0")
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    return e


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.cpu_only
@pytest.mark.slow
def test_fraction_zero_on_prompt_completion_data_is_the_off_policy_trainer(tmp_path):
    """Off-policy micro steps train on prompt + completion with the loss on the completion only: ``fraction: 0`` gives
    the plain trainer's losses exactly; ``fraction: 1`` trains on the student's samples of the same prompts."""
    data = write(RECORDS * 4, str(tmp_path / "d.jsonl"))
    base = [sys.executable, "-m", "fastdistill.train", "--config", TINY, "data.format=prompt_completion"]
    base += [f"data.source={data}", "data.seq_len=48", "schedule.max_steps=3", "schedule.save_every=0"]
    base += ["run.final_checkpoint=false", "teacher.deepspeed.stage=0", "logging.progress_bar=false"]
    base += ["logging.tensorboard=false", "student.deepspeed.micro_batch_size=2"]
    runs = {"plain": [], "zero": ["onpolicy={fraction: 0.0, max_new_tokens: 4}"]}
    runs["one"] = ["onpolicy={fraction: 1.0, max_new_tokens: 4}"]
    got = {}
    for name, extra in runs.items():
        out = str(tmp_path / name)
        cmd = base + [f"run.output_dir={out}", *extra]
        check(subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600))
        with open(os.path.join(out, "metrics.csv")) as f:
            got[name] = {int(r["step"]): r for r in csv.DictReader(f) if r.get("train/loss")}
        got[name + "_summary"] = json.load(open(os.path.join(out, "summary.json")))
    for step in (1, 2, 3):
        for key in ("train/loss", "train/kd", "train/ce"):
            assert float(got["plain"][step][key]) == float(got["zero"][step][key]), (step, key)
    assert got["zero_summary"]["student_ppl_after"] == got["plain_summary"]["student_ppl_after"]
    one = got["one_summary"]
    assert one["onpolicy_generation_calls"] == 3 and 0 < one["onpolicy_mean_completion_len"] <= 4
    assert float(got["one"][1]["train/loss"]) != float(got["plain"][1]["train/loss"])


@pytest.mark.cpu_only
@pytest.mark.slow
def test_offpolicy_vs_onpolicy_script_smoke_preset(tmp_path):
    res = tmp_path / "results"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "onpolicy_vs_offpolicy.py"), "--preset", "smoke"]
    cmd += ["--budget", "2", "--threads", "1", "--out", str(tmp_path / "cmp")]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**run_env(), "FASTDISTILL_BENCH_RESULTS": str(res)}, capture_output=True, text=True,
        timeout=1200,  # three processes (the script, two trainer runs): ~1-2 min on an idle 2-core CI machine
    )  # fmt: skip
    check(proc)
    with open(res / "onpolicy_vs_offpolicy.csv") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["init", "off-policy", "on-policy"]
    for r in rows.values():
        assert math.isfinite(float(r["ppl_teacher_greedy"])) and float(r["ppl_teacher_greedy"]) > 1, r
        assert float(r["reverse_kl_own"]) >= 0, r
    for name in ("off-policy", "on-policy"):  # stopped by schedule.max_seconds, not by max_steps
        assert 1 <= int(rows[name]["steps"]) < 100_000
        assert os.path.isfile(tmp_path / "cmp" / name / "student" / "config.json")
