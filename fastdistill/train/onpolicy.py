"""On-policy distillation (GKD, Agarwal et al. 2024): the student writes completions, the teacher grades every token.

One more stage of the one recipe, placed between the data sampler and the teacher: ``OnPolicy.batch(k)`` has the
sampler's interface (``(input_ids, labels)`` of micro step ``k``), so the colocated teacher source scores whatever it
returns. Per micro step, with probability ``fraction`` (lambda) the batch's completions are replaced by the student's
own samples of its prompts (or, DistiLLM-style, a stored batch of earlier student samples is replayed); otherwise the
data's batch goes through unchanged, or with ``seq_kd`` the teacher's samples replace the completions. The loss then
runs on the completion tokens only: prompt positions and padding carry ``ignore_index`` labels, and the fused lm-head
loss drops those rows before any matmul (no [tokens x vocab] logits).

Generation reuses ``fastdistill.generate``: ``sample`` (batched, KV cache, one generator per row) inside ``unsharded``,
which all-gathers a ZeRO-3 model's parameters once per call and decodes on a bound replica with no hook and no
collective; every rank makes the same calls (the choices below do not depend on the rank).

Every random choice is a pure function of ``(run.seed, micro step, row)``: the student-or-data coin, the replay coin
and index, and each row's sampling generator. A resumed run therefore draws what the killed run would have drawn; the
only state is the replay buffer, saved per rank next to the DeepSpeed checkpoint (``onpolicy_rank{R}.pt``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import time

import torch

from fastdistill._config import ConfigError
from fastdistill.train.data import IGNORE_INDEX

DEFAULTS = {
    "fraction": 0.5,  # lambda: share of micro steps whose completions are the student's (TRL's lmbda)
    "max_new_tokens": 128,
    "temperature": 0.9,  # sampling temperature (TRL's GKD default); the loss's own is losses[].temperature
    "top_p": 1.0,
    # packed: the first prompt_tokens of each packed sequence; dataset: the data's prompts. Not given (or null): the
    # one data.format fits (validate); "packed" here for code that builds a config from these defaults
    "prompt": "packed",
    "prompt_tokens": None,  # packed only; None: data.seq_len // 2
    "seq_kd": False,  # the other (1 - fraction) micro steps: the teacher's samples instead of the data's text
    "replay_capacity": 0,  # student batches kept per rank for reuse (DistiLLM); 0: no replay buffer
    "replay_reuse": 0.5,  # probability that a student micro step reuses a stored batch instead of generating
}
# packed: the first prompt_tokens of each packed text sequence; dataset: the prompt of each prompt / completion example
# (data.format: prompt_completion; prompt_lengths reads it from the labels, ignored on the prompt). None: the one that
# fits data.format
PROMPTS = ("packed", "dataset")
# the loss a run with `onpolicy` gets when it names none: generalized JSD, beta 0.5 (TRL's GKDTrainer)
DEFAULT_LOSSES = [{"type": "logit_kd", "weight": 1.0, "divergence": "jsd", "beta": 0.5, "temperature": 1.0}]
STATE_FILE = "onpolicy_rank{rank}.pt"
TEACHER_SALT = 1  # the teacher's sampling stream (seq_kd) next to the student's (salt 0)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate(out: dict, losses_given: bool) -> dict | None:
    """Resolve ``out["onpolicy"]`` (the rest of ``out`` validated); raises ``ConfigError`` naming key and value."""
    given = out.get("onpolicy")
    if given is None:
        return None
    if not isinstance(given, dict):
        raise ConfigError(f"onpolicy: expected a mapping of on-policy settings (or null: off), got {given!r}")
    unknown = [k for k in given if k not in DEFAULTS]
    if unknown:
        raise ConfigError(f"unknown key 'onpolicy.{unknown[0]}'; expected one of {sorted(DEFAULTS)}")
    o = {**copy.deepcopy(DEFAULTS), **given}
    fmt = out["data"].get("format", "packed")
    if given.get("prompt") is None:
        o["prompt"] = "dataset" if fmt == "prompt_completion" else "packed"
    checks = [
        ("fraction", _is_num(o["fraction"]) and 0 <= o["fraction"] <= 1, "a number in [0, 1]"),
        ("max_new_tokens", _is_int(o["max_new_tokens"]) and o["max_new_tokens"] >= 1, "an integer >= 1"),
        ("temperature", _is_num(o["temperature"]) and o["temperature"] >= 0, "a number >= 0 (0: greedy)"),
        ("top_p", _is_num(o["top_p"]) and 0 < o["top_p"] <= 1, "a number in (0, 1]"),
        ("prompt", o["prompt"] in PROMPTS, f"one of {list(PROMPTS)}"),
        ("prompt_tokens", o["prompt_tokens"] is None or _is_int(o["prompt_tokens"]), "null or an integer"),
        ("seq_kd", isinstance(o["seq_kd"], bool), "true/false"),
        ("replay_capacity", _is_int(o["replay_capacity"]) and o["replay_capacity"] >= 0, "an integer >= 0"),
        ("replay_reuse", _is_num(o["replay_reuse"]) and 0 <= o["replay_reuse"] < 1, "a number in [0, 1)"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"onpolicy.{key}: got {o[key]!r}; expected {expected}")
    seq_len = out["data"]["seq_len"]
    if (o["prompt"] == "dataset") != (fmt == "prompt_completion"):
        raise ConfigError(
            f"onpolicy.prompt: got {o['prompt']!r} with data.format {fmt!r}; expected 'dataset' with "
            "'prompt_completion' data (the examples' own prompts) and 'packed' with packed text (or leave it out)"
        )
    if o["prompt"] == "dataset":
        if o["prompt_tokens"] is not None:
            raise ConfigError(
                f"onpolicy.prompt_tokens: got {o['prompt_tokens']}; expected null with onpolicy.prompt 'dataset' (each "
                "example's prompt is its own length)"
            )
        if not losses_given:
            out["losses"] = copy.deepcopy(DEFAULT_LOSSES)
        return o
    if o["prompt_tokens"] is None:
        o["prompt_tokens"] = seq_len // 2
    if not 1 <= o["prompt_tokens"] < seq_len:
        raise ConfigError(
            f"onpolicy.prompt_tokens: got {o['prompt_tokens']}; expected an integer in [1, data.seq_len - 1 = "
            f"{seq_len - 1}] (the first P tokens of each packed sequence are the prompt)"
        )
    if out["teacher"]["cache"] is not None:
        raise ConfigError(
            f"onpolicy: a teacher.cache ({out['teacher']['cache']!r}) holds targets for the data's own sequences, not "
            "for the student's completions; on-policy distillation needs a live teacher (teacher.model or "
            "teacher.config, without teacher.cache)"
        )
    # with `pools`, each student pool's section is checked again by fastdistill.train.pools_onpolicy.validate
    if not losses_given:
        out["losses"] = copy.deepcopy(DEFAULT_LOSSES)
    return o


def _coin(seed: int, step: int, salt: int) -> float:
    """A uniform draw in [0, 1) that depends only on (seed, micro step, salt): the same on every rank and on resume."""
    from fastdistill.generate.core import row_seed

    return random.Random(row_seed(seed, step, salt)).random()


def prompt_lengths(input_ids: torch.Tensor, labels: torch.Tensor, cfg: dict) -> list[int]:
    """Tokens of each row's prompt: the first ``prompt_tokens`` (packed) or everything before the first valid label
    plus one (split: the label at position t is token t + 1, so the first valid label is the completion's first
    token). A row without any valid label (batch padding) gets a one-token prompt; its labels stay ignored."""
    if cfg["prompt"] == "packed":
        return [cfg["prompt_tokens"]] * len(input_ids)
    valid = labels != IGNORE_INDEX
    first = torch.where(valid.any(-1), valid.int().argmax(-1), torch.zeros(len(labels), dtype=torch.long))
    return [int(f) + 1 for f in first]


def completion_batch(
    prompts: list[list[int]], completions: list[list[int]], real: list[bool], pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) [B, W] of ``prompt + completion`` rows, right-padded to the longest; labels are the next
    tokens on the completion only (position ``len(prompt) - 1`` predicts the first completion token, as TRL's GKD
    masks them), ``ignore_index`` on prompt positions, padding and rows that are not ``real``."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = torch.tensor(p + c, dtype=torch.long)
        input_ids[i, : len(seq)] = seq
        if real[i] and c:
            labels[i, len(p) - 1 : len(p) - 1 + len(c)] = torch.tensor(c, dtype=torch.long)
    return input_ids, labels


@contextlib.contextmanager
def _eval(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class OnPolicy:
    """The on-policy stage: ``batch(k)`` like ``fastdistill.train.data.Sampler``, with the completions replaced.

    Args:
        cfg: the resolved run config (its ``onpolicy`` section resolved by ``validate``).
        sampler: the data sampler (``batch(k) -> (input_ids, labels)``).
        student: the student ``*ForCausalLM`` (ZeRO-3 partitioned or not).
        teacher: the teacher ``*ForCausalLM`` (needed for ``seq_kd``).
        tokenizer: the run's tokenizer (its end-of-sequence ids end a completion).
        rank, world_size: this rank and the world (row ids, so every row of a step has its own generator).
    """

    def __init__(self, cfg: dict, sampler, student, teacher, tokenizer, rank: int, world_size: int):
        from fastdistill.generate import Codec
        from fastdistill.generate.core import _eos_ids

        self.o, self.seed = cfg["onpolicy"], cfg["run"]["seed"]
        self.sampler, self.student, self.teacher = sampler, student, teacher
        self.rank, self.world = rank, world_size
        self.mb = cfg["student"]["deepspeed"]["micro_batch_size"]
        self.codec = Codec(tokenizer)
        self.eos = _eos_ids(student, self.codec)
        self.buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.calls = self.gathers = 0  # generation calls; calls that all-gathered a ZeRO-3 model
        self.last_kind = "data"
        # with pools: the teacher pool samples a seq_kd step's completions, this callable receives them
        # (fastdistill.train.pools_onpolicy.StudentScoring)
        self.remote_teacher = None
        self._reset_stats()
        longest = (self.o["prompt_tokens"] or cfg["data"]["seq_len"]) + self.o["max_new_tokens"]
        for who, model in (("student", student), ("teacher", teacher)):
            limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            if limit is not None and longest > limit:
                raise ConfigError(
                    f"onpolicy.max_new_tokens: got {self.o['max_new_tokens']}; a prompt of up to "
                    f"{longest - self.o['max_new_tokens']} tokens plus the completion needs {longest} positions, the "
                    f"{who} has max_position_embeddings={limit}; expected max_new_tokens <= "
                    f"{limit - longest + self.o['max_new_tokens']}"
                )

    # -- the sampler interface ------------------------------------------------------------------------------------
    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, labels = self.sampler.batch(k)
        o = self.o
        if _coin(self.seed, k, 0) < o["fraction"]:
            if self.buffer and o["replay_capacity"] and _coin(self.seed, k, 1) < o["replay_reuse"]:
                # every rank's buffer has the same length (each stores one batch per generation): same index
                self.last_kind = "replay"
                out = self.buffer[int(_coin(self.seed, k, 2) * len(self.buffer))]
            else:
                self.last_kind = "student"
                out = self._generate(self.student, input_ids, labels, k, salt=0)
                if o["replay_capacity"]:
                    self.buffer.append(out)
                    del self.buffer[: -o["replay_capacity"]]
        elif o["seq_kd"]:
            self.last_kind = "teacher"
            out = self._generate(self.teacher, input_ids, labels, k, salt=TEACHER_SALT, remote=self.remote_teacher)
        else:
            self.last_kind = "data"
            return input_ids, labels
        self.stats[self.last_kind] += 1
        return out

    def prompts(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[list[list[int]], list[bool]]:
        """Each row's prompt tokens, and whether the row is real (not batch padding)."""
        lengths = prompt_lengths(input_ids, labels, self.o)
        real = [bool((row != IGNORE_INDEX).any()) for row in labels]
        return [input_ids[i, :n].tolist() for i, n in enumerate(lengths)], real

    def sample(self, model, prompts: list[list[int]], k: int, salt: int) -> list[list[int]]:
        """The completions ``model`` samples for this rank's ``prompts`` of micro step ``k`` (salt 0: the student's
        stream, ``TEACHER_SALT``: the teacher's). Each row has its own generator, seeded by its global row id, so the
        rows of a step come out the same however the ranks split them."""
        from fastdistill.generate.core import SamplingConfig, is_sharded, sample, unsharded

        o = self.o
        first = (k * self.world + self.rank) * self.mb  # a global row id: each row of each step its own generator
        sampling = SamplingConfig(
            temperature=o["temperature"],
            top_p=o["top_p"],
            max_new_tokens=o["max_new_tokens"],
            seed=self.seed * 2 + salt,  # student and teacher samples from different streams
        )
        with _eval(model), unsharded(model) as m:  # ZeRO-3: one all-gather for the whole call, every rank
            samples = sample(m, self.codec, prompts, list(range(first, first + len(prompts))), sampling, self.eos)
        self.calls += 1
        self.gathers += int(is_sharded(model))
        return [g[0].token_ids for g in samples]

    def _generate(self, model, input_ids, labels, k: int, salt: int, remote=None):
        """(input_ids, labels) of prompt + completion rows: sampled here by ``model``, or, with ``remote``, taken from
        ``remote(k, prompts)`` (with pools, the teacher pool's own samples for a ``seq_kd`` step)."""
        prompts, real = self.prompts(input_ids, labels)
        t0 = time.perf_counter()
        completions = remote(k, prompts) if remote is not None else self.sample(model, prompts, k, salt)
        self.stats["generate_s"] += time.perf_counter() - t0
        n = sum(len(c) for c, r in zip(completions, real) if r)
        self.stats["tokens"] += n
        self.stats["rows"] += sum(real)
        pad = self.eos[0] if self.eos else 0
        return completion_batch(prompts, completions, real, pad)

    # -- metrics ----------------------------------------------------------------------------------------------------
    def _reset_stats(self) -> None:
        self.stats = {"generate_s": 0.0, "tokens": 0, "rows": 0, "student": 0, "replay": 0, "teacher": 0}
        self.stats.update(kd_sum=0.0, kd_n=0)

    def record(self, parts: dict) -> None:
        """After the loss of the last batch: its per-token divergence counts when the student wrote the batch."""
        if self.last_kind in ("student", "replay") and "kd" in parts:
            self.stats["kd_sum"] += float(parts["kd"])
            self.stats["kd_n"] += 1

    def take_stats(self, step_seconds: float) -> dict:
        """This optimizer step's on-policy metrics, summed over ranks (one all-reduce, every rank calls it)."""
        import torch.distributed as dist

        s = self.stats
        keys = ("generate_s", "tokens", "rows", "student", "replay", "teacher", "kd_sum", "kd_n")
        vals = torch.tensor([float(s[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(vals)
        tot = dict(zip(keys, vals.tolist()))
        self.totals = {k: self.totals.get(k, 0.0) + v for k, v in tot.items()} if hasattr(self, "totals") else tot
        gen_s = s["generate_s"]  # this rank's own time: the wall-clock share of its step
        self._reset_stats()
        row = {
            "onpolicy/generate_s": gen_s,
            "onpolicy/generate_fraction": gen_s / max(step_seconds, 1e-9),
            "onpolicy/generated_tokens_per_s": tot["tokens"] / max(tot["generate_s"] / self.world, 1e-9)
            if tot["generate_s"]
            else 0.0,
            "onpolicy/student_batches": tot["student"] / self.world,
            "onpolicy/replayed_batches": tot["replay"] / self.world,
            "onpolicy/teacher_batches": tot["teacher"] / self.world,
        }
        if tot["rows"]:
            row["onpolicy/completion_len"] = tot["tokens"] / tot["rows"]
        if tot["kd_n"]:
            row["onpolicy/kd_on_student_samples"] = tot["kd_sum"] / tot["kd_n"]
        return row

    def summary(self, train_seconds: float) -> dict:
        t = getattr(self, "totals", {})
        gen_s = t.get("generate_s", 0.0) / self.world
        return {
            "onpolicy_generation_calls": self.calls,
            "onpolicy_gathers": self.gathers,
            "onpolicy_generate_seconds": gen_s,
            "onpolicy_generate_fraction": gen_s / max(train_seconds, 1e-9),
            "onpolicy_generated_tokens": int(t.get("tokens", 0)),
            "onpolicy_generated_tokens_per_s": t.get("tokens", 0) / max(gen_s * self.world, 1e-9) if gen_s else 0.0,
            "onpolicy_mean_completion_len": t.get("tokens", 0) / t["rows"] if t.get("rows") else None,
            "onpolicy_kd_on_student_samples": t["kd_sum"] / t["kd_n"] if t.get("kd_n") else None,
        }

    # -- checkpoint state -------------------------------------------------------------------------------------------
    def save(self, folder: str, rank: int) -> None:
        """The replay buffer of this rank (the draws need no state: they are functions of seed and step)."""
        path = os.path.join(folder, STATE_FILE.format(rank=rank))
        tmp = path + ".tmp"
        torch.save({"buffer": self.buffer, "calls": self.calls, "world_size": self.world}, tmp)
        os.replace(tmp, path)

    def load(self, folder: str, rank: int) -> bool:
        """Restore this rank's replay buffer; False when the checkpoint has none for this rank."""
        path = os.path.join(folder, STATE_FILE.format(rank=rank))
        if not os.path.isfile(path):
            return False
        state = torch.load(path, weights_only=False)
        if state.get("world_size") != self.world:
            return False
        self.buffer = list(state["buffer"])[-self.o["replay_capacity"] :] if self.o["replay_capacity"] else []
        self.calls = int(state.get("calls", 0))
        return True
