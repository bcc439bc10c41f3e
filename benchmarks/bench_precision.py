"""fp32 precision of the distillation loss at large vocabularies: every divergence, every backend, vs torch eager.

    TRITON_INTERPRET=1 python benchmarks/bench_precision.py                   # V = 32000, 128256, 262144; all backends
    TRITON_INTERPRET=1 python benchmarks/bench_precision.py --vocab 128256 --backends cpp triton
    TRITON_INTERPRET=1 python benchmarks/bench_precision.py --divergences tvd jsd     # some divergences only

Inputs: 8 rows of N(0, 3^2) logits in float32 (seeded), labels None, T = 1, batchmean. For each divergence the float64
reference (``fastdistill.reference.distill_loss``, autograd) gives the per-row losses and the student gradient; each
provider's error is the norm of its difference from that reference divided by the reference's norm:

    eager   the reference formula run in float32 (log_softmax, autograd): what a user writes in plain torch
    torch / cpp / triton   ``fastdistill.functional.distill_loss(backend=...)`` (triton needs TRITON_INTERPRET=1 on CPU)

The ``ratio`` columns are a provider's error over eager's on the same inputs; the project's goal is <= 1.5. Rows are
appended to benchmarks/results/precision.csv (or ``$FASTDISTILL_BENCH_RESULTS``) with versions and git sha.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import fastdistill.functional as FD  # noqa: E402
from fastdistill import _backend  # noqa: E402
from fastdistill import reference as R  # noqa: E402

VOCABS = (32000, 128256, 262144)
# (divergence, beta): beta is the JSD weight / skew alpha; forward / reverse KL and TVD ignore it
CASES = (
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.5),
    ("jsd", 0.1),
    ("tvd", 0.5),
    ("skew_forward_kl", 0.1),
    ("skew_reverse_kl", 0.1),
)
GOAL = 1.5  # a backend's error may be at most this multiple of torch eager's own fp32 error
ROWS, SCALE, SEED = 8, 3.0, 0


def make_inputs(vocab: int, rows: int = ROWS, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` rows of N(0, 3^2) float32 logits for the student and the teacher."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + vocab)
    s = torch.randn(rows, vocab, generator=g) * SCALE
    t = torch.randn(rows, vocab, generator=g) * SCALE
    return s, t


def _rows_and_grad(fn, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = s.detach().clone().requires_grad_(True)
    rows = fn(x)
    rows.sum().backward()
    return rows.detach(), x.grad


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """norm(x - ref) / norm(ref), in float64."""
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def errors(s: torch.Tensor, t: torch.Tensor, divergence: str, beta: float, backends) -> dict[str, tuple[float, float]]:
    """{provider: (loss error, grad error)} relative to the float64 reference, for eager and every backend."""

    def ref_fn(x, tt):
        return R.distill_loss(x, tt, divergence=divergence, beta=beta, reduction="none")

    ref_rows, ref_grad = _rows_and_grad(lambda x: ref_fn(x, t.double()), s.double())
    out = {}
    rows, grad = _rows_and_grad(lambda x: ref_fn(x, t), s)
    out["eager"] = (rel(rows, ref_rows), rel(grad, ref_grad))
    for b in backends:
        rows, grad = _rows_and_grad(
            lambda x, b=b: FD.distill_loss(x, t, divergence=divergence, beta=beta, reduction="none", backend=b), s
        )
        out[b] = (rel(rows, ref_rows), rel(grad, ref_grad))
    return out


def available_backends(requested) -> list[str]:
    out = []
    for b in requested:
        try:
            _backend.choose_backend(torch.device("cpu"), cpp_op="distill_loss_rows", backend=b)
        except RuntimeError as err:
            print(f"# backend {b} skipped: {err}")
            continue
        out.append(b)
    return out


def run(vocabs=VOCABS, backends=("cpp", "triton", "torch"), csv_name="precision", divergences=None) -> list[dict]:
    backends = available_backends(backends)
    print(f"# distill_loss fp32 precision: {ROWS} rows of N(0, {SCALE:g}^2) logits, seed {SEED}; {_backend.describe()}")
    print("# error = norm(x - float64 ref) / norm(ref) of the per-row losses and the student gradient; ratio = / eager")
    head = f"{'V':>7} {'divergence':<22}" + "".join(
        f" {'loss ' + p:>13} {'grad ' + p:>13}" for p in ["eager", *backends]
    )
    head += "".join(f" {'ratio ' + b:>16}" for b in backends)
    print(head)
    records = []
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    path = os.path.join(C.results_dir(), f"{csv_name}.csv")
    for vocab in vocabs:
        s, t = make_inputs(vocab)
        for divergence, beta in (c for c in CASES if divergences is None or c[0] in divergences):
            errs = errors(s, t, divergence, beta, backends)
            name = divergence if divergence in ("forward_kl", "reverse_kl", "tvd") else f"{divergence}(beta={beta:g})"
            line = f"{vocab:>7} {name:<22}" + "".join(f" {errs[p][0]:>13.2e} {errs[p][1]:>13.2e}" for p in errs)
            eager_loss, eager_grad = errs["eager"]
            for b in backends:
                ratio = max(errs[b][0] / max(eager_loss, 1e-12), errs[b][1] / max(eager_grad, 1e-12))
                line += f" {ratio:>12.2f}{'  ok' if ratio <= GOAL else ' !!'}"
            print(line, flush=True)
            new = [
                dict(
                    timestamp=stamp,
                    device=C.device_name(torch.device("cpu")),
                    provider=p,
                    vocab=vocab,
                    rows=ROWS,
                    dtype="float32",
                    divergence=divergence,
                    beta=beta,
                    loss_rel_err=f"{le:.3e}",
                    grad_rel_err=f"{ge:.3e}",
                    loss_ratio_to_eager=f"{le / max(eager_loss, 1e-12):.3f}",
                    grad_ratio_to_eager=f"{ge / max(eager_grad, 1e-12):.3f}",
                    torch=torch.__version__,
                    git_sha=C.git_sha(),
                )
                for p, (le, ge) in errs.items()
            ]
            # appended case by case: an interrupted run keeps what it measured
            exists = os.path.exists(path)
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(new[0]))
                if not exists:
                    w.writeheader()
                w.writerows(new)
            records += new
    print(f"\nrows appended to {path}")
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="*", default=list(VOCABS))
    p.add_argument("--backends", nargs="*", default=["cpp", "triton", "torch"])
    p.add_argument("--csv", default="precision")
    names = sorted({c[0] for c in CASES})
    p.add_argument("--divergences", nargs="*", choices=names, default=None, help="default: every case")
    a = p.parse_args(argv)
    torch.manual_seed(SEED)
    run(a.vocab, a.backends, a.csv, a.divergences)


if __name__ == "__main__":
    main()
