"""The generation config (GEN.yaml): the teacher section is the trainer's, so the same teacher (builtin / folder /
GGUF / random config, ZeRO-3 or a full copy) serves both stages."""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml

from fastdistill.train.config import (
    DEEPSPEED_TEACHER,
    REQUIRED,
    ConfigError,
    _choice,
    _fill,
    _float,
    _int,
    _opt,
    _str,
    apply_overrides,
)

_list = (list,)

TEACHER = {
    "model": (_opt(_str), "smollm2-135m-instruct"),
    "gguf_file": (_opt(_str), None),
    "config": (_opt((dict,)), None),
    "dtype": (_str, "float32"),
    "deepspeed": DEEPSPEED_TEACHER,
}
SAMPLING = {
    "num_samples": (_int, 1),
    "temperature": (_float, 1.0),  # 0: greedy
    "top_p": (_float, 1.0),
    "max_new_tokens": (_int, 64),
    "stop": (_list, []),  # stop strings: the sample's text is cut before the first one
    "top_k_record": (_int, 0),  # >0: also record the teacher's top-k tokens and log-probs per generated position
}
SCHEMA: dict[str, Any] = {
    "run": {
        "output_dir": (_str, REQUIRED),
        "seed": (_int, 0),
        "threads": (_opt(_int), None),
    },
    "teacher": TEACHER,
    "tokenizer": (_str, "teacher"),  # teacher | bytes | a builtin name or tokenizer folder
    "prompts": {
        "source": (_str, REQUIRED),  # .jsonl / .json / .csv / .parquet / .txt
        "template": (_str, "{text}"),
        "id_field": (_opt(_str), None),
        "chat_template": ((str, bool), "auto"),  # auto: when the tokenizer has one
        "system": (_opt(_str), None),
        "max_prompts": (_opt(_int), None),
    },
    "sampling": SAMPLING,
    "output": {
        "format": (_str, "parquet"),  # parquet | jsonl
        "batch_size": (_int, 8),  # prompts per generation batch (x num_samples rows)
    },
    "logging": {"progress_bar": ((bool,), True)},
}
# keys whose change makes earlier parts of an output folder a different dataset (resume refuses to mix them)
FINGERPRINT = ("teacher", "tokenizer", "prompts", "sampling", "run.seed")


def validate(raw: dict) -> dict:
    cfg = _fill(SCHEMA, raw, "")
    t = cfg["teacher"]
    raw_teacher = raw.get("teacher") or {}
    if raw_teacher.get("config") is not None and "model" not in raw_teacher:
        t["model"] = None  # a random-weights teacher replaces the default builtin one
    given = [k for k in ("model", "config") if t[k] is not None]
    if len(given) != 1:
        raise ConfigError(
            f"teacher: expected exactly one of 'teacher.model' or 'teacher.config', got {given or 'neither'}"
        )
    if t["config"] is not None and "model_type" not in t["config"]:
        raise ConfigError(
            f"teacher.config: expected a transformers config with a 'model_type' key, got {t['config']!r}"
        )
    _choice("teacher.dtype", t["dtype"], ("float32", "bfloat16"))
    _choice("teacher.deepspeed.stage", t["deepspeed"]["stage"], (0, 3))
    if cfg["tokenizer"] == "teacher" and t["model"] is None:
        raise ConfigError("tokenizer: 'teacher' needs 'teacher.model'; set tokenizer to 'bytes' or a tokenizer folder")
    _choice("output.format", cfg["output"]["format"], ("parquet", "jsonl"))
    if cfg["output"]["batch_size"] < 1:
        raise ConfigError(f"output.batch_size: got {cfg['output']['batch_size']}; expected an integer >= 1")
    _choice("prompts.chat_template", cfg["prompts"]["chat_template"], ("auto", True, False))
    mp = cfg["prompts"]["max_prompts"]
    if mp is not None and mp < 1:
        raise ConfigError(f"prompts.max_prompts: got {mp}; expected an integer >= 1 or null")
    if not os.path.isfile(cfg["prompts"]["source"]):
        raise ConfigError(f"prompts.source: file {cfg['prompts']['source']!r} does not exist")
    from fastdistill.generate.core import SamplingConfig

    try:
        SamplingConfig(**cfg["sampling"])
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    return cfg


def read_yaml(path: str, overrides: list[str] | None = None) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {path!r} does not exist")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path!r}: not valid YAML ({e})") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping at the top level, got {type(raw).__name__}")
    return apply_overrides(raw, overrides or [])


def load_config(path: str, overrides: list[str] | None = None) -> dict:
    return validate(read_yaml(path, overrides))


def fingerprint(cfg: dict) -> dict:
    out = {}
    for key in FINGERPRINT:
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        out[key] = copy.deepcopy(node)
    out["teacher"].pop("deepspeed", None)  # sharding does not change what is generated
    return out
