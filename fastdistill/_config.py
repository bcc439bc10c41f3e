"""What every ``fastdistill`` command's YAML config shares: the error type and the ``key=value`` override syntax.

``fastdistill train`` and ``fastdistill dataset-distill`` both take ``--config RUN.yaml`` followed by overrides such as
``schedule.max_steps=20`` or ``distill.iterations=50``: the key is a dotted path into the YAML mapping, the value is
parsed as YAML (``[0, 5]`` is a list, ``null`` is None, ``1e-3`` a number, although YAML 1.1 alone would read it as a
string). One parser, so the syntax is the same
everywhere.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import yaml

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration or environment problem; the message names the key, the value given and what was expected.

    The command-line entry points print it as one line (``fastdistill <command>: config error: ...``) and exit 2."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (``["a", "b", "c"]``, the value parsed as YAML; an empty value is None)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. schedule.max_steps=10)")
    key, value = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: expected a dotted key such as student.deepspeed.stage")
    if value == "":
        return key.split("."), None
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({first})") from None
    if isinstance(parsed, str) and _FLOAT.fullmatch(parsed):
        parsed = float(parsed)  # YAML 1.1 reads 1e-3 (no dot) as a string; on a command line it is a number
    return key.split("."), parsed


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """A copy of ``cfg`` with each ``key=value`` of ``overrides`` set (missing sections are created)."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        path, value = parse_override(text)
        node = cfg
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return cfg


def read_yaml(path: str) -> dict:
    """The top-level mapping of the YAML file ``path`` (an empty file is ``{}``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {path!r} does not exist")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            first = " ".join(str(e).split())
            raise ConfigError(f"--config {path!r}: not valid YAML ({first})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def check_writable(key: str, path: str) -> None:
    """``path`` exists as a writable folder, or can be created (its nearest existing parent is a writable folder)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe == os.path.abspath(path) and not os.path.isdir(probe):
        raise ConfigError(f"{key}: {path!r} is a file; expected a folder to write the run into")
    if not os.path.isdir(probe):
        raise ConfigError(f"{key}: {path!r} cannot be created: {probe!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key}: {path!r} is not writable ({probe!r}: permission denied or a read-only filesystem); expected a "
            "folder you can write to"
        )
