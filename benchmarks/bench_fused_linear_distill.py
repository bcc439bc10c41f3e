"""Benchmark of the fused lm-head + distillation loss against materialized logits.

    python benchmarks/bench_fused_linear_distill.py --preset cpu     # N=4096, H=512, V=32000 fp32 (the CPU target)
    python benchmarks/bench_fused_linear_distill.py --preset gpu     # N=8192, H=4096, V=128256 bf16, TFLOP/s, Liger
    python benchmarks/bench_fused_linear_distill.py --preset smoke   # seconds; used by the test suite

Providers: ``torch`` (eager, both logits materialized: the float64-tested reference
``fastdistill/ops/fused_linear_distill_ref.py`` run in the input dtype), ``torch.compile`` of it, ``fastdistill``
(``fused_linear_distill_loss``, default backend), ``fastdistill-topk64`` (the same student against a top-64 sparse
teacher cache) and Liger-Kernel's ``LigerFusedLinearJSDLoss`` where installed (GPU). Mode ``full`` = forward +
backward (the fused loss computes its gradients in the forward, so only ``full`` compares like with like).
Rows go to benchmarks/results/fused_linear_distill.csv and a plot. On CUDA the script also measures the bf16 matmul
rate of one [N, H] x [H, V] product and reports each provider's rate over the four N x H x V matmuls a dense step
needs (teacher forward, student forward, dX, dW).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import fastdistill.functional as FD  # noqa: E402
from fastdistill import _backend  # noqa: E402
from fastdistill.ops.fused_linear_distill_ref import fused_linear_distill_loss_ref  # noqa: E402

PRESETS = {
    "smoke": dict(shape=(64, 32, 1000), dtype="float32", divergences=["forward_kl"], repeats=2, compile=False),
    "cpu": dict(shape=(4096, 512, 32000), dtype="float32", divergences=["forward_kl"], repeats=3, compile=True),
    "gpu": dict(shape=(8192, 4096, 128256), dtype="bfloat16", divergences=["jsd"], repeats=10, compile=True),
}
BETA = 0.5
TOPK = 64


def liger_fn(divergence, device):
    """Liger's fused-linear JSD (beta=0.5; forward / reverse KL at beta 0 / 1), or None when unavailable."""
    if device.type != "cuda":
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearJSDLoss
    except Exception:
        return None
    beta = {"jsd": BETA, "forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence)
    if beta is None:
        return None
    # Liger's jsd_beta weights the teacher like ours: beta=0 -> forward KL, beta=1 -> reverse KL
    loss = LigerFusedLinearJSDLoss(jsd_beta=beta, temperature=1.0)
    return lambda xs, ws, xt, wt: loss(xs, ws, xt, wt)


def matmul_tflops(N, H, V, dtype, device) -> float:
    """Measured rate of one [N, H] x [H, V] matmul (TFLOP/s), the yardstick for the fused loss."""
    a = torch.randn(N, H, device=device, dtype=dtype)
    b = torch.randn(H, V, device=device, dtype=dtype)
    times = C.time_fn(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * N * H * V / (sorted(times)[len(times) // 2] / 1e3) / 1e12


def run(preset: str, *, providers_filter=None, repeats=None, csv_name="fused_linear_distill", plot=True, device=None):
    cfg = PRESETS[preset]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, cfg["dtype"])
    repeats = repeats or cfg["repeats"]
    N, H, V = cfg["shape"]
    shape = f"{N}x{H}x{V}"
    print(f"# fused_linear_distill benchmark, preset {preset}: {C.device_name(device)}; {_backend.describe()}")
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, device=device, dtype=torch.float32, generator=g) * scale).to(dtype)

    xs = rnd(N, H).requires_grad_()
    ws = rnd(V, H, scale=H**-0.5).requires_grad_()
    xt = rnd(N, H)
    wt = rnd(V, H, scale=H**-0.5)
    with torch.no_grad():  # the top-k cache an offline teacher pass would have written
        lp = torch.log_softmax((xt @ wt.t()).float(), dim=-1)
        topk = tuple(t.contiguous() for t in lp.topk(TOPK, dim=-1))
        topk = (topk[0].to(dtype), topk[1])
        del lp

    rows = []
    for divergence in cfg["divergences"]:
        kw = dict(divergence=divergence, beta=BETA)

        def eager(xs, ws, xt, wt, kw=kw):
            return fused_linear_distill_loss_ref(xs, ws, xt, wt, **kw)

        provs = {"torch": eager}
        if cfg["compile"]:
            provs["torch.compile"] = torch.compile(eager)
        provs["fastdistill"] = lambda xs, ws, xt, wt, kw=kw: FD.fused_linear_distill_loss(xs, ws, xt, wt, **kw)
        if divergence != "reverse_kl":
            provs[f"fastdistill-topk{TOPK}"] = lambda xs, ws, xt, wt, kw=kw: FD.fused_linear_distill_loss(
                xs, ws, teacher_topk=topk, **kw
            )
        liger = liger_fn(divergence, device)
        if liger is not None:
            provs["liger-fused-linear-jsd"] = liger
        for name, fn in provs.items():
            if providers_filter and name not in providers_filter:
                continue

            def clear():
                xs.grad = None
                ws.grad = None

            def step(fn=fn):
                fn(xs, ws, xt, wt).backward()

            try:
                row = C.measure(
                    "fused_linear_distill",
                    name,
                    "full",
                    shape,
                    dtype,
                    device,
                    step,
                    setup=clear,
                    repeats=repeats,
                    warmup=1 if device.type == "cpu" else 3,
                    extra=divergence,
                )
            except Exception as err:  # a provider that fails is reported, not fatal
                print(f"  {name} {divergence}: failed: {type(err).__name__}: {err}")
                continue
            print(f"  {name:<22} {divergence:<11} {row.median_ms:10.1f} ms  {row.peak_mib:9.1f} MiB", flush=True)
            if len(cfg["divergences"]) > 1:
                row.provider = f"{name}:{divergence}"
            rows.append(row)
            clear()
    if device.type == "cuda" and rows:
        rate = matmul_tflops(N, H, V, dtype, device)
        print(
            f"# measured matmul rate ([{N},{H}] x [{H},{V}] {cfg['dtype']}): {rate:.0f} TFLOP/s; the four-matmul "
            f"floor is {4 * 2 * N * H * V / rate / 1e9:.1f} ms"
        )
        for r in rows:
            tf = 4 * 2 * N * H * V / (r.median_ms / 1e3) / 1e12
            r.extra += f" TFLOP/s={tf:.0f} ({100 * tf / rate:.0f}% of matmul)"
    for d in cfg["divergences"]:
        sub = [r for r in rows if r.extra.startswith(d)]
        for r in sub:
            r.provider = r.provider.rsplit(":", 1)[0]
        print(f"\n## {d}")
        C.print_table(sub, baseline="torch")
        for r in sub:
            if len(cfg["divergences"]) > 1:
                r.provider = f"{r.provider}:{d}"
    path = C.write_csv(rows, csv_name) if rows else None
    png = (
        C.plot(rows, csv_name + f"_{preset}", title=f"fused_linear_distill ({preset}, {C.device_name(device)})")
        if plot and rows
        else None
    )
    print(f"\nrows appended to {path}" + (f"; plot {png}" if png else ""))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--providers", nargs="*", help="only these providers (e.g. torch fastdistill)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--csv", default="fused_linear_distill", help="CSV / plot name under benchmarks/results/")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads for every provider (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run(a.preset, providers_filter=a.providers, repeats=a.repeats, csv_name=a.csv, plot=not a.no_plot, device=a.device)


if __name__ == "__main__":
    main()
