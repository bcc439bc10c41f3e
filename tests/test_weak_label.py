"""Weak labels: aggregation rules against hand-computed values, verbalizer and template errors, the config checks, and
the whole pipeline on a tiny random teacher and student (one process): soft labels, a trained student exported for
plain transformers, the measurement table."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("pyarrow")
transformers = pytest.importorskip("transformers")

from _launch import check, run  # noqa: E402

from fastdistill.generate import Codec, PromptError  # noqa: E402
from fastdistill.train.config import ConfigError  # noqa: E402
from fastdistill.train.data import ByteTokenizer  # noqa: E402
from fastdistill.weak_label.config import validate  # noqa: E402
from fastdistill.weak_label.labeling import Task, aggregate, expected_score  # noqa: E402

CODEC = Codec(ByteTokenizer())
LABELS = {"positive": {"verbalizer": " pos", "value": 1.0}, "negative": {"verbalizer": " neg", "value": -1.0}}


def task(**kw) -> Task:
    args = dict(
        template="Text: {text}",
        labels=["positive", "negative"],
        verbalizers=[" pos", " neg"],
        values=[1.0, -1.0],
        chain_of_thought=True,
        answer_prompt="\nAnswer:",
    )
    args.update(kw)
    return Task(**args)


def test_aggregation_rules_by_hand():
    q = torch.tensor([[[0.9, 0.1], [0.4, 0.6], [0.8, 0.2]]], dtype=torch.float64)  # [E=1, N=3, L=2]
    log_q = q.log()
    torch.testing.assert_close(aggregate(log_q, "prob_mean"), torch.tensor([[0.7, 0.3]], dtype=torch.float64))
    torch.testing.assert_close(aggregate(log_q, "majority"), torch.tensor([[2 / 3, 1 / 3]], dtype=torch.float64))
    geo = (q.log().mean(1)).exp()
    torch.testing.assert_close(aggregate(log_q, "score_mean"), geo / geo.sum(-1, keepdim=True))
    torch.testing.assert_close(aggregate(log_q, "prob_mean", 2), torch.tensor([[0.65, 0.35]], dtype=torch.float64))
    torch.testing.assert_close(expected_score(torch.tensor([[0.7, 0.3]]), [1.0, -1.0]), torch.tensor([0.4]).double())
    with pytest.raises(ValueError, match="expected 1..3"):
        aggregate(log_q, "majority", 4)
    with pytest.raises(ValueError, match="expected one of"):
        aggregate(log_q, "vote")


def test_batch_calibration_by_hand():
    from fastdistill.weak_label.student import batch_calibrate

    p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.75, 0.25]], dtype=torch.float64)  # mean [0.75, 0.25]
    q = p / torch.tensor([[0.75, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(batch_calibrate(p), q / q.sum(-1, keepdim=True))
    torch.testing.assert_close(batch_calibrate(p)[2], torch.tensor([0.5, 0.5], dtype=torch.float64))  # the mean -> 1/L
    # the prior from a reference split (the unlabeled one) applied to other rows (the held-out ones)
    torch.testing.assert_close(batch_calibrate(p[:1], reference=p), batch_calibrate(p)[:1])
    # the order of the sentences' scores is kept: calibration moves the prior, not the evidence
    assert torch.equal(batch_calibrate(p)[:, 0].argsort(), p[:, 0].argsort())


def test_student_keeps_the_epoch_with_the_lowest_validation_kl():
    from fastdistill.weak_label.student import build_student, fidelity, train_student

    torch.manual_seed(0)
    bert = {
        "model_type": "bert",
        "vocab_size": 256,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 32,
    }
    model, tok = build_student(None, ["positive", "negative"], [1.0, -1.0], bert)
    texts = [f"s{i}" for i in range(12)]
    probs = torch.softmax(torch.randn(12, 2, dtype=torch.float64), -1)
    val_probs = torch.softmax(torch.randn(4, 2, dtype=torch.float64), -1)  # unrelated to training: KL wanders
    vals = ["v0", "v1", "v2", "v3"]
    logs = []
    out = train_student(
        model, tok, texts, probs, epochs=5, batch_size=4, lr=5e-2, max_length=8, seed=0,
        val_texts=vals, val_probs=val_probs, values=[1.0, -1.0], log=logs.append,
    )  # fmt: skip
    kls = [v["kl"] for v in out["val"]]
    assert len(kls) == 5 and out["best_epoch"] == 1 + kls.index(min(kls))
    assert out["best_epoch"] < 5  # on this seed the best is not the last epoch: the restore is exercised
    # the model holds the kept epoch's weights: its fidelity now is that epoch's
    assert fidelity(model, tok, vals, val_probs, 8, [1.0, -1.0])["kl"] == pytest.approx(min(kls), rel=1e-9)
    with pytest.raises(ValueError, match="val_texts and val_probs go together"):
        train_student(model, tok, texts, probs, epochs=1, batch_size=4, lr=1e-3, max_length=8, seed=0, val_texts=vals)


def test_table_marks_undefined_correlations():
    from fastdistill.weak_label.labeling import pearson
    from fastdistill.weak_label.run import format_table

    rating = torch.tensor([2.0, -1.0, 3.0])
    assert pearson(torch.ones(3), rating) != pearson(torch.ones(3), rating)  # constant scores: r is NaN
    row = {"a": {"r": float("nan"), "sign_acc": 0.5}, "b": {"r": 0.25, "sign_acc": float("nan")}}
    summary = {
        "held_out": {"a": 3, "b": 3},
        "table": [{"system": "teacher majority N=1", **row}],
        "train_soft_labels": 4,
        "num_samples": 1,
        "seconds_per_sentence": {"teacher_chains_all_samples": 1.0, "teacher_direct": 0.5, "student": 0.1},
        "student_speedup_vs_teacher_chains": 10.0,
        "student_speedup_vs_teacher_direct": 5.0,
    }
    md = format_table(summary)
    assert "| teacher majority N=1 | n/a | 0.500 | 0.250 | n/a |" in md
    assert "nan" not in md and "n/a: undefined" in md


def test_verbalizers_multi_token_and_prefix_error():
    ids = task().verbalizer_ids(CODEC)
    assert ids == [list(b" pos"), list(b" neg")]  # several byte tokens each: scored as a sum of log-probs
    with pytest.raises(PromptError, match="is a token prefix of"):
        task(verbalizers=[" pos", " positive"]).verbalizer_ids(CODEC)
    with pytest.raises(PromptError, match=r"lacks the placeholder\(s\) \{text\}"):
        task(template="Sentence: {sentence}")
    with pytest.raises(PromptError, match="every label needs a verbalizer"):
        task(verbalizers=[" pos"])


def test_config_errors(tmp_path):
    base = {
        "run": {"output_dir": str(tmp_path)},
        "task": {"template": "{text}", "labels": LABELS},
        "sampling": {"num_samples": 4},
        "evaluate": {"samples": [1, 4]},
    }
    validate(base)
    with pytest.raises(ConfigError, match="without chain_of_thought"):
        validate({**base, "task": {**base["task"], "chain_of_thought": False}})
    with pytest.raises(ConfigError, match=r"evaluate.samples: \[8\] out of range"):
        validate({**base, "sampling": {"num_samples": 4}, "evaluate": {"samples": [1, 8]}})
    with pytest.raises(ConfigError, match="task.labels.positive: expected"):
        validate({**base, "task": {**base["task"], "labels": {"positive": " pos", "negative": " neg"}}})
    with pytest.raises(ConfigError, match="aggregation: got 'vote'"):
        validate({**base, "aggregation": "vote"})
    with pytest.raises(ConfigError, match="student.calibrate: got 'prior'"):
        validate({**base, "student": {"calibrate": "prior"}})
    with pytest.raises(ConfigError, match=r"student.validation_fraction: got 1.0; expected a number in \[0, 1\)"):
        validate({**base, "student": {"validation_fraction": 1.0}})
    with pytest.raises(ConfigError, match="data.source: got"):
        validate({**base, "data": {"source": str(tmp_path / "missing.jsonl")}})


@pytest.mark.cpu_only
@pytest.mark.slow
def test_pipeline_on_tiny_models(tmp_path):
    """Tiny Llama teacher (bytes) -> 3 sampled chains per sentence -> soft labels -> tiny BERT student, exported."""
    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(
            "llama",
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )
    teacher.save_pretrained(str(tmp_path / "teacher"))
    words = ["good", "great", "bad", "awful", "fine", "nice", "poor", "sad"]
    with open(tmp_path / "sentences.jsonl", "w") as f:
        for i in range(40):
            w = words[i % len(words)]
            f.write(json.dumps({"text": f"it was {w} #{i}", "rating": (1.0 if i % 3 else -1.5) * (i % 4)}) + "\n")
    cfg = {
        "run": {"output_dir": str(tmp_path / "out"), "seed": 0, "threads": 1},
        "teacher": {"model": str(tmp_path / "teacher")},
        "tokenizer": "bytes",
        "data": {"source": str(tmp_path / "sentences.jsonl"), "test_per_set": 12, "train_per_set": 20},
        "task": {"template": "Text: {text}\nWhy:", "answer_prompt": "\nSo:", "labels": LABELS},
        "sampling": {"num_samples": 3, "temperature": 1.0, "max_new_tokens": 6},
        "generation": {"batch_size": 4},
        "student": {
            "config": {
                "model_type": "bert",
                "vocab_size": 256,
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
            },
            "epochs": 2,
            "batch_size": 8,
            "lr": 1e-3,
        },
        "evaluate": {"samples": [1, 3]},
        "logging": {"progress_bar": False},
    }
    path = tmp_path / "wl.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = run([sys.executable, "-m", "fastdistill.weak_label", "--config", str(path)])
    check(proc)
    out = tmp_path / "out"
    res = json.load(open(out / "results.json"))
    systems = [r["system"] for r in res["table"]]
    from fastdistill.weak_label import data as data_lib

    # the lexicon baseline is there when its data is (make data-weak-labels); the table says so either way
    baseline = ["VADER lexicon (compound)"] if data_lib.vader_scores(["good"]) is not None else []
    assert systems[: len(baseline) + 1] == baseline + ["teacher direct answer, no chain"]
    for rule in ("prob_mean", "majority", "score_mean"):
        assert f"teacher {rule} N=1" in systems and f"teacher {rule} N=3" in systems
    assert systems[-1].startswith("student")
    assert res["held_out"] == {"file": 12} and res["train_soft_labels"] == 20
    # the student's targets are batch-calibrated (a row shows them on the held-out split); 4 of the 20 soft-labelled
    # sentences (validation_fraction 0.2) pick the kept epoch
    assert "teacher prob_mean N=3, batch-calibrated (the student's targets)" in systems
    val = res["student_validation"]
    assert val["sentences"] == 4 and len(val["per_epoch"]) == 2 and val["calibration"] == "batch"
    assert val["kept_epoch"] == 1 + min(range(2), key=lambda e: val["per_epoch"][e]["kl"])
    assert all(-1 <= r["file"]["r"] <= 1 for r in res["table"])
    assert "student saved to" in proc.stdout
    # the exported student: plain transformers, one logit per label, label names and values in its config
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "student"))
    assert model.config.id2label == {0: "positive", 1: "negative"} and model.config.label_values == [1.0, -1.0]
    # N = 1 of every rule uses the same first sample: prob_mean and score_mean agree exactly there
    rows = {r["system"]: r["file"]["r"] for r in res["table"]}
    assert rows["teacher prob_mean N=1"] == pytest.approx(rows["teacher score_mean N=1"], abs=1e-12)
    # a re-run resumes: no teacher work left, same table
    proc2 = run([sys.executable, "-m", "fastdistill.weak_label", "--config", str(path)])
    check(proc2)
    res2 = json.load(open(out / "results.json"))
    assert [r for r in res2["table"] if r["system"].startswith("teacher")] == [
        r for r in res["table"] if r["system"].startswith("teacher")
    ]
    # the teacher's seconds per sentence come from its rows: the resumed run reports those of the run that made them
    chains = res["seconds_per_sentence"]["teacher_chains_all_samples"]
    assert chains > 0 and res2["seconds_per_sentence"]["teacher_chains_all_samples"] == chains
    assert os.path.isdir(out / "teacher" / "parts")
