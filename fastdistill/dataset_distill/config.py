"""YAML configuration of a trajectory-matching run (one run = one file; the launch command sits in its header).

Every section is a dataclass; loading checks every key: an unknown key, a wrong type or a value out of range is a
:class:`ConfigError` that names the key, what was given and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from fastdistill._config import ConfigError, apply_overrides, read_yaml
from fastdistill.dataset_distill.core import UNROLL_MODES
from fastdistill.dataset_distill.data import DATASETS

__all__ = ["ConfigError", "RunConfig", "from_dict", "load_config", "save_resolved", "to_dict"]


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | digits
    root: str | None = None  # folder of the IDX files; default: Debian's /usr/share/datasets/fashion-mnist
    train_subset: int | None = None  # experts train on this many random training images (None: all)


@dataclass
class ModelConfig:
    width: int = 32
    depth: int = 3


@dataclass
class ExpertConfig:
    num_experts: int = 5
    epochs: int = 10
    lr: float = 0.01  # plain SGD, no momentum (MTT)
    batch_size: int = 256


@dataclass
class DistillConfig:
    ipc: int = 10  # synthetic images per class
    iterations: int = 300
    syn_steps: int = 20  # N: student SGD steps per iteration
    expert_epochs: int = 2  # M: the target is the expert M epochs after the start
    max_start_epoch: int = 5  # the start epoch t is drawn from [0, max_start_epoch)
    batch_syn: int | None = None  # synthetic images per student step (None: all)
    lr_images: float = 100.0
    lr_lr: float = 1e-5
    lr_init: float = 0.01  # initial student learning rate alpha
    momentum: float = 0.5
    unroll: str = "exact"  # bptt | first_order | exact
    checkpoint_every_iterate: int | None = None  # exact/first_order: keep every k-th parameter iterate only
    augment: bool = True
    init: str = "real"  # real (random real images per class) | noise
    dtype: str = "float32"
    checkpoint_every: int = 25  # iterations between checkpoints of the synthetic set
    log_every: int = 10


@dataclass
class EvalConfig:
    runs: int = 5
    epochs: int = 300
    batch_size: int = 256
    lr: float = 0.01  # random real subset (and the distilled set when use_learned_lr is false)
    use_learned_lr: bool = True  # train on the distilled set with its learned alpha (as MTT)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True


@dataclass
class RunConfig:
    run_dir: str = "runs/mtt"
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    @property
    def expert_dir(self) -> str:
        return os.path.join(self.run_dir, "experts")


CHOICES = {
    "data.name": DATASETS,
    "distill.unroll": UNROLL_MODES,
    "distill.init": ("real", "noise"),
    "distill.dtype": ("float32", "float64"),
}
POSITIVE = {
    "model.width",
    "model.depth",
    "experts.num_experts",
    "experts.epochs",
    "experts.lr",
    "experts.batch_size",
    "distill.ipc",
    "distill.iterations",
    "distill.syn_steps",
    "distill.expert_epochs",
    "distill.max_start_epoch",
    "distill.batch_syn",
    "distill.lr_images",
    "distill.lr_lr",
    "distill.lr_init",
    "distill.checkpoint_every",
    "distill.log_every",
    "distill.checkpoint_every_iterate",
    "evaluate.runs",
    "evaluate.epochs",
    "evaluate.batch_size",
    "evaluate.lr",
    "threads",
    "data.train_subset",
}


def _type_name(tp) -> str:
    return " or ".join("null" if a is type(None) else a.__name__ for a in typing.get_args(tp)) or tp.__name__


def _check_value(key: str, value, tp):
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key}: null given; expected {_type_name(tp)}")
    for opt in options:
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt in (bool, str) and isinstance(value, opt):
            return value
    raise ConfigError(f"{key}: {value!r} ({type(value).__name__}) given; expected {_type_name(tp)}")


def _build(cls, raw, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: {type(raw).__name__} given; expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key {prefix + str(unknown[0])!r}; expected one of {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        key, tp = prefix + name, hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
            continue
        value = _check_value(key, value, tp)
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key}: {value!r} given; expected one of {CHOICES[key]}")
        if key in POSITIVE and value is not None and value <= 0:
            raise ConfigError(f"{key}: {value!r} given; expected a positive number")
        kwargs[name] = value
    return cls(**kwargs)


def from_dict(raw: dict) -> RunConfig:
    cfg = _build(RunConfig, raw, "")
    d = cfg.distill
    if d.expert_epochs + d.max_start_epoch > cfg.experts.epochs + 1:
        raise ConfigError(
            f"distill.max_start_epoch + distill.expert_epochs = {d.max_start_epoch + d.expert_epochs} "
            f"needs expert snapshots past experts.epochs={cfg.experts.epochs}; expected at most "
            f"{cfg.experts.epochs + 1}"
        )
    if d.batch_syn is not None and d.batch_syn > d.ipc * 10:
        raise ConfigError(f"distill.batch_syn: {d.batch_syn} given; expected at most ipc x classes = {d.ipc * 10}")
    return cfg


def load_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    """Read the YAML run file at ``path``, apply ``key=value`` overrides (``distill.iterations=50``) and check it."""
    return from_dict(apply_overrides(read_yaml(path), overrides or []))


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: RunConfig, path: str) -> None:
    from fastdistill.dataset_distill._io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
