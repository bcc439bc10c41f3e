"""What a user sees: the logit-distillation loss inside a plain training loop, against the eager formula.

    python benchmarks/bench_loss_loop.py                       # N = 2048 and 4096, V = 32000, fp32, CPU
    python benchmarks/bench_loss_loop.py --shapes 4096x32000 --iters 5 --threads 2
    python benchmarks/bench_loss_loop.py --hidden 256          # logits from an lm_head matmul inside the timing

Each iteration is what a training step does with the loss: fresh student logits (a new [N, V] tensor every step, as a
model's forward gives; with ``--hidden H`` made by a matmul inside the timed region), then the timed
``loss = loss_fn(student_logits, teacher_logits, labels); loss.backward()``, then the gradient freed. The two providers
run interleaved, iteration by iteration, in one process, so load on a shared machine hits both alike; the figure is the
ratio of their medians. Unlike bench_distill_loss.py (the loss call on one reused logits leaf, warm repeats), every
iteration here allocates and frees its [N, V] tensors as a training loop does. Rows go to
benchmarks/results/loss_loop.csv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import fastdistill.functional as FD  # noqa: E402
from fastdistill import _backend  # noqa: E402


def eager(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The formula a user writes: forward KL over the valid rows, batch mean."""
    valid = labels != -100
    kl = F.kl_div(F.log_softmax(s[valid], -1), F.log_softmax(t[valid], -1), reduction="sum", log_target=True)
    return kl / valid.sum().clamp_min(1)


def fused(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return FD.distill_loss(s, t, labels, divergence="forward_kl")


def run(shapes, iters: int, hidden: int) -> list[C.Row]:
    device = torch.device("cpu")
    rows = []
    print(f"# plain-loop benchmark: {C.device_name(device)}; {_backend.describe()}")
    for N, V in shapes:
        g = torch.Generator().manual_seed(0)
        if hidden:
            h = torch.randn(N, hidden, generator=g)
            w = (torch.randn(V, hidden, generator=g) / hidden**0.5).requires_grad_(True)
        else:
            s0 = torch.randn(N, V, generator=g) * 2
        t = torch.randn(N, V, generator=g) * 2
        labels = torch.randint(0, V, (N,), generator=g)
        labels[::7] = -100  # some ignored rows, as padding gives
        providers = {"torch eager": eager, "fastdistill": fused}
        times: dict[str, list[float]] = {k: [] for k in providers}
        losses = {}
        for it in range(iters + 1):  # the first iteration of each is a warm-up
            for name, fn in providers.items():
                if hidden:
                    w.grad = None
                    t0 = time.perf_counter()
                    s = h @ w.t()  # [N, V] student logits
                else:
                    s = s0.clone().requires_grad_(True)  # a fresh [N, V] tensor, as a model's forward returns
                    t0 = time.perf_counter()
                loss = fn(s, t, labels)
                loss.backward()
                elapsed = time.perf_counter() - t0
                losses[name] = loss.item()
                del s, loss
                if it:
                    times[name].append(elapsed * 1e3)
        assert abs(losses["fastdistill"] - losses["torch eager"]) <= 1e-4 * abs(losses["torch eager"]), losses
        base = statistics.median(times["torch eager"])
        for name, ts in times.items():
            med = statistics.median(ts)
            what = f"matmul [{N},{hidden}]x[{hidden},{V}] + " if hidden else "fresh logits, "
            extra = f"loop: {what}loss + backward; forward_kl, 1/7 rows ignored; speedup={base / med:.2f}x"
            rows.append(
                C.Row(
                    "loss_loop",
                    name,
                    "full",
                    f"{N}x{V}",
                    "float32",
                    med,
                    min(ts),
                    max(ts),
                    float("nan"),
                    C.device_name(device),
                    extra,
                )
            )
            print(
                f"N={N} V={V} {name:<12} median {med:8.1f} ms  (min {min(ts):.1f}, max {max(ts):.1f})  "
                f"{base / med:.2f}x eager"
            )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=["2048x32000", "4096x32000"], help="NxV")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per provider (after one warm-up)")
    p.add_argument("--hidden", type=int, default=0, help="> 0: logits from an lm_head matmul of this width (timed)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--csv", default="loss_loop")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    rows = run(shapes, args.iters, args.hidden)
    print(f"rows appended to {C.write_csv(rows, args.csv)}")


if __name__ == "__main__":
    main()
