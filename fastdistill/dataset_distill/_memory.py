"""Peak extra memory of a call, for the unroll tests and benchmark: CUDA from the caching allocator's statistics,
CPU from the profiler's allocation events (torch tensors only; what the call allocates beyond its inputs)."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch


def _is_cpu(event) -> bool:
    # the event's device type is a DeviceType enum that does not compare equal to 0 in every torch build
    dt = event.device_type()
    return dt == torch.autograd.DeviceType.CPU or str(dt).endswith("CPU")


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and _is_cpu(e)]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)
