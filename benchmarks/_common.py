"""Shared benchmark harness: timing (median / min / max), peak extra memory, one CSV, plots.

Every bench_<op>.py builds a list of cases (provider x mode x shape) and calls ``run_case``; rows go to
``benchmarks/results/<name>.csv`` (appended, with device, provider, shape, dtype, versions and git sha) and a PNG plot.
Peak memory is the extra memory allocated while the measured call runs, on top of its inputs: CUDA from the caching
allocator's statistics, CPU from the profiler's allocation events (torch tensors only).
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def results_dir() -> str:
    """Where CSVs and plots go: ``FASTDISTILL_BENCH_RESULTS`` or benchmarks/results/."""
    path = os.environ.get("FASTDISTILL_BENCH_RESULTS") or RESULTS
    os.makedirs(path, exist_ok=True)
    return path


def git_sha() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 5,
    setup: Callable[[], object] | None = None,
) -> list[float]:
    """Wall times in ms of ``fn()`` (``setup()`` runs untimed before each call, e.g. to clear grads)."""
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during ``fn()`` beyond what was allocated before it (outputs included while alive)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    ]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


@dataclass
class Row:
    bench: str
    provider: str
    mode: str
    shape: str
    dtype: str
    median_ms: float
    min_ms: float
    max_ms: float
    peak_mib: float
    device: str
    extra: str = ""
    torch_version: str = field(default_factory=lambda: torch.__version__)
    git_sha: str = field(default_factory=git_sha)
    date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def measure(
    bench: str,
    provider: str,
    mode: str,
    shape: str,
    dtype: torch.dtype,
    device: torch.device,
    fn: Callable[[], object],
    *,
    setup: Callable[[], object] | None = None,
    warmup: int = 2,
    repeats: int = 5,
    extra: str = "",
) -> Row:
    if setup is not None:
        setup()
    peak = peak_memory_bytes(fn, device)
    times = time_fn(fn, device, warmup=warmup, repeats=repeats, setup=setup)
    return Row(
        bench,
        provider,
        mode,
        shape,
        str(dtype).replace("torch.", ""),
        statistics.median(times),
        min(times),
        max(times),
        peak / 2**20,
        device_name(device),
        extra,
    )


def write_csv(rows: list[Row], name: str) -> str:
    path = os.path.join(results_dir(), f"{name}.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    return path


def print_table(rows: list[Row], baseline: str | None = None) -> None:
    """Aligned table; with ``baseline``, the time and memory ratio of every provider to it per (mode, shape)."""
    base = {(r.mode, r.shape, r.dtype): r for r in rows if r.provider == baseline}
    hdr = f"{'provider':<22}{'mode':<10}{'shape':<22}{'dtype':<10}{'median ms':>11}{'min':>9}{'max':>9}{'peak MiB':>10}"
    if baseline:
        hdr += f"{'speedup':>9}{'mem x':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        line = (
            f"{r.provider:<22}{r.mode:<10}{r.shape:<22}{r.dtype:<10}{r.median_ms:>11.2f}{r.min_ms:>9.2f}"
            f"{r.max_ms:>9.2f}{r.peak_mib:>10.1f}"
        )
        b = base.get((r.mode, r.shape, r.dtype))
        if baseline and b is not None:
            line += (
                f"{b.median_ms / r.median_ms:>8.2f}x{(r.peak_mib / b.peak_mib if b.peak_mib else float('nan')):>8.2f}"
            )
        print(line)


def plot(rows: list[Row], name: str, *, x: str = "shape", title: str | None = None) -> str | None:
    """One panel per mode: median time per provider (bars, min-max as error bars) and peak memory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot")
        return None
    modes = list(dict.fromkeys(r.mode for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    xs = list(dict.fromkeys(getattr(r, x) for r in rows))
    fig, axes = plt.subplots(2, len(modes), figsize=(5 * len(modes), 7), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for j, mode in enumerate(modes):
        for k, prov in enumerate(providers):
            sel = {getattr(r, x): r for r in rows if r.mode == mode and r.provider == prov}
            pos = [i + k * width for i, v in enumerate(xs) if v in sel]
            vals = [sel[v] for v in xs if v in sel]
            if not vals:
                continue
            med = [r.median_ms for r in vals]
            err = [[r.median_ms - r.min_ms for r in vals], [r.max_ms - r.median_ms for r in vals]]
            axes[0][j].bar(pos, med, width, yerr=err, label=prov)
            axes[1][j].bar(pos, [r.peak_mib for r in vals], width, label=prov)
        for ax, ylabel in ((axes[0][j], "median ms"), (axes[1][j], "peak extra MiB")):
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(xs))])
            ax.set_xticklabels(xs, rotation=20, fontsize=7)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}")
        axes[0][j].legend(fontsize=7)
    fig.suptitle(title or name)
    fig.tight_layout()
    path = os.path.join(results_dir(), f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
