"""Compile every Triton kernel of fastdistill ahead of time for sm_80 and sm_90, with no GPU, and report registers,
shared memory and spills per kernel and launch configuration.

The kernels are not compiled from hand-written signatures: each launcher in ``fastdistill/ops/*_triton.py`` is called
on fake CUDA tensors (``FakeTensorMode``: shapes, dtypes and strides, no memory, no device), and each kernel launch it
makes is captured and compiled by Triton's own launch path (``JITFunction.warmup``: the same argument specialization,
heuristics, block sizes and ``num_warps`` as a real launch) for a stand-in driver that reports the target GPU. Triton
ships ``ptxas``; ``cuobjdump`` reads the resources from the cubin. A kernel or launcher that changes is followed
automatically; a new launcher or a new regime of an existing one is one entry in ``SPECS`` below.

    python benchmarks/triton_aot.py [--arch 80 90] [--csv benchmarks/results/triton_aot.csv] [--jobs 2]

Exits non-zero when a kernel fails to compile, spills registers (local memory or a stack frame), or needs more shared
memory than the architecture has. There is no allow-list: a launch configuration that spills is fixed in its launcher
(e.g. ``launch_config`` in ``fastdistill/ops/attention_distill_triton.py``), which this script then compiles.
``tests/test_build.py`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's stand-ins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_CSV = os.path.join(ROOT, "benchmarks", "results", "triton_aot.csv")
# shared memory a block may use (opt-in maximum), bytes
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
FIELDS = [
    "kernel", "arch", "launch", "config", "num_warps", "num_stages", "registers", "smem_bytes", "spill_bytes",
    "stack_bytes", "ld_v4", "ld_b16",
]  # fmt: skip

BF16_V = 128256  # a Llama-3 vocabulary: the launchers' largest GPU tiles


# ------------------------------------------------------------------------------------------------------------- specs
# One entry per launch regime: (name, function that calls one launcher on fake CUDA tensors, extra checks). Keep in
# step with the launchers' signatures; block sizes and warps are the launchers' own.
def _distill_loss(
    divergence: str, *, V=BF16_V, Vt=None, labels=True, grad=True, ce=0.0, temperature=2.0, dtype="bfloat16"
):
    def call(torch):
        from fastdistill.ops.distill_loss import DIVERGENCE_ID, canonical_divergence
        from fastdistill.ops.distill_loss_triton import distill_loss_rows_triton

        dt = getattr(torch, dtype)
        s, t = torch.randn(8, V, device="cuda", dtype=dt), torch.randn(8, Vt or V, device="cuda", dtype=dt)
        lab = torch.randint(0, V, (8,), device="cuda") if labels else None
        beta = 0.3
        div = canonical_divergence(DIVERGENCE_ID[divergence], beta)
        one = torch.ones(1, device="cuda")
        vc = min(V, Vt or V)
        distill_loss_rows_triton(s, t, lab, one, div, beta, temperature, -100, temperature**2, grad, ce, 1.0, vc)

    return call


def _kl_div(log_target: bool, grad: bool, V=BF16_V):
    def call(torch):
        from fastdistill.ops.kl_div_triton import kl_div_rows_triton

        x, t = (torch.randn(8, V, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        kl_div_rows_triton(x, t, torch.ones(1, device="cuda"), log_target, grad)

    return call


def _attention(dtype: str, ds: int, dt: int, *, mask: bool, causal: bool, L=512):
    def call(torch):
        from fastdistill.ops.attention_distill_triton import attention_distill_triton

        d = getattr(torch, dtype)
        sq, sk = (torch.randn(2, 4, L, ds, device="cuda", dtype=d) for _ in range(2))
        tq, tk = (torch.randn(2, 4, L, dt, device="cuda", dtype=d) for _ in range(2))
        m = torch.ones(2, L, device="cuda", dtype=torch.bool) if mask else None
        w = torch.ones(2, 4, L, device="cuda")
        attention_distill_triton(sq, sk, tq, tk, m, causal, ds**-0.5, dt**-0.5, w)

    return call


def _topk(K: int, *, soft: bool, ce: bool, V=BF16_V):
    def call(torch):
        from fastdistill.ops.fused_linear_distill_triton import topk_grad, topk_stats

        C = 16
        s = torch.randn(C, V, device="cuda", dtype=torch.bfloat16)
        idx = torch.randint(0, V, (C, K), device="cuda")
        stats = topk_stats(s, idx, 2.0, ce)[:4]
        labels = torch.randint(0, V, (C,), device="cuda")
        g = torch.randn(C, K, device="cuda")
        r = torch.randn(C, device="cuda")
        topk_grad(s, idx, g, r, stats, labels, 2.0, 1.0, soft, ce)

    return call


VEC = {"vector_loads": True}  # bf16 rows must be read with 16-byte vector loads (one scalar read: the label's logit)
SPECS = [
    # distillation-loss row kernel: every divergence on the training path (labels + gradient), 4096-wide tiles
    *[(f"distill_loss {d} bf16 V={BF16_V}", _distill_loss(d), VEC) for d in
      ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")],
    ("distill_loss forward_kl eval (no labels, no grad)", _distill_loss("forward_kl", labels=False, grad=False), VEC),
    ("distill_loss forward_kl + fused CE (T=1)", _distill_loss("forward_kl", ce=1.0, temperature=1.0), VEC),
    ("distill_loss jsd + fused CE (T=2)", _distill_loss("jsd", ce=0.5), VEC),
    # a teacher narrower than the student (Vt < Vs: the divergence over [:Vt], CE over the student's whole row)
    ("distill_loss forward_kl + fused CE, Vt < Vs", _distill_loss("forward_kl", Vt=BF16_V - 256, ce=1.0), VEC),
    ("distill_loss jsd + fused CE, Vt < Vs", _distill_loss("jsd", Vt=BF16_V - 256, ce=0.5), VEC),
    (f"distill_loss forward_kl fp16 V={BF16_V}", _distill_loss("forward_kl", dtype="float16"), VEC),
    (f"distill_loss forward_kl fp32 V={BF16_V}", _distill_loss("forward_kl", dtype="float32"), {}),
    ("distill_loss forward_kl fp32 V=1000 (1024 tile)", _distill_loss("forward_kl", V=1000, dtype="float32"), {}),
    # kl_div row kernel
    ("kl_div log_target grad", _kl_div(True, True), VEC),
    ("kl_div prob target no grad", _kl_div(False, False), VEC),
    # attention distillation: forward + dq + dk; head sizes <= 64 and > 64 take different tiles
    ("attention bf16 d=64 causal", _attention("bfloat16", 64, 64, mask=False, causal=True), {}),
    ("attention bf16 ds=128 dt=64 mask", _attention("bfloat16", 128, 64, mask=True, causal=False), {}),
    ("attention fp16 d=64 mask", _attention("float16", 64, 64, mask=True, causal=False), {}),
    # fp32 inputs: exact fp32 dots (FMA), the launcher's own tiles and stages for them (fp64 is converted to fp32)
    ("attention fp32 d=64 mask causal", _attention("float32", 64, 64, mask=True, causal=True), {}),
    ("attention fp32 ds=128 dt=64", _attention("float32", 128, 64, mask=False, causal=False), {}),
    # sparse top-k term of the fused lm-head loss: the membership tile is [BLOCK_V, BLOCK_K]
    ("topk K=64 soft + CE", _topk(64, soft=True, ce=True), {}),
    ("topk K=8 soft", _topk(8, soft=True, ce=False), {}),
    ("topk K=256 soft + CE", _topk(256, soft=True, ce=True), {}),
]  # fmt: skip


# --------------------------------------------------------------------------------------------------------- machinery
class _Driver:
    """Stands in for Triton's CUDA driver: reports the target GPU; the device id is the arch (one binder per target)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


