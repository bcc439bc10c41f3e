"""Teacher targets as one record: what a student step needs from its teacher, whoever produced it.

A ``TopKTargets`` holds, per sequence and position, the teacher's k most probable token ids and their log-probs at the
distillation temperature, plus two exact per-position scalars per configured temperature:

- ``lse[..., i]``: the teacher's log-sum-exp of ``z / T_i`` (``z`` the logits), so the top-k logits
  ``z_j = T_0 (logprob_j + lse_0)`` and the log-probs at any other listed temperature can be recovered;
- ``log_tail[..., i]``: the log of the teacher's probability mass *outside* the top k at ``T_i``, computed by the
  teacher in log space (a log-sum-exp over the other V - k tokens), not as ``1 - sum(top-k)``, which is rounding
  noise once the top k hold more than 0.9999 of the mass.

It is the one format of teacher targets: the cache on disk (``fastdistill.cache``) stores it coded (below), a teacher
pool sends it uncoded over the bridge (:meth:`TopKTargets.wire`), and the trainer's loss takes it from either source
(``DistillLoss`` turns it into ``fused_linear_distill_loss(..., teacher_topk=...)`` with :meth:`at_temperature`).

The compact coding (``encode`` / ``decode``), chosen for size under zstd and for an error that the loss does not see:

- indices sorted ascending within a position and stored as deltas (the first as is) in ``uint16`` when V <= 65536,
  else ``uint32``, byte planes apart (all low bytes of a sequence, then all high bytes: Parquet's byte-stream-split
  idea), so zstd sees the nearly constant high bytes together; sorting loses nothing (the loss is a sum over the k
  buckets, order-free). Measured on the demo data at k = 64: 71 B/token against 77 for plain uint16 deltas;
- log-probs as ``uint8`` steps of ``logprob_step`` nats below the position's maximum (clamped at 255 steps, i.e. more
  than 63 nats below the top entry at the default 1/4). The maximum itself is
  not stored: decoding shifts every position's log-probs by one constant so that their mass is exactly
  ``1 - exp(log_tail)``, which fixes the level and makes the rounding errors average out instead of biasing the sum;
- ``lse`` and ``log_tail`` as float32 (8 bytes per position and temperature).

A decoded log-prob is within ``logprob_step`` of the teacher's (rounding <= step / 2, plus the shared shift, also
<= step / 2).
Measured on the demo data at k = 64 (``benchmarks/bench_teacher_cache.py``): steps of 1/16, 1/8, 1/4 nat give 139, 131,
122 bytes/token and a KD loss within 6e-5, 1e-5, 2e-4 (relative) of the loss from the exact fp32 top-k: the errors
are unbiased and average out over the k entries, so the default is the smallest of the three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fastdistill import _backend

CODING = "delta-sorted-idx-bytesplit/u8-logprob-steps/v1"
DEFAULT_LOGPROB_STEP = 1.0 / 4.0


@dataclass
class TopKTargets:
    """Teacher top-k targets for a batch of sequences.

    Shapes: ``indices`` [B, T, k] int64 (distinct within a position), ``logprobs`` [B, T, k] float32 (log-probs at
    ``temperatures[0]``, the distillation temperature), ``lse`` and ``log_tail`` [B, T, n_temps] float32.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    lse: torch.Tensor
    log_tail: torch.Tensor
    temperatures: tuple[float, ...]

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def at_temperature(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [B, T, k] at ``temperature``, with mass exactly 1 - tail, and indices): the ``teacher_topk``
        pair for ``fused_linear_distill_loss`` with ``topk_values='logprobs'``. ``temperature`` must be one of
        ``temperatures``."""
        i = _temperature_index(self.temperatures, temperature)
        lp = self.logprobs.float()
        if i != 0:  # top-k logits from the T0 record, then log-probs at T_i (same top-k set: softmax is monotone)
            t0, ti = self.temperatures[0], self.temperatures[i]
            lp = (lp + self.lse[..., :1]) * (t0 / ti) - self.lse[..., i : i + 1]
        return renormalize_to_tail(lp, self.log_tail[..., i]), self.indices

    def select(self, rows) -> TopKTargets:
        return TopKTargets(
            self.indices[rows], self.logprobs[rows], self.lse[rows], self.log_tail[rows], self.temperatures
        )

    def to(self, device, non_blocking: bool = False) -> TopKTargets:
        """The record on ``device`` (indices as int64, the loss's index type)."""
        return TopKTargets(
            self.indices.to(device, torch.long, non_blocking=non_blocking),
            *(getattr(self, n).to(device, non_blocking=non_blocking) for n in ("logprobs", "lse", "log_tail")),
            self.temperatures,
        )

    # -- the wire form: the same record, uncoded, as fixed-shape tensors (one message of a teacher pool) --------------
    @staticmethod
    def wire_layout(rows: int, seq_len: int, k: int, n_temps: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """``(name, dtype, shape)`` of the record's fields for ``rows`` sequences: what a teacher pool sends a student
        rank (``fastdistill.train.bridge.Layout``). Uncoded: the coding is lossy and costs the sender CPU time, and
        a bridge message lives only until the student consumes it. 8 k + 8 n_temps bytes per token."""
        return [
            ("topk_indices", torch.int32, (rows, seq_len, k)),  # token ids < 2^31
            ("topk_logprobs", torch.float32, (rows, seq_len, k)),
            ("topk_lse", torch.float32, (rows, seq_len, n_temps)),
            ("topk_log_tail", torch.float32, (rows, seq_len, n_temps)),
        ]

    def wire(self) -> dict[str, torch.Tensor]:
        """The fields of :meth:`wire_layout` (views; ``Layout.pack`` copies them into the message)."""
        return {
            "topk_indices": self.indices.to(torch.int32),
            "topk_logprobs": self.logprobs.float(),
            "topk_lse": self.lse.float(),
            "topk_log_tail": self.log_tail.float(),
        }

    @classmethod
    def from_wire(cls, fields: dict[str, torch.Tensor], temperatures: tuple[float, ...]) -> TopKTargets:
        """Inverse of :meth:`wire` (exact)."""
        return cls(
            fields["topk_indices"].long(),
            fields["topk_logprobs"],
            fields["topk_lse"],
            fields["topk_log_tail"],
            tuple(float(t) for t in temperatures),
        )


def _temperature_index(temperatures, temperature: float) -> int:
    for i, t in enumerate(temperatures):
        if math.isclose(t, temperature, rel_tol=1e-9, abs_tol=0.0):
            return i
    raise ValueError(
        f"temperature {temperature} is not among the record's temperatures {list(temperatures)}; rebuild the cache "
        "with it listed (teacher-cache build cache.temperatures=[...])"
    )


def renormalize_to_tail(logprobs: torch.Tensor, log_tail: torch.Tensor) -> torch.Tensor:
    """Shift each position's log-probs [..., k] by one constant so that sum(exp) = 1 - exp(log_tail) exactly."""
    lp = logprobs.double()
    top_mass = torch.log((-torch.expm1(log_tail.double())).clamp_min(1e-300))  # log(1 - tail), in log space
    return (lp + (top_mass - torch.logsumexp(lp, dim=-1))[..., None]).float()


@torch.no_grad()
def topk_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    temperatures: tuple[float, ...],
    chunk_rows: int = 512,
    backend: str | None = None,
) -> TopKTargets:
    """The teacher's ``TopKTargets`` from its final hidden states [B, T, H] and lm_head weight [V, H], a chunk of
    rows at a time (no [B*T, V] tensor), on ``hidden``'s device. Everything is computed in float32. ``backend``:
    ``"cpp"`` (the C++ row kernel ``fastdistill::topk_targets_rows``, CPU), ``"torch"``, or None / ``"auto"``
    (``FASTDISTILL_BACKEND``, else the C++ kernel where it is built and the tensors are on a CPU).

    The one producer of top-k targets: ``teacher-cache build`` (then coded to disk), a teacher pool (sent over the
    bridge) and the colocated top-k loss (``losses[].topk``) all call it."""
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k={k}: expected 1 <= k <= V={weight.shape[0]}")
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    n, nt = h.shape[0], len(temperatures)
    indices = torch.empty(n, k, dtype=torch.long, device=h.device)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=h.device)
    lse = torch.empty(n, nt, dtype=torch.float32, device=h.device)
    log_tail = torch.empty(n, nt, dtype=torch.float32, device=h.device)
    w = weight.float() if weight.dtype != torch.float32 else weight
    # the C++ row kernel on a CPU (one selection pass + one exp pass per temperature: ~3x faster than torch's topk,
    # exp and two sums); the torch ops below elsewhere (GPUs, no compiled extension, or backend="torch")
    choice = backend or _backend.requested_backend()
    choice = "torch" if choice == "triton" else choice  # no Triton kernel of its own: the torch ops run on GPUs
    cpp = _backend.choose_backend(h.device, cpp_op="topk_targets_rows", backend=choice, has_triton=False) == "cpp"
    # two [C, V] buffers reused by every chunk (fresh 100 MB tensors per chunk cost more in page faults than the maths)
    rows = min(chunk_rows, max(n, 1))
    z_buf = torch.empty(rows, w.shape[0], dtype=torch.float32, device=h.device)
    e_buf = None if cpp else torch.empty_like(z_buf)
    for a in range(0, n, chunk_rows):
        c = min(chunk_rows, n - a)
        z = z_buf[:c]
        torch.matmul(h[a : a + c].float(), w.t(), out=z)  # [C, V]
        if cpp:
            idx, top_z, lse[a : a + c], log_tail[a : a + c] = torch.ops.fastdistill.topk_targets_rows(
                z, k, [float(t) for t in temperatures]
            )
            logprobs[a : a + c] = top_z / temperatures[0] - lse[a : a + c, :1]
            indices[a : a + c] = idx
            continue
        e = e_buf[:c]
        top_z, idx = torch.topk(z, k, dim=-1, sorted=False)
        idx, order = idx.sort(dim=-1)
        top_z = top_z.gather(1, order)
        z_max = top_z.max(dim=-1, keepdim=True).values
        for i, t in enumerate(temperatures):
            torch.sub(z, z_max, out=e)
            if t != 1.0:
                e.div_(t)
            e.exp_()  # [C, V], max entry 1
            # the tail: a sum over the other V - k tokens themselves (not 1 - sum(top k), which cancels); the total
            # is tail + top k, two sums of positive terms (one pass over [C, V] fewer than summing e twice)
            rest = e.scatter_(1, idx, 0.0).sum(dim=-1)
            top = ((top_z - z_max) / t).exp().sum(dim=-1)
            log_total, log_rest = torch.log(rest + top), torch.log(rest)
            lse_t = z_max[:, 0] / t + log_total
            lse[a : a + c, i] = lse_t
            log_tail[a : a + c, i] = log_rest - log_total
            if i == 0:
                logprobs[a : a + c] = top_z / t - lse_t[:, None]
        indices[a : a + c] = idx
    return TopKTargets(
        indices.view(*lead, k),
        logprobs.view(*lead, k),
        lse.view(*lead, nt),
        log_tail.view(*lead, nt),
        tuple(float(t) for t in temperatures),
    )


