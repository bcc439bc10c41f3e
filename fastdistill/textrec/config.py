"""The text-recognition config (one YAML file describes the whole comparison: data, model, teachers, students).

Every subcommand reads the same file; ``key=value`` overrides as everywhere in fastdistill (``distill.hint=0``).
Output layout under ``run.output_dir``: ``teacher_printed/``, ``teacher_handwriting/``, ``<distill.name>/``, each
with ``checkpoint.pt`` (resumable), ``model/`` (the export ``fastdistill.textrec.load`` reads) and
``metrics.jsonl``; ``evaluation.json`` / ``evaluation.md`` from ``evaluate``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from fastdistill._config import ConfigError, apply_overrides, check_writable, read_yaml
from fastdistill.train.config import REQUIRED, _fill, _float, _int, _opt, _str

_bool, _list, _dict = (bool,), (list,), (dict,)

SCHEDULE = {
    "steps": (_int, 1500),
    "batch_size": (_int, 64),
    "lr": (_float, 2e-3),
    "min_lr_ratio": (_float, 0.05),  # cosine decay to lr * this
    "warmup_steps": (_int, 50),
    "weight_decay": (_float, 0.0),
    "grad_clip": (_float, 5.0),
    "ctc": (_float, 0.5),  # weight of the CTC loss on the encoder (joint CTC-attention); 0 = the attention CE only
}

SCHEMA: dict[str, Any] = {
    "run": {
        "output_dir": (_str, REQUIRED),
        "seed": (_int, 0),
        "threads": (_opt(_int), None),
        "checkpoint_every": (_int, 100),  # steps between resumable checkpoints
        "log_every": (_int, 25),
    },
    "data": {
        "max_len": (_int, 10),  # longest word (characters)
        "train_size": (_int, 20000),  # rendered training images per domain (cached on disk once)
        "test_size": (_int, 500),  # held-out-font test images per domain
        "cache": (_bool, True),
    },
    "model": {  # the teachers' architecture (RecognizerConfig)
        "channels": (_list, [32, 64, 96, 128]),
        "d_model": (_int, 128),
        "bilstm": (_bool, False),
        "d_key": (_int, 64),
        "d_hidden": (_int, 128),
        "d_embed": (_int, 32),
        "position_attention": (_bool, True),
        "ctc_head": (_bool, True),
    },
    "student_model": (_opt(_dict), None),  # overrides of `model` for the student; null: the teachers' size
    "teacher": SCHEDULE,
    "distill": {
        "name": (_str, "student"),  # the student's folder under output_dir
        "teachers": {"printed": (_opt(_str), None), "handwriting": (_opt(_str), None)},  # null: output_dir/teacher_*
        "ce": (_float, 1.0),
        "logits": (_float, 1.0),
        "hint": (_float, 1.0),
        "attention": (_float, 1.0),
        "affinity": (_float, 1.0),
        "temperature": (_float, 2.0),
        "hint_kind": (_str, "mse"),
        **SCHEDULE,
    },
    "evaluate": {"models": (_opt(_list), None), "batch_size": (_int, 250)},  # null: every model under output_dir
}


def validate(raw: dict) -> dict:
    cfg = _fill(SCHEMA, raw, "")
    for section in ("teacher", "distill"):
        s = cfg[section]
        for key in ("steps", "batch_size"):
            if s[key] < 1:
                raise ConfigError(f"{section}.{key}: got {s[key]}; expected an integer >= 1")
        if not s["lr"] > 0:
            raise ConfigError(f"{section}.lr: got {s['lr']}; expected a number > 0")
        if not s["ctc"] >= 0:
            raise ConfigError(f"{section}.ctc: got {s['ctc']}; expected a number >= 0")
        if not 0 <= s["min_lr_ratio"] <= 1:
            raise ConfigError(f"{section}.min_lr_ratio: got {s['min_lr_ratio']}; expected a number in [0, 1]")
    for key in ("train_size", "test_size", "max_len"):
        if cfg["data"][key] < 1:
            raise ConfigError(f"data.{key}: got {cfg['data'][key]}; expected an integer >= 1")
    for key in ("checkpoint_every", "log_every"):
        if cfg["run"][key] < 1:
            raise ConfigError(f"run.{key}: got {cfg['run'][key]}; expected an integer >= 1")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg["distill"]["name"]) or cfg["distill"]["name"].startswith("teacher_"):
        raise ConfigError(
            f"distill.name: got {cfg['distill']['name']!r}; expected a folder name of letters, digits, '_', '.', '-' "
            "not starting with 'teacher_'"
        )
    unknown = set(cfg["student_model"] or {}) - set(SCHEMA["model"])
    if unknown:
        raise ConfigError(f"student_model: unknown key {sorted(unknown)[0]!r}; expected keys of `model`")
    try:
        loss_config(cfg)
        model_config(cfg, "teacher")
        model_config(cfg, "student")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for section, role in (("teacher", "teacher"), ("distill", "student")):
        if cfg[section]["ctc"] > 0 and not model_config(cfg, role).ctc_head:
            raise ConfigError(
                f"{section}.ctc: got {cfg[section]['ctc']} but the {role} model has ctc_head: false; expected "
                f"{section}.ctc: 0 or ctc_head: true"
            )
    check_writable("run.output_dir", cfg["run"]["output_dir"])
    return cfg


def model_config(cfg: dict, role: str):
    from fastdistill.textrec.model import RecognizerConfig

    m = dict(cfg["model"])
    if role == "student":
        m.update(cfg["student_model"] or {})
    return RecognizerConfig(**m, max_len=cfg["data"]["max_len"])


def loss_config(cfg: dict):
    from fastdistill.textrec.losses import TERMS, LossConfig

    d = cfg["distill"]
    return LossConfig(**{k: d[k] for k in TERMS}, temperature=d["temperature"], hint_kind=d["hint_kind"])


def load_config(path: str, overrides: list[str] | None = None) -> dict:
    return validate(apply_overrides(read_yaml(path), overrides or []))


def dump(cfg: dict, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("# resolved config (defaults filled in)\n")
        yaml.safe_dump(cfg, f, sort_keys=False)
    os.replace(tmp, path)


__all__ = ["ConfigError", "SCHEMA", "dump", "load_config", "loss_config", "model_config", "validate"]
