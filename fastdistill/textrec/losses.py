"""The "Text is Text" objective: CE on the labels plus four distillation terms, every one through fastdistill's ops.

For a batch whose images come from both domains, each image's teacher is the specialist of its domain: the batch is
split by domain, each teacher runs (no_grad, teacher forcing on the same words) on its part, and each term is the
part-size-weighted mean over the parts. With ``valid`` the [B, T] mask of real decoding steps (the characters and
the end symbol):

=============  =====================================================================================================
``ce``          cross-entropy of the student's logits on the labels
``logits``      ``FD.distill_loss(student, teacher, labels, temperature=T)``: forward KL of the softened per-step
                character distributions, times T^2 (Hinton)
``hint``        ``FD.glimpse_hint_loss``: MSE (or cosine) between the student's glimpses g_t = sum_i alpha_ti F_i,
                mapped to the teacher's width by a learned projection (one per teacher), and the teacher's
``attention``   ``FD.attention_distill_loss`` on the decoder's *query / key tensors*, KL(alpha^t_t || alpha^s_t) per
                step. The op wants q and k of the same length, so the T queries are zero-padded to the L keys and
                the per-row result (``reduction="none"``) is averaged over the valid steps only; no [T, L] map is
                formed by the loss (the decoder forms its own, which is tiny here: T = 11, L = 32)
``affinity``    ``FD.affinity_distill_loss`` between the glimpses of the valid steps: the [T, T] cosine-similarity
                maps of student and teacher glimpses matched (the widths may differ)
=============  =====================================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastdistill.functional as FD
from fastdistill.textrec.model import IGNORE, RecognizerOutput

TERMS = ("ce", "logits", "hint", "attention", "affinity")


@dataclass
class LossConfig:
    ce: float = 1.0
    logits: float = 1.0
    hint: float = 1.0
    attention: float = 1.0
    affinity: float = 1.0
    temperature: float = 2.0
    hint_kind: str = "mse"

    def __post_init__(self):
        for name in TERMS + ("temperature",):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or v != v:
                raise ValueError(f"distill.{name}={v!r} is invalid; expected a number >= 0")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature={self.temperature!r} is invalid; expected a number > 0")
        if self.hint_kind not in ("mse", "cosine"):
            raise ValueError(f"distill.hint_kind={self.hint_kind!r} is invalid; expected 'mse' or 'cosine'")

    @property
    def needs_teacher(self) -> bool:
        return any(getattr(self, t) > 0 for t in TERMS[1:])


def ce_loss(out: RecognizerOutput, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def ctc_loss(out: RecognizerOutput, targets: torch.Tensor) -> torch.Tensor:
    """CTC of the encoder's per-position scores [B, L, V] on the words (class 0 = blank), mean per target character."""
    if out.ctc_logits is None:
        raise ValueError("the model has no CTC head (model.ctc_head: false); expected ctc: 0 for it")
    lengths = (targets > 0).sum(1)  # the characters (the end symbol is 0, padding IGNORE < 0)
    flat = targets[targets > 0]
    x = out.ctc_logits
    log_probs = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).log_softmax(-1).transpose(0, 1)
    L = torch.full((targets.shape[0],), log_probs.shape[0], dtype=torch.long)
    return F.ctc_loss(log_probs, flat, L, lengths, blank=0, reduction="sum", zero_infinity=True) / lengths.sum().clamp(
        min=1
    )


def attention_term(s: RecognizerOutput, t: RecognizerOutput, valid: torch.Tensor) -> torch.Tensor:
    """Attention-map distillation on the decoder's queries [B, 1, T, d_k] and keys [B, 1, L, d_k] of both models."""
    T, L = s.queries.shape[2], s.keys.shape[2]
    pad = (0, 0, 0, L - T)  # queries [B, 1, T, d] -> [B, 1, L, d]: rows T.. are zeros and are dropped below
    per_row = FD.attention_distill_loss(
        F.pad(s.queries, pad), s.keys, F.pad(t.queries, pad), t.keys, reduction="none"
    )  # [B, 1, L] = KL(teacher row || student row)
    per_step = per_row[:, 0, :T]
    return (per_step * valid).sum() / valid.sum().clamp(min=1)


def distill_terms(
    student: RecognizerOutput,
    teacher: RecognizerOutput,
    targets: torch.Tensor,
    cfg: LossConfig,
    projection: torch.nn.Module | None,
) -> dict[str, torch.Tensor]:
    """The four distillation terms (unweighted) between step-aligned student and teacher outputs on the same words."""
    valid = targets != IGNORE
    terms = {}
    if cfg.logits > 0:
        terms["logits"] = FD.distill_loss(student.logits, teacher.logits, targets, temperature=cfg.temperature)
    if cfg.hint > 0:
        terms["hint"] = FD.glimpse_hint_loss(
            student.attn, student.features, teacher.attn, teacher.features,
            projection=projection, kind=cfg.hint_kind, mask=valid,
        )  # fmt: skip
    if cfg.attention > 0:
        terms["attention"] = attention_term(student, teacher, valid.to(student.keys.dtype))
    if cfg.affinity > 0:
        terms["affinity"] = FD.affinity_distill_loss(student.glimpses, teacher.glimpses, mask=valid)
    return terms


def _select(out: RecognizerOutput, idx: torch.Tensor) -> RecognizerOutput:
    return RecognizerOutput(
        *(None if getattr(out, f) is None else getattr(out, f)[idx] for f in RecognizerOutput.__dataclass_fields__)
    )


def objective(
    student_out: RecognizerOutput,
    targets: torch.Tensor,
    domain_ids: torch.Tensor,
    images: torch.Tensor,
    teachers: dict[int, torch.nn.Module],
    projections: torch.nn.ModuleDict | None,
    cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted total and each term's value. ``teachers`` maps a domain id to its (frozen, eval-mode) teacher."""
    terms = {"ce": ce_loss(student_out, targets)} if cfg.ce > 0 else {}
    if cfg.needs_teacher:
        n = len(targets)
        for dom, teacher in teachers.items():
            idx = (domain_ids == dom).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            with torch.no_grad():
                t_out = teacher(images[idx], targets[idx])
            proj = projections[str(dom)] if projections is not None else None
            part = distill_terms(_select(student_out, idx), t_out, targets[idx], cfg, proj)
            for k, v in part.items():
                terms[k] = terms.get(k, 0.0) + v * (idx.numel() / n)
    total = sum(getattr(cfg, k) * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}
