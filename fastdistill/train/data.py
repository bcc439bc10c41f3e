"""Data: text -> token ids -> fixed-length packed sequences (or prompt / completion examples), a held-out split, and a
deterministic per-rank sampler.

The default corpus is the English text of Python's documentation topics (``pydoc_data.topics``, shipped with every
CPython). Documents are tokenized, joined with the end-of-text token and cut into sequences of ``seq_len`` tokens; the
last ``heldout_fraction`` of the stream is held out (a contiguous tail, so no sequence straddles the split).

Batches are a pure function of the micro-step index (epoch = a fresh seeded permutation), so the data position of a
checkpoint is one integer and a resumed run reads exactly the batches the killed one would have. Every rank gets
``micro_batch_size`` rows per micro step; the last, partial global batch is padded with rows whose labels are all
``ignore_index``, so every rank runs the teacher forward the same number of times with the same shapes.

``data.format: prompt_completion`` reads examples instead of text: rows of a JSONL / Parquet / Arrow file with
``prompt`` + ``completion`` strings or chat ``messages`` (the tokenizer's chat template applied when it has one), or
the builtin ``pydoc_qa`` (passages of the same documentation topics split into a prompt and its continuation). Each
example is one row, ``prompt + completion`` right-padded to the longest row of its batch; its labels are the completion
only (``ignore_index`` on prompt and padding), so the loss, the held-out perplexity and the on-policy stage's prompts
all come from the one split.
"""

from __future__ import annotations

import math

import torch

from fastdistill._config import ConfigError

IGNORE_INDEX = -100


FORMATS = ("packed", "prompt_completion")
EXAMPLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".feather")


def load_text(source: str) -> list[str]:
    if source == "pydoc_topics":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    with open(source, encoding="utf-8") as f:
        return [doc for doc in f.read().split("\n\n\n") if doc.strip()]


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256): data for tiny test models without a tokenizer file."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def pack(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize ``docs``, join them with the end-of-text token and cut into [num_sequences, seq_len] (tail dropped)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for doc in docs:
        ids.extend(
            tokenizer.encode(doc)
            if isinstance(tokenizer, ByteTokenizer)
            else tokenizer(doc, add_special_tokens=False)["input_ids"]
        )
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ---------------------------------------------------------------------------------------------------------------
# prompt / completion examples
# ---------------------------------------------------------------------------------------------------------------
class Examples:
    """Prompt / completion examples as rows: ``input_ids`` [N, W] (right-padded with ``pad``), ``labels`` [N, W]
    (the next token on completion positions, ``ignore_index`` elsewhere) and ``lengths`` [N] (real tokens per row).
    Indexing by a tensor of rows gives the rows cut to their longest real row."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor, pad: int):
        self.input_ids, self.labels, self.lengths, self.pad = input_ids, labels, lengths, pad

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, rows) -> Examples:
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        return Examples(self.input_ids[rows], self.labels[rows], self.lengths[rows], self.pad)

    def rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(int(self.lengths[rows].max()), 2) if len(rows) else 2
        return self.input_ids[rows, :width], self.labels[rows, :width]


def pydoc_qa() -> list[dict]:
    """A small offline prompt / completion set from ``pydoc_data.topics`` (shipped with CPython): every prose
    paragraph of >= 120 characters becomes one chat example, the user giving its first sentence (40-160 characters) and
    the topic, the assistant continuing with the rest of the paragraph (about 1000 examples)."""
    import re
    from pydoc_data.topics import topics

    out = []
    for topic in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[topic]):
            para = " ".join(para.split())
            if len(para) < 120 or para.startswith(("*", "-", "=", ">>>", "|", "+")):
                continue
            cut = para.find(". ", 40)
            if not 0 < cut <= 160 or len(para) - cut < 40:  # a long or missing first sentence: cut at a space
                cut = para.rfind(" ", 40, min(160, len(para) // 2))
            head, tail = para[: cut + 1].strip(), para[cut + 1 :].strip()
            out.append(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": f"Continue this passage of the Python documentation ({topic}):\n{head}",
                        },
                        {"role": "assistant", "content": tail},
                    ]
                }
            )
    return out


def read_records(source: str) -> list[dict]:
    """Rows of a JSONL (or JSON list) / Parquet / Arrow (IPC file or stream, Feather) file as dicts."""
    if source == "pydoc_qa":
        return pydoc_qa()
    lower = source.lower()
    if lower.endswith((".jsonl", ".json")):
        import json

        with open(source, encoding="utf-8") as f:
            text = f.read()
        if lower.endswith(".json") and text.lstrip().startswith("["):
            return json.loads(text)
        out = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"data.source: {source} line {i + 1} is not JSON ({e.msg})") from None
        return out
    import pyarrow as pa

    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(source)
    else:
        try:
            table = pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_stream(source).read_all()
    return table.to_pylist()


def _ids(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def encode_example(record, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one record: ``prompt`` + ``completion`` strings (the completion ends with the
    tokenizer's end-of-sequence token), or chat ``messages`` whose last turn is the assistant's completion (the chat
    template when the tokenizer has one, else ``role: content`` lines)."""
    if not isinstance(record, dict):
        raise ConfigError(
            f"data.source: {where} is {type(record).__name__}; expected a mapping with 'prompt' and 'completion' "
            "strings or a 'messages' list"
        )
    if "messages" in record:
        msgs = record["messages"]
        ok = (
            isinstance(msgs, list)
            and len(msgs) >= 2
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        )
        if not ok or msgs[-1]["role"] != "assistant":
            raise ConfigError(
                f"data.source: {where} 'messages': expected a list of >= 2 {{role, content}} strings ending with the "
                f"assistant's turn (the completion), got {str(msgs)[:200]}"
            )
        if not msgs[-1]["content"].strip():
            raise ConfigError(f"data.source: {where}: the last (assistant) message is empty; expected a completion")
        if getattr(tokenizer, "chat_template", None):
            prompt = _chat_ids(tokenizer, msgs[:-1], True)
            full = _chat_ids(tokenizer, msgs, False)
            if full[: len(prompt)] != prompt:
                raise ConfigError(
                    f"data.source: {where}: the tokenizer's chat template renders the conversation with a prefix "
                    "different from its prompt; expected a template that appends turns"
                )
            return prompt, full[len(prompt) :]
        prompt_text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:-1]) + "assistant: "
        record = {"prompt": prompt_text, "completion": msgs[-1]["content"]}
    missing = [k for k in ("prompt", "completion") if not isinstance(record.get(k), str)]
    if missing:
        raise ConfigError(
            f"data.source: {where} has no string field(s) {missing} (fields: {sorted(record)}); expected 'prompt' and "
            "'completion' strings or a chat 'messages' list"
        )
    if not record["prompt"].strip():
        raise ConfigError(f"data.source: {where}: 'prompt' is empty; expected the text the completion follows")
    if not record["completion"].strip():
        raise ConfigError(f"data.source: {where}: 'completion' is empty; expected the text to learn")
    eos = getattr(tokenizer, "eos_token_id", None)
    return _ids(tokenizer, record["prompt"]), _ids(tokenizer, record["completion"]) + ([eos] if eos is not None else [])


