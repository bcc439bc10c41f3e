"""Safe resume: which checkpoint a run continues from, and whether the new config may continue it.

A checkpoint folder (``output_dir/checkpoints/stepNNNNNNN``) holds the config that wrote it (``config.yaml``) and
``state.json`` (step, world size). Before anything is built, the new config is compared with the saved one:

* keys that define the trained state or the data position (``FIXED`` below: the models, the student's ZeRO stage,
  precision and optimizer type, the batch shape, the data, the seed, losses that own parameters, and the world size when
  the optimizer state is partitioned over ranks) must be equal, else one ``ConfigError`` lists every difference
  (``old -> new``) and what to do instead;
* everything else may change (``schedule.*``, ``logging.*``, learning rate and scheduler, loss weights, eval sizes,
  ``run.threads``, ``run.keep_checkpoints``, the teacher's ZeRO stage, ...);
* a checkpoint already at ``schedule.max_steps`` is a finished run: ``RunFinished`` says so and how to extend it.

All of this reads small files only, so every rank reaches the same verdict without a collective.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any

import yaml

from fastdistill._config import ConfigError

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"

# (dotted key, why it cannot change): the checkpoint's weights, optimizer state or data position depend on it
FIXED = {
    "teacher.model": "the teacher being distilled",
    "teacher.gguf_file": "the teacher being distilled",
    "teacher.config": "the teacher being distilled",
    "student.model": "the student's weights",
    "student.config": "the student's weights",
    "student.init_from_teacher": "the student's weights",
    "student.freeze_embeddings": "which parameters the optimizer state holds",
    "student.dtype": "the student's weights",
    "student.deepspeed.stage": "the layout of the saved optimizer state",
    "student.deepspeed.precision": "the layout of the saved optimizer state",
    "student.deepspeed.optimizer.type": "the saved optimizer state",
    "student.deepspeed.extra": "the student's DeepSpeed engine",
    "student.deepspeed.micro_batch_size": "the data position (sequences per step)",
    "student.deepspeed.gradient_accumulation_steps": "the data position (sequences per step)",
    "data.source": "the data position",
    "data.tokenizer": "the data position",
    "data.seq_len": "the data position",
    "data.heldout_fraction": "the data position (the training split)",
    "data.max_train_sequences": "the data position (the training split)",
    "run.seed": "the data order",
}


class RunFinished(Exception):
    """The checkpoint to resume is already at (or past) ``schedule.max_steps``: nothing to train."""


@dataclass
class Checkpoint:
    folder: str  # output_dir/checkpoints/stepNNNNNNN
    step: int | None
    world_size: int | None
    config: dict | None  # the resolved config that wrote it (None: an old checkpoint without config.yaml)


def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _learned_losses(losses: list | None) -> list:
    """The losses that own trained parameters (a ``hint`` holds a learned projection per mapped layer)."""
    return [{"type": x["type"], "layer_map": x.get("layer_map")} for x in losses or [] if x.get("type") == "hint"]


def is_checkpoint(folder: str) -> bool:
    """A DeepSpeed checkpoint root (with ``latest``) or one of its tag folders."""
    return os.path.isfile(os.path.join(folder, "latest")) or bool(glob.glob(os.path.join(folder, "*model_states.pt")))


def locate(cfg: dict) -> str | None:
    """The checkpoint tag folder ``cfg`` resumes from (None: a fresh start); ``run.resume`` checked."""
    resume, out = cfg["run"]["resume"], cfg["run"]["output_dir"]
    if resume == "never":
        return None
    root = os.path.join(out, CHECKPOINTS) if resume == "auto" else resume
    if resume != "auto":
        if not os.path.isdir(resume):
            raise ConfigError(
                f"run.resume: checkpoint folder {resume!r} does not exist; expected 'auto', 'never' or a checkpoint "
                f"folder such as {os.path.join(out, CHECKPOINTS)!r} or one of its step folders"
            )
        if not is_checkpoint(resume):
            raise ConfigError(
                f"run.resume: {resume!r} holds no DeepSpeed checkpoint (no 'latest' file, no *model_states.pt); "
                "expected 'auto', 'never' or a folder written by fastdistill train (checkpoints/ or checkpoints/stepN)"
            )
    latest = os.path.join(root, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            return os.path.join(root, f.read().strip())
    return root if resume != "auto" else None


def read(folder: str) -> Checkpoint:
    """What a checkpoint folder says about itself, from its small files."""
    config = step = world = None
    cfg_file, state_file = os.path.join(folder, "config.yaml"), os.path.join(folder, STATE_FILE)
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            config = yaml.safe_load(f)
    if os.path.isfile(state_file):
        with open(state_file) as f:
            state = json.load(f)
        step, world = state.get("step"), state.get("world_size")
    else:  # written before state.json existed: the tag and the per-rank optimizer shards tell the same
        tag = os.path.basename(folder.rstrip("/"))
        step = int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None
        shards = glob.glob(os.path.join(folder, "*zero_pp_rank_*_optim_states.pt"))
        world = len(shards) or None
    return Checkpoint(folder, step, world, config)


def write_state(folder: str, step: int, world_size: int) -> None:
    tmp = os.path.join(folder, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "world_size": world_size}, f)
    os.replace(tmp, os.path.join(folder, STATE_FILE))


def differences(old: dict, new: dict, old_world: int | None, new_world: int) -> list[str]:
    """``key old -> new`` for every key that may not change between ``old`` (the checkpoint's) and ``new``."""
    diffs = []
    for key in FIXED:
        a, b = _get(old, key), _get(new, key)
        if a != b:
            diffs.append(f"{key} {_short(a)} -> {_short(b)}")
    a, b = _learned_losses(old.get("losses")), _learned_losses(new.get("losses"))
    if a != b:
        diffs.append(f"losses with learned parameters (hint) {_short(a)} -> {_short(b)}")
    stage = _get(old, "student.deepspeed.stage")
    if old_world is not None and old_world != new_world and stage != 0:
        # ZeRO 1-3 saves one optimizer shard per rank; the data order also depends on the world size
        diffs.append(f"world size {old_world} -> {new_world} (ZeRO stage {stage} saved one optimizer shard per rank)")
    return diffs


def check(cfg: dict, world_size: int) -> Checkpoint | None:
    """The checkpoint ``cfg`` resumes from after checking that it may (None: a fresh start).

    Raises ``ConfigError`` (incompatible config, bad ``run.resume``) or ``RunFinished`` (nothing left to train)."""
    folder = locate(cfg)
    if folder is None:
        return None
    ckpt = read(folder)
    fresh = (
        "to start a new run instead: run.resume=never (replaces the checkpoints in that folder) or another "
        "run.output_dir"
    )
    if ckpt.config is not None:
        diffs = differences(ckpt.config, cfg, ckpt.world_size, world_size)
        if diffs:
            raise ConfigError(
                f"run.resume={cfg['run']['resume']!r}: the checkpoint {folder!r} (step {ckpt.step}) was written by a "
                f"config that differs in what a resume cannot change: {'; '.join(diffs)}. To continue it, keep the "
                f"old values; {fresh}"
            )
    max_steps = cfg["schedule"]["max_steps"]
    if ckpt.step is not None and ckpt.step >= max_steps:
        raise RunFinished(
            f"the checkpoint {folder!r} is already at step {ckpt.step} of schedule.max_steps={max_steps}: nothing to "
            f"train. To train further, pass a larger schedule.max_steps (e.g. schedule.max_steps={2 * ckpt.step}; "
            f"it continues from step {ckpt.step}); {fresh}"
        )
    return ckpt
