"""The one table of divergences and the one table of reductions.

Every layer reads its names and integer ids from here: the functional API and its checks, the ops, the trainer
config, the Triton kernels' constexprs and the C++ kernels, whose ``csrc/divergences.h`` is generated from this file
(``python -m fastdistill.divergences``; a test fails when the checked-in header is out of step).

Conventions at the end points of ``beta`` (the JSD weight / the skew KLs' alpha) are part of the table: each entry
names the divergence it *is* at beta = 0 and at beta = 1, and ``canonical_divergence`` maps (id, beta) to the id the
kernels run, the same way on every backend.

======================  ===  =======================  =======================
name                     id   beta = 0                 beta = 1
======================  ===  =======================  =======================
``forward_kl``           0    forward_kl               forward_kl
``reverse_kl``           1    reverse_kl               reverse_kl
``jsd``                  2    forward_kl (TRL/Liger)   reverse_kl (TRL/Liger)
``tvd``                  3    tvd                      tvd
``skew_forward_kl``      4    forward_kl               zero (KL(pt || pt))
``skew_reverse_kl``      5    reverse_kl               zero (KL(ps || ps))
======================  ===  =======================  =======================

``zero`` is not a kernel id: the skew kernels handle beta = 1 themselves (loss 0, gradient 0, exactly).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Divergence:
    """One divergence D(p_t, p_s) between the teacher and student distributions."""

    id: int  # the kernel ABI id (Triton constexpr, C++ enum)
    name: str
    at_beta0: str  # what it is at beta = 0: a divergence name, or "zero"
    at_beta1: str  # what it is at beta = 1
    formula: str


DIVERGENCE_TABLE: tuple[Divergence, ...] = (
    Divergence(0, "forward_kl", "forward_kl", "forward_kl", "KL(pt || ps)"),
    Divergence(1, "reverse_kl", "reverse_kl", "reverse_kl", "KL(ps || pt)"),
    Divergence(
        2, "jsd", "forward_kl", "reverse_kl", "beta KL(pt || m) + (1 - beta) KL(ps || m), m = (1-beta) ps + beta pt"
    ),
    Divergence(3, "tvd", "tvd", "tvd", "0.5 sum |ps - pt|"),
    Divergence(4, "skew_forward_kl", "forward_kl", "zero", "KL(pt || beta pt + (1 - beta) ps)"),
    Divergence(5, "skew_reverse_kl", "reverse_kl", "zero", "KL(ps || beta ps + (1 - beta) pt)"),
)
DIVERGENCES: tuple[str, ...] = tuple(d.name for d in DIVERGENCE_TABLE)
DIVERGENCE_ID: dict[str, int] = {d.name: d.id for d in DIVERGENCE_TABLE}
# divergences whose loss the kernels get in two passes (no per-element a_j pass): the plain KLs
TWO_PASS_IDS: tuple[int, ...] = (DIVERGENCE_ID["forward_kl"], DIVERGENCE_ID["reverse_kl"])


def canonical_divergence(divergence: int | str, beta: float) -> int:
    """The id the kernels run for ``divergence`` at ``beta``: the table's beta = 0 / 1 conventions applied (JSD and
    the skew KLs at an end point are plain KLs; "zero" keeps the skew id, whose kernels return exactly 0)."""
    d = DIVERGENCE_TABLE[DIVERGENCE_ID[divergence] if isinstance(divergence, str) else divergence]
    target = d.at_beta0 if beta == 0.0 else d.at_beta1 if beta == 1.0 else d.name
    return d.id if target == "zero" else DIVERGENCE_ID[target]


@dataclass(frozen=True)
class Reduction:
    """How per-row (or per-element) losses become the returned loss."""

    id: int
    name: str
    meaning: str


REDUCTION_TABLE: tuple[Reduction, ...] = (
    Reduction(0, "none", "no reduction: one value per row (per element for kl_div)"),
    Reduction(1, "sum", "sum over rows"),
    Reduction(2, "batchmean", "sum over rows / number of valid rows (input.size(0) for kl_div); 0 when none is valid"),
    Reduction(3, "mean", "sum over every element / number of elements (kl_div only, as torch)"),
)
REDUCTIONS_ALL: tuple[str, ...] = tuple(r.name for r in REDUCTION_TABLE)
REDUCTION_ID: dict[str, int] = {r.name: r.id for r in REDUCTION_TABLE}
# what the distillation losses accept (distill_loss, fused_linear_distill_loss, attention / affinity losses)
REDUCTIONS: tuple[str, ...] = ("none", "sum", "batchmean")


# ---------------------------------------------------------------------------------------------------------------------
# C++ header generated from the table
# ---------------------------------------------------------------------------------------------------------------------

HEADER_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "divergences.h")


def _camel(name: str) -> str:
    return "k" + "".join(w.upper() if w in ("kl", "jsd", "tvd") else w.capitalize() for w in name.split("_"))


def cpp_header() -> str:
    """The text of ``csrc/divergences.h``: the divergence ids and their beta = 0 / 1 conventions."""
    lines = [
        "// GENERATED from fastdistill/divergences.py by `python -m fastdistill.divergences`; do not edit.",
        "// The divergence and reduction ids the kernels share with Python (tests/test_divergence_table.py checks that",
        "// this file matches the table).",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "namespace fastdistill {",
        "",
        "enum Divergence : int64_t {",
    ]
    lines += [f"  {_camel(d.name)} = {d.id},  // {d.formula}" for d in DIVERGENCE_TABLE]
    lines += [
        "};",
        f"constexpr int64_t kNumDivergences = {len(DIVERGENCE_TABLE)};",
        f'constexpr const char* kDivergenceNames = "{", ".join(f"{d.id} {d.name}" for d in DIVERGENCE_TABLE)}";',
        "",
        "enum Reduction : int64_t {",
    ]
    lines += [f"  kReduction{r.name.capitalize()} = {r.id}," for r in REDUCTION_TABLE]
    lines += [
        "};",
        "",
        "// The id the kernels run for (divergence, beta): the table's conventions at beta = 0 and beta = 1.",
        "constexpr int64_t canonical_divergence(int64_t divergence, double beta) {",
    ]
    for d in DIVERGENCE_TABLE:
        for beta, target in ((0.0, d.at_beta0), (1.0, d.at_beta1)):
            if target not in (d.name, "zero"):
                lines.append(f"  if (divergence == {_camel(d.name)} && beta == {beta:.1f}) return {_camel(target)};")
    lines += ["  return divergence;", "}", "", "}  // namespace fastdistill", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Write (default) or ``--check`` csrc/divergences.h."""
    argv = sys.argv[1:] if argv is None else argv
    text = cpp_header()
    if "--check" in argv:
        with open(HEADER_PATH) as f:
            ok = f.read() == text
        print(f"{HEADER_PATH}: {'up to date' if ok else 'out of date; run python -m fastdistill.divergences'}")
        return 0 if ok else 1
    with open(HEADER_PATH, "w") as f:
        f.write(text)
    print(f"wrote {HEADER_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