def index_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def encode(targets: TopKTargets, vocab_size: int, logprob_step: float = DEFAULT_LOGPROB_STEP) -> dict[str, np.ndarray]:
    """The compact coding of one record, per sequence: ``index_deltas`` [B, T*k*w] uint8 (the byte planes of the
    uint16 / uint32 deltas, w = 2 / 4), ``logprob_steps``
    [B, T*k] uint8, ``lse`` and ``log_tail`` [B, T*n_temps] float32."""
    targets = targets.to("cpu")
    idx = targets.indices.numpy()
    b = idx.shape[0]
    if idx.min(initial=0) < 0 or idx.max(initial=0) >= vocab_size:
        raise ValueError(f"indices lie outside [0, {vocab_size})")
    srt = np.sort(idx, axis=-1)
    if not np.array_equal(srt, idx):
        raise ValueError("indices must be sorted ascending within each position (topk_from_hidden sorts them)")
    deltas = np.diff(srt, axis=-1, prepend=0).astype(index_dtype(vocab_size)).reshape(b, -1)
    planes = deltas.view(np.uint8).reshape(b, -1, deltas.dtype.itemsize).transpose(0, 2, 1)  # [B, bytes, T*k]
    lp = targets.logprobs.numpy().astype(np.float64)
    steps = np.rint((lp.max(axis=-1, keepdims=True) - lp) / logprob_step)
    steps = np.clip(steps, 0, 255).astype(np.uint8)
    return {
        "index_deltas": np.ascontiguousarray(planes).reshape(b, -1),
        "logprob_steps": steps.reshape(b, -1),
        "lse": targets.lse.numpy().astype("<f4").reshape(b, -1),
        "log_tail": targets.log_tail.numpy().astype("<f4").reshape(b, -1),
    }


