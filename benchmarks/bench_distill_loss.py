"""Microbenchmark of the logit-distillation loss: torch eager, torch.compile, every fastdistill backend, Liger.

    python benchmarks/bench_distill_loss.py --preset cpu      # N=4096, V=32000 fp32, the CPU target (also `make demo`)
    python benchmarks/bench_distill_loss.py --preset gpu      # N=8192, V=128256 bf16, + GB/s vs copy bandwidth, Liger
    python benchmarks/bench_distill_loss.py --preset smoke    # seconds; used by the test suite
    python benchmarks/bench_distill_loss.py --preset fallback --providers torch fastdistill-torch   # the torch fallback

Modes: ``forward`` (loss; fastdistill also computes the gradient here, as it does in training), ``backward`` (after an
untimed forward), ``full`` (forward + backward). Rows are appended to benchmarks/results/distill_loss.csv and plotted
to benchmarks/results/distill_loss.png. The torch provider is what a user writes: log_softmax + kl_div for forward
KL, the reference formula (fastdistill.reference) for the other divergences.
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
from fastdistill import reference as R  # noqa: E402

PRESETS = {
    "smoke": dict(
        shapes=[(64, 1000)], dtype="float32", divergences=["forward_kl"], modes=["full"], repeats=2, compile=False
    ),
    "cpu": dict(
        shapes=[(4096, 32000)],
        dtype="float32",
        divergences=["forward_kl", "jsd"],
        modes=["forward", "backward", "full"],
        repeats=5,
        compile=True,
    ),
    # the torch fallback (no compiler: what `pip install` without a build gives) against the plain eager formula:
    #   python benchmarks/bench_distill_loss.py --preset fallback --providers torch fastdistill-torch
    "fallback": dict(
        shapes=[(4096, 32000)],
        dtype="float32",
        divergences=["forward_kl"],
        modes=["full"],
        repeats=5,
        compile=False,
    ),
    "demo": dict(
        shapes=[(4096, 32000)],
        dtype="float32",
        divergences=["forward_kl"],
        modes=["forward", "full"],
        repeats=3,
        compile=True,
    ),
    "gpu": dict(
        shapes=[(8192, 128256)],
        dtype="bfloat16",
        divergences=list(R.DIVERGENCES),
        modes=["forward", "backward", "full"],
        repeats=10,
        compile=True,
    ),
}


def torch_loss(s, t, divergence, temperature=1.0, beta=0.5):
    """The plain-torch provider, in the input dtype."""
    if divergence == "forward_kl":
        return (
            F.kl_div(
                F.log_softmax(s / temperature, -1),
                F.log_softmax(t / temperature, -1),
                reduction="batchmean",
                log_target=True,
            )
            * temperature**2
        )
    return R.distill_loss(s, t, divergence=divergence, beta=beta, temperature=temperature)


def liger_loss_fn(divergence):
    """Liger-Kernel's equivalent on log-probabilities, or None when Liger is not installed / has no equivalent."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss, LigerTVDLoss
    except Exception:
        return None
    if divergence == "forward_kl":
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda s, t: kl(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1))
    if divergence in ("jsd", "reverse_kl"):
        jsd = LigerJSD(beta=0.5 if divergence == "jsd" else 1.0)
        return lambda s, t: jsd(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1))
    if divergence == "tvd":
        tvd = LigerTVDLoss(reduction="batchmean")
        return lambda s, t: tvd(F.softmax(s.float(), -1), F.softmax(t.float(), -1))
    return None


def providers(device, divergence, use_compile):
    out = {"torch": lambda s, t: torch_loss(s, t, divergence)}
    if use_compile:
        compiled = torch.compile(lambda s, t: torch_loss(s, t, divergence))
        out["torch.compile"] = compiled
    for b in _backend.BACKENDS:
        try:
            from fastdistill.ops.distill_loss import resolve_backend

            resolve_backend(device, b)
        except RuntimeError:
            continue
        if b == "triton" and device.type != "cuda":
            continue  # the interpreter is a correctness tool, not a benchmark provider
        out[f"fastdistill-{b}"] = lambda s, t, b=b: FD.distill_loss(s, t, divergence=divergence, backend=b)
    if device.type == "cuda":
        liger = liger_loss_fn(divergence)
        if liger is not None:
            out["liger"] = liger
    return out


