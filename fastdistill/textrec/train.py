"""The recipe: train a specialist teacher on one domain, distil one student from both, evaluate on held-out fonts.

Setup (data pools, model, optimizer, resume), train loop, save: one function, :func:`fit`, serves teachers (CE on
one domain) and students (CE + the four terms on the union; CE only when every distillation weight is 0).

Checkpoints: ``<folder>/checkpoint.pt`` (model, optimizer, step, resolved config) every ``run.checkpoint_every``
steps and at the end, written to a temporary file and renamed, so a kill at any moment leaves the last finished
checkpoint intact. A rerun of the same command resumes from it (the batches are a function of the step, so the resumed
run sees the same data); a finished run is not retrained. The export ``<folder>/model/`` (``config.json`` +
``weights.pt``) is written the same way (a temporary folder renamed into place).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import numpy as np
import torch

from fastdistill.textrec import data as D
from fastdistill.textrec.config import ConfigError, dump, loss_config, model_config
from fastdistill.textrec.losses import TERMS, ce_loss, ctc_loss, objective
from fastdistill.textrec.model import Recognizer, RecognizerConfig, encode_targets

CHECKPOINT, EXPORT = "checkpoint.pt", "model"


def _log(msg: str) -> None:
    print(f"[textrec] {msg}", flush=True)


# --- export / load ---------------------------------------------------------------------------------------------------


def export(model: Recognizer, folder: str, extra: dict | None = None) -> str:
    """Write ``folder/model`` (config.json + weights.pt) atomically; returns its path."""
    final = os.path.join(folder, EXPORT)
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"recognizer": model.config.to_dict(), **(extra or {})}, f, indent=1)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(tmp, "weights.pt"))
    old = f"{final}.old{os.getpid()}"
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load(folder: str, device: str | torch.device = "cpu") -> Recognizer:
    """The recognizer exported in ``folder`` (a ``model/`` folder, or a run folder holding one), in eval mode."""
    if os.path.isdir(os.path.join(folder, EXPORT)):
        folder = os.path.join(folder, EXPORT)
    cfg_path, w_path = os.path.join(folder, "config.json"), os.path.join(folder, "weights.pt")
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise FileNotFoundError(
            f"{folder!r} holds no exported recognizer; expected config.json and weights.pt (written by "
            "`fastdistill text-recognition train-teacher|distill`, in <run>/<name>/model)"
        )
    with open(cfg_path) as f:
        meta = json.load(f)
    # exports from before these options existed: plain content attention, no CTC head
    arch = {"position_attention": False, "ctc_head": False, **meta["recognizer"]}
    model = Recognizer(RecognizerConfig(**arch))
    model.load_state_dict(torch.load(w_path, map_location="cpu", weights_only=True))
    return model.to(device).eval()


# --- the training loop -----------------------------------------------------------------------------------------------


def _save_checkpoint(path: str, state: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _lr(step: int, s: dict) -> float:
    if step < s["warmup_steps"]:
        return s["lr"] * (step + 1) / s["warmup_steps"]
    p = (step - s["warmup_steps"]) / max(1, s["steps"] - s["warmup_steps"])
    lo = s["lr"] * s["min_lr_ratio"]
    return lo + (s["lr"] - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


class _Pools:
    """The training images of each domain (rendered once, cached on disk) and the batch of a given step."""

    def __init__(self, cfg: dict, domains: tuple[str, ...]):
        d = cfg["data"]
        self.seed, self.domains = cfg["run"]["seed"], domains
        self.pools = {}
        for dom in domains:
            t = time.time()
            images, words = D.pool(self.seed, dom, "train", d["train_size"], d["max_len"], cache=d["cache"])
            self.pools[dom] = (D.pool_tensor(images), words)
            _log(f"{dom} training pool: {len(words)} images ({time.time() - t:.1f}s)")

    def batch(self, step: int, batch_size: int):
        """Batch ``step``: a fixed function of (seed, step); the domains alternate sample by sample."""
        rng = np.random.default_rng([self.seed, 7919, step])
        doms = [self.domains[(i + step) % len(self.domains)] for i in range(batch_size)]
        images, words, ids = [], [], []
        for dom in self.domains:
            n = doms.count(dom)
            pool_images, pool_words = self.pools[dom]
            idx = rng.integers(0, len(pool_words), n)
            images.append(pool_images[torch.from_numpy(idx)])
            words += [pool_words[i] for i in idx]
            ids += [D.DOMAINS.index(dom)] * n
        return torch.cat(images), words, torch.tensor(ids)


def fit(
    cfg: dict,
    folder: str,
    model_cfg: RecognizerConfig,
    schedule: dict,
    domains: tuple[str, ...],
    teachers: dict[int, Recognizer] | None = None,
    loss_cfg=None,
    role: str = "teacher",
) -> Recognizer:
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(cfg["run"]["seed"])
    model = Recognizer(model_cfg)
    projections = None
    if loss_cfg is not None and loss_cfg.hint > 0 and teachers:
        projections = torch.nn.ModuleDict(
            {str(d): torch.nn.Linear(model_cfg.d_model, t.config.d_model, bias=False) for d, t in teachers.items()}
        )
    params = list(model.parameters()) + (list(projections.parameters()) if projections is not None else [])
    opt = torch.optim.AdamW(params, lr=schedule["lr"], weight_decay=schedule["weight_decay"])
    ckpt_path = os.path.join(folder, CHECKPOINT)
    start = 0
    if os.path.isfile(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["model_config"] != model_cfg.to_dict():
            raise ConfigError(
                f"{ckpt_path!r} holds a model of config {state['model_config']} but this run asks for "
                f"{model_cfg.to_dict()}; expected the same (delete the folder or pick another distill.name)"
            )
        model.load_state_dict(state["model"])
        if projections is not None and state.get("projections"):
            projections.load_state_dict(state["projections"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        _log(f"resuming {folder} at step {start}/{schedule['steps']}")
    dump(cfg, os.path.join(folder, "config.yaml"))
    if start >= schedule["steps"] and os.path.isdir(os.path.join(folder, EXPORT)):
        _log(f"{folder} is already trained ({start} steps); delete it to retrain")
        return load(folder)
    pools = _Pools(cfg, domains)
    for t in (teachers or {}).values():
        t.eval().requires_grad_(False)
    model.train()

    def save(step):
        _save_checkpoint(
            ckpt_path,
            {
                "model": model.state_dict(),
                "projections": projections.state_dict() if projections is not None else None,
                "optimizer": opt.state_dict(),
                "step": step,
                "model_config": model_cfg.to_dict(),
                "config": cfg,
            },
        )

    log = open(os.path.join(folder, "metrics.jsonl"), "a")
    t0, seen = time.time(), 0
    for step in range(start, schedule["steps"]):
        images, words, dom = pools.batch(step, schedule["batch_size"])
        targets = encode_targets(words, model_cfg)
        for g in opt.param_groups:
            g["lr"] = _lr(step, schedule)
        out = model(images, targets)
        if loss_cfg is None:
            loss = ce_loss(out, targets)
            terms = {"ce": loss.item()}
        else:
            loss, terms = objective(out, targets, dom, images, teachers or {}, projections, loss_cfg)
        if schedule["ctc"] > 0:
            ctc = ctc_loss(out, targets)
            loss = loss + schedule["ctc"] * ctc
            terms["ctc"] = ctc.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, schedule["grad_clip"])
        opt.step()
        seen += 1
        done = step + 1
        if done % cfg["run"]["log_every"] == 0 or done == schedule["steps"]:
            rate = seen / (time.time() - t0)
            msg = " ".join(f"{k}={v:.4f}" for k, v in terms.items())
            _log(f"{role} {os.path.basename(folder)} step {done}/{schedule['steps']} loss={loss.item():.4f} {msg} "
                 f"({rate:.2f} steps/s)")  # fmt: skip
            log.write(json.dumps({"step": done, "loss": loss.item(), **terms, "steps_per_s": rate}) + "\n")
            log.flush()
        if done % cfg["run"]["checkpoint_every"] == 0 or done == schedule["steps"]:
            save(done)
    log.close()
    if start < schedule["steps"] or not os.path.isdir(os.path.join(folder, EXPORT)):
        export(model, folder, {"role": role, "domains": list(domains), "steps": schedule["steps"]})
        _log(f"exported {os.path.join(folder, EXPORT)}")
    return model.eval()


def _threads(cfg: dict) -> None:
    if cfg["run"]["threads"]:
        torch.set_num_threads(cfg["run"]["threads"])


def train_teacher(cfg: dict, domain: str) -> Recognizer:
    if domain not in D.DOMAINS:
        raise ConfigError(f"--domain: got {domain!r}; expected one of {list(D.DOMAINS)}")
    _threads(cfg)
    D.check_available((domain,))
    folder = os.path.join(cfg["run"]["output_dir"], f"teacher_{domain}")
    return fit(cfg, folder, model_config(cfg, "teacher"), cfg["teacher"], (domain,), role="teacher")


def teacher_folder(cfg: dict, domain: str) -> str:
    return cfg["distill"]["teachers"][domain] or os.path.join(cfg["run"]["output_dir"], f"teacher_{domain}")


def distill(cfg: dict) -> Recognizer:
    _threads(cfg)
    D.check_available()
    loss_cfg = loss_config(cfg)
    teachers = {}
    if loss_cfg.needs_teacher:
        for dom in D.DOMAINS:
            path = teacher_folder(cfg, dom)
            try:
                teachers[D.DOMAINS.index(dom)] = load(path)
            except FileNotFoundError as e:
                raise FileNotFoundError(
                    f"the {dom} teacher: {e}; train it first with `fastdistill text-recognition train-teacher "
                    f"--domain {dom}` (or set distill.teachers.{dom})"
                ) from None
    folder = os.path.join(cfg["run"]["output_dir"], cfg["distill"]["name"])
    used = {k: getattr(loss_cfg, k) for k in TERMS}
    _log(f"student {cfg['distill']['name']}: weights {used}, T={loss_cfg.temperature}")
    return fit(cfg, folder, model_config(cfg, "student"), cfg["distill"], D.DOMAINS, teachers, loss_cfg, "student")


# --- evaluation ------------------------------------------------------------------------------------------------------


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def score(predictions: list[str], truths: list[str]) -> dict:
    """Word accuracy (exact, case-sensitive) and character error rate (edit distance / reference characters), %."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} references; expected the same number")
    correct = sum(p == t for p, t in zip(predictions, truths))
    edits = sum(edit_distance(p, t) for p, t in zip(predictions, truths))
    chars = sum(len(t) for t in truths)
    return {"word_acc": 100.0 * correct / max(1, len(truths)), "cer": 100.0 * edits / max(1, chars), "n": len(truths)}


