"""Trainer config validation and the data sampler: fast, in-process (no DeepSpeed launch)."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from conftest import assert_one_line_error

from fastdistill.train import data as data_lib
from fastdistill.train.cli import main as train_main
from fastdistill.train.config import ConfigError, load_config, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ["demo_smollm2.yaml", "tiny_llama_zero3.yaml", "multinode_tiny_llama.yaml"]


def minimal() -> dict:
    return {
        "run": {"output_dir": "runs/x"},
        "teacher": {"config": {"model_type": "llama", "vocab_size": 256}},
        "student": {"init_from_teacher": {"layers": [0]}},
        "data": {"tokenizer": "bytes"},
    }


@pytest.mark.parametrize("name", SHIPPED, ids=SHIPPED)
def test_shipped_configs_validate_and_carry_launch_command(name):
    path = os.path.join(REPO, "configs", name)
    cfg = load_config(path)
    assert cfg["teacher"]["deepspeed"]["stage"] in (0, 3)
    header = open(path).read().split("\n", 12)[:12]
    assert any(("fastdistill train" in line or "deepspeed" in line) and line.startswith("#") for line in header)


def test_defaults_are_filled():
    cfg = validate(minimal())
    assert cfg["student"]["deepspeed"]["stage"] == 2
    assert cfg["teacher"]["deepspeed"]["stage"] == 3
    assert cfg["losses"] == [
        {"type": "logit_kd", "weight": 1.0, "divergence": "forward_kl", "beta": 0.5, "temperature": 1.0}
    ]


def _set(cfg: dict, dotted: str, value) -> dict:
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return cfg


CASES = [
    # (id, change, words the one message must contain)
    ("unknown_key", lambda c: _set(c, "student.deepspeed.stag", 2), ["unknown key", "student.deepspeed.stag"]),
    ("unknown_section", lambda c: _set(c, "trainer.x", 1), ["unknown key", "trainer"]),
    ("wrong_type", lambda c: _set(c, "schedule.max_steps", "ten"), ["schedule.max_steps", "an integer", "'ten'"]),
    ("bool_for_int", lambda c: _set(c, "data.seq_len", True), ["data.seq_len", "an integer"]),
    ("missing_teacher", lambda c: c.pop("teacher") and c, ["teacher", "exactly one", "teacher.model"]),
    ("two_students", lambda c: _set(c, "student.model", "x"), ["student", "exactly one"]),
    ("missing_output", lambda c: c["run"].pop("output_dir") and c, ["missing required key", "run.output_dir"]),
    (
        "teacher_zero2",
        lambda c: _set(c, "teacher.deepspeed.stage", 2),
        ["teacher.deepspeed.stage", "got 2", "optimizer"],
    ),
    ("teacher_zero1", lambda c: _set(c, "teacher.deepspeed.stage", 1), ["teacher.deepspeed.stage", "got 1"]),
    ("student_zero5", lambda c: _set(c, "student.deepspeed.stage", 5), ["student.deepspeed.stage", "got 5"]),
    (
        "offload_stage0",
        lambda c: _set(_set(c, "teacher.deepspeed.stage", 0), "teacher.deepspeed.offload_param", "cpu"),
        ["offload_param", "stage 3"],
    ),
    ("loss_type", lambda c: _set(c, "losses", [{"type": "mse_logits"}]), ["losses[0].type", "mse_logits"]),
    ("loss_key", lambda c: _set(c, "losses", [{"type": "logit_kd", "temp": 2}]), ["losses[0].temp", "logit_kd"]),
    ("divergence", lambda c: _set(c, "losses", [{"type": "logit_kd", "divergence": "kl"}]), ["divergence", "'kl'"]),
    ("hint_no_map", lambda c: _set(c, "losses", [{"type": "logit_kd"}, {"type": "hint"}]), ["losses[1]", "layer_map"]),
    ("no_lm_loss", lambda c: _set(c, "losses", [{"type": "hint", "layer_map": {0: 1}}]), ["logit_kd", "hard_ce"]),
    ("layers", lambda c: _set(c, "student.init_from_teacher", {"layers": [3, 1]}), ["layers", "increasing"]),
    ("tokenizer", lambda c: _set(c, "data.tokenizer", "teacher"), ["data.tokenizer", "teacher.config"]),
    ("source", lambda c: _set(c, "data.source", "/nonexistent.txt"), ["data.source", "/nonexistent.txt"]),
    ("precision", lambda c: _set(c, "student.deepspeed.precision", "fp8"), ["precision", "'fp8'"]),
]


@pytest.mark.parametrize("change,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_config_errors_name_the_key(change, words):
    with pytest.raises(ConfigError) as e:
        validate(change(minimal()))
    assert_one_line_error(str(e.value), words)


def test_cli_reports_one_line_and_exit_code_2(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    assert train_main(["--config", str(path), "--local_rank=0", "teacher.deepspeed.stage=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fastdistill train: config error: teacher.deepspeed.stage")
    assert train_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert train_main(["--config", str(path), "schedule.max_steps"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_overrides_parse_yaml_values(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    cfg = load_config(
        str(path),
        [
            "schedule.max_steps=7",
            "student.init_from_teacher.layers=[0, 2]",
            "student.deepspeed.optimizer.params.lr=1.0e-2",
        ],
    )
    assert cfg["schedule"]["max_steps"] == 7
    assert cfg["student"]["init_from_teacher"]["layers"] == [0, 2]
    assert cfg["student"]["deepspeed"]["optimizer"]["params"]["lr"] == 1e-2
    assert train_main(["--config", str(path), "--print-config", "run.seed=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["seed"] == 3


@pytest.mark.parametrize("world", [1, 2, 3], ids=lambda w: f"world{w}")
def test_sampler_same_batch_count_and_shapes_on_every_rank(world):
    seqs = torch.arange(11 * 5).view(11, 5)  # 11 sequences: the last global batch is partial for every world size
    samplers = [data_lib.Sampler(seqs, 2, r, world, seed=1) for r in range(world)]
    per_epoch = samplers[0].batches_per_epoch
    seen = []
    for k in range(per_epoch):
        for s in samplers:
            ids, labels = s.batch(k)
            assert ids.shape == labels.shape == (2, 5)
            real = (labels != data_lib.IGNORE_INDEX).any(-1)
            seen += [tuple(r.tolist()) for r in ids[real]]
            assert (labels[~real] == data_lib.IGNORE_INDEX).all()
    assert sorted(seen) == sorted(tuple(r.tolist()) for r in seqs)  # one epoch = every sequence exactly once
    again = data_lib.Sampler(seqs, 2, 0, world, seed=1)
    assert torch.equal(again.batch(per_epoch + 1)[0], samplers[0].batch(per_epoch + 1)[0])  # a pure function of k


def test_labels_shift_and_packing():
    tok = data_lib.ByteTokenizer()
    seqs = data_lib.pack(["abcdef", "ghij"], tok, 4)
    assert seqs.tolist() == [[97, 98, 99, 100], [101, 102, 103, 104]]
    assert data_lib.labels_for(seqs)[0].tolist() == [98, 99, 100, -100]
