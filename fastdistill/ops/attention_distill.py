"""Attention-distribution distillation op (MiniLM / MiniLMv2): KL(A_t || A_s) per query row without forming [L, L].

Contract shared by the backends, for q/k of shape [B, H, L, D] (student and teacher may differ in D, not in B, H, L):

    S_s = scale_s * q_s k_s^T,  S_t = scale_t * q_t k_t^T   (+ -inf on masked keys)
    rows[b, h, i] = sum_j P_t[i, j] (log P_t[i, j] - log P_s[i, j]),  P = softmax(S) over j       [B, H, L]
    grad_q[i] = scale_s sum_j w[i] (P_s - P_t)[i, j] k_s[j],  grad_k[j] = scale_s sum_i w[i] (P_s - P_t)[i, j] q_s[i]

with ``w`` a per-row weight (the reduction's 1 / (H n_valid), or grad_output for ``reduction="none"``). Rows whose
query is padded, or that have no key to attend to, give 0 and no gradient.

Backends:
    triton  flash-style kernels (``fastdistill.kernels.attention_distill``): one pass over key tiles per query block
            with online log-sum-exp for both models, then dq / dk passes that recompute the tiles; extra memory
            O(B H L). CUDA, or CPU under TRITON_INTERPRET=1.
    torch   tiled torch: blocks of query rows (and of batch-heads) whose full key rows fit an element budget; each
            block's [rows, L] scores give the exact row log-sum-exp, the loss and the gradient. Extra memory
            O(block x L), never [L, L] per head. On CPU the batch-heads are split over torch.get_num_threads()
            Python threads that each run single-threaded ops (``TORCH_CPU_THREADS``).

For ``sum`` / ``batchmean`` the gradient is computed inside the forward pass (the scores are already there) and
backward only scales it by grad_output (always: q / k are input-sized, so it is cheap and needs no sync); for
``none`` backward recomputes the tiles with w = grad_output.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from fastdistill import _backend
from fastdistill.divergences import REDUCTION_ID

# elements of one [rows, L] score block of the torch path (a few such fp32 blocks live at once: ~8 MiB each)
TORCH_BLOCK_ELEMENTS = 1 << 21
# CPU: split the batch-heads over torch.get_num_threads() Python threads running single-threaded ops (see _tiled_torch)
TORCH_CPU_THREADS = True


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    return _backend.choose_backend(device, backend=backend)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_rows(attention_mask: torch.Tensor | None, causal: bool, B: int, L: int, device) -> torch.Tensor:
    """Boolean [B, L]: query rows that count (query kept and at least one key it may attend to)."""
    if attention_mask is None:
        return torch.ones(B, L, dtype=torch.bool, device=device)
    keep = attention_mask.bool()
    if causal:  # a kept query i always has key i itself
        return keep
    return keep & keep.any(-1, keepdim=True)


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """In place: scores ``x`` [..., L] (-inf on hidden keys) become log-probabilities; returns the probabilities (0 on
    hidden keys; all 0 on rows with no key). One exp per element, unlike logsumexp followed by exp."""
    m = x.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)  # rows with no key: shift by 0 (no -inf - -inf)
    p = x.sub_(m).exp()
    total = p.sum(-1, keepdim=True)
    total = torch.where(total == 0, 1.0, total)
    x.sub_(total.log())
    return p.div_(total)


def _cpu_workers(device: torch.device, n_heads: int) -> int:
    if device.type != "cpu" or not TORCH_CPU_THREADS:
        return 1
    return max(1, min(torch.get_num_threads(), n_heads))


def _tiled_torch(sq, sk, tq, tk, attention_mask, causal, ss, st, row_weight, need_rows=True):
    """Torch backend of the contract. ``row_weight`` [B, H, L] (None: no gradient). Returns (rows, dq, dk)."""
    B, H, L, Ds = sq.shape
    cdt = compute_dtype(sq.dtype)
    N = B * H
    # scales folded into the queries once ([N, L, D]) instead of into every [rows, L] score block
    sq_, sk_ = sq.reshape(N, L, Ds).to(cdt) * ss, sk.reshape(N, L, Ds).to(cdt)
    tq_, tk_ = tq.reshape(N, L, -1).to(cdt) * st, tk.reshape(N, L, -1).to(cdt)
    key_keep = None if attention_mask is None else attention_mask.bool().repeat_interleave(H, 0)  # [N, L]
    rows_ok = valid_rows(attention_mask, causal, B, L, sq.device).repeat_interleave(H, 0)  # [N, L]
    rows = torch.zeros(N, L, dtype=cdt, device=sq.device)
    need_grad = row_weight is not None
    if need_grad:
        w = row_weight.reshape(N, L).to(cdt) * rows_ok
        dq = torch.zeros(N, L, Ds, dtype=cdt, device=sq.device)
        dk = torch.zeros(N, L, Ds, dtype=cdt, device=sq.device)
    cols = torch.arange(L, device=sq.device)

    def run(h0: int, h1: int, budget: int) -> None:
        """Batch-heads [h0, h1): as many heads and query rows per block as fit ``budget`` (>= 16 rows)."""
        nh = h1 - h0
        q_block = min(L, max(16, budget // max(nh * L, 1)))
        n_block = max(1, min(nh, budget // (q_block * L)))
        for n0 in range(h0, h1, n_block):
            n1 = min(h1, n0 + n_block)
            for i0 in range(0, L, q_block):
                i1 = min(L, i0 + q_block)
                kn = i1 if causal else L  # causal: keys after the block's last query are never visible
                # keys each row may see: padding [n, 1, kn] and causal [1, rows, kn]
                keep = None
                if key_keep is not None:
                    keep = key_keep[n0:n1, None, :kn]
                if causal:
                    c = (cols[None, :kn] <= torch.arange(i0, i1, device=sq.device)[:, None])[None]
                    keep = c if keep is None else keep & c
                if keep is not None:
                    keep = keep.expand(n1 - n0, i1 - i0, kn)
                s_blk = torch.bmm(sq_[n0:n1, i0:i1], sk_[n0:n1, :kn].transpose(1, 2))  # scores S_s, [n, rows, kn]
                t_blk = torch.bmm(tq_[n0:n1, i0:i1], tk_[n0:n1, :kn].transpose(1, 2))  # scores S_t, [n, rows, kn]
                if keep is not None:
                    s_blk.masked_fill_(~keep, float("-inf"))
                    t_blk.masked_fill_(~keep, float("-inf"))
                p_t = _log_softmax_(t_blk)  # t_blk is now log P_t
                p_s = _log_softmax_(s_blk)  # s_blk is now log P_s
                if need_rows:
                    diff = t_blk.sub_(s_blk)  # log P_t - log P_s (NaN on hidden keys: -inf - -inf)
                    if keep is not None:
                        diff.masked_fill_(~keep, 0.0)
                    rows[n0:n1, i0:i1] = diff.mul_(p_t).sum(-1)
                if need_grad:
                    d_s = p_s.sub_(p_t)  # P_s - P_t, exactly 0 on hidden keys; the row weights go on the thin sides
                    w_blk = w[n0:n1, i0:i1, None]  # [n, rows, 1]
                    dq[n0:n1, i0:i1] = torch.bmm(d_s, sk_[n0:n1, :kn]).mul_(w_blk)  # times scale_s below
                    dk[n0:n1, :kn].baddbmm_(d_s.transpose(1, 2), sq_[n0:n1, i0:i1] * w_blk)  # sq_ has scale_s
                del s_blk, t_blk, p_s, p_t

    workers = _cpu_workers(sq.device, N)
    # worker threads inherit neither the grad mode nor the dispatch modes (fake / functional tensors under
    # torch.compile and opcheck): run serially whenever a mode is active, and the workers under no_grad
    if workers == 1 or torch._C._len_torch_dispatch_stack() > 0:
        run(0, N, TORCH_BLOCK_ELEMENTS)
    else:
        # one thread per slice of batch-heads, each running single-threaded torch ops: a block's ops are many
        # short parallel regions, whose barriers dominate when cores are shared; disjoint heads -> no races on dk
        bounds = [N * i // workers for i in range(workers + 1)]

        def job(i: int) -> None:
            torch.set_num_threads(1)  # this worker thread only (OpenMP thread-local setting)
            with torch.no_grad():
                run(bounds[i], bounds[i + 1], TORCH_BLOCK_ELEMENTS // workers)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(job, range(workers)))
    rows = rows * rows_ok
    if not need_grad:
        return rows.reshape(B, H, L), sq.new_empty(0), sk.new_empty(0)
    dq.mul_(ss)
    return rows.reshape(B, H, L), dq.reshape(B, H, L, Ds).to(sq.dtype), dk.reshape(B, H, L, Ds).to(sk.dtype)


def attention_distill_rows(sq, sk, tq, tk, attention_mask, causal, ss, st, row_weight, backend, need_rows=True):
    """Run the contract on an already-resolved backend: (rows [B, H, L], grad_q, grad_k); grads are empty tensors
    when ``row_weight`` is None."""
    if backend == "triton":
        from fastdistill.ops.attention_distill_triton import attention_distill_triton

        return attention_distill_triton(sq, sk, tq, tk, attention_mask, causal, ss, st, row_weight, need_rows)
    if backend != "torch":
        raise RuntimeError(f"backend {backend!r} has no attention_distill kernel; use 'triton' or 'torch'")
    return _tiled_torch(sq, sk, tq, tk, attention_mask, causal, ss, st, row_weight, need_rows)


def _row_weight(attention_mask, causal, B, H, L, reduction, device):
    """The reduction's d loss / d rows as a [B, H, L] float32 tensor (no host sync)."""
    ok = valid_rows(attention_mask, causal, B, L, device)
    w = ok.to(torch.float32)
    if reduction == REDUCTION_ID["batchmean"]:
        w = w / (H * ok.sum().clamp(min=1)).to(torch.float32)
    return w[:, None, :].expand(B, H, L)