def test_set(cfg: dict, domain: str):
    d = cfg["data"]
    images, words = D.pool(cfg["run"]["seed"] + 1, domain, "test", d["test_size"], d["max_len"], cache=d["cache"])
    return D.pool_tensor(images), words


def _model_folders(cfg: dict) -> list[str]:
    if cfg["evaluate"]["models"]:
        return list(cfg["evaluate"]["models"])
    root = cfg["run"]["output_dir"]
    found = sorted(
        os.path.join(root, n) for n in os.listdir(root) if os.path.isdir(os.path.join(root, n, EXPORT))
    ) if os.path.isdir(root) else []  # fmt: skip
    teachers = [f for f in found if os.path.basename(f).startswith("teacher_")]
    return teachers + [f for f in found if f not in teachers]


def evaluate(cfg: dict) -> dict:
    """Word accuracy and CER of every model on the held-out fonts (and held-out words) of each domain."""
    _threads(cfg)
    D.check_available()
    folders = _model_folders(cfg)
    if not folders:
        raise FileNotFoundError(
            f"no exported model under {cfg['run']['output_dir']!r}; train one first (train-teacher / distill) or set "
            "evaluate.models"
        )
    tests = {dom: test_set(cfg, dom) for dom in D.DOMAINS}
    results = {}
    for folder in folders:
        model = load(folder)
        row = {}
        for dom, (images, words) in tests.items():
            bs = cfg["evaluate"]["batch_size"]
            preds = [w for i in range(0, len(images), bs) for w in model.greedy(images[i : i + bs])]
            row[dom] = score(preds, words)
        results[os.path.basename(os.path.normpath(folder))] = row
    root = cfg["run"]["output_dir"]
    os.makedirs(root, exist_ok=True)
    table = format_table(results)
    for name, text in (("evaluation.json", json.dumps(results, indent=1)), ("evaluation.md", table)):
        tmp = os.path.join(root, f"{name}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(root, name))
    print(table, flush=True)
    return results


def format_table(results: dict) -> str:
    head = "| model | printed word acc % | printed CER % | handwriting word acc % | handwriting CER % |"
    lines = [head, "|---|---:|---:|---:|---:|"]
    for name, row in results.items():
        p, h = row["printed"], row["handwriting"]
        lines.append(f"| {name} | {p['word_acc']:.1f} | {p['cer']:.1f} | {h['word_acc']:.1f} | {h['cer']:.1f} |")
    return "\n".join(lines)
