"""The distillation recipe: learnable synthetic images (IPC per class) and student learning rate, trained by matching
expert trajectories with :func:`match_trajectory`.

Reads top to bottom: setup (data, experts, synthetic set, optimizers, resume), loop (random expert and start epoch,
trajectory-matching gradient, SGD with momentum on images and lr), save (checkpoint every ``checkpoint_every``
iterations, final synthetic set and PNG grid). The checkpoint holds the synthetic set, the optimizers, the generator
state and the resolved config, so a killed run resumes where its last checkpoint left it.
"""

from __future__ import annotations

import csv
import math
import os
import time

import torch
from tqdm import tqdm

from fastdistill.dataset_distill._io import atomic_save
from fastdistill.dataset_distill.augment import diff_augment
from fastdistill.dataset_distill.config import RunConfig, save_resolved, to_dict
from fastdistill.dataset_distill.core import ParamLayout, match_trajectory
from fastdistill.dataset_distill.data import ImageDataset, load_dataset
from fastdistill.dataset_distill.experts import load_experts
from fastdistill.dataset_distill.models import build_model

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def checkpoint_path(cfg: RunConfig) -> str:
    return os.path.join(cfg.run_dir, "distill_checkpoint.pt")


def synthetic_path(cfg: RunConfig) -> str:
    return os.path.join(cfg.run_dir, "synthetic.pt")


def init_synthetic(cfg: RunConfig, ds: ImageDataset, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """IPC images per class: random real training images (``init: real``) or Gaussian noise; labels sorted by class."""
    ipc, dtype = cfg.distill.ipc, DTYPES[cfg.distill.dtype]
    labels = torch.arange(ds.num_classes).repeat_interleave(ipc)
    if cfg.distill.init == "noise":
        return torch.randn(len(labels), ds.channels, ds.image_size, ds.image_size, generator=gen, dtype=dtype), labels
    images = []
    for c in range(ds.num_classes):
        idx = (ds.train_y == c).nonzero().squeeze(1)
        if len(idx) < ipc:
            raise ValueError(f"distill.ipc={ipc} but class {c} has only {len(idx)} training images")
        images.append(ds.train_x[idx[torch.randperm(len(idx), generator=gen)[:ipc]]])
    return torch.cat(images).to(dtype), labels


def save_grid(images: torch.Tensor, ds: ImageDataset, path: str, *, ipc: int, title: str | None = None) -> str:
    """PNG grid: one row per class, ``ipc`` columns, de-normalised to [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = (images.detach().float().cpu() * ds.std + ds.mean).clamp(0, 1)
    rows, cols = ds.num_classes, ipc
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for c in range(rows):
        for j in range(cols):
            ax = axes[c][j]
            ax.imshow(x[c * ipc + j].permute(1, 2, 0).squeeze(-1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(ds.class_names[c], fontsize=6, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def distill(cfg: RunConfig, *, ds: ImageDataset | None = None, progress: bool = True, log=print) -> dict:
    # ---- setup
    dc = cfg.distill
    dtype = DTYPES[dc.dtype]
    ds = ds or load_dataset(cfg.data.name, cfg.data.root, cfg.data.train_subset, cfg.seed)
    experts = load_experts(cfg, min_epochs=dc.max_start_epoch - 1 + dc.expert_epochs)
    model = build_model(cfg.model, ds).to(dtype)
    layout = ParamLayout.of(dict(model.named_parameters()))
    if list(experts[0]["names"]) != list(layout.names):
        raise RuntimeError(f"experts in {cfg.expert_dir} were trained with another model; expected {layout.names}")
    os.makedirs(cfg.run_dir, exist_ok=True)
    save_resolved(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels = init_synthetic(cfg, ds, gen)
    images.requires_grad_(True)
    syn_lr = torch.tensor(dc.lr_init, dtype=dtype, requires_grad=True)
    opt_img = torch.optim.SGD([images], lr=dc.lr_images, momentum=dc.momentum)
    opt_lr = torch.optim.SGD([syn_lr], lr=dc.lr_lr, momentum=dc.momentum)
    start_it = 0
    ckpt = checkpoint_path(cfg)
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        with torch.no_grad():
            images.copy_(state["images"])
            syn_lr.copy_(state["lr"])
        opt_img.load_state_dict(state["opt_images"])
        opt_lr.load_state_dict(state["opt_lr"])
        gen.set_state(state["generator_state"])
        start_it = state["iteration"]
        log(f"resuming distillation from iteration {start_it} ({ckpt})")
    save_grid(images, ds, os.path.join(cfg.run_dir, "synthetic_init.png"), ipc=dc.ipc, title="initialisation")
    batch_syn = dc.batch_syn or len(labels)
    augment = diff_augment if dc.augment else None
    log_path = os.path.join(cfg.run_dir, "distill_log.csv")

    def checkpoint(iteration: int) -> None:
        atomic_save(
            {
                "images": images.detach().clone(),
                "labels": labels,
                "lr": syn_lr.detach().clone(),
                "opt_images": opt_img.state_dict(),
                "opt_lr": opt_lr.state_dict(),
                "generator_state": gen.get_state(),
                "iteration": iteration,
                "config": to_dict(cfg),
            },
            ckpt,
        )

    # ---- train loop
    bar = tqdm(
        range(start_it, dc.iterations), desc="distill", initial=start_it, total=dc.iterations, disable=not progress
    )
    t0, losses = time.perf_counter(), []
    for it in bar:
        e = int(torch.randint(len(experts), (), generator=gen))
        t = int(torch.randint(dc.max_start_epoch, (), generator=gen))
        snaps = experts[e]["snapshots"]
        start = layout.unflatten(snaps[t].to(dtype))
        target = layout.unflatten(snaps[t + dc.expert_epochs].to(dtype))
        loss, g_img, g_lr = match_trajectory(
            model,
            start,
            target,
            images,
            labels,
            syn_lr,
            steps=dc.syn_steps,
            batch_size=batch_syn,
            unroll=dc.unroll,
            generator=gen,
            augment=augment,
            checkpoint_every=dc.checkpoint_every_iterate,
        )
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"trajectory-matching loss is {loss.item()} at iteration {it}; lower "
                f"distill.lr_images (={dc.lr_images}) or distill.lr_lr (={dc.lr_lr})"
            )
        images.grad, syn_lr.grad = g_img, g_lr.reshape(syn_lr.shape)
        opt_img.step()
        opt_lr.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{syn_lr.item():.5f}")
        if (it + 1) % dc.log_every == 0 or it + 1 == dc.iterations:
            new = not os.path.exists(log_path)
            with open(log_path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["iteration", "mean_loss", "syn_lr", "seconds"])
                w.writerow([it + 1, sum(losses) / len(losses), syn_lr.item(), round(time.perf_counter() - t0, 1)])
            losses = []
        if (it + 1) % dc.checkpoint_every == 0 or it + 1 == dc.iterations:
            checkpoint(it + 1)
    bar.close()

    # ---- save
    result = {
        "images": images.detach().clone(),
        "labels": labels,
        "lr": syn_lr.detach().clone(),
        "config": to_dict(cfg),
        "mean": ds.mean,
        "std": ds.std,
    }
    atomic_save(result, synthetic_path(cfg))
    png = save_grid(
        images,
        ds,
        os.path.join(cfg.run_dir, "synthetic.png"),
        ipc=dc.ipc,
        title=f"{cfg.data.name} IPC {dc.ipc}, {dc.iterations} iterations ({dc.unroll}), learned lr {syn_lr.item():.4f}",
    )
    log(f"synthetic set -> {synthetic_path(cfg)}, grid -> {png}")
    return result