class _Launch:
    def __init__(self, spec: str, name: str, kernel, grid, args, kwargs):
        self.spec, self.name, self.kernel, self.grid, self.args, self.kwargs = spec, name, kernel, grid, args, kwargs


def _global_loads(ptx: str) -> tuple[int, int]:
    """(16-byte vector loads, scalar 16-bit loads) from global memory in a kernel's PTX."""
    loads = re.findall(r"ld\.global[\w:.]*", ptx)
    return sum(ld.endswith(".v4.b32") for ld in loads), sum(ld.endswith(".b16") for ld in loads)


def _capture(spec_name: str, call) -> list[_Launch]:
    """Run one spec's launcher on fake CUDA tensors and return the kernel launches it made (args as MockTensors)."""
    import torch
    import triton
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.jit import JITFunction, MockTensor

    launches: list[_Launch] = []

    def getitem(self, grid):
        def launch(*args, **kwargs):
            def mock(a):
                return MockTensor(a.dtype, list(a.shape)) if isinstance(a, torch.Tensor) else a

            fn = self.fn if not isinstance(self, JITFunction) else self
            launches.append(
                _Launch(
                    spec_name, fn.__name__, self, grid, [mock(a) for a in args], {k: mock(v) for k, v in kwargs.items()}
                )
            )

        return launch

    kinds = (JITFunction, triton.runtime.autotuner.Heuristics)
    saved = {k: k.__getitem__ for k in kinds}
    try:
        for k in kinds:
            k.__getitem__ = getitem
        with FakeTensorMode(), _no_cuda_context(torch):
            call(torch)
    finally:
        for k, f in saved.items():
            k.__getitem__ = f
    if not launches:
        raise RuntimeError(f"{spec_name}: the launcher made no Triton launch")
    return launches


