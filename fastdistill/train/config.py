"""The run configuration: one YAML file per run, validated against a schema, resolved (defaults filled in) and saved.

Every key, its type and its default is in ``SCHEMA`` below; ``load_config`` reads a YAML file, applies ``key=value``
overrides (``student.deepspeed.stage=3``, values parsed as YAML), fills the defaults and checks types, required keys
and impossible combinations. Each problem is one ``ConfigError`` whose message names the key, what was given and what
was expected.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml

from fastdistill._config import ConfigError, apply_overrides, parse_override, read_yaml

__all__ = ["ConfigError", "SCHEMA", "apply_overrides", "dump_config", "load_config", "parse_override", "validate"]
from fastdistill.divergences import DIVERGENCES  # the one table of divergences (ids, beta = 0 / 1 conventions)

BUILTIN_MODELS = ("smollm2-135m-instruct",)
LOSS_TYPES = ("logit_kd", "hard_ce", "hint", "attention", "affinity")


# A leaf is (types, default); a nested dict is a section. REQUIRED marks a key without default.
REQUIRED = object()
_str, _int, _float, _bool = (str,), (int,), (int, float), (bool,)
_opt = lambda t: t + (type(None),)  # noqa: E731

DEEPSPEED_TEACHER = {
    "stage": (_int, 3),  # 3: sharded over every rank; 0: a full copy per rank
    "offload_param": (_str, "none"),  # none | cpu | nvme
    "nvme_path": (_opt(_str), None),
    "prefetch_bucket_size": (_int, 50_000_000),
    "param_persistence_threshold": (_int, 100_000),
    "max_live_parameters": (_int, 1_000_000_000),
    "extra": (_opt((dict,)), None),  # merged into the generated DeepSpeed config as is
}
DEEPSPEED_STUDENT = {
    "stage": (_int, 2),
    "precision": (_str, "fp32"),  # fp32 | bf16
    "micro_batch_size": (_int, 4),  # sequences per rank per micro step
    "gradient_accumulation_steps": (_int, 1),
    "gradient_clipping": (_float, 1.0),
    "optimizer": (
        (dict,),
        {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.0, "torch_adam": True}},
    ),
    "scheduler": (
        _opt((dict,)),
        {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 10, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}},
    ),
    "extra": (_opt((dict,)), None),
}
SCHEMA: dict[str, Any] = {
    "run": {
        "output_dir": (_str, REQUIRED),
        "seed": (_int, 0),
        "resume": (_str, "auto"),  # auto (latest checkpoint in output_dir if any) | never | a checkpoint folder
        "loss_impl": (_str, "fused"),  # fused (no [tokens x vocab] logits) | unfused (materialized torch losses)
        "threads": (_opt(_int), None),  # torch.set_num_threads per rank (None: torch's default / launcher's)
        "keep_checkpoints": (_int, 2),  # newest checkpoints kept in output_dir/checkpoints (0: all)
        "final_checkpoint": (_bool, True),  # false: no resumable checkpoint at the end, only the exported student
    },
    "teacher": {
        "model": (_opt(_str), None),  # builtin name, a Hugging Face folder, or a .gguf file
        "gguf_file": (_opt(_str), None),  # GGUF file name inside the `model` folder
        "config": (_opt((dict,)), None),  # a transformers config (model_type + fields): random weights, for tests
        "dtype": (_str, "float32"),
        "deepspeed": DEEPSPEED_TEACHER,
        "cache": (_opt(_str), None),  # a teacher-cache folder: train from its top-k targets, no teacher forward
    },
    "student": {
        "model": (_opt(_str), None),
        "config": (_opt((dict,)), None),
        "init_from_teacher": (_opt((dict,)), None),  # {layers: [0, 6, ...]}: a DistilBERT-style layer subset
        "freeze_embeddings": (_bool, False),  # keep the (tied) input embedding / lm_head weights fixed
        "dtype": (_str, "float32"),
        "deepspeed": DEEPSPEED_STUDENT,
    },
    "data": {
        "source": (_str, "pydoc_topics"),  # packed: pydoc_topics | a .txt file; prompt_completion: pydoc_qa | a file
        "format": (
            _str,
            "packed",
        ),  # packed (text cut into seq_len tokens) | prompt_completion (fastdistill.train.data)
        "tokenizer": (_str, "teacher"),  # teacher | bytes | a builtin name or folder
        "seq_len": (_int, 128),
        "heldout_fraction": (_float, 0.05),
        "max_train_sequences": (_opt(_int), None),
        "max_heldout_sequences": (_opt(_int), 64),
    },
    "losses": ((list,), [{"type": "logit_kd", "weight": 1.0}]),
    "cache": {  # teacher-cache build (k, temperatures, coding) and reading (teacher.cache) options
        "k": (_int, 64),
        "temperatures": (_opt((list,)), None),  # None: [the logit_kd temperature]; the first one is the record's
        "logprob_step": (_float, 0.25),  # uint8 log-prob steps in nats below the position's maximum
        "shard_sequences": (_int, 256),  # sequences per shard file (a killed build redoes at most this many)
        "micro_batch_size": (_opt(_int), None),  # sequences per teacher forward when building (None: the student's)
        "tail": (_str, "bucket"),  # bucket (exact tail mass from the record) | renormalize (DistillKit sparse KD)
        "missing": (_str, "error"),  # error | skip (a sequence not in the cache: its rows are left out, counted)
        "prefetch": (_int, 8),  # micro batches decoded ahead by the reader thread
        "verify": (_bool, True),  # check every shard's sha256 when a run opens the cache
    },
    "schedule": {
        "max_steps": (_int, 100),  # optimizer steps
        "max_seconds": (_opt(_float), None),  # also stop after this much training wall-clock (rank 0's clock)
        "eval_every": (_int, 0),  # 0: only before and after training
        "save_every": (_int, 0),  # 0: only at the end
        "eval_batches": (_opt(_int), None),  # None: the whole held-out split
        "log_every": (_int, 1),
    },
    "logging": {
        "tensorboard": (_bool, True),
        "progress_bar": (_bool, True),
    },
    # a teacher pool and student pools in one launch (fastdistill.train.pools); null: colocated
    "pools": (_opt((dict,)), None),
    # on-policy distillation: the student (or, seq_kd, the teacher) writes the completions (fastdistill.train.onpolicy)
    "onpolicy": (_opt((dict,)), None),
}
LOSS_SCHEMA = {
    "logit_kd": {
        "weight": _float,
        "divergence": _str,
        "beta": _float,
        "temperature": _float,
        "topk": _opt(_int),  # sparse KD on the teacher's top k tokens at the temperature (a `topk` pool payload)
        "topk_tail": _str,  # bucket (the tail mass matched too) | renormalize
    },
    "hard_ce": {"weight": _float},
    "hint": {"weight": _float, "layer_map": (dict,), "kind": _str},
    "attention": {"weight": _float, "layer_map": (dict,), "relation_heads": _opt(_int)},
    "affinity": {"weight": _float, "layer_map": (dict,)},
}
LOSS_DEFAULTS = {
    "logit_kd": {"divergence": "forward_kl", "beta": 0.5, "temperature": 1.0},
    "hint": {"kind": "mse"},  # mse | cosine; a learned projection when the widths differ (FitNets)
    "attention": {"relation_heads": None},  # None: per-head attention maps (MiniLM); R: MiniLMv2 relations
}


def _typename(types: tuple) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true/false",
        dict: "a mapping",
        list: "a list",
        type(None): "null",
    }
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _check_type(key: str, value: Any, types: tuple) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ConfigError(f"{key}: expected {_typename(types)}, got {value!r} ({type(value).__name__})")


def _fill(section: dict, given: Any, prefix: str) -> dict:
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {given!r}")
    unknown = [k for k in given if k not in section]
    if unknown:
        raise ConfigError(f"unknown key {prefix + unknown[0]!r}; expected one of {sorted(section)}")
    out = {}
    for key, spec in section.items():
        name = prefix + key
        if isinstance(spec, dict):
            out[key] = _fill(spec, given.get(key), name + ".")
            continue
        types, default = spec
        if key not in given:
            if default is REQUIRED:
                raise ConfigError(f"missing required key {name!r}")
            out[key] = copy.deepcopy(default)
            continue
        _check_type(name, given[key], types)
        value = given[key]
        if isinstance(value, dict) and isinstance(default, dict) and "type" in default and "type" not in value:
            # e.g. only optimizer.params.lr given: the rest comes from the default optimizer
            value = _merge(default, value)
        out[key] = value
    return out


def _merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: got {value!r}; expected one of {list(choices)}")


def _check_losses(losses: list) -> list:
    out = []
    if not losses:
        raise ConfigError("losses: the list is empty; expected at least one of " + str(list(LOSS_TYPES)))
    for i, item in enumerate(losses):
        key = f"losses[{i}]"
        if not isinstance(item, dict) or "type" not in item:
            raise ConfigError(f"{key}: expected a mapping with a 'type' among {list(LOSS_TYPES)}, got {item!r}")
        _choice(f"{key}.type", item["type"], LOSS_TYPES)
        schema = LOSS_SCHEMA[item["type"]]
        resolved = {"type": item["type"], "weight": 1.0, **copy.deepcopy(LOSS_DEFAULTS.get(item["type"], {}))}
        for k, v in item.items():
            if k == "type":
                continue
            if k not in schema:
                raise ConfigError(
                    f"unknown key '{key}.{k}' for a {item['type']} loss; expected one of {sorted(schema)}"
                )
            _check_type(f"{key}.{k}", v, schema[k])
            resolved[k] = v
        if resolved["weight"] < 0:
            raise ConfigError(f"{key}.weight: got {resolved['weight']}; expected a number >= 0")
        if item["type"] == "logit_kd":
            _choice(f"{key}.divergence", resolved["divergence"], DIVERGENCES)
            if not 0.0 <= resolved["beta"] <= 1.0:
                raise ConfigError(f"{key}.beta: got {resolved['beta']}; expected a number in [0, 1]")
            if resolved["temperature"] <= 0:
                raise ConfigError(f"{key}.temperature: got {resolved['temperature']}; expected a number > 0")
            if resolved.get("topk") is not None and resolved["topk"] < 1:
                raise ConfigError(f"{key}.topk: got {resolved['topk']}; expected an integer >= 1 (or null: dense)")
            if "topk_tail" in resolved:
                _choice(f"{key}.topk_tail", resolved["topk_tail"], ("bucket", "renormalize"))
        if item["type"] == "hint":
            _choice(f"{key}.kind", resolved["kind"], ("mse", "cosine"))
        if "layer_map" in schema:
            if "layer_map" not in item:
                raise ConfigError(f"{key}: a {item['type']} loss needs 'layer_map' {{student_layer: teacher_layer}}")
            lm = {}
            for s, t in item["layer_map"].items():
                if not (isinstance(s, int) and isinstance(t, int)) or isinstance(s, bool) or isinstance(t, bool):
                    raise ConfigError(
                        f"{key}.layer_map: expected integer pairs student_layer: teacher_layer, got {s!r}: {t!r}"
                    )
                lm[s] = t
            resolved["layer_map"] = lm
        out.append(resolved)
    types = [x["type"] for x in out]
    for t in set(types):
        if types.count(t) > 1:
            raise ConfigError(f"losses: {t!r} appears {types.count(t)} times; expected each loss type at most once")
    if not any(t in ("logit_kd", "hard_ce") for t in types):
        raise ConfigError("losses: expected at least one of 'logit_kd' or 'hard_ce' (the lm-head loss)")
    return out


# DeepSpeed 0.19's own optimizer names (matched case-insensitively) and LR schedules; any other name must be a class in
# torch.optim / torch.optim.lr_scheduler (DeepSpeed's fallback)
DS_OPTIMIZERS = ("adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon")
DS_SCHEDULERS = ("LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


def _torch_names(module: str) -> list[str]:
    import importlib
    import inspect

    mod = importlib.import_module(f"torch.{module}")
    return sorted(n for n, v in vars(mod).items() if inspect.isclass(v) and not n.startswith("_"))


def _check_named(key: str, spec: dict, ds_names: tuple, torch_module: str, torch_names: list[str]) -> None:
    name = spec.get("type")
    known = isinstance(name, str) and (name.lower() in ds_names or name in ds_names or name in torch_names)
    if not known:
        raise ConfigError(
            f"{key}.type: got {name!r}; expected one of DeepSpeed's {list(ds_names)} or a class of {torch_module}"
        )
    params = spec.get("params")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{key}.params: expected a mapping of keyword arguments, got {params!r}")


def _check_cache(out: dict) -> None:
    c = out["cache"]
    if c["k"] < 1:
        raise ConfigError(f"cache.k: got {c['k']}; expected an integer >= 1")
    temps = c["temperatures"]
    if temps is not None and (
        not temps or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in temps)
    ):
        raise ConfigError(f"cache.temperatures: got {temps!r}; expected null or a non-empty list of numbers > 0")
    if not 0 < c["logprob_step"] <= 1:
        raise ConfigError(f"cache.logprob_step: got {c['logprob_step']}; expected a number in (0, 1] (nats)")
    for key in ("shard_sequences", "prefetch"):
        if c[key] < 1:
            raise ConfigError(f"cache.{key}: got {c[key]}; expected an integer >= 1")
    if c["micro_batch_size"] is not None and c["micro_batch_size"] < 1:
        raise ConfigError(f"cache.micro_batch_size: got {c['micro_batch_size']}; expected null or an integer >= 1")
    _choice("cache.tail", c["tail"], ("bucket", "renormalize"))
    _choice("cache.missing", c["missing"], ("error", "skip"))
    if out["teacher"]["cache"] is not None:
        if out["run"]["loss_impl"] != "fused":
            raise ConfigError(
                f"run.loss_impl: got {out['run']['loss_impl']!r}; a teacher.cache trains with 'fused' (top-k targets)"
            )
        live = [x["type"] for x in out["losses"] if x["type"] in ("hint", "attention", "affinity")]
        if live:
            raise ConfigError(
                f"losses: {live} need the teacher's hidden states or attention, which a teacher.cache (top-k logit "
                "targets only) does not hold; drop them or train with a live teacher (teacher.model)"
            )


def _check_data_source(out: dict) -> None:
    from fastdistill.train.data import EXAMPLE_SUFFIXES, FORMATS

    data = out["data"]
    _choice("data.format", data["format"], FORMATS)
    if data["format"] == "packed":
        if data["source"] != "pydoc_topics" and not os.path.isfile(data["source"]):
            raise ConfigError(f"data.source: got {data['source']!r}; expected 'pydoc_topics' or an existing text file")
        return
    src = data["source"]
    if src != "pydoc_qa" and not (os.path.isfile(src) and src.lower().endswith(EXAMPLE_SUFFIXES)):
        raise ConfigError(
            f"data.source: got {src!r} with data.format 'prompt_completion'; expected 'pydoc_qa' or an existing "
            f"{'/'.join(EXAMPLE_SUFFIXES)} file of prompt / completion (or chat 'messages') rows"
        )
    for key, what in (("teacher.cache", out["teacher"]["cache"]), ("pools", out["pools"])):
        if what is not None:
            raise ConfigError(
                f"data.format: 'prompt_completion' is not supported with {key} yet (it reads packed sequences); "
                "expected data.format 'packed' there"
            )


def validate(cfg: dict) -> dict:
    """Fill the defaults of ``cfg`` (a parsed YAML mapping) and check it; returns the resolved config."""
    out = _fill(SCHEMA, cfg, "")
    out["losses"] = _check_losses(out["losses"])
    run, teacher, student, data, sched = out["run"], out["teacher"], out["student"], out["data"], out["schedule"]
    _choice("run.loss_impl", run["loss_impl"], ("fused", "unfused"))
    given = [k for k in ("model", "config") if teacher[k] is not None]
    if len(given) > 1 or (not given and teacher["cache"] is None):
        raise ConfigError(
            "teacher: expected exactly one of 'teacher.model' (builtin name, folder or .gguf file) or "
            f"'teacher.config' (a transformers config), or only 'teacher.cache' (a teacher-cache folder), got "
            f"{given or 'neither'}"
        )
    _check_cache(out)
    given = [k for k in ("model", "config", "init_from_teacher") if student[k] is not None]
    if len(given) != 1:
        raise ConfigError(
            "student: expected exactly one of 'student.model', 'student.config' or "
            f"'student.init_from_teacher', got {given or 'neither'}"
        )
    for who in ("teacher", "student"):
        _choice(f"{who}.dtype", out[who]["dtype"], ("float32", "bfloat16"))
        cfg_ = out[who]["config"]
        if cfg_ is not None and "model_type" not in cfg_:
            raise ConfigError(f"{who}.config: expected a transformers config with a 'model_type' key, got {cfg_!r}")
    ift = student["init_from_teacher"]
    if ift is not None:
        layers = ift.get("layers")
        if (
            set(ift) != {"layers"}
            or not isinstance(layers, list)
            or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        ):
            raise ConfigError(
                f"student.init_from_teacher: expected {{layers: [non-negative layer indices]}}, got {ift!r}"
            )
        if sorted(set(layers)) != layers:
            raise ConfigError(f"student.init_from_teacher.layers: got {layers}; expected strictly increasing indices")
    tds, sds = teacher["deepspeed"], student["deepspeed"]
    if tds["stage"] in (1, 2):
        raise ConfigError(
            f"teacher.deepspeed.stage: got {tds['stage']}; ZeRO stages 1 and 2 shard optimizer state and gradients, "
            "which a frozen teacher without an optimizer does not have: use 3 (parameters sharded) or 0 (a full copy)"
        )
    _choice("teacher.deepspeed.stage", tds["stage"], (0, 3))
    _choice("teacher.deepspeed.offload_param", tds["offload_param"], ("none", "cpu", "nvme"))
    if tds["offload_param"] != "none" and tds["stage"] != 3:
        raise ConfigError(f"teacher.deepspeed.offload_param: {tds['offload_param']!r} needs stage 3, got stage 0")
    if tds["offload_param"] == "nvme" and not tds["nvme_path"]:
        raise ConfigError("teacher.deepspeed.nvme_path: offload_param 'nvme' needs a folder, got null")
    _choice("student.deepspeed.stage", sds["stage"], (0, 1, 2, 3))
    _choice("student.deepspeed.precision", sds["precision"], ("fp32", "bf16"))
    for key in ("micro_batch_size", "gradient_accumulation_steps"):
        if sds[key] < 1:
            raise ConfigError(f"student.deepspeed.{key}: got {sds[key]}; expected an integer >= 1")
    if "type" not in sds["optimizer"]:
        raise ConfigError(
            f"student.deepspeed.optimizer: expected {{type: ..., params: {{...}}}}, got {sds['optimizer']!r}"
        )
    _check_named("student.deepspeed.optimizer", sds["optimizer"], DS_OPTIMIZERS, "torch.optim", _torch_names("optim"))
    if sds["scheduler"] is not None:
        _check_named(
            "student.deepspeed.scheduler",
            sds["scheduler"],
            DS_SCHEDULERS,
            "torch.optim.lr_scheduler",
            _torch_names("optim.lr_scheduler"),
        )
    if data["seq_len"] < 2:
        raise ConfigError(f"data.seq_len: got {data['seq_len']}; expected an integer >= 2")
    if not 0.0 < data["heldout_fraction"] < 1.0:
        raise ConfigError(f"data.heldout_fraction: got {data['heldout_fraction']}; expected a number in (0, 1)")
    _check_data_source(out)
    if data["tokenizer"] == "teacher" and teacher["model"] is None and teacher["cache"] is None:
        raise ConfigError(
            "data.tokenizer: 'teacher' needs 'teacher.model' (a teacher from 'teacher.config' has no "
            "tokenizer); set data.tokenizer to 'bytes', a builtin name or a tokenizer folder"
        )
    for key in ("max_steps", "eval_every", "save_every", "log_every"):
        least = 1 if key in ("max_steps", "log_every") else 0
        if sched[key] < least:
            raise ConfigError(f"schedule.{key}: got {sched[key]}; expected an integer >= {least}")
    at_least = {  # key: (value, least); None values mean "no limit" / "the default" and are not checked
        "run.threads": (run["threads"], 1),
        "run.keep_checkpoints": (run["keep_checkpoints"], 0),
        "schedule.eval_batches": (sched["eval_batches"], 1),
        "data.max_train_sequences": (data["max_train_sequences"], 1),
        "data.max_heldout_sequences": (data["max_heldout_sequences"], 1),
        "student.deepspeed.gradient_clipping": (sds["gradient_clipping"], 0),
        "teacher.deepspeed.prefetch_bucket_size": (tds["prefetch_bucket_size"], 0),
        "teacher.deepspeed.param_persistence_threshold": (tds["param_persistence_threshold"], 0),
        "teacher.deepspeed.max_live_parameters": (tds["max_live_parameters"], 0),
    }
    for key, (value, least) in at_least.items():
        if value is not None and value < least:
            raise ConfigError(f"{key}: got {value}; expected a number >= {least}")
    if sched["max_seconds"] is not None and (sched["max_seconds"] <= 0 or out["pools"] is not None):
        raise ConfigError(
            f"schedule.max_seconds: got {sched['max_seconds']!r}; expected null or a number > 0 (and no `pools`: the "
            "teacher pool serves max_steps steps)"
        )
    kd = next((x for x in out["losses"] if x["type"] == "logit_kd"), None)
    if kd is not None and kd.get("topk") and run["loss_impl"] != "fused":
        raise ConfigError("losses[].topk: sparse top-k KD needs run.loss_impl 'fused', got 'unfused'")
    if out["onpolicy"] is not None:
        from fastdistill.train import onpolicy

        out["onpolicy"] = onpolicy.validate(out, losses_given=isinstance(cfg, dict) and "losses" in cfg)
    if out["pools"] is not None:
        from fastdistill.train.pools import validate_pools

        out["pools"] = validate_pools(out, validate)
    return out


def load_config(path: str, overrides: list[str] | None = None) -> dict:
    """Read, override, resolve and validate the YAML run file at ``path``."""
    return validate(apply_overrides(read_yaml(path), overrides or []))


def dump_config(cfg: dict, path: str) -> None:
    """Write the resolved config atomically (the header says it is resolved)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("# resolved fastdistill run config (defaults filled in); re-run with:\n")
        f.write(f"#   fastdistill train --config {os.path.basename(path)}\n")
        yaml.safe_dump(cfg, f, sort_keys=False)
    os.replace(tmp, path)
