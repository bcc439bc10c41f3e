"""The Socratic config (SOC.yaml): the generation stage's teacher / tokenizer / sampling, the problems, the few-shot
prompt, and ``student.train``: a ``fastdistill train`` config (everything but the data source) for each student."""

from __future__ import annotations

import os
from typing import Any

from fastdistill.generate.config import SAMPLING, TEACHER, read_yaml
from fastdistill.socratic.data import TEMPLATES, TEST_TEMPLATES, TRAIN_TEMPLATES
from fastdistill.train.config import REQUIRED, ConfigError, _fill, _int, _opt, _str

_list = (list,)
CHAINS = ("teacher", "gold", "teacher_then_gold")
SOC_SAMPLING = {**SAMPLING, "temperature": (SAMPLING["temperature"][0], 0.0), "max_new_tokens": (_int, 96)}

SCHEMA: dict[str, Any] = {
    "run": {"output_dir": (_str, REQUIRED), "seed": (_int, 0), "threads": (_opt(_int), None)},
    "teacher": TEACHER,
    "tokenizer": (_str, "teacher"),
    "data": {
        "source": (_str, "synthetic"),  # synthetic | a GSM8K socratic .jsonl file
        "train_size": (_int, 64),
        "test_size": (_int, 32),
        "train_templates": (_list, list(TRAIN_TEMPLATES)),
        "test_templates": (_list, list(TEST_TEMPLATES)),
    },
    "teacher_prompt": {"shots": (_int, 3)},
    # where the students' documents come from: the teacher's kept chains, the data's own (gold) decompositions, or
    # the teacher's kept chains with gold ones for the problems whose chain was dropped; the teacher runs either way
    # (its kept-chain rate and accuracies are measured), on the first ``teacher_train_size`` train problems (all: null)
    "build": {"chains": (_str, "teacher"), "teacher_train_size": (_opt(_int), None)},
    "sampling": SOC_SAMPLING,
    "generation": {"batch_size": (_int, 4)},
    "student": {"train": ((dict,), REQUIRED)},  # a fastdistill train config without data.source / run.output_dir
    "logging": {"progress_bar": ((bool,), True)},
}


def validate(raw: dict) -> dict:
    raw_teacher = raw.get("teacher") or {}
    cfg = _fill(SCHEMA, raw, "")
    if raw_teacher.get("config") is not None and "model" not in raw_teacher:
        cfg["teacher"]["model"] = None
    d = cfg["data"]
    if d["source"] != "synthetic" and not os.path.isfile(d["source"]):
        raise ConfigError(f"data.source: got {d['source']!r}; expected 'synthetic' or an existing GSM8K .jsonl file")
    for key in ("train_templates", "test_templates"):
        bad = [t for t in d[key] if t not in TEMPLATES]
        if bad or not d[key]:
            raise ConfigError(f"data.{key}: got {d[key]!r}; expected a non-empty list among {sorted(TEMPLATES)}")
    shared = set(d["train_templates"]) & set(d["test_templates"])
    if shared and d["source"] == "synthetic":
        raise ConfigError(
            f"data.test_templates: {sorted(shared)} also in train_templates; the test split holds "
            "templates out so a student cannot pass by memorising one"
        )
    if d["train_size"] <= cfg["teacher_prompt"]["shots"]:
        raise ConfigError(
            f"data.train_size: got {d['train_size']}; expected more than teacher_prompt.shots "
            f"({cfg['teacher_prompt']['shots']}), the few-shot examples come from the train split"
        )
    b = cfg["build"]
    if b["chains"] not in CHAINS:
        raise ConfigError(f"build.chains: got {b['chains']!r}; expected one of {list(CHAINS)}")
    if b["teacher_train_size"] is not None and b["teacher_train_size"] < 0:
        raise ConfigError(f"build.teacher_train_size: got {b['teacher_train_size']}; expected an integer >= 0 or null")
    ift = (cfg["student"]["train"].get("student") or {}).get("init_from_teacher")
    if not isinstance(ift, dict) or not isinstance(ift.get("layers"), list):
        raise ConfigError(
            "student.train.student.init_from_teacher: expected {layers: [...]} (the student is cut "
            "from the teacher, so 'before distillation' is that cut)"
        )
    from fastdistill.generate.core import SamplingConfig

    try:
        SamplingConfig(**cfg["sampling"])
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    return cfg


def load_config(path: str, overrides: list[str] | None = None) -> dict:
    return validate(read_yaml(path, overrides))