def load_examples(source: str, tokenizer, seq_len: int) -> Examples:
    """Tokenize every record of ``source``; a completion is cut to fit ``seq_len`` (prompt + completion), a prompt of
    ``seq_len`` tokens or more is an error naming the row."""
    records = read_records(source)
    if not records:
        raise ConfigError(f"data.source: {source!r} holds no examples; expected prompt / completion rows")
    pad = getattr(tokenizer, "eos_token_id", None) or 0
    n = len(records)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.zeros(n, dtype=torch.long)
    for i, record in enumerate(records):
        where = f"{source} row {i}"
        prompt, completion = encode_example(record, tokenizer, where)
        if not prompt:
            raise ConfigError(f"data.source: {where}: the prompt encodes to no tokens; expected a non-empty prompt")
        if len(prompt) >= seq_len:
            raise ConfigError(
                f"data.seq_len: {where} has a prompt of {len(prompt)} tokens; expected data.seq_len ({seq_len}) to "
                "exceed every prompt (raise data.seq_len or shorten the prompt)"
            )
        completion = completion[: seq_len - len(prompt)]
        seq = prompt + completion
        input_ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(prompt) - 1 : len(seq) - 1] = torch.tensor(completion)
        lengths[i] = len(seq)
    return Examples(input_ids, labels, lengths, pad)


def split(sequences, heldout_fraction: float, max_train: int | None, max_heldout: int | None):
    n_held = max(1, int(round(len(sequences) * heldout_fraction)))
    train, held = sequences[:-n_held], sequences[-n_held:]
    if max_train is not None:
        train = train[:max_train]
    if max_heldout is not None:
        held = held[:max_heldout]
    if len(train) == 0:
        raise ConfigError(
            f"data: no training sequences left ({len(sequences)} sequences / examples in all); "
            "lower data.seq_len or data.heldout_fraction"
        )
    return train, held


def train_heldout(cfg: dict, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's packed training and held-out sequences (the trainer and ``teacher-cache build`` share this)."""
    d = cfg["data"]
    if d.get("format", "packed") == "prompt_completion":
        examples = load_examples(d["source"], tokenizer, d["seq_len"])
        return split(examples, d["heldout_fraction"], d["max_train_sequences"], d["max_heldout_sequences"])
    sequences = pack(load_text(d["source"]), tokenizer, d["seq_len"])
    return split(sequences, d["heldout_fraction"], d["max_train_sequences"], d["max_heldout_sequences"])


def labels_for(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token labels: position t predicts token t+1; the last position of each row has no label."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


class Sampler:
    """Rows of micro step ``k`` for ``rank``: a pure function of (seed, k), identical on every run."""

    def __init__(
        self,
        sequences: torch.Tensor,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
    ):
        self.sequences, self.mb, self.rank, self.world, self.seed = sequences, micro_batch_size, rank, world_size, seed
        self.shuffle = shuffle
        self.global_batch = micro_batch_size * world_size
        self.batches_per_epoch = math.ceil(len(sequences) / self.global_batch)
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(len(self.sequences), generator=g)
            else:
                self._perm = torch.arange(len(self.sequences))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), both [micro_batch_size, seq_len] (prompt / completion examples: [micro_batch_size, the
        longest row of the batch]); padding rows carry only ``IGNORE_INDEX`` labels."""
        epoch, j = divmod(k, self.batches_per_epoch)
        rows = self._permutation(epoch)[j * self.global_batch : (j + 1) * self.global_batch]
        rows = rows[self.rank * self.mb : (self.rank + 1) * self.mb]
        if isinstance(self.sequences, Examples):  # prompt / completion rows: labels on the completion only
            input_ids, labels = self.sequences.rows(rows)
        else:
            input_ids = self.sequences[rows]
            labels = labels_for(input_ids)
        missing = self.mb - len(rows)
        if missing:
            pad = torch.zeros(missing, input_ids.shape[1], dtype=torch.long)
            input_ids = torch.cat([input_ids, pad])
            labels = torch.cat([labels, torch.full_like(pad, IGNORE_INDEX)])
        return input_ids, labels