@contextlib.contextmanager
def _no_cuda_context(torch):
    """What a CPU-only torch cannot do on fake CUDA tensors, made possible while a launcher runs: ``with
    torch.cuda.device(t.device)`` (would initialise CUDA) becomes a no-op, and the Tensor methods whose Python binding
    takes a CUDA device guard (``t[...]``, ``contiguous``, ``copy_``) go through the dispatcher's ops instead."""
    T = torch.Tensor
    saved = {"device": torch.cuda.device, "__getitem__": T.__getitem__, "contiguous": T.contiguous, "copy_": T.copy_}
    saved_getitem = saved["__getitem__"]

    def getitem(self, index):
        items = index if isinstance(index, tuple) else (index,)
        if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
            return saved_getitem(self, index)  # advanced indexing: no device guard needed
        out, dim = self, 0
        for pos, i in enumerate(items):
            if i is Ellipsis:
                dim = out.dim() - sum(j is not None and j is not Ellipsis for j in items[pos + 1 :])
            elif i is None:
                out, dim = out.unsqueeze(dim), dim + 1
            elif isinstance(i, int):
                out = out.select(dim, i)
            else:
                start, stop, step = i.indices(out.shape[dim])
                out, dim = torch.ops.aten.slice.Tensor(out, dim, start, stop, step), dim + 1
        return out

    def contiguous(self, memory_format=torch.contiguous_format):
        if self.is_contiguous(memory_format=memory_format):
            return self
        return torch.ops.aten.clone.default(self, memory_format=memory_format)

    def copy_(self, src, non_blocking=False):
        return torch.ops.aten.copy_.default(self, src, non_blocking)

    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
    T.__getitem__, T.contiguous, T.copy_ = getitem, contiguous, copy_
    try:
        yield
    finally:
        torch.cuda.device = saved["device"]
        T.__getitem__, T.contiguous, T.copy_ = saved["__getitem__"], saved["contiguous"], saved["copy_"]