@torch.library.custom_op("fastdistill::attention_distill", mutates_args=())
def attention_distill_op(
    student_q: torch.Tensor,
    student_k: torch.Tensor,
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    student_scale: float,
    teacher_scale: float,
    reduction: int,
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: (loss, grad_q, grad_k). For sum / batchmean with ``need_grad`` the grads are d loss / d q_s and
    d loss / d k_s; otherwise they are empty (``none`` recomputes them in backward with the row weights)."""
    B, H, L, _ = student_q.shape
    fused_grad = need_grad and reduction != REDUCTION_ID["none"]
    w = _row_weight(attention_mask, causal, B, H, L, reduction, student_q.device) if fused_grad else None
    rows, dq, dk = attention_distill_rows(
        student_q, student_k, teacher_q, teacher_k, attention_mask, causal, student_scale, teacher_scale, w, backend
    )
    rows = rows.to(compute_dtype(student_q.dtype))
    if reduction == REDUCTION_ID["none"]:
        loss = rows
    elif reduction == REDUCTION_ID["sum"]:
        loss = rows.sum()
    else:
        n = valid_rows(attention_mask, causal, B, L, student_q.device).sum().clamp(min=1)
        loss = rows.sum() / (H * n)
    return loss, dq, dk


@attention_distill_op.register_fake
def _(student_q, student_k, teacher_q, teacher_k, attention_mask, causal, ss, st, reduction, need_grad, backend):
    B, H, L, _ = student_q.shape
    dt = compute_dtype(student_q.dtype)
    loss = student_q.new_empty((B, H, L) if reduction == REDUCTION_ID["none"] else (), dtype=dt)
    fused = need_grad and reduction != REDUCTION_ID["none"]
    dq = torch.empty_like(student_q, memory_format=torch.contiguous_format) if fused else student_q.new_empty(0)
    dk = torch.empty_like(student_k, memory_format=torch.contiguous_format) if fused else student_k.new_empty(0)
    return loss, dq, dk


@torch.library.custom_op("fastdistill::attention_distill_backward", mutates_args=())
def attention_distill_backward_op(
    student_q: torch.Tensor,
    student_k: torch.Tensor,
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    student_scale: float,
    teacher_scale: float,
    row_weight: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient w.r.t. the student's q and k for per-row weights ``row_weight`` [B, H, L] (recomputes the tiles)."""
    _, dq, dk = attention_distill_rows(
        student_q,
        student_k,
        teacher_q,
        teacher_k,
        attention_mask,
        causal,
        student_scale,
        teacher_scale,
        row_weight.float(),
        backend,
        need_rows=False,
    )
    return dq, dk


@attention_distill_backward_op.register_fake
def _(student_q, student_k, teacher_q, teacher_k, attention_mask, causal, ss, st, row_weight, backend):
    return (
        torch.empty_like(student_q, memory_format=torch.contiguous_format),
        torch.empty_like(student_k, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the dq / dk outputs get no gradient: no zero q / k-sized tensors in backward
    sq, sk, tq, tk, mask, causal, ss, st, reduction, need_grad, backend = inputs
    ctx.reduction, ctx.need_grad = reduction, need_grad
    ctx.args = (causal, ss, st, backend)
    if reduction == REDUCTION_ID["none"]:
        ctx.save_for_backward(sq, sk, tq, tk, mask)
    else:
        ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad_loss, _gq, _gk):
    nones = (None,) * 9
    if not ctx.need_grad:
        raise RuntimeError("attention_distill was run with need_grad=False; its student gradient was not computed")
    if ctx.reduction == REDUCTION_ID["none"]:
        sq, sk, tq, tk, mask = ctx.saved_tensors
        causal, ss, st, backend = ctx.args
        dq, dk = attention_distill_backward_op(sq, sk, tq, tk, mask, causal, ss, st, grad_loss, backend)
        return (dq, dk) + nones
    dq, dk = ctx.saved_tensors
    # always scaled: q / k are input-sized, so the multiply is negligible next to the O(L^2) forward, and testing
    # grad_output == 1 would cost a device sync and break tracing
    return (dq * grad_loss.to(dq.dtype), dk * grad_loss.to(dk.dtype)) + nones


attention_distill_op.register_autograd(_backward, setup_context=_setup_context)