def decode(
    coded: dict[str, np.ndarray], k: int, temperatures: tuple[float, ...], logprob_step: float = DEFAULT_LOGPROB_STEP
) -> TopKTargets:
    """Inverse of :func:`encode` (log-probs within ``logprob_step / 2`` of the stored ones, up to one shared shift
    per position that makes their mass exactly 1 - tail)."""
    planes = np.asarray(coded["index_deltas"], dtype=np.uint8)
    b, nt = planes.shape[0], len(temperatures)
    width = planes.shape[1] // np.asarray(coded["logprob_steps"]).reshape(b, -1).shape[1]  # bytes per index
    deltas = np.ascontiguousarray(planes.reshape(b, width, -1).transpose(0, 2, 1)).view(f"<u{width}")
    idx = np.cumsum(deltas.reshape(b, -1, k).astype(np.int64), axis=-1)
    steps = np.asarray(coded["logprob_steps"]).reshape(b, -1, k)
    lse = torch.from_numpy(np.asarray(coded["lse"], dtype=np.float32).reshape(b, -1, nt).copy())
    log_tail = torch.from_numpy(np.asarray(coded["log_tail"], dtype=np.float32).reshape(b, -1, nt).copy())
    lp = torch.from_numpy(steps.astype(np.float32) * np.float32(-logprob_step))
    lp = renormalize_to_tail(lp, log_tail[..., 0])
    return TopKTargets(torch.from_numpy(idx), lp, lse, log_tail, tuple(float(t) for t in temperatures))
