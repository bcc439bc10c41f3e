"""Input validation shared by the functional API: every message names the argument, what was given and what was
expected. One rule per kind of input, used by every loss (distill_loss, fused_linear_distill_loss, ...)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# labels / token indices: any integer dtype (values are checked where a kernel indexes with them)
INDEX_DTYPES = (
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
)


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {choices}")


def check_tensor(name: str, x, *, dtypes=FLOAT_DTYPES, min_dim: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {x.dtype}; expected one of {tuple(str(d) for d in dtypes)}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, shape: bool = True) -> None:
    """Same device, dtype and (optionally) shape, else a ValueError naming both tensors."""
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; expected the same device")
    if a.dtype != b.dtype:
        raise ValueError(f"{name_a} has dtype {a.dtype} but {name_b} has dtype {b.dtype}; expected the same dtype")
    if shape and a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; expected the same shape"
        )


def check_device(name: str, x: torch.Tensor, device: torch.device, like: str) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {like} is on {device}; expected the same device")


def check_frozen(name: str, x: torch.Tensor | None) -> None:
    """The teacher is frozen: a teacher tensor that requires grad is almost always a bug (a forgotten no_grad)."""
    if x is not None and x.requires_grad:
        raise ValueError(
            f"{name} requires grad, but the teacher is frozen and gets no gradient; compute it under "
            f"torch.no_grad() or pass {name}.detach()"
        )


def check_real(
    name: str,
    value,
    *,
    lo: float = -math.inf,
    hi: float = math.inf,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """A finite real number in [lo, hi] (open ends as asked), returned as a Python float.

    Any kind of real number is accepted: ``int`` / ``float``, numpy scalars (``np.float32(2.0)``) and one-element
    tensors (``torch.tensor(2.0)``; read on the host, and never differentiated). ``bool`` and complex values are not.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"{name} is a tensor of shape {tuple(value.shape)} and dtype {value.dtype}; expected a real number "
                "(a Python / numpy number or a one-element real tensor)"
            )
        if value.requires_grad:
            raise ValueError(f"{name} requires grad, but no gradient flows to it; pass {name}.detach() or a number")
        number = float(value.item())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_":
        number = float(value)
    else:
        raise ValueError(f"{name}={value!r} ({type(value).__name__}) is invalid; expected a real number")
    above = number > lo if lo_open else number >= lo
    below = number < hi if hi_open else number <= hi
    if math.isfinite(number) and above and below:
        return number
    if lo == -math.inf and hi == math.inf:
        expected = "a finite number"
    elif hi == math.inf:
        expected = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        expected = f"a value in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    problem = "is out of range" if math.isfinite(number) else "is invalid"
    raise ValueError(f"{name}={number!r} {problem}; expected {expected}")


def check_temperature(temperature) -> float:
    """The softmax temperature: a finite real number > 0."""
    return check_real("temperature", temperature, lo=0.0, lo_open=True)


def check_range(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """A real number in [lo, hi] (``(lo, hi]`` with ``lo_open``), returned as a float."""
    return check_real(name, value, lo=lo, hi=hi, lo_open=lo_open)


def check_labels(
    name: str,
    labels: torch.Tensor | None,
    rows_shape: torch.Size,
    device: torch.device,
    rows_desc: str = "the logits' shape without the vocabulary dimension",
) -> torch.Tensor | None:
    """Labels of any integer dtype, shaped like the rows (or flat), on ``device``; returned flat as int64."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} has dtype {labels.dtype}; expected an integer dtype (e.g. torch.long)")
    if labels.numel() != rows_shape.numel() or (labels.dim() > 1 and labels.shape != rows_shape):
        raise ValueError(
            f"{name} has shape {tuple(labels.shape)}; expected {tuple(rows_shape)} ({rows_desc}) or a flat tensor of "
            f"{rows_shape.numel()} elements"
        )
    check_device(name, labels, device, "the inputs")
    return labels.reshape(-1).long()


def check_label_values(name: str, labels: torch.Tensor, ignore_index: int, vocab: int, vocab_name: str) -> None:
    """Every label that is not ``ignore_index`` lies in [0, vocab) (a host sync: skipped under torch.compile)."""
    if torch.compiler.is_compiling():
        return
    lab = labels[labels != ignore_index]
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= vocab):
        raise ValueError(
            f"{name} lie in [{int(lab.min())}, {int(lab.max())}] (ignore_index={ignore_index} excluded); expected "
            f"[0, {vocab_name}={vocab})"
        )


def vocab_padding_ok(v_student: int, v_teacher: int) -> bool:
    """A vocabulary mismatch is padding when the sizes differ by at most max(128, 2% of the larger)."""
    return abs(v_student - v_teacher) <= max(128, int(0.02 * max(v_student, v_teacher)))


def check_vocab(v_student: int, v_teacher: int, what: str = "student vocabulary Vs and teacher vocabulary Vt") -> int:
    """The one rule for vocabularies of different sizes, used by every loss: a padding mismatch (at most max(128, 2%)
    extra entries on either side, e.g. 32000 vs 32064 or 151936 vs 152064) is accepted and the divergence runs over
    the common prefix ``[:min(Vs, Vt)]`` (the extra entries excluded from both softmaxes); a larger one is an error.
    Returns the common width."""
    if v_student != v_teacher and not vocab_padding_ok(v_student, v_teacher):
        raise ValueError(
            f"{what} differ: Vs={v_student} and Vt={v_teacher} (by {abs(v_student - v_teacher)}); only padding "
            "mismatches (at most max(128, 2%) extra entries, e.g. 32000 vs 32064) are supported: the divergence then "
            "runs over the common prefix. Map the vocabularies first for different tokenizers"
        )
    return min(v_student, v_teacher)


def check_topk_indices(name: str, indices: torch.Tensor, vocab: int, vocab_name: str = "Vs") -> None:
    """Top-k indices [N, k]: in [0, vocab) and distinct within each row (duplicates would count a token twice).

    One sort of the [N, k] indices and an adjacent compare (cheap next to the [N, V] work); a host sync, so skipped
    under torch.compile."""
    if torch.compiler.is_compiling() or indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name} lie in [{lo}, {hi}]; expected [0, {vocab_name}={vocab})")
    if indices.shape[-1] > 1:
        srt = indices.sort(dim=-1).values
        dup = srt[..., 1:] == srt[..., :-1]
        if bool(dup.any()):
            row = int(dup.reshape(-1, dup.shape[-1]).any(-1).nonzero()[0, 0])
            raise ValueError(
                f"{name} repeat a token within a row (row {row}: {srt.reshape(-1, srt.shape[-1])[row].tolist()}); "
                "expected k distinct indices per row (e.g. from torch.topk)"
            )