def _resources(cubin: bytes) -> dict[str, int]:
    """REG / SHARED / LOCAL / STACK of the one function in a cubin, from the cuobjdump Triton ships."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def compile_arch(arch: int) -> list[dict]:
    """Capture every spec's launches and compile them for ``arch``; one row per distinct compiled kernel."""
    from triton.runtime.driver import driver

    rows, seen = [], set()
    saved = driver._active
    driver.set_active(_Driver(arch))
    try:
        for spec_name, call, checks in SPECS:
            for launch in _capture(spec_name, call):
                start = time.perf_counter()
                compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
                seconds = time.perf_counter() - start
                key = (launch.name, compiled.hash)
                if key in seen:  # two specs reached the same specialization
                    continue
                seen.add(key)
                res = _resources(compiled.asm["cubin"])
                vec, b16 = _global_loads(compiled.asm["ptx"])
                smem = max(int(compiled.metadata.shared), res["static_shared"])
                rows.append(
                    {
                        "kernel": launch.name,
                        "arch": f"sm_{arch}",
                        "launch": spec_name,
                        "config": _config(compiled),
                        "num_warps": compiled.metadata.num_warps,
                        "num_stages": compiled.metadata.num_stages,
                        "registers": res["registers"],
                        "smem_bytes": smem,
                        "spill_bytes": res["local"],
                        "stack_bytes": res["stack"],
                        "ld_v4": vec,
                        "ld_b16": b16,
                        "_ptx_local": ".local" in compiled.asm["ptx"],
                        "_checks": checks,
                        "_seconds": round(seconds, 2),
                    }
                )
    finally:
        driver._active = saved
    return rows


def _config(compiled) -> str:
    """The constexpr arguments of a compiled kernel (block sizes and flags), e.g. 'BLOCK_V=4096 HAS_CE=False'."""
    src = compiled.src
    names = src.fn.arg_names
    parts = []
    for key, value in src.constants.items():
        idx = key[0] if isinstance(key, tuple) else key
        name = names[idx] if isinstance(idx, int) else str(key)
        if name.isupper():
            parts.append(f"{name}={value}")
    return " ".join(parts)


def problems(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        where = f"{r['kernel']} {r['arch']} [{r['config']}] ({r['launch']})"
        spills = r["spill_bytes"] or r["stack_bytes"] or r["_ptx_local"]
        if spills:
            out.append(f"{where}: spills ({r['spill_bytes']} B local, {r['stack_bytes']} B stack per thread)")
        if r["_checks"].get("vector_loads") and (r["ld_v4"] == 0 or r["ld_b16"] > 1):
            out.append(f"{where}: rows not read with 16-byte vector loads ({r['ld_v4']} vector, {r['ld_b16']} scalar)")
        limit = MAX_SHARED.get(int(r["arch"][3:]))
        if limit is not None and r["smem_bytes"] > limit:
            out.append(f"{where}: {r['smem_bytes']} B shared memory > {limit} B available on {r['arch']}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    ap.add_argument("--csv", default=DEFAULT_CSV, help="where to write the table ('' to skip)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel architectures")
    args = ap.parse_args(argv)
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        print("this triton install has no bundled ptxas: cannot compile for NVIDIA GPUs", file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.jobs > 1 and len(args.arch) > 1:
        with ProcessPoolExecutor(min(args.jobs, len(args.arch))) as pool:
            per_arch = list(pool.map(compile_arch, args.arch))
    else:
        per_arch = [compile_arch(a) for a in args.arch]
    rows = [r for rs in per_arch for r in rs]
    elapsed = time.perf_counter() - start
    for r in rows:
        print(
            f"{r['arch']}  {r['kernel']:<30} warps={r['num_warps']:<2} stages={r['num_stages']} "
            f"regs={r['registers']:<3} smem={r['smem_bytes']:<6} spill={r['spill_bytes']} stack={r['stack_bytes']}  "
            f"[{r['config']}]  ({r['launch']}; {r['_seconds']} s)"
        )
    kernels = sorted({r["kernel"] for r in rows})
    print(f"{len(rows)} compiled kernels ({len(kernels)} kernels: {', '.join(kernels)}) in {elapsed:.1f} s")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}")
    bad = problems(rows)
    for p in bad:
        print("FAIL", p, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
