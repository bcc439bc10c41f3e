"""Microbenchmark of attention-distribution distillation (MiniLM KL(A_t || A_s) per query row).

    python benchmarks/bench_attention_distill.py --preset cpu     # B=2, H=8, L=2048, D=64 fp32: the CPU target
    python benchmarks/bench_attention_distill.py --preset gpu     # L = 1024 .. 8192, bf16 and fp32, + torch.compile
    python benchmarks/bench_attention_distill.py --preset smoke   # seconds

Providers: ``torch`` is the materialized eager loss a user writes (q k^T, log_softmax of both maps, kl_div over
[B, H, L, L]; the baseline, from the same maths as fastdistill.ops.attention_distill_ref); ``torch.compile`` of it
(``--compile``, default on the GPU preset); ``fastdistill-torch`` the tiled torch backend (the CPU path);
``fastdistill-triton`` the flash-style Triton kernels (CUDA only: the interpreter is a correctness tool).
On CPU the peak memory of ``fastdistill-torch`` is measured on its serial variant: the profiler sees only the calling
thread's allocations, and the timed path splits the same block budget over worker threads.
Modes: ``forward`` (loss; fastdistill computes the gradient here too when q / k require grad, as in training) and
``full`` (forward + backward). Rows go to benchmarks/results/attention_distill.csv and a plot next to it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import fastdistill.functional as FD  # noqa: E402
from fastdistill import _backend  # noqa: E402
from fastdistill.ops import attention_distill as _att  # noqa: E402

PRESETS = {
    "smoke": dict(B=1, H=2, Ls=[256], D=32, dtypes=["float32"], modes=["full"], repeats=2, compile=False, causal=False),
    "cpu": dict(
        B=2, H=8, Ls=[2048], D=64, dtypes=["float32"], modes=["forward", "full"], repeats=3, compile=False, causal=False
    ),
    "gpu": dict(
        B=2,
        H=8,
        Ls=[1024, 2048, 4096, 8192],
        D=64,
        dtypes=["bfloat16", "float32"],
        modes=["forward", "full"],
        repeats=10,
        compile=True,
        causal=False,
    ),
}


def torch_loss(sq, sk, tq, tk, causal=False):
    """Materialized eager baseline: both [B, H, L, L] maps, log_softmax, KL, batchmean over heads and rows."""
    B, H, L, D = sq.shape
    s = (sq @ sk.transpose(-1, -2)) * D**-0.5
    t = (tq @ tk.transpose(-1, -2)) * tq.shape[-1] ** -0.5
    if causal:  # finite fill: exp() is 0 there and 0 * finite stays 0 (with -inf kl_div would give NaN)
        hide = torch.ones(L, L, dtype=torch.bool, device=sq.device).triu(1)
        s = s.masked_fill(hide, torch.finfo(s.dtype).min)
        t = t.masked_fill(hide, torch.finfo(t.dtype).min)
    log_s, log_t = s.float().log_softmax(-1), t.float().log_softmax(-1)
    return F.kl_div(log_s, log_t, reduction="sum", log_target=True) / (B * H * L)


def providers(device, causal, use_compile):
    out = {"torch": lambda *a: torch_loss(*a, causal=causal)}
    if use_compile:
        out["torch.compile"] = torch.compile(lambda *a: torch_loss(*a, causal=causal))
    for b in ("triton", "torch"):
        try:
            _backend.choose_backend(device, backend=b)
        except RuntimeError:
            continue
        if b == "triton" and device.type != "cuda":
            continue
        out[f"fastdistill-{b}"] = lambda *a, b=b: FD.attention_distill_loss(*a, causal=causal, backend=b)
    return out


def run(
    preset: str,
    *,
    providers_filter=None,
    repeats=None,
    use_compile=None,
    causal=None,
    device=None,
    csv_name="attention_distill",
    plot=True,
):
    cfg = PRESETS[preset]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    repeats = repeats or cfg["repeats"]
    use_compile = cfg["compile"] if use_compile is None else use_compile
    causal = cfg["causal"] if causal is None else causal
    print(f"# attention_distill benchmark, preset {preset}: {C.device_name(device)}; {_backend.describe()}")
    rows = []
    B, H, D = cfg["B"], cfg["H"], cfg["D"]
    for dtype_name in cfg["dtypes"]:
        dtype = getattr(torch, dtype_name)
        for L in cfg["Ls"]:
            g = torch.Generator(device=device).manual_seed(0)
            sq0, sk0, tq, tk = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g) for _ in range(4))
            for name, fn in providers(device, causal, use_compile).items():
                if providers_filter and name not in providers_filter:
                    continue
                for mode in cfg["modes"]:
                    sq, sk = sq0.clone().requires_grad_(True), sk0.clone().requires_grad_(True)

                    def clear():
                        sq.grad = sk.grad = None

                    if mode == "forward":
                        run_fn, setup = (lambda: fn(sq, sk, tq, tk)), None
                    else:
                        run_fn, setup = (lambda: fn(sq, sk, tq, tk).backward()), clear
                    try:
                        row = C.measure(
                            "attention_distill",
                            name,
                            mode,
                            f"{B}x{H}x{L}x{D}",
                            dtype,
                            device,
                            run_fn,
                            setup=setup,
                            repeats=repeats,
                            extra="causal" if causal else "",
                        )
                    except Exception as err:  # e.g. out of memory for the materialized maps at long L
                        print(f"  {name} {mode} L={L} {dtype_name}: failed: {type(err).__name__}: {err}")
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    if name == "fastdistill-torch" and device.type == "cpu" and _att.TORCH_CPU_THREADS:
                        # the profiler records allocations of the calling thread only, so the CPU path's worker
                        # threads would go unseen: take the peak from its serial variant, which allocates the same
                        # block budget in one thread (the workers split it: budget / workers each)
                        _att.TORCH_CPU_THREADS = False
                        try:
                            if setup is not None:
                                setup()
                            row.peak_mib = C.peak_memory_bytes(run_fn, device) / 2**20
                        finally:
                            _att.TORCH_CPU_THREADS = True
                        row.extra = (row.extra + " peak=serial path").strip()
                    rows.append(row)
    C.print_table(rows, baseline="torch")
    if rows:
        print("csv:", C.write_csv(rows, csv_name))
        if plot:
            print("plot:", C.plot(rows, csv_name, title=f"attention_distill ({preset})"))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--providers", nargs="*", help="subset of providers to run")
    p.add_argument("--repeats", type=int)
    p.add_argument("--compile", dest="use_compile", action="store_true", default=None, help="add torch.compile")
    p.add_argument("--causal", action="store_true", default=None, help="causal mask on both models")
    p.add_argument("--device")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    args = p.parse_args(argv)
    run(
        args.preset,
        providers_filter=args.providers,
        repeats=args.repeats,
        use_compile=args.use_compile,
        causal=args.causal,
        device=args.device,
        plot=args.plot,
    )


if __name__ == "__main__":
    main()
