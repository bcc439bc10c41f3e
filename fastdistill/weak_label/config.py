"""The weak-label config (WL.yaml): the generation stage's teacher / tokenizer / sampling sections, plus the data,
the task (template, verbalizers, label values), the aggregation rule, the student and the measurement."""

from __future__ import annotations

import os
from typing import Any

from fastdistill.generate.config import SAMPLING, TEACHER, read_yaml
from fastdistill.train.config import REQUIRED, ConfigError, _choice, _fill, _float, _int, _opt, _str

_list, _bool = (list,), (bool,)

SCHEMA: dict[str, Any] = {
    "run": {"output_dir": (_str, REQUIRED), "seed": (_int, 0), "threads": (_opt(_int), None)},
    "teacher": TEACHER,
    "tokenizer": (_str, "teacher"),
    "data": {
        "source": (_str, "vader"),  # vader | a .jsonl/.json/.csv/.parquet/.txt file
        "sets": (_list, ["tweets", "movieReviewSnippets"]),  # VADER sets
        "text_field": (_str, "text"),
        "label_field": (_opt(_str), "rating"),  # human score (evaluation only); null: unlabeled
        "test_per_set": (_int, 150),
        "train_per_set": (_opt(_int), 400),  # unlabeled sentences the teacher labels (null: all the rest)
        "neutral_band": (_float, 0.5),  # |rating| <= this is neutral (left out of sign accuracy)
    },
    "task": {
        "template": (_str, REQUIRED),  # needs {text}
        "chain_of_thought": (_bool, True),
        "answer_prompt": (_str, "\nAnswer:"),
        "labels": ((dict,), REQUIRED),  # name: {verbalizer: " positive", value: 1.0}
        "system": (_opt(_str), None),
        "chat_template": ((str, bool), "auto"),
    },
    "sampling": SAMPLING,
    "aggregation": (_str, "prob_mean"),  # the rule whose soft labels train the student
    "generation": {"batch_size": (_int, 8)},
    "student": {
        "model": (_opt(_str), "all-minilm-l6-v2"),  # builtin name or a Hugging Face folder
        "config": (_opt((dict,)), None),  # random weights (tests)
        "epochs": (_int, 12),  # the epoch with the lowest validation KL is kept
        "batch_size": (_int, 16),
        "lr": (_float, 1e-4),
        "max_length": (_int, 64),
        "temperature": (_float, 1.0),
        "calibrate": (_str, "batch"),  # batch | none: divide the soft labels by their mean over the unlabeled split
        "validation_fraction": (_float, 0.2),  # soft-labelled sentences held out to pick the epoch (no human label)
    },
    "evaluate": {"samples": (_list, [1, 2, 4, 8, 16])},  # N of the aggregation curves (<= sampling.num_samples)
    "logging": {"progress_bar": (_bool, True)},
}


def validate(raw: dict) -> dict:
    raw_teacher = raw.get("teacher") or {}
    cfg = _fill(SCHEMA, raw, "")
    if raw_teacher.get("config") is not None and "model" not in raw_teacher:
        cfg["teacher"]["model"] = None
    given = [k for k in ("model", "config") if cfg["teacher"][k] is not None]
    if len(given) != 1:
        raise ConfigError(f"teacher: expected exactly one of 'teacher.model' or 'teacher.config', got {given}")
    if cfg["tokenizer"] == "teacher" and cfg["teacher"]["model"] is None:
        raise ConfigError("tokenizer: 'teacher' needs 'teacher.model'; set tokenizer to 'bytes' or a tokenizer folder")
    raw_student = raw.get("student") or {}
    if raw_student.get("config") is not None and "model" not in raw_student:
        cfg["student"]["model"] = None
    labels = cfg["task"]["labels"]
    for name, spec in labels.items():
        if not isinstance(spec, dict) or set(spec) - {"verbalizer", "value"} or "verbalizer" not in spec:
            raise ConfigError(f"task.labels.{name}: expected {{verbalizer: ' word', value: number}}, got {spec!r}")
        if not isinstance(spec["verbalizer"], str) or not isinstance(spec.get("value", 0.0), (int, float)):
            raise ConfigError(f"task.labels.{name}: verbalizer must be a string and value a number, got {spec!r}")
    _choice("aggregation", cfg["aggregation"], ("prob_mean", "majority", "score_mean"))
    _choice("student.calibrate", cfg["student"]["calibrate"], ("batch", "none"))
    vf = cfg["student"]["validation_fraction"]
    if not 0.0 <= vf < 1.0:
        raise ConfigError(f"student.validation_fraction: got {vf}; expected a number in [0, 1)")
    _choice("task.chat_template", cfg["task"]["chat_template"], ("auto", True, False))
    d = cfg["data"]
    if d["source"] != "vader" and not os.path.isfile(d["source"]):
        raise ConfigError(f"data.source: got {d['source']!r}; expected 'vader' or an existing file")
    if d["test_per_set"] < 1:
        raise ConfigError(f"data.test_per_set: got {d['test_per_set']}; expected an integer >= 1")
    n = cfg["sampling"]["num_samples"]
    bad = [k for k in cfg["evaluate"]["samples"] if not isinstance(k, int) or not 1 <= k <= n]
    if bad:
        raise ConfigError(f"evaluate.samples: {bad} out of range; expected integers in 1..sampling.num_samples={n}")
    if not cfg["task"]["chain_of_thought"] and n != 1:
        raise ConfigError(
            f"sampling.num_samples: got {n} without chain_of_thought; the label distribution after the prompt alone "
            "is the same for every sample: set num_samples to 1 or chain_of_thought to true"
        )
    from fastdistill.generate.core import SamplingConfig

    try:
        SamplingConfig(**cfg["sampling"])
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    return cfg


def load_config(path: str, overrides: list[str] | None = None) -> dict:
    return validate(read_yaml(path, overrides))
