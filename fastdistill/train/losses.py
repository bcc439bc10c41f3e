"""The weighted distillation loss of one step, from final hidden states and lm_head weights.

``logit_kd`` (soft) and ``hard_ce`` (hard) go through ``fastdistill.functional.fused_linear_distill_loss`` in one call:
chunks of tokens, matmul, online softmax, divergence, gradient, with no [tokens x vocab] tensor kept. ``hint``,
``attention`` (q / k captured by ``fastdistill.capture``) and ``affinity`` call ``fastdistill.functional.hint_loss``,
``attention_distill_loss`` and ``affinity_distill_loss``. ``run.loss_impl: unfused`` computes the
same terms the plain-torch way (materialized logits, the shared reference divergence, F.cross_entropy): the baseline of
``benchmarks/bench_trainer.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fastdistill.functional as FD
from fastdistill import reference
from fastdistill.train.data import IGNORE_INDEX
from fastdistill.train.targets import TopKTargets, topk_from_hidden

EVAL_CHUNK_BYTES = 32 << 20  # the [rows x vocab] float32 logits of one evaluation-NLL chunk (its temporaries alike)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class DistillLoss(nn.Module):
    """``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_states,
    teacher_states) -> (loss, parts)``; ``parts`` are detached scalars for logging (unweighted terms).

    ``teacher_hidden`` is the teacher's final hidden states (dense KD through ``teacher_weight``) or a
    :class:`~fastdistill.train.targets.TopKTargets` record (a teacher cache or a teacher pool; ``teacher_weight``
    None): the one input type of the top-k path."""

    def __init__(
        self,
        losses: list[dict],
        impl: str,
        student_hidden_size: int,
        teacher_hidden_size: int | None,
        topk_tail: str | None = None,
    ):
        super().__init__()
        self.impl = impl
        by_type = {x["type"]: x for x in losses}
        kd, ce = by_type.get("logit_kd"), by_type.get("hard_ce")
        self.soft_weight = kd["weight"] if kd else 0.0
        self.hard_weight = ce["weight"] if ce else 0.0
        self.kd = kd or {"divergence": "forward_kl", "beta": 0.5, "temperature": 1.0}
        # the tail of a top-k teacher: the cache's `cache.tail` when reading one, else the loss's own `topk_tail`
        self.topk_tail = topk_tail or self.kd.get("topk_tail") or "bucket"
        self.hint = by_type.get("hint")
        self.attention = by_type.get("attention")
        self.affinity = by_type.get("affinity")
        self.hint_proj = nn.ModuleDict()
        if self.hint is not None and student_hidden_size != teacher_hidden_size:
            # a learned projection student -> teacher width per mapped layer (FitNets), trained with the student
            for s in self.hint["layer_map"]:
                self.hint_proj[str(s)] = nn.Linear(student_hidden_size, teacher_hidden_size, bias=False)
        self.needs_hidden_states = any(x is not None for x in (self.hint, self.affinity))
        # attention KD: decoder layers whose q / k are captured (student layer -> teacher layer)
        self.attention_layers = dict(self.attention["layer_map"]) if self.attention else {}

    # -- lm-head terms --------------------------------------------------------------------------------------------
    def _lm_head_fused(self, hs, ws, ht, wt, labels, topk=None):
        sparse = {}
        if topk is not None:  # a top-k record: the fused sparse path (the k tokens + the tail bucket)
            ht = wt = None
            sparse = dict(teacher_topk=topk, topk_tail=self.topk_tail, topk_values="logprobs")
        loss, ce, kd = FD.fused_linear_distill_loss(
            hs,
            ws,
            ht,
            wt,
            labels,
            **sparse,
            divergence=self.kd["divergence"],
            beta=self.kd["beta"],
            temperature=self.kd["temperature"],
            hard_weight=self.hard_weight,
            soft_weight=self.soft_weight,
            ignore_index=IGNORE_INDEX,
            reduction="batchmean",
            return_parts=True,
        )
        return loss, {"kd": kd, "ce": ce}

    def _lm_head_unfused(self, hs, ws, ht, wt, labels):
        s_logits = hs @ ws.t()  # [N, V]: exactly what the fused path avoids
        with torch.no_grad():
            t_logits = ht @ wt.t()
        kd = reference.distill_loss(
            s_logits,
            t_logits,
            labels,
            divergence=self.kd["divergence"],
            beta=self.kd["beta"],
            temperature=self.kd["temperature"],
            ignore_index=IGNORE_INDEX,
        )
        ce = F.cross_entropy(s_logits.float(), labels, ignore_index=IGNORE_INDEX)
        return self.soft_weight * kd + self.hard_weight * ce, {"kd": kd, "ce": ce}

    def forward(
        self,
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        student_states=None,
        teacher_states=None,
    ):
        hs, labels_flat = _flat(student_hidden), labels.reshape(-1)
        topk = None
        if isinstance(teacher_hidden, TopKTargets):  # top-k targets: from a teacher cache or a teacher pool
            ht, record = None, teacher_hidden
        else:
            ht, record = _flat(teacher_hidden), None
            if self.kd.get("topk") and self.soft_weight:  # colocated top-k: the same record, computed here
                record = topk_from_hidden(ht, teacher_weight, self.kd["topk"], (float(self.kd["temperature"]),))
        if record is not None:
            values, indices = record.at_temperature(float(self.kd["temperature"]))
            topk = (_flat(values), _flat(indices))
        if self.impl == "fused":
            loss, parts = self._lm_head_fused(hs, student_weight, ht, teacher_weight, labels_flat, topk)
        else:
            loss, parts = self._lm_head_unfused(hs, student_weight, ht, teacher_weight, labels_flat)
        # positions that count: valid labels for hint (per token); whole real rows for the sequence-level maps
        token_mask = labels != IGNORE_INDEX
        row_mask = token_mask.any(-1, keepdim=True).expand_as(token_mask)
        if self.hint is not None:
            terms = [
                FD.hint_loss(
                    student_states["hidden"][s + 1],
                    teacher_states["hidden"][t + 1],
                    projection=self.hint_proj[str(s)] if str(s) in self.hint_proj else None,
                    kind=self.hint["kind"],
                    mask=token_mask,
                )
                for s, t in self.hint["layer_map"].items()
            ]
            parts["hint"] = torch.stack(terms).mean()
            loss = loss + self.hint["weight"] * parts["hint"]
        if self.affinity is not None:
            terms = [
                FD.affinity_distill_loss(
                    student_states["hidden"][s + 1], teacher_states["hidden"][t + 1], mask=row_mask
                )
                for s, t in self.affinity["layer_map"].items()
            ]
            parts["affinity"] = torch.stack(terms).mean()
            loss = loss + self.affinity["weight"] * parts["affinity"]
        if self.attention is not None:
            terms = [
                FD.attention_distill_loss(
                    student_states["q"][s],
                    student_states["k"][s],
                    teacher_states["q"][t],
                    teacher_states["k"][t],
                    attention_mask=row_mask,
                    causal=True,
                    relation_heads=self.attention["relation_heads"],
                )
                for s, t in self.attention["layer_map"].items()
            ]
            parts["attention"] = torch.stack(terms).mean()
            loss = loss + self.attention["weight"] * parts["attention"]
        return loss, {k: v.detach().float() for k, v in parts.items()}

    # -- evaluation -----------------------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[summed next-token NLL, token count] over valid labels, in chunks of rows (no [N, V] tensor)."""
        h, y = _flat(hidden), labels.reshape(-1)
        keep = y != IGNORE_INDEX
        h, y = h[keep], y[keep]
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        rows = max(1, EVAL_CHUNK_BYTES // (4 * weight.shape[0]))  # a 1024-row chunk at V = 49152 held 2 x 192 MiB
        for i in range(0, len(y), rows):
            logits = (h[i : i + rows] @ weight.t()).float()
            total += F.cross_entropy(logits, y[i : i + rows], reduction="sum").double()
        return torch.stack([total, torch.tensor(float(len(y)), dtype=torch.float64, device=hidden.device)])
