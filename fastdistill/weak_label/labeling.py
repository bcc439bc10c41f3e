"""Teacher weak labels (Deng et al. 2022): a prompt per example, N sampled chain-of-thought continuations, the label
distribution after each chain read from the verbalizers' probabilities, and an aggregation over the N samples.

Per example and sample j, ``q_j`` is the distribution over the L labels: the teacher's probability of each label's
verbalizer (summed token log-probs when a verbalizer is several tokens) after prompt + chain j + answer prompt,
renormalised over the labels. Aggregation rules over the first n samples, each giving a distribution ``p``:

=============  ==============================================================================================
``prob_mean``  label-token probability averaging: ``p = mean_j q_j``
``majority``   majority vote: ``p(l)`` = fraction of samples whose most likely label is l
``score_mean`` mean of per-sample scores: each sample's score is its label log-probabilities (for two labels, the
               log-odds ``log q(pos) - log q(neg)``); their mean, renormalised, is ``p`` (the normalised
               geometric mean of the ``q_j``)
=============  ==============================================================================================

An example's score on the rating scale is ``E_p[value]`` (each label has a value, e.g. positive 1, negative -1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastdistill.generate.prompts import Codec, Prompt, PromptError, check_template

RULES = ("prob_mean", "majority", "score_mean")


@dataclass
class Task:
    template: str  # needs {text}
    labels: list[str]
    verbalizers: list[str]
    values: list[float]
    chain_of_thought: bool
    answer_prompt: str  # after the chain (or right after the prompt without one), before the verbalizer
    system: str | None = None
    chat_template: str | bool = "auto"

    def __post_init__(self):
        check_template(self.template, ["text"], "task.template")
        if len(self.labels) < 2:
            raise PromptError(f"task.labels: got {self.labels!r}; expected at least two labels")
        if len(set(self.labels)) != len(self.labels):
            raise PromptError(f"task.labels: got {self.labels!r}; expected distinct names")
        if len(self.verbalizers) != len(self.labels) or len(self.values) != len(self.labels):
            raise PromptError(
                f"task.labels: every label needs a verbalizer and a value; got {len(self.labels)} labels, "
                f"{len(self.verbalizers)} verbalizers, {len(self.values)} values"
            )

    def verbalizer_ids(self, codec: Codec) -> list[list[int]]:
        """Token ids of each verbalizer as it follows the answer prompt; several tokens are fine (their log-probs are
        summed), but a verbalizer whose tokens begin another's would make the two compete unfairly: an error."""
        base = codec.encode(self.answer_prompt)
        ids = []
        for label, v in zip(self.labels, self.verbalizers):
            if not v:
                raise PromptError(f"task.labels.{label}.verbalizer: expected a non-empty string")
            full = codec.encode(self.answer_prompt + v)
            tail = full[len(base) :] if full[: len(base)] == base else codec.encode(v)
            if not tail:
                raise PromptError(f"task.labels.{label}.verbalizer: {v!r} encodes to no tokens")
            ids.append(tail)
        for i, a in enumerate(ids):
            for j, b in enumerate(ids):
                if i != j and len(a) <= len(b) and b[: len(a)] == a:
                    raise PromptError(
                        f"task.labels: verbalizer {self.verbalizers[i]!r} ({a}) is a token prefix of "
                        f"{self.verbalizers[j]!r} ({b}); choose verbalizers whose first tokens differ"
                    )
        return ids


def answer_contexts(codec: Codec, task: Task, prompt: Prompt, chains: list[str]) -> list[list[int]]:
    """Token ids after which the verbalizer is scored: prompt (+ chain) + answer prompt, one per chain."""
    if not task.chain_of_thought:
        return [codec.encode(prompt.text + task.answer_prompt)]
    return [codec.encode(prompt.text + c + task.answer_prompt) for c in chains]


def label_distributions(logprobs: torch.Tensor) -> torch.Tensor:
    """Renormalise verbalizer log-probs [..., L] over the labels: log q [..., L] (float64)."""
    return torch.log_softmax(logprobs.double(), dim=-1)


def aggregate(log_q: torch.Tensor, rule: str, n: int | None = None) -> torch.Tensor:
    """Aggregate per-sample label log-distributions ``log_q`` [E, N, L] over the first ``n`` samples: p [E, L]."""
    if rule not in RULES:
        raise ValueError(f"aggregation: got {rule!r}; expected one of {list(RULES)}")
    n = log_q.shape[1] if n is None else n
    if not 1 <= n <= log_q.shape[1]:
        raise ValueError(f"aggregate: n={n}; expected 1..{log_q.shape[1]} (samples available)")
    lq = log_q[:, :n].double()
    if rule == "prob_mean":
        return lq.exp().mean(1)
    if rule == "majority":
        votes = torch.nn.functional.one_hot(lq.argmax(-1), lq.shape[-1]).double()
        return votes.mean(1)
    return torch.softmax(lq.mean(1), dim=-1)  # score_mean: mean per-sample log-scores, renormalised


def expected_score(p: torch.Tensor, values: list[float]) -> torch.Tensor:
    return p.double() @ torch.tensor(values, dtype=torch.float64)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def sign_accuracy(score: torch.Tensor, rating: torch.Tensor, band: float) -> float:
    keep = rating.abs() > band
    if not bool(keep.any()):
        return float("nan")
    return float((torch.sign(score[keep]) == torch.sign(rating[keep])).double().mean())
