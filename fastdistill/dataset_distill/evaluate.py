"""Evaluation: train fresh ConvNets on a small training set (the distilled one, or a random real subset with the same
IPC) and report test accuracy as mean and std over ``evaluate.runs`` runs.

Protocol (as MTT's ``evaluate_synset``): SGD with momentum and weight decay, the learning rate divided by 10 halfway,
differentiable augmentation on every step, ``evaluate.epochs`` passes over the small set. The distilled set trains
with its learned learning rate (``use_learned_lr``), the random subset with ``evaluate.lr``; the distilled set is also
reported with ``evaluate.lr`` so the two rows can be compared under one protocol.
"""

from __future__ import annotations

import json
import os
import statistics

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastdistill.dataset_distill._io import atomic_write_text
from fastdistill.dataset_distill.augment import diff_augment
from fastdistill.dataset_distill.config import RunConfig
from fastdistill.dataset_distill.data import ImageDataset, load_dataset
from fastdistill.dataset_distill.distill import save_grid, synthetic_path
from fastdistill.dataset_distill.experts import accuracy
from fastdistill.dataset_distill.models import build_model


def train_and_test(cfg: RunConfig, ds: ImageDataset, x: torch.Tensor, y: torch.Tensor, lr: float, seed: int) -> float:
    ec = cfg.evaluate
    torch.manual_seed(seed)
    model = build_model(cfg.model, ds)
    x, y = x.detach().float(), y
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=ec.momentum, weight_decay=ec.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [ec.epochs // 2], 0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(ec.epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), ec.batch_size):
            idx = perm[i : i + ec.batch_size]
            xb = x[idx]
            if ec.augment:
                xb = diff_augment(xb, int(torch.randint(0, 2**62, (), generator=gen)))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return accuracy(model, ds.test_x, ds.test_y)


def random_subset(ds: ImageDataset, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.cat(
        [
            (ds.train_y == c).nonzero().squeeze(1)[torch.randperm(int((ds.train_y == c).sum()), generator=gen)[:ipc]]
            for c in range(ds.num_classes)
        ]
    )
    return ds.train_x[idx], ds.train_y[idx]


def _summary(accs: list[float]) -> dict:
    return {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "runs": accs}


def evaluate(cfg: RunConfig, *, ds: ImageDataset | None = None, progress: bool = True, log=print) -> dict:
    ec, ipc = cfg.evaluate, cfg.distill.ipc
    ds = ds or load_dataset(cfg.data.name, cfg.data.root, None, cfg.seed)  # test set is always the full one
    path = synthetic_path(cfg)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no distilled set at {path!r}; run `fastdistill dataset-distill run --config ...`")
    syn = torch.load(path, weights_only=False)
    learned_lr = float(syn["lr"])
    rows = {}
    jobs = [
        (
            "distilled",
            "learned lr" if ec.use_learned_lr else "evaluate.lr",
            learned_lr if ec.use_learned_lr else ec.lr,
            lambda r: (syn["images"], syn["labels"]),
        )
    ]
    if ec.use_learned_lr:
        jobs.append(("distilled", "evaluate.lr", ec.lr, lambda r: (syn["images"], syn["labels"])))
    jobs.append(("random real", "evaluate.lr", ec.lr, lambda r: random_subset(ds, ipc, 10_000 + r)))
    bar = tqdm(total=len(jobs) * ec.runs, desc="evaluate", disable=not progress)
    for name, lr_name, lr, data in jobs:
        accs = []
        for r in range(ec.runs):
            x, y = data(r)
            accs.append(train_and_test(cfg, ds, x, y, lr, seed=cfg.seed * 100 + r))
            bar.update()
        rows[f"{name} ({lr_name} {lr:.4g})"] = _summary(accs)
    bar.close()
    x_rand, _ = random_subset(ds, ipc, 10_000)
    save_grid(x_rand, ds, os.path.join(cfg.run_dir, "random_real.png"), ipc=ipc, title="random real subset")
    result = {
        "dataset": cfg.data.name,
        "ipc": ipc,
        "runs": ec.runs,
        "epochs": ec.epochs,
        "learned_lr": learned_lr,
        "results": rows,
    }
    atomic_write_text(os.path.join(cfg.run_dir, "results.json"), json.dumps(result, indent=2))
    log(
        f"{cfg.data.name}, IPC {ipc}, test accuracy over {ec.runs} runs (ConvNet width {cfg.model.width}, depth "
        f"{cfg.model.depth}, {ec.epochs} epochs):"
    )
    for k, v in rows.items():
        log(f"  {k:<36} {100 * v['mean']:.2f} +- {100 * v['std']:.2f} %")
    return result
