"""Prompt sets: records read from a file, rendered through a template, optionally wrapped in the chat template.

A template is a Python format string whose ``{field}`` placeholders name record fields (``{{`` / ``}}`` for literal
braces). Records come from ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects), ``.csv`` (a header
row), ``.parquet`` or ``.txt`` (one record ``{"text": line}`` per non-empty line).
"""

from __future__ import annotations

import csv
import json
import os
import string
from dataclasses import dataclass


class PromptError(ValueError):
    """A problem with a template or a prompt file; the message names what was given and what was expected."""


@dataclass
class Prompt:
    id: int  # position in the prompt set: seeds the prompt's samples and names it in the output
    key: str  # the record's own id (``id_field``) or str(id)
    text: str  # the rendered prompt, chat template applied
    fields: dict


def placeholders(template: str, what: str = "template") -> list[str]:
    """The field names ``template`` uses, in order (a malformed template is a ``PromptError``)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise PromptError(
            f"{what}: {template!r} is not a valid format string ({e}); write literal braces as {{{{ }}}}"
        ) from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise PromptError(f"{what}: {template!r} has a positional placeholder {{{name}}}; expected {{field_name}}")
        names.append(name.split(".")[0].split("[")[0])
    return list(dict.fromkeys(names))


def check_template(template: str, required: list[str] | tuple = (), what: str = "template") -> list[str]:
    """The placeholders of ``template``; a ``PromptError`` when one of ``required`` is missing."""
    if not isinstance(template, str) or not template.strip():
        raise PromptError(f"{what}: expected a non-empty string, got {template!r}")
    names = placeholders(template, what)
    missing = [r for r in required if r not in names]
    if missing:
        raise PromptError(
            f"{what}: {template!r} lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)} it needs"
        )
    return names


def render(template: str, record: dict, where: str, what: str = "template") -> str:
    names = placeholders(template, what)
    missing = [n for n in names if n not in record]
    if missing:
        raise PromptError(
            f"{where}: the record has no field(s) {missing} that {what} uses; it has {sorted(record)} (record: "
            f"{str(record)[:200]})"
        )
    return template.format(**record)


def read_records(path: str) -> list[dict]:
    """The records of a prompt file (see the module docstring); an empty or malformed file is a ``PromptError``."""
    if not os.path.isfile(path):
        raise PromptError(f"prompts.source: file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    records: list[dict]
    if ext == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptError(
                        f"{path}:{n}: not valid JSON ({e.msg}); expected one JSON object per line"
                    ) from None
                if not isinstance(rec, dict):
                    raise PromptError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
                records.append(rec)
    elif ext == ".json":
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise PromptError(f"{path}: expected a JSON list of objects")
    elif ext == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            records = [dict(r) for r in csv.DictReader(f)]
    elif ext == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    elif ext == ".txt":
        with open(path, encoding="utf-8") as f:
            records = [{"text": line.rstrip("\n")} for line in f if line.strip()]
    else:
        raise PromptError(
            f"prompts.source: {path!r} has extension {ext!r}; expected .jsonl, .json, .csv, .parquet or .txt"
        )
    if not records:
        raise PromptError(f"prompts.source: {path!r} holds no records (empty file)")
    return records


class Codec:
    """One interface over a Hugging Face tokenizer or the trainer's byte tokenizer: encode, decode, the chat
    template (when the tokenizer has one) and the end-of-sequence ids."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.hf = hasattr(tokenizer, "convert_tokens_to_ids")

    @property
    def has_chat_template(self) -> bool:
        return self.hf and getattr(self.tok, "chat_template", None) is not None

    def encode(self, text: str) -> list[int]:
        if self.hf:
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if self.hf:
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    @property
    def eos_token_id(self):
        return getattr(self.tok, "eos_token_id", None)

    def chat(self, user: str, system: str | None = None, assistant_prefix: str = "") -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + assistant_prefix


def build_prompts(
    records: list[dict],
    template: str,
    codec: Codec,
    *,
    chat_template: str | bool = "auto",
    system: str | None = None,
    id_field: str | None = None,
    assistant_prefix: str = "",
    where: str = "prompts",
) -> list[Prompt]:
    """Render every record: ``template`` -> (chat template with optional ``system`` message, when ``chat_template``
    is True, or "auto" and the tokenizer has one) -> the text to continue (+ ``assistant_prefix``)."""
    check_template(template, what=f"{where}.template")
    if chat_template not in ("auto", True, False):
        raise PromptError(f"{where}.chat_template: got {chat_template!r}; expected auto, true or false")
    if chat_template is True and not codec.has_chat_template:
        raise PromptError(f"{where}.chat_template: true, but the tokenizer has no chat template; use auto or false")
    use_chat = codec.has_chat_template if chat_template == "auto" else chat_template
    out = []
    for i, rec in enumerate(records):
        user = render(template, rec, f"{where} record {i}", f"{where}.template")
        text = codec.chat(user, system, assistant_prefix) if use_chat else user + assistant_prefix
        if id_field is not None and id_field not in rec:
            raise PromptError(f"{where}.id_field: record {i} has no field {id_field!r}; it has {sorted(rec)}")
        key = str(rec[id_field]) if id_field is not None else str(i)
        out.append(Prompt(i, key, text, rec))
    return out
