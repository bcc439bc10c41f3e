"""Peak memory and time of one trajectory-matching iteration vs the unroll length N, for the three gradient modes.

    python benchmarks/bench_unroll.py                      # N in {10, 20, 40, 80}, bptt / first_order / exact
    python benchmarks/bench_unroll.py --steps 10 20 --providers exact exact_ckpt --repeats 1

One iteration = ``match_trajectory`` (N student SGD steps on the synthetic set + the gradient w.r.t. images and lr) on
the Fashion-MNIST-shaped problem of ``configs/mtt_fashion_mnist.yaml``: ConvNet width 16, depth 3, 28x28 inputs,
IPC 10 (100 synthetic images, all in every step), differentiable augmentation, float32. ``exact_ckpt`` is ``exact``
keeping only every ceil(sqrt(N))-th parameter iterate. Rows go to benchmarks/results/bench_unroll.csv, the plot to
benchmarks/results/bench_unroll.png (harness: benchmarks/_common.py). Peak memory is the extra memory allocated during
the call (CPU: the profiler's allocation events; CUDA: the allocator's peak).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from fastdistill.dataset_distill import ConvNet, match_trajectory  # noqa: E402
from fastdistill.dataset_distill._memory import peak_memory_bytes  # noqa: E402
from fastdistill.dataset_distill.augment import diff_augment  # noqa: E402

PROVIDERS = ("bptt", "first_order", "exact", "exact_ckpt")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80])
    p.add_argument("--providers", nargs="+", default=["bptt", "first_order", "exact"], choices=PROVIDERS)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--warmup", type=int, default=0)  # the untimed memory run before the timed ones warms up
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ConvNet(1, 10, 28, width=args.width, depth=args.depth).to(device)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    target = {k: v + 0.01 * torch.randn_like(v) for k, v in start.items()}
    n = 10 * args.ipc
    images = torch.randn(n, 1, 28, 28, device=device)
    labels = torch.arange(10, device=device).repeat_interleave(args.ipc)
    lr = torch.tensor(0.01, device=device)
    num_params = sum(v.numel() for v in start.values())

    rows = []
    for steps in args.steps:
        for provider in args.providers:
            unroll = "exact" if provider == "exact_ckpt" else provider
            ckpt = math.ceil(math.sqrt(steps)) if provider == "exact_ckpt" else None

            def fn(unroll=unroll, ckpt=ckpt, steps=steps):
                return match_trajectory(
                    model,
                    start,
                    target,
                    images,
                    labels,
                    lr,
                    steps=steps,
                    batch_size=n,
                    unroll=unroll,
                    generator=torch.Generator().manual_seed(0),
                    augment=diff_augment,
                    checkpoint_every=ckpt,
                )

            peak = peak_memory_bytes(fn, device)
            times = _common.time_fn(fn, device, warmup=args.warmup, repeats=args.repeats)
            row = _common.Row(
                "bench_unroll",
                provider,
                "iteration",
                f"N={steps}",
                "float32",
                statistics.median(times),
                min(times),
                max(times),
                peak / 2**20,
                _common.device_name(device),
                extra=f"convnet w{args.width} d{args.depth} 28x28, {n} images, batch {n}, augment, "
                f"{num_params} params" + (f", iterate checkpoint every {ckpt}" if ckpt else ""),
            )
            rows.append(row)
            print(f"N={steps:<3} {provider:<12} {row.median_ms:9.1f} ms  peak {row.peak_mib:8.2f} MiB", flush=True)

    print()
    _common.print_table(rows, baseline="bptt")
    print("\nratios (from the smallest to the largest N; and exact / bptt time per N):")
    by = {(r.provider, r.shape): r for r in rows}
    lo, hi = f"N={min(args.steps)}", f"N={max(args.steps)}"
    for provider in args.providers:
        if (provider, lo) in by and (provider, hi) in by:
            print(
                f"  {provider:<12} peak memory x{by[(provider, hi)].peak_mib / by[(provider, lo)].peak_mib:.2f}, "
                f"time x{by[(provider, hi)].median_ms / by[(provider, lo)].median_ms:.2f}"
            )
    for steps in args.steps:
        s = f"N={steps}"
        if ("exact", s) in by and ("bptt", s) in by:
            print(
                f"  {s:<6} exact/bptt time {by[('exact', s)].median_ms / by[('bptt', s)].median_ms:.2f}x, "
                f"memory {by[('exact', s)].peak_mib / by[('bptt', s)].peak_mib:.2f}x"
            )
    print("csv:", _common.write_csv(rows, "bench_unroll"))
    print("plot:", _common.plot(rows, "bench_unroll", title="trajectory matching: one iteration vs unroll length N"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