def copy_bandwidth_gbs(device, nbytes=2**30):
    """Measured device-to-device copy bandwidth (read + write bytes per second)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = C.time_fn(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * nbytes / (sorted(times)[len(times) // 2] / 1e3) / 1e9


def _measure_mode(name, fn, mode, s0, t, divergence, device, dtype, repeats):
    """One (provider, mode) row: ``forward`` (loss only), ``backward`` (after an untimed forward) or ``full``."""
    s = s0.clone().requires_grad_(True)
    state = {}

    def clear():
        s.grad = None

    def forward_only():
        return fn(s, t)

    def full():
        fn(s, t).backward()

    def prepare_backward():
        s.grad = None
        state["loss"] = fn(s, t)

    def backward_only():
        state["loss"].backward()

    run_fn, setup = {
        "forward": (forward_only, None),
        "full": (full, clear),
        "backward": (backward_only, prepare_backward),
    }[mode]
    N, V = s0.shape
    try:
        return C.measure(
            "distill_loss",
            name,
            mode,
            f"{N}x{V}",
            dtype,
            device,
            run_fn,
            setup=setup,
            repeats=repeats,
            extra=divergence,
        )
    except Exception as err:  # a provider that fails (e.g. compile unsupported) is reported, not fatal
        print(f"  {name} {mode} {divergence}: failed: {type(err).__name__}: {err}")
        return None


def run(
    preset: str,
    *,
    providers_filter=None,
    repeats=None,
    csv_name="distill_loss",
    plot=True,
    device=None,
    divergences=None,
    modes=None,
):
    cfg = dict(PRESETS[preset])
    if divergences:
        cfg["divergences"] = list(divergences)
    if modes:
        cfg["modes"] = list(modes)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, cfg["dtype"])
    repeats = repeats or cfg["repeats"]
    print(f"# distill_loss benchmark, preset {preset}: {C.device_name(device)}; {_backend.describe()}")
    rows = []
    for N, V in cfg["shapes"]:
        g = torch.Generator(device=device).manual_seed(0)
        s0 = torch.randn(N, V, device=device, dtype=dtype, generator=g) * 2
        t = torch.randn(N, V, device=device, dtype=dtype, generator=g) * 2
        for divergence in cfg["divergences"]:
            for name, fn in providers(device, divergence, cfg["compile"]).items():
                if providers_filter and name not in providers_filter:
                    continue
                for mode in cfg["modes"]:
                    row = _measure_mode(name, fn, mode, s0, t, divergence, device, dtype, repeats)
                    if row is None:
                        continue
                    row.provider = f"{name}" if len(cfg["divergences"]) == 1 else f"{name}:{divergence}"
                    if device.type == "cuda" and mode in ("forward", "full") and name.startswith("fastdistill"):
                        # minimum traffic: read both logits once, write the gradient once
                        row.extra += f" GB/s={3 * N * V * s0.element_size() / (row.median_ms / 1e3) / 1e9:.0f}"
                    rows.append(row)
    if device.type == "cuda":
        bw = copy_bandwidth_gbs(device)
        print(f"# measured copy bandwidth: {bw:.0f} GB/s (read + write)")
        for r in rows:
            if "GB/s=" in r.extra:
                gbs = float(r.extra.split("GB/s=")[1])
                r.extra += f" ({100 * gbs / bw:.0f}% of copy)"
    C.print_table(rows, baseline="torch" if len(cfg["divergences"]) == 1 else None)
    if len(cfg["divergences"]) > 1:
        for d in cfg["divergences"]:
            sub = [r for r in rows if r.provider.endswith(":" + d)]
            for r in sub:
                r.provider = r.provider.rsplit(":", 1)[0]
            print(f"\n## {d}")
            C.print_table(sub, baseline="torch")
            for r in sub:
                r.provider = f"{r.provider}:{d}"
    path = C.write_csv(rows, csv_name) if rows else None
    png = (
        C.plot(rows, csv_name + f"_{preset}", title=f"distill_loss ({preset}, {C.device_name(device)})")
        if (plot and rows)
        else None
    )
    print(f"\nrows appended to {path}" + (f"; plot {png}" if png else ""))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--providers", nargs="*", help="only these providers (e.g. torch fastdistill-cpp)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--csv", default="distill_loss", help="CSV / plot name under benchmarks/results/")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--divergences", nargs="*", choices=R.DIVERGENCES, help="override the preset's divergences")
    p.add_argument("--modes", nargs="*", choices=("forward", "backward", "full"), help="override the preset's modes")
    a = p.parse_args(argv)
    run(
        a.preset,
        providers_filter=a.providers,
        repeats=a.repeats,
        csv_name=a.csv,
        plot=not a.no_plot,
        device=a.device,
        divergences=a.divergences,
        modes=a.modes,
    )


if __name__ == "__main__":
    main()
