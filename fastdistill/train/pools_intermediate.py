"""Intermediate teacher states in a pool's record: what a student pool's ``hint``, ``affinity`` and ``attention`` losses
read from the teacher, sent along with its ``hidden`` or ``topk`` payload (see README "Teacher and student pools").

The colocated recipe runs its teacher as ``TeacherHidden(input_ids, output_hidden_states, attention_layers)``: the
per-layer hidden states, and q / k of chosen attention layers captured by ``fastdistill.capture.AttentionCapture``
(after the model's rotary embedding, key/value heads repeated to the query heads). The teacher pool makes that same
call, once per micro step, for the union of what its student pools' losses need, and each pool's record carries only
its own layers, in fixed-layout fields (never an [L, L] map):

    hint / affinity, teacher layer t  ->  "hidden.{t+1}"  [rows, seq, H]        (hidden_states[t + 1]: after layer t)
    attention,       teacher layer t  ->  "q.{t}", "k.{t}" [rows, heads, seq, D]

A pool whose losses need none of them gets none (its message is unchanged). The fields travel in the pool's precision:
bfloat16 when the pool trains in bf16 or the teacher runs in bfloat16, else float32. The student pool turns them
back into the ``teacher_states`` the colocated path hands to ``DistillLoss`` (``{"hidden": {i: ...}, "q": {t: ...},
"k": {t: ...}}``), so the same loss functions run on them.
"""

from __future__ import annotations

import torch

from fastdistill.train.config import ConfigError

STATE_LOSSES = ("hint", "affinity")  # read hidden_states[t + 1] of the teacher
QK_LOSSES = ("attention",)  # read captured q / k of teacher layer t


def teacher_needs(losses: list[dict]) -> tuple[list[int], list[int]]:
    """(indices into the teacher's ``hidden_states`` tuple, teacher attention layers) that ``losses`` (a resolved
    ``losses`` list) read, each sorted and unique; ``([], [])`` for a pool of lm-head losses only."""
    hidden, attention = set(), set()
    for loss in losses:
        if loss["type"] in STATE_LOSSES:
            hidden.update(t + 1 for t in loss["layer_map"].values())
        elif loss["type"] in QK_LOSSES:
            attention.update(loss["layer_map"].values())
    return sorted(hidden), sorted(attention)


def wire_dtype(teacher_dtype: torch.dtype, precision: str) -> torch.dtype:
    """The pool's precision: bfloat16 when the pool trains in bf16 or the teacher computes in bfloat16 (nothing finer
    to send), else float32."""
    return torch.bfloat16 if precision == "bf16" or teacher_dtype == torch.bfloat16 else torch.float32


def _qk_shape(module: torch.nn.Module, family: str) -> tuple[int, int]:
    """(heads, head dim) of the q / k that ``AttentionCapture`` captures from ``module`` (keys repeated to the query
    heads, as the colocated path captures them)."""
    if family == "llama":
        return module.q_proj.out_features // module.head_dim, module.head_dim
    if family == "gpt2":
        return module.num_heads, module.head_dim
    return module.num_attention_heads, module.attention_head_size  # bert


def fields(key: str, losses: list[dict], teacher_model, seq_len: int, dtype: torch.dtype) -> list[tuple]:
    """The record fields ``[(name, dtype, shape of one row)]`` of a student pool whose resolved losses are ``losses``
    (``key``: the pool's config key, ``pools.students[i]``, for the errors), checked against the teacher: a layer it
    does not have, or attention q / k it cannot capture, is a :class:`ConfigError` naming the loss's ``layer_map``."""
    from fastdistill.capture import find_attention_modules

    n_layers = teacher_model.config.num_hidden_layers
    attention = None
    for j, loss in enumerate(losses):
        where = f"{key}.losses[{j}].layer_map"
        if loss["type"] in STATE_LOSSES:
            bad = [t for t in loss["layer_map"].values() if not 0 <= t < n_layers]
            if bad:
                raise ConfigError(
                    f"{where}: teacher layer(s) {bad} for a {loss['type']!r} loss; the teacher has {n_layers} layers "
                    f"(expected 0..{n_layers - 1})"
                )
        elif loss["type"] in QK_LOSSES:
            attention = attention if attention is not None else find_attention_modules(teacher_model)
            n_attn = len(attention)
            if not n_attn:
                raise ConfigError(
                    f"{where}: an 'attention' loss needs the teacher's q / k, and fastdistill.capture knows no "
                    f"attention block of {type(teacher_model).__name__}; expected Llama-, GPT-2- or BERT-style "
                    "attention (or drop the loss from this pool)"
                )
            bad = [t for t in loss["layer_map"].values() if not -n_attn <= t < n_attn]
            if bad:
                raise ConfigError(
                    f"{where}: teacher attention layer(s) {bad}; the teacher has {n_attn} attention layers "
                    f"(expected {-n_attn}..{n_attn - 1})"
                )
    hidden, attn_layers = teacher_needs(losses)
    out = [(f"hidden.{i}", dtype, (seq_len, teacher_model.config.hidden_size)) for i in hidden]
    for t in attn_layers:
        _, module, family = attention[t]
        heads, head_dim = _qk_shape(module, family)
        out += [(f"{part}.{t}", dtype, (heads, seq_len, head_dim)) for part in ("q", "k")]
    return out


class TeacherIntermediates:
    """The teacher pool's side: which states its one forward per micro step must produce (``forward_kwargs``), each
    pool's record fields (``layouts``, sent in the handshake) and a pool's rows of them (:meth:`select`)."""

    def __init__(self, students: dict, teacher_model, teacher_dtype: torch.dtype, seq_len: int):
        self.layouts: dict[str, list[tuple]] = {}
        hidden, attention = set(), set()
        for i, (name, s) in enumerate(students.items()):
            losses = s["config"]["losses"]
            h, a = teacher_needs(losses)
            if not h and not a:
                continue
            dtype = wire_dtype(teacher_dtype, s["config"]["student"]["deepspeed"]["precision"])
            self.layouts[name] = fields(f"pools.students[{i}]", losses, teacher_model, seq_len, dtype)
            hidden.update(h)
            attention.update(a)
        # as the colocated OnlineTeacher asks TeacherHidden: all hidden states when any is needed, q / k by hooks
        self.forward_kwargs = {"output_hidden_states": bool(hidden), "attention_layers": sorted(attention)}

    def select(self, pool: str, states: dict | None, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Rows ``[lo, hi)`` of ``pool``'s fields, from the teacher's ``states`` (``TeacherHidden``'s second output),
        in the pool's dtype; ``{}`` for a pool that needs none."""
        out = {}
        for name, dtype, _ in self.layouts.get(pool, ()):
            part, index = name.split(".")
            x = states[part][int(index)]
            out[name] = x[lo:hi].to(dtype)
        return out


def teacher_states(record: dict, layout: list[tuple] | None) -> dict | None:
    """The student pool's side: a received record's intermediate fields as the ``teacher_states`` the colocated path
    gives ``DistillLoss`` (``{"hidden": {i: [B, L, H]}, "q": {t: [B, heads, L, D]}, "k": {...}}``), or None."""
    if not layout:
        return None
    out: dict = {"hidden": {}, "q": {}, "k": {}}
    for name, _, _ in layout:
        part, index = name.split(".")
        out[part][int(index)] = record[name]
    return out
