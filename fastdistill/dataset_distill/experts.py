"""Expert trajectories: K networks trained on the real training set with plain SGD; the flat parameter vector is
saved after every epoch (snapshot 0 is the initialisation).

One file per expert, ``<run_dir>/experts/expert_<k>.pt``, rewritten atomically after every epoch with the snapshots
so far and the shuffling generator's state; an interrupted run resumes from the last finished epoch and gives the
same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastdistill.dataset_distill._io import atomic_save
from fastdistill.dataset_distill.config import RunConfig, save_resolved, to_dict
from fastdistill.dataset_distill.core import ParamLayout
from fastdistill.dataset_distill.data import ImageDataset, load_dataset
from fastdistill.dataset_distill.models import build_model


def expert_path(cfg: RunConfig, k: int) -> str:
    return os.path.join(cfg.expert_dir, f"expert_{k}.pt")


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(y), batch_size)
    )
    return correct / len(y)


def train_expert(
    cfg: RunConfig, ds: ImageDataset, k: int, *, stop_after_epoch: int | None = None, progress: bool = True
) -> dict:
    """Train (or resume) expert ``k`` to ``cfg.experts.epochs`` epochs; returns its saved record.

    ``stop_after_epoch`` stops early (as a kill would) after that many epochs in total; used by tests.
    """
    ec, path = cfg.experts, expert_path(cfg, k)
    torch.manual_seed(cfg.seed * 1000 + k)  # initialisation of expert k
    model = build_model(cfg.model, ds)
    layout = ParamLayout.of(dict(model.named_parameters()))
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + k)
    if os.path.exists(path):
        rec = torch.load(path, weights_only=False)
        if list(rec["names"]) != list(layout.names):
            raise RuntimeError(
                f"{path} holds parameters {rec['names']}, not those of this config's model; use "
                f"another run_dir or delete it"
            )
        gen.set_state(rec["generator_state"])
        with torch.no_grad():
            for n, p in layout.unflatten(rec["snapshots"][-1]).items():
                model.get_parameter(n).copy_(p)
    else:
        rec = {
            "names": list(layout.names),
            "shapes": [list(s) for s in layout.shapes],
            "config": to_dict(cfg),
            "snapshots": [layout.flatten(dict(model.named_parameters()))],
            "test_acc": [],
        }
    opt = torch.optim.SGD(model.parameters(), lr=ec.lr)  # plain SGD: no state, resuming needs only the parameters
    done = len(rec["snapshots"]) - 1
    last = ec.epochs if stop_after_epoch is None else min(ec.epochs, stop_after_epoch)
    n = len(ds.train_y)
    bar = tqdm(range(done, last), desc=f"expert {k}", initial=done, total=ec.epochs, disable=not progress)
    for _epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, ec.batch_size):
            idx = perm[i : i + ec.batch_size]
            loss = F.cross_entropy(model(ds.train_x[idx]), ds.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rec["snapshots"].append(layout.flatten(dict(model.named_parameters())))
        rec["test_acc"].append(accuracy(model, ds.test_x, ds.test_y))
        rec["generator_state"] = gen.get_state()
        atomic_save(rec, path)
        bar.set_postfix(loss=f"{loss.item():.3f}", test_acc=f"{rec['test_acc'][-1]:.4f}")
    bar.close()
    return rec


def train_experts(
    cfg: RunConfig,
    *,
    ds: ImageDataset | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    ds = ds or load_dataset(cfg.data.name, cfg.data.root, cfg.data.train_subset, cfg.seed)
    os.makedirs(cfg.expert_dir, exist_ok=True)
    save_resolved(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    records = []
    for k in range(cfg.experts.num_experts):
        rec = train_expert(cfg, ds, k, stop_after_epoch=stop_after_epoch, progress=progress)
        log(
            f"expert {k}: {len(rec['snapshots']) - 1}/{cfg.experts.epochs} epochs, test accuracy "
            f"{rec['test_acc'][-1] if rec['test_acc'] else float('nan'):.4f} -> {expert_path(cfg, k)}"
        )
        records.append(rec)
    return records


def load_experts(cfg: RunConfig, min_epochs: int) -> list[dict]:
    """Expert records with at least ``min_epochs`` finished epochs (clear error when there are none)."""
    paths = sorted(glob.glob(os.path.join(cfg.expert_dir, "expert_*.pt")))
    recs = [torch.load(p, weights_only=False) for p in paths]
    recs = [r for r in recs if len(r["snapshots"]) - 1 >= min_epochs]
    if not recs:
        raise FileNotFoundError(
            f"no expert with at least {min_epochs} epochs in {cfg.expert_dir!r}; run "
            f"`fastdistill dataset-distill experts --config ...` first"
        )
    return recs
