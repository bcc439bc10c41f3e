"""Data: text -> token ids -> fixed-length packed sequences, a held-out split, and a deterministic per-rank sampler.

The default corpus is the English text of Python's documentation topics (``pydoc_data.topics``, shipped with every
CPython). Documents are tokenized, joined with the end-of-text token and cut into sequences of ``seq_len`` tokens; the
last ``heldout_fraction`` of the stream is held out (a contiguous tail, so no sequence straddles the split).

Batches are a pure function of the micro-step index (epoch = a fresh seeded permutation), so the data position of a
checkpoint is one integer and a resumed run reads exactly the batches the killed one would have. Every rank gets
``micro_batch_size`` rows per micro step; the last, partial global batch is padded with rows whose labels are all
``ignore_index``, so every rank runs the teacher forward the same number of times with the same shapes.
"""

from __future__ import annotations

import math

import torch

from fastdistill._config import ConfigError

IGNORE_INDEX = -100


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


def split(sequences: torch.Tensor, heldout_fraction: float, max_train: int | None, max_heldout: int | None):
    n_held = max(1, int(round(len(sequences) * heldout_fraction)))
    train, held = sequences[:-n_held], sequences[-n_held:]
    if max_train is not None:
        train = train[:max_train]
    if max_heldout is not None:
        held = held[:max_heldout]
    if len(train) == 0:
        raise ConfigError(
            f"data: no training sequences left ({len(sequences)} packed sequences in all); "
            "lower data.seq_len or data.heldout_fraction"
        )
    return train, held


def train_heldout(cfg: dict, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's packed training and held-out sequences (the trainer and ``teacher-cache build`` share this)."""
    d = cfg["data"]
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
        """(input_ids, labels), both [micro_batch_size, seq_len]; padding rows carry only ``IGNORE_INDEX`` labels."""
        epoch, j = divmod(k, self.batches_per_epoch)
        rows = self._permutation(epoch)[j * self.global_batch : (j + 1) * self.global_batch]
        rows = rows[self.rank * self.mb : (self.rank + 1) * self.mb]
        input_ids = self.sequences[rows]
        labels = labels_for(input_ids)
        missing = self.mb - len(rows)
        if missing:
            pad = torch.zeros(missing, self.sequences.shape[1], dtype=torch.long)
            input_ids = torch.cat([input_ids, pad])
            labels = torch.cat([labels, torch.full_like(pad, IGNORE_INDEX)])
        return input_ids, labels
